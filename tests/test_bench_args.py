"""The long-context benches refuse bad arguments (argparse's exit 2, the problem named) before they
convert, train or write anything: a typo must not surface only after a 40-minute conversion, hours of
training or the source's 4K measurement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def _texts(monkeypatch, tmp_path, module):
    """Stand-ins for ../shared's pydocs files, which tests never read: the benches only check they are there."""
    for name, stem in (("TRAIN", "pydocs-train"), ("VALID", "pydocs-valid")):
        f = tmp_path / f"{stem}.jsonl"
        f.write_text('{"text": "x"}\n')
        monkeypatch.setattr(module, name, f, raising=False)
    return module


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the script sets it at import; monkeypatch restores it after
    import bench_long_context

    return _texts(monkeypatch, tmp_path, bench_long_context)


@pytest.fixture
def uptrain_bench(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # HELD_OUT_TRAIN is relative to the working folder: the tests check it is not written
    import bench_uptrain_long

    return _texts(monkeypatch, tmp_path, bench_uptrain_long)


def refusal(main, argv: list[str], out: Path, capsys) -> str:
    """Run a bench's main on bad arguments: argparse's exit 2 and no output folder; returns stderr."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    assert exc.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "mqa,bogus"], "unknown job bogus; choose from mqa, mla50, mla75, hybrid50"),
    (["--jobs", "", "--extra", "mla-2k"], "--extra 'mla-2k': expected a name, '=' and what it names"),
    (["--jobs", "", "--extra", "mla-2k="], "--extra 'mla-2k=': expected a name, '=' and what it names"),
    (["--jobs", "", "--extra", "=--to mqa"], "--extra '=--to mqa': expected a name"),
    (["--jobs", "mqa", "--extra", "mqa=--to mqa --calib-seq-len 2048"], "--extra mqa: a row of that name"),
    (["--jobs", "", "--extra", "source=--to mqa"], "--extra source: a row of that name"),
    (["--tasks", "passkey,bogus"], "unknown long-context task bogus; choose from passkey, multikey, long-ppl"),
    (["--lengths", "1024,2.1k"], "--lengths '1024,2.1k': use comma-separated whole token counts"),
    (["--lengths", ""], "--lengths is empty"),
    (["--lengths", "32"], "lengths [32]: each must be at least 64 tokens"),
])
def test_bad_arguments_are_refused_before_anything_is_written(bench, tmp_path, capsys, argv, message):
    assert message in refusal(bench.main, argv, tmp_path / "out", capsys)


def test_missing_eval_text_is_refused(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "VALID", tmp_path / "absent.jsonl")
    assert "absent.jsonl not found" in refusal(bench.main, ["--jobs", "mqa"], tmp_path / "out", capsys)


def test_jobs_and_extras_become_the_runs_rows(bench):
    args, jobs, opts = bench.parse_args(
        ["--jobs", "mla75", "--extra", "mla75-2k=--to mla --kv-lora-rank 64  --rope-dim 32 --calib-seq-len 2048",
         "--tasks", "passkey,long-ppl", "--lengths", "1024,4K"])
    assert jobs == {"mla75": bench.JOBS["mla75"],
                    "mla75-2k": ["--to", "mla", "--kv-lora-rank", "64", "--rope-dim", "32", "--calib-seq-len", "2048"]}
    assert opts.tasks == ("passkey", "long-ppl") and opts.lengths == (1024, 4096)
    assert opts.data == str(bench.VALID)
    _, jobs, opts = bench.parse_args(["--jobs", ""])
    assert jobs == {} and opts.tasks == ("passkey", "multikey", "long-ppl")


CONVERT = ["--convert", "mqa=--to mqa"]


@pytest.mark.parametrize("argv, message", [
    ([], "pass exactly one of --student NAME=FOLDER or --convert NAME=ARGS"),
    (["--convert", "mqa"], "--convert 'mqa': expected a name, '=' and what it names, e.g. 'mqa=--to mqa'"),
    (["--student", "=runs/x"], "--student '=runs/x': expected a name"),
    (["--student", "mqa=no-such-folder"], "--student no-such-folder: no config.json there"),
    ([*CONVERT, "--seq-len", "2048,4096", "--tokens", "1,2,3"], "--tokens gives 3 budgets for 2 --seq-len stages"),
    ([*CONVERT, "--tokens", "100x"], "--tokens '100x': use comma-separated whole token counts"),
    ([*CONVERT, "--seq-len", ","], "--seq-len, --tokens and --lengths: give at least one token count each"),
    ([*CONVERT, "--retrieval-facts", "9"], "data.retrieval_facts: an integer from 1 to 8 (one item each), got 9"),
    ([*CONVERT, "--retrieval-far", "2"], "data.retrieval_far: a fraction of retrieval windows, between 0 and 1, got 2.0"),
    ([*CONVERT, "--retrieval", "0", "--answer-weight", "50"], "distill.answer_weight: weighs the answers of retrieval windows"),
    ([*CONVERT, "--answer-ce", "-1"], "distill.answer_ce: must be >= 0"),
    ([*CONVERT, "--tokens", "1000"], "stages[0].tokens: 1000 is less than one optimiser step"),
    ([*CONVERT, "--lengths", "32"], "lengths [32]: each must be at least 64 tokens"),
])
def test_uptrain_bench_refuses_before_converting(uptrain_bench, tmp_path, capsys, argv, message):
    assert message in refusal(uptrain_bench.main, argv, tmp_path / "out", capsys)
    assert not uptrain_bench.HELD_OUT_TRAIN.exists()


@pytest.mark.parametrize("missing", ["TRAIN", "VALID"])
def test_uptrain_bench_refuses_missing_texts(uptrain_bench, tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setattr(uptrain_bench, missing, tmp_path / "absent.jsonl")
    assert "absent.jsonl not found" in refusal(uptrain_bench.main, CONVERT, tmp_path / "out", capsys)
    assert not uptrain_bench.HELD_OUT_TRAIN.exists()


def test_uptrain_bench_builds_the_curriculum_it_is_asked_for(uptrain_bench, tmp_path):
    args, name, spec, recipe, opts = uptrain_bench.parse_args(
        ["--convert", "mla75=--to mla --kv-lora-rank 64 --rope-dim 32", "--seq-len", "2K,4096", "--tokens", "96K",
         "--trainable", "all", "--answer-weight", "50", "--lead-weight", "250", "--answer-ce", "0.1", "--schedule-span", "run", "--out", str(tmp_path / "out")])
    assert (name, spec) == ("mla75", "--to mla --kv-lora-rank 64 --rope-dim 32")
    assert [(s.name, s.seq_len, s.tokens, s.trainable) for s in recipe.stages] == [
        ("all-2048", 2048, 49152, "all"), ("all-4096", 4096, 49152, "all")]
    # a length that comes back after another (a last 2K stage) gets its own stage name
    _, _, _, back, _ = uptrain_bench.parse_args([*CONVERT, "--seq-len", "2048,4096,2048", "--tokens", "64K,96K,32K",
                                                  "--out", str(tmp_path / "out")])
    assert [(s.name, s.seq_len, s.tokens) for s in back.stages] == [
        ("attention-2048", 2048, 65536), ("attention-4096", 4096, 98304), ("attention-2048-2", 2048, 32768)]
    assert recipe.student == str(tmp_path / "out" / "mla75-converted")
    assert recipe.output == str(tmp_path / "out" / "mla75-uptrained")
    assert recipe.data.train == str(uptrain_bench.HELD_OUT_TRAIN) and recipe.distill.answer_weight == 50
    assert (recipe.distill.lead_weight, recipe.distill.answer_ce) == (250, 0.1)
    assert recipe.optim.schedule_span == "run"
    assert opts.tasks == ("passkey", "multikey", "long-ppl") and opts.lengths == (1024, 2048)
    assert not (tmp_path / "out").exists()


def test_uptrain_bench_summarises_the_last_steps(uptrain_bench):
    """The end-of-training means skip steps that logged no answer CE (no retrieval window in the batch)."""
    rows = [{"loss": 9.0, "kl": 9.0, "answer_ce": 9.0}] + [
        {"loss": float(i), "kl": i / 2, "answer_ce": None if i % 2 else float(i)} for i in range(8)]
    assert uptrain_bench.last_steps_mean(rows, 8) == {"loss": 3.5, "kl": 1.75, "answer_ce": 3.0}
    assert uptrain_bench.last_steps_mean(rows[1:2], 8)["answer_ce"] == 0.0
    assert uptrain_bench.last_steps_mean(rows[2:3], 8)["answer_ce"] is None


@pytest.mark.parametrize("argv, message", [
    (["--student", "mla75"], "--student 'mla75': expected a name, '=' and what it names"),
    (["--student", "mla75=no-such-folder"], "--student no-such-folder: no config.json there"),
    (["--student", "S", "--seq-len", "2k,x"], "--seq-len '2k,x': use comma-separated whole token counts"),
    (["--student", "S", "--seq-len", "2048,-4K"], "--seq-len '2048,-4K': use comma-separated whole token counts, each above 0"),
    (["--student", "S", "--checkpointing", "off,sometimes"], "at least one length, and off, on or off,on"),
])
def test_memory_bench_refuses_before_running(monkeypatch, tmp_path, capsys, argv, message):
    import bench_memory

    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    argv = [f"m={student}" if a == "S" else a for a in argv]  # "S": the valid student folder
    assert message in refusal(bench_memory.main, argv, tmp_path / "out", capsys)
