"""Long-context eval: prompts of exact length with the key where asked, scoring equal to real greedy
``generate``, per-bucket perplexity equal to a direct computation, the CLI's outputs, and bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from kvsurgeon.convert.cli import app
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.evaluation.perplexity import load_model, load_tokenizer
from kvsurgeon.convert.token_counts import parse_token_counts
from kvsurgeon.convert.evaluation.long_context import (
    FillerTokens, LongContextError, LongContextOptions, bucket_edges, bucket_nll, check_lengths, evaluate_long_context,
    LongContextResult, grid_accuracy, long_ppl, make_prompt, prompt_grid, score_prompts, starts_other_key,
)

from conftest import SMOL_ID


@pytest.fixture(scope="module")
def smol(smollm2):
    model, path = load_model(str(smollm2))
    return model, load_tokenizer(path)


def test_prompts_have_exact_length_and_key_at_depth(smol):
    _, tok = smol
    filler = FillerTokens(tok, "repeat")
    rng = random.Random(0)
    for depth in (0.0, 0.5, 1.0):
        p = make_prompt(tok, filler, 700, depth, rng)
        assert len(p.ids) == 700
        key = tok.decode(p.answer).strip()
        text = tok.decode(p.ids)
        assert len(key) == 5 and key.isdigit() and text.count(key) == 2
        where = text.index(key) / len(text)
        assert abs(where - depth) < 0.12, (depth, where)
    p = make_prompt(tok, filler, 900, 0.25, rng, keys=3)
    text = tok.decode(p.ids)
    assert len(p.ids) == 900 and text.count("pass key for the") == 5  # three needles, twice in the question
    asked = text.rsplit("pass key for the ", 1)[1].split()[0]
    assert f"the {asked} door is {tok.decode(p.answer).strip()}." in text
    # the decoys: the two other doors' keys, tokenised as the answer is
    assert len(p.decoys) == 2 and all(len(d) == len(p.answer) for d in p.decoys)
    for d in p.decoys:
        assert f" door is {tok.decode(d).strip()}." in text and d != p.answer


def test_same_options_same_prompts_other_seed_other_keys(smol):
    _, tok = smol
    o = LongContextOptions(lengths=(256,), depths=2, samples=2)
    a, b = prompt_grid(tok, o, 1), prompt_grid(tok, o, 1)
    c = prompt_grid(tok, LongContextOptions(lengths=(256,), depths=2, samples=2, seed=1), 1)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert [p.answer for p in a] != [p.answer for p in c]


def test_score_matches_real_greedy_generate(smol):
    """A prompt counts as retrieved exactly when greedy generate emits the key (the control: some are not),
    and a miss's ``first_miss`` and argmax are where and what greedy generate first says wrong."""
    model, tok = smol
    o = LongContextOptions(lengths=(512,), depths=3, samples=2)
    prompts = prompt_grid(tok, o, 1) + prompt_grid(tok, o, 3)
    rows = score_prompts(model, prompts, batch_size=2, progress=False)
    outcomes = set()
    for p, r in zip(prompts, rows):
        gen = model.generate(torch.tensor([p.ids]), max_new_tokens=len(p.answer), do_sample=False)
        emitted = gen[0, len(p.ids):].tolist() == p.answer
        assert emitted == r["retrieved"], (p.depth, tok.decode(gen[0, len(p.ids):]))
        said = gen[0, len(p.ids):].tolist()
        miss = next((j for j, (x, y) in enumerate(zip(said, p.answer)) if x != y), None)
        upto = len(said) if miss is None else miss + 1
        assert r["first_miss"] == miss and r["argmax"][:upto] == said[:upto]
        if p.decoys:  # multikey: another door's key is what greedy turns onto at its first wrong token
            assert r["other_key"] == (miss is not None and any(d[:upto] == said[:upto] for d in p.decoys))
        else:
            assert "other_key" not in r
        outcomes.add(emitted)
    assert outcomes == {True, False}  # both kinds occur, so agreement is not trivially all-True
    # batching must not change the result
    single = score_prompts(model, prompts, batch_size=1, progress=False)
    assert [r["retrieved"] for r in rows] == [r["retrieved"] for r in single]
    assert [r["answer_logprob"] for r in rows] == pytest.approx([r["answer_logprob"] for r in single], abs=1e-4)


def test_source_retrieves_passkey_at_1k(smol):
    """The real SmolLM2 retrieves a mid-depth passkey at 1K (DESIGN.md §9: 5/5 at 10-90% depth)."""
    model, tok = smol
    o = LongContextOptions(lengths=(1024,), depths=3, samples=2)
    prompts = [p for p in prompt_grid(tok, o, 1) if p.depth == 0.5]
    assert all(r["retrieved"] for r in score_prompts(model, prompts, progress=False))


def test_bucket_ppl_equals_direct_computation(smol):
    model, tok = smol
    ids = torch.randint(100, 5000, (1, 700), generator=torch.Generator().manual_seed(0))
    edges = bucket_edges(700)
    assert edges == [0, 512, 700]
    got = long_ppl(model, ids, edges, progress=False)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="none")
    # position t+1 is predicted at t: targets 1..511 in the first bucket, 512..699 in the second
    assert got[0] == pytest.approx(math.exp(nll[:511].mean().item()), rel=1e-4)
    assert got[1] == pytest.approx(math.exp(nll[511:].mean().item()), rel=1e-4)
    assert bucket_edges(4096) == [0, 512, 1024, 2048, 4096]
    s = bucket_nll(torch.ones(2, 9), [0, 4, 9])
    assert s == [(6.0, 6), (12.0, 12)]


def test_starts_other_key_compares_up_to_the_first_wrong_token():
    answer, decoys = [5, 1, 2, 3], [[5, 1, 7, 7], [5, 8, 9, 9]]
    assert not starts_other_key(answer, None, decoys)  # retrieved
    assert starts_other_key([5, 1, 7, 0], 2, decoys)  # turned onto the first decoy at token 2
    assert starts_other_key([5, 8, 0, 0], 1, decoys)  # onto the second at token 1
    assert not starts_other_key([5, 1, 9, 0], 2, decoys)  # a digit no key has there
    assert not starts_other_key([5, 1, 7, 0], 2, [])  # passkey: no decoys


def test_markdown_counts_multikey_answers_that_turn_onto_another_key():
    from kvsurgeon.convert.evaluation.report import markdown

    o = LongContextOptions(tasks=("multikey",), lengths=(1024, 2048), depths=1, samples=4)
    r = LongContextResult(model="m", options=o.__dict__, depths=[0.0], multikey=[[0.5], [0.25]],
                          multikey_by_length={"1024": 0.5, "2048": 0.25}, multikey_other_key_by_length={"1024": 0.25, "2048": 0.75})
    md = markdown([r])
    assert "Multikey prompts whose answer turns onto another door's key (1K / 2K): m 25% / 75%." in md
    assert "log-probability" not in md  # stored before key log-probs were recorded: no line of dashes
    r.multikey_logprob_by_length = {"1024": -0.123, "2048": -4.5}
    src = LongContextResult(model="s", options=o.__dict__, depths=[0.0], multikey=[[1.0], [1.0]],
                            multikey_logprob_by_length={"1024": -0.01, "2048": -0.02})
    assert ("Mean log-probability of the key, in nats summed over its tokens (1K / 2K; 0 is certain): "
            "multikey s -0.01 / -0.02; m -0.12 / -4.50.") in markdown([src, r])
    passkey_only = LongContextResult(model="m", options=o.__dict__, depths=[0.0], passkey=[[1.0], [1.0]],
                                     passkey_by_length={"1024": 1.0, "2048": 1.0})
    assert "another door" not in markdown([passkey_only])


def test_paired_logprob_line_pairs_prompts_with_the_first_model(capsys):
    """Differences per prompt, then mean ± standard error per length; only models whose prompts match the
    first's are paired, and results without per-prompt rows (a stored model card) print nothing."""
    from kvsurgeon.convert.evaluation.report import markdown, paired_logprob_line

    o = LongContextOptions(tasks=("passkey",), lengths=(1024, 2048), depths=1, samples=3)

    def result(name, lps, keys=("11111", "22222", "33333", "44444", "55555", "66666")):
        rows = [{"length": n, "depth": 0.0, "retrieved": True, "answer_logprob": lp, "key": k}
                for n, lp, k in zip((1024,) * 3 + (2048,) * 3, lps, keys)]
        return LongContextResult(model=name, options=o.__dict__, depths=[0.0], passkey=[[1.0], [1.0]],
                                 passkey_by_length={"1024": 1.0, "2048": 1.0}, samples={"passkey": rows})

    src = result("s", [-1.0, -2.0, -3.0, -1.0, -1.0, -1.0])
    m = result("m", [-2.0, -4.0, -6.0, -1.5, -1.5, -1.5])  # 1K: differences -1, -2, -3; 2K: -0.5 three times
    other = result("o", [0.0] * 6, keys=("99999",) * 6)  # other prompts: not comparable
    line = ("Key log-probability minus s's on the same prompts, mean ± standard error of the per-prompt difference "
            "(1K / 2K; nats): passkey m -2.00 ± 0.58 / -0.50 ± 0.00.")
    assert paired_logprob_line([src, m, other]) == line
    assert line in markdown([src, m])
    from kvsurgeon.convert.cli import _print_long

    _print_long([src, m])  # the CLI's table prints the same lines under it
    assert "-2.00 ± 0.58 / -0.50 ± 0.00." in " ".join(capsys.readouterr().out.split())
    assert paired_logprob_line([src]) is None and paired_logprob_line([src, other]) is None
    src.samples, m.samples = {}, {}
    assert "minus" not in markdown([src, m])


def test_grid_accuracy_layout():
    rows = [{"length": n, "depth": d, "retrieved": ok} for n, d, ok in
            [(10, 0.0, True), (10, 0.0, False), (10, 1.0, True), (20, 0.0, False), (20, 1.0, False)]]
    assert grid_accuracy(rows, [10, 20], [0.0, 1.0]) == [[0.5, 1.0], [0.0, 0.0]]


def test_cli_passkey_json_png_against_reference(smollm2, tmp_path):
    png = tmp_path / "lc.png"
    res = CliRunner().invoke(app, [
        "eval", str(smollm2), "--reference", SMOL_ID, "--tasks", "passkey,long-ppl", "--lengths", "512",
        "--depths", "2", "--samples", "1", "--long-seq-len", "600", "--long-windows", "1", "--png", str(png), "--json",
    ])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    ref, model = out["long_context"]
    assert ref["model"].endswith("(reference)")
    # the same model on the same prompts: identical grids and per-bucket ppl
    assert ref["passkey"] == model["passkey"] and ref["long_ppl"] == pytest.approx(model["long_ppl"], rel=1e-6)
    assert len(model["passkey"]) == 1 and len(model["passkey"][0]) == 2
    # every prompt's key and what the model says in its place: the key itself where retrieved
    rows = model["samples"]["passkey"]
    drop = lambda rs: [{k: v for k, v in r.items() if k != "answer_logprob"} for r in rs]  # noqa: E731
    assert len(rows) == 2 and drop(rows) == drop(ref["samples"]["passkey"])
    for r in rows:
        assert r["key"].isdigit() and len(r["key"]) == 5
        assert (r["said"] == r["key"]) == r["retrieved"] == (r["first_miss"] is None)
    assert model["long_ppl_buckets"] == ["0-512", "512-600"]
    # the key's mean log-prob per length is the mean over that length's prompts, and the same model's on both sides
    assert model["passkey_logprob_by_length"]["512"] == pytest.approx(sum(r["answer_logprob"] for r in rows) / 2, abs=1e-9)
    assert model["passkey_logprob_by_length"]["512"] == pytest.approx(ref["passkey_logprob_by_length"]["512"], abs=1e-3)
    assert model["passkey_logprob_by_length"]["512"] < 0
    # paired against the reference prompt by prompt: the same model, so a difference of float noise only
    from kvsurgeon.convert.evaluation.report import paired_logprob_line

    line = paired_logprob_line([LongContextResult(**ref), LongContextResult(**model)])
    assert line.endswith(f"passkey {model['model']} +0.00 ± 0.00.") or line.endswith(f"passkey {model['model']} -0.00 ± 0.00."), line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_length_past_context_refused(tiny_ckpt):
    with pytest.raises(LongContextError, match="max_position_embeddings \\(256\\).*--allow-beyond-context"):
        evaluate_long_context(str(tiny_ckpt), LongContextOptions(lengths=(512,)))
    res = CliRunner().invoke(app, ["eval", str(tiny_ckpt), "--tasks", "passkey", "--lengths", "512"])
    assert res.exit_code == 2 and "max_position_embeddings" in res.output


def test_thin_cells_warn_and_short_filler_refused(smol, tmp_path):
    _, tok = smol
    with pytest.warns(UserWarning, match="resolve only 50%"):
        check_lengths(LongContextOptions(lengths=(512,), samples=2), 8192)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of filler here.")
    with pytest.raises(LongContextError, match="fewer than the 1,024 the longest prompt needs"):
        prompt_grid(tok, LongContextOptions(lengths=(1024,), filler=str(short)), 1)
    with pytest.raises(LongContextError, match="unknown long-context task"):
        LongContextOptions(tasks=("needle",))
    with pytest.raises(LongContextError, match="--lengths is empty"):
        LongContextOptions(tasks=("passkey",), lengths=())
    assert LongContextOptions(tasks=("long-ppl",), lengths=()).lengths == ()  # perplexity needs no prompt lengths


@pytest.mark.parametrize("lengths, message", [
    ("1k,1.3k", "--lengths '1k,1.3k': use comma-separated whole token counts"),
    ("1024,x", "--lengths '1024,x': use comma-separated whole token counts"),
    ("", "--lengths is empty"),
])
def test_cli_refuses_bad_lengths_before_loading(tmp_path, lengths, message):
    """Refused from the arguments alone: the model folder does not even exist."""
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "absent"), "--tasks", "passkey", "--lengths", lengths])
    assert res.exit_code == 2 and message in res.output, res.output


def test_token_counts_take_a_k_suffix():
    assert parse_token_counts("1024, 2k,1.5K,4096", "--lengths") == (1024, 2048, 1536, 4096)
    for bad in ("1.5", "infk", "1e3", "0", "1024,-2K", "0k"):
        with pytest.raises(KvSurgeonError, match=f"--lengths '{bad}'"):
            parse_token_counts(bad, "--lengths")


def test_user_filler_text_is_used(smol, tmp_path):
    _, tok = smol
    f = tmp_path / "filler.txt"
    f.write_text("Alpacas graze quietly on the high plateau near the lake. " * 200)
    p = prompt_grid(tok, LongContextOptions(lengths=(300,), depths=1, samples=1, filler=str(f)), 1)[0]
    assert "Alpacas" in tok.decode(p.ids) and "grass is green" not in tok.decode(p.ids)


def test_retrieval_calibration_windows(smol):
    """--calib-retrieval: the chosen fraction of windows keeps its length and its own text, gains three
    facts and a restatement of one at its end; the rest are untouched."""
    from kvsurgeon.convert.pipeline.calibration import CalibConfig, calibration_ids

    _, tok = smol
    plain = calibration_ids(tok, CalibConfig(tokens=2048, seq_len=512))
    mixed = calibration_ids(tok, CalibConfig(tokens=2048, seq_len=512, retrieval=0.5))
    assert mixed.shape == plain.shape == (4, 512)
    changed = [i for i in range(4) if not torch.equal(mixed[i], plain[i])]
    assert changed == [0, 2]
    for i in changed:
        text = tok.decode(mixed[i])
        assert text.count("The access code for the") == 3
        item, code = text.rsplit("Reminder: the access code for the ", 1)[1].rstrip(".").rsplit(" is ", 1)
        assert f"The access code for the {item} is {code}." in text
        assert tok.decode(plain[i][:40]) in text or tok.decode(plain[i][:40])[:60] in text  # its own text stays
    with pytest.raises(Exception, match="between 0 and 1"):
        calibration_ids(tok, CalibConfig(tokens=2048, seq_len=512, retrieval=1.5))


def test_retrieval_window_answer_is_the_restated_code(smol):
    """The answer positions the retrieval-weighted loss upweighs: exactly the restated code's tokens,
    a code that appears earlier in the window, from the same tokens and draws as calibration's windows."""
    from kvsurgeon.convert.pipeline.calibration import retrieval_window, retrieval_window_with_answer

    _, tok = smol
    ids = tok("The module reads the file and returns its lines. " * 120, add_special_tokens=False)["input_ids"][:512]
    for seed in range(5):
        plain = retrieval_window(tok, ids, random.Random(seed))
        out, (span,) = retrieval_window_with_answer(tok, ids, random.Random(seed))
        assert out == plain and len(out) == 512
        code = tok.decode(out[span.start : span.stop])
        assert code.isdigit() and 4 <= len(code) <= 5, code  # no space token: the span starts at the first digit
        assert tok.decode(out[span.start : span.start + 1]) == code[0]  # the token distill.lead_weight weighs
        assert tok.decode(out[span.stop :]) == "."
        item = tok.decode(out[: span.start]).rstrip().rsplit("Reminder: the access code for the ", 1)[1].removesuffix(" is")
        assert f"The access code for the {item} is {code}." in tok.decode(out[: span.start])
    short = ids[:40]  # too short for far-apart facts: left as text, no answer
    assert retrieval_window_with_answer(tok, short, random.Random(0)) == (short, ())


def test_retrieval_far_puts_the_asked_fact_in_the_first_tenth(smol):
    """``far=1`` moves the asked fact into the window's first 10% (the distance uptrained MQA misses at
    4K); the other facts and the restated code stay whole; ``far=0`` is the uniform draw, token for token."""
    from kvsurgeon.convert.pipeline.calibration import retrieval_window_with_answer

    _, tok = smol
    ids = tok("The module reads the file and returns its lines. " * 250, add_special_tokens=False)["input_ids"][:1024]
    near = 0
    for seed in range(8):
        plain = retrieval_window_with_answer(tok, ids, random.Random(seed))
        assert retrieval_window_with_answer(tok, ids, random.Random(seed), far=0.0) == plain
        out, (span,) = retrieval_window_with_answer(tok, ids, random.Random(seed), far=1.0)
        assert len(out) == 1024 and tok.decode(out[span.stop :]) == "."
        text = tok.decode(out[: span.start])
        code, item = tok.decode(out[span.start : span.stop]).strip(), text.rstrip().rsplit("Reminder: the access code for the ", 1)[1].removesuffix(" is")
        fact = f"The access code for the {item} is {code}."
        assert text.count("The access code for the ") == 3 and fact in text
        assert len(tok(text[: text.index(fact)], add_special_tokens=False)["input_ids"]) < 0.1 * 1024
        plain_text = tok.decode(plain[0])
        near += len(tok(plain_text[: plain_text.index(fact)], add_special_tokens=False)["input_ids"]) >= 0.1 * 1024
    assert near >= 4  # the uniform draw mostly puts the asked fact past the first tenth: the option moved it


def test_retrieval_asks_restate_distinct_facts_each_with_its_code_span(smol):
    """``asks=3``: the window ends with three reminders of three different facts, each span the code of
    a fact stated earlier in the window; the first asked fact is the one ``asks=1`` draws (same seed)."""
    from kvsurgeon.convert.pipeline.calibration import retrieval_window_with_answer

    _, tok = smol
    ids = tok("The module reads the file and returns its lines. " * 250, add_special_tokens=False)["input_ids"][:1024]
    for seed in range(5):
        one, (first,) = retrieval_window_with_answer(tok, ids, random.Random(seed))
        assert retrieval_window_with_answer(tok, ids, random.Random(seed), asks=1) == (one, (first,))
        out, spans = retrieval_window_with_answer(tok, ids, random.Random(seed), asks=3)
        assert len(out) == 1024 and len(spans) == 3 and spans[-1].stop == 1023 and tok.decode(out[1023:]) == "."
        asked = []
        for span in spans:
            code = tok.decode(out[span.start : span.stop])
            assert code.isdigit() and 4 <= len(code) <= 5, code
            before = tok.decode(out[: span.start])
            item = before.rstrip().rsplit("Reminder: the access code for the ", 1)[1].removesuffix(" is")
            assert f"The access code for the {item} is {code}." in before
            asked.append((item, code))
        assert len({item for item, _ in asked}) == 3  # three different facts
        one_item = tok.decode(one[: first.start]).rstrip().rsplit("Reminder: the access code for the ", 1)[1].removesuffix(" is")
        assert asked[0] == (one_item, tok.decode(one[first.start : first.stop]))
        assert tok.decode(out).count("The access code for the ") == 3  # the facts themselves are not repeated
    with pytest.raises(ValueError, match="asks 4: between 1 and the window's 3 facts"):
        retrieval_window_with_answer(tok, ids, random.Random(0), asks=4)


def test_retrieval_facts_states_that_many_distinct_facts_and_asks_among_them(smol):
    """``facts=6``: six different items, each with its code, stated once in the window; every asked code is
    one of them; calibration's default (3 facts) draws what it always drew."""
    from kvsurgeon.convert.pipeline.calibration import RETRIEVAL_FACTS, retrieval_window_with_answer

    _, tok = smol
    ids = tok("The module reads the file and returns its lines. " * 500, add_special_tokens=False)["input_ids"][:2048]
    for seed in range(3):
        assert retrieval_window_with_answer(tok, ids, random.Random(seed), facts=RETRIEVAL_FACTS) == \
            retrieval_window_with_answer(tok, ids, random.Random(seed))
        out, spans = retrieval_window_with_answer(tok, ids, random.Random(seed), facts=6, asks=2)
        text = tok.decode(out)
        assert len(out) == 2048 and len(spans) == 2
        body = text[: text.index(" Reminder:")]
        facts = dict(f.split(" is ") for f in body.split("The access code for the ")[1:] for f in [f.split(".")[0]])
        assert len(facts) == 6  # six different items
        for span in spans:
            item = tok.decode(out[: span.start]).rstrip().rsplit("Reminder: the access code for the ", 1)[1].removesuffix(" is")
            assert facts[item] == tok.decode(out[span.start : span.stop]).strip()
    with pytest.raises(ValueError, match="facts 9: between 1 and 8"):
        retrieval_window_with_answer(tok, ids, random.Random(0), facts=9)


def test_card_command_keeps_calibration_flags():
    from kvsurgeon.convert.pipeline.calibration import CalibConfig
    from kvsurgeon.convert.pipeline.spec import ConversionSpec, cli_command

    spec = ConversionSpec(to="mla", kv_lora_rank=64, rope_dim=32, calib=CalibConfig(
        data="train.jsonl", tokens=16384, seq_len=1024, windows_per_text=1, retrieval=0.25, text_field="body"))
    cmd = cli_command("org/model", spec, "out")
    for flag in ("--calib-windows-per-text 1", "--calib-retrieval 0.25", "--text-field body", "--calib-seq-len 1024"):
        assert flag in cmd
