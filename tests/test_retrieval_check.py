"""The passkey check after uptraining: when it runs, what it refuses before training, and, on the real
SmolLM2, that a student which cannot retrieve is caught (metrics row, model card, warning)."""

from __future__ import annotations

import json
import warnings

import pytest

from kvsurgeon.convert.evaluation.long_context import LongContextResult
from kvsurgeon.convert.train.recipe import RecipeError, recipe_from_dict
from kvsurgeon.convert.train.retrieval_check import layer_choice_hint, passkey_check_options, passkey_warning
from kvsurgeon.convert.train.uptrain import uptrain

from conftest import save_tiny


def _recipe(source, out, seq_len, **over) -> dict:
    data = {"train": "t.jsonl", "seq_len": seq_len, "eval": None} | over.pop("data", {})
    return {"source": str(source), "output": str(out), "conversion": {"to": "mqa", "method": "mean"}, "data": data,
            "stages": [{"name": "e2e", "tokens": seq_len, "trainable": "attention"}], "precision": "fp32", **over}


def test_the_check_follows_retrieval_and_fits_the_last_stage(smollm2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    opts = lambda seq_len=2048, **over: passkey_check_options(recipe_from_dict(_recipe(smollm2, tmp_path, seq_len, **over)), tok)  # noqa: E731
    assert opts() is None  # no retrieval windows trained: off unless asked for
    auto = opts(data={"retrieval": 0.5}, seed=3)
    assert (auto.tasks, auto.lengths, auto.depths, auto.samples, auto.seed) == (("passkey",), (2048,), 5, 1, 3)
    assert opts(data={"retrieval": 0.5}, eval_passkey=0) is None
    assert opts(eval_passkey=3).depths == 3
    # the last stage's length, not data.seq_len: a 2K-then-4K curriculum is checked at 4K
    two = opts(data={"retrieval": 0.5}, stages=[{"tokens": 2048, "seq_len": 2048}, {"tokens": 4096, "seq_len": 4096}])
    assert two.lengths == (4096,)
    assert opts(32, data={"retrieval": 0.5}) is None  # too short to hold a prompt, and not asked for: skipped
    with pytest.raises(RecipeError, match=r"eval_passkey: length 64 is too short for the passkey prompt .*"
                                          r"the last stage's seq_len \(64\) must hold a passkey prompt: lengthen it, or set eval_passkey: 0"):
        opts(64, eval_passkey=3)
    with pytest.raises(RecipeError, match=r"eval_passkey: a number of prompts, >= 0 \(0: off; null: 5 with data.retrieval\), got -1"):
        opts(eval_passkey=-1)


def test_a_check_asked_for_at_a_too_short_length_is_refused_before_anything_is_written(tmp_path, text_file):
    src = save_tiny(tmp_path / "src", max_shard_size="1GB")
    r = recipe_from_dict(_recipe(src, tmp_path / "run", 32, data={"train": str(text_file)}, eval_passkey=5))
    with pytest.raises(RecipeError, match=r"eval_passkey: lengths \[32\]: each must be at least 64 tokens; the last stage's seq_len \(32\)"):
        uptrain(r, progress=False)
    assert not (tmp_path / "run").exists()


def _result(name: str, retrieved: list[bool], logprob: float) -> LongContextResult:
    n = len(retrieved)
    return LongContextResult(model=name, options={}, depths=[i / max(1, n - 1) for i in range(n)],
                             passkey_by_length={"4096": sum(retrieved) / n}, passkey_logprob_by_length={"4096": logprob},
                             samples={"passkey": [{"retrieved": x} for x in retrieved]})


def test_the_warning_names_a_collapse_and_the_command_that_measures_it():
    src = _result("source", [True, True, True, True, False], -0.91)
    msg = passkey_warning(src, _result("after", [False] * 5, -12.95), "runs/x/final", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert msg.startswith("passkey at 4096 tokens after uptraining: 0/5 retrieved, the source 4/5 (key log-prob -12.95 vs -0.91)")
    assert "`kvsurgeon eval runs/x/final --reference HuggingFaceTB/SmolLM2-135M-Instruct --tasks passkey --lengths 4096`" in msg
    # half the source's or more is the noise of 5 prompts, not a collapse; so is a source that retrieves nothing
    assert passkey_warning(src, _result("after", [True, True, False, False, False], -3.0), "f", "s") is None
    assert passkey_warning(src, _result("after", [True, False, False, False, False], -5.0), "f", "s") is not None
    nothing = _result("source", [False] * 5, -9.0)
    assert passkey_warning(nothing, _result("after", [False] * 5, -20.0), "f", "s") is None


def test_a_hybrid_whose_layers_no_search_chose_is_pointed_at_the_search(tmp_path):
    """The layer choice, not another seed, is the fix when a hybrid's attention layers cannot retrieve
    (BENCHMARKS.md, 'Hybrid 75%'). Real conversions write the report: tests/test_hybrid.py reads it."""
    def student(name, report):
        (d := tmp_path / name).mkdir()
        if report is not None:
            (d / "kvsurgeon_hybrid.json").write_text(report)
        return d

    auto = layer_choice_hint(student("auto", json.dumps({"mode": "auto", "linear_layers": [0, 2]})))
    assert auto.startswith("This hybrid's attention layers were ranked by each layer's KL cost alone on short windows")
    listed = layer_choice_hint(student("list", json.dumps({"mode": "list"})))
    assert "listed by hand" in listed and "unless these came from that search" in listed
    for name, report in (("search", json.dumps({"mode": "search"})), ("mla", None), ("corrupt", "{"), ("odd", "[1]")):
        assert layer_choice_hint(student(name, report)) is None, name
    src = _result("source", [True, True, True, True, False], -0.91)
    msg = passkey_warning(src, _result("after", [False] * 5, -12.95), "f", "s", auto)
    assert msg.endswith(". " + auto) and "retrain with another seed" in msg
    assert passkey_warning(src, _result("after", [True] * 4 + [False], -1.0), "f", "s", auto) is None


def test_real_uptrain_catches_a_student_that_cannot_retrieve(smollm2, tmp_path, text_file, capsys):
    """SmolLM2 mean-pooled to MQA and trained one step on a 512-token retrieval window: the source
    retrieves 4/5 passkeys at 512 (it misses the 100%-depth one), the student none (key log-prob
    ~-48). The run logs both, writes them to the model card and warns with the command to measure it."""
    r = recipe_from_dict(_recipe(smollm2, tmp_path / "run", 512, data={"train": str(text_file), "retrieval": 1.0}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = uptrain(r, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [x for x in rows if x["kind"] == "passkey"]
    assert (row["length"], row["prompts"], row["accuracy"], row["reference_accuracy"]) == (512, 5, 0.0, 0.8)
    assert row["reference_logprob"] == pytest.approx(-0.84, abs=0.1) and row["logprob"] < -20 and row["seconds"] > 0, row
    # the console says it as it happens, from the same row
    assert f"passkey at 512 tokens: 0/5 retrieved, the source 4/5 (key log-prob {row['logprob']:.2f} vs " in capsys.readouterr().out
    (msg,) = [str(w.message) for w in caught if "passkey at 512" in str(w.message)]
    assert msg.startswith("passkey at 512 tokens after uptraining: 0/5 retrieved, the source 4/5") and str(final) in msg
    card = (final / "README.md").read_text()
    assert "| model | passkey 512 |\n|---|---:|\n| source | 80% |\n| after uptraining | 0% |" in card
    assert "1 prompt per length and depth. Retrieved" in card  # no multikey measured, none described
