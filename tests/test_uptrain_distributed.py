"""The uptrainer on two processes, on CPU, started the accelerate-native way:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/uptrain.py --recipe R.yaml

(`--multi_gpu` picks accelerate's torchrun launcher; ACCELERATE_USE_CPU makes each process an
`Accelerator(cpu=True)`, so they form a MULTI_CPU/gloo group. `accelerate launch --cpu --num_processes 2`
starts one process only: `--cpu` always takes the single-process launcher. Plain
`torchrun --nproc_per_node 2 scripts/uptrain.py ...` also works: the uptrainer asks for CPU itself
when several processes start on a machine without CUDA.)

One 1-process and one 2-process run with the same global batch are shared by the tests (module
fixture); a third 2-process run is killed and resumed. Tiny random models: ~1-2 min in all here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.train.distill import PackedStream, window_digests
from kvsurgeon.convert.train.recipe import recipe_from_dict
from kvsurgeon.convert.train.uptrain import uptrain

from conftest import free_port, save_tiny, write_text, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ, STEPS = 32, 12
# DDP averages the two ranks' gradients of their per-rank mean losses; one process takes the gradient
# of the mean over both windows: equal in exact arithmetic, different in float32 summation order.
# Measured here: max relative loss difference ~1e-6 over 12 Adam steps; 1e-4 leaves room for other BLAS.
DDP_RTOL = 1e-4


def launch_cmd(recipe: Path, resume: bool = False, nproc: int = 2) -> list[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "scripts" / "uptrain.py"), "--recipe", str(recipe)]
    return cmd + (["--resume"] if resume else [])


def launch_env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it. killpg is not enough: torch elastic starts each
    rank in a session of its own, so a rank outlived its killed launcher long enough to log another step."""
    import psutil  # accelerate's own dependency

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)  # listed before the kill: orphans lose their parent link
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"processes outlived SIGKILL: {alive}"


def launch(recipe: Path, resume: bool = False, timeout: int = 300) -> None:
    # a timeout, not a hang: a rank that skips a collective shows up here as a deadlock
    p = subprocess.run(launch_cmd(recipe, resume), env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]


def recipe(base: Path, out: str, batch_size: int, **over) -> dict:
    r = {
        "source": str(base / "src"),
        "output": str(base / out),
        "conversion": {"to": "mqa", "method": "mean"},
        "data": {"train": str(base / "text.jsonl"), "seq_len": SEQ, "eval": None},
        # the global budget: 2 windows per step whatever the process count
        "stages": [{"name": "e2e", "tokens": SEQ * 2 * STEPS, "trainable": "all"}],
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
        "batch_size": batch_size,
        "precision": "fp32",
        "save_every": 3,
    }
    r.update(over)
    return r


def rows(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process run (batch 2) in this process and a 2-process run (batch 1 each), same global batch."""
    base = tmp_path_factory.mktemp("dist")
    save_tiny(base / "src", max_shard_size="1GB", tie_word_embeddings=True)  # tied, as SmolLM2
    write_text(base / "text.jsonl")
    uptrain(recipe_from_dict(recipe(base, "one", batch_size=2)), progress=False)
    path = base / "two.yaml"
    path.write_text(yaml.safe_dump(recipe(base, "two", batch_size=1)))
    launch(path)
    return base


def test_rank_split_of_the_stream_is_disjoint_and_complete(tmp_path):
    """In-process, no launcher: rank r of N keeps its slice of each global step, and the union over
    ranks is exactly what one process with N times the batch sees."""
    from transformers import AutoTokenizer

    write_tiny_tokenizer(tmp_path, 128)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = write_text(tmp_path / "t.jsonl")

    def take(rank, world, bs, n, skip=0):
        it = PackedStream(tok, str(text), SEQ, bs, rank=rank, world=world).batches(skip_windows=skip)
        return [next(it) for _ in range(n)]

    one = take(0, 1, 2, 5)
    r0, r1 = take(0, 2, 1, 5), take(1, 2, 1, 5)
    for b, a, c in zip(one, r0, r1):
        torch.testing.assert_close(b, torch.cat([a, c]), rtol=0, atol=0)
    d0 = set(window_digests(torch.cat(r0)).tolist())
    d1 = set(window_digests(torch.cat(r1)).tolist())
    assert len(d0) == len(d1) == 5 and not d0 & d1
    # the position is global: 4 windows consumed, then rank 1 continues at window 4 + 1
    stream = PackedStream(tok, str(text), SEQ, 1, rank=1, world=2)
    it = stream.batches()
    next(it), next(it)
    assert stream.position == 4
    torch.testing.assert_close(take(1, 2, 1, 1, skip=4)[0], r1[2], rtol=0, atol=0)


def test_retrieval_windows_follow_the_global_index_and_seed_across_ranks_and_resumes(tmp_path):
    """data.retrieval rewrites a seeded subset of windows: which ones, and their facts, depend only on
    the global window index and the recipe seed, so a rank split and a resumed stream see the same
    windows as one run, and another seed draws other windows and facts (a replicate is a real one)."""
    from transformers import AutoTokenizer

    write_tiny_tokenizer(tmp_path, 128)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = write_text(tmp_path / "t.jsonl")  # ~47 windows of 512 bytes
    seq, n = 512, 8

    def take(rank, world, bs, steps, skip=0, retrieval=0.5, seed=0):
        it = PackedStream(tok, str(text), seq, bs, rank=rank, world=world, retrieval=retrieval, seed=seed).batches(skip_windows=skip)
        return torch.cat([next(it) for _ in range(steps)])

    plain, mixed = take(0, 1, 1, n, retrieval=0.0), take(0, 1, 1, n)
    changed = [i for i in range(n) if not torch.equal(plain[i], mixed[i])]
    assert 1 <= len(changed) < n  # seeded Bernoulli(0.5) over 8 windows: some, not all
    for i in changed:
        decoded = tok.decode(mixed[i]).replace("<unk>", " ")  # the tiny vocabulary has no space token
        assert "Reminder: the access code for the" in decoded and decoded.count("The access code for the") == 3
    two = torch.stack([torch.cat([a, b]) for a, b in zip(take(0, 2, 1, n // 2), take(1, 2, 1, n // 2))]).reshape(n, seq)
    torch.testing.assert_close(two, mixed, rtol=0, atol=0)
    torch.testing.assert_close(take(0, 1, 1, n - 3, skip=3), mixed[3:], rtol=0, atol=0)

    seeded = take(0, 1, 1, n, seed=1)
    torch.testing.assert_close(take(0, 1, 1, n, seed=1), seeded, rtol=0, atol=0)
    assert not torch.equal(seeded, mixed)
    rewritten = [i for i in range(n) if not torch.equal(plain[i], seeded[i])]
    assert 1 <= len(rewritten) < n
    two = torch.stack([torch.cat([a, b]) for a, b in zip(take(0, 2, 1, n // 2, seed=1), take(1, 2, 1, n // 2, seed=1))]).reshape(n, seq)
    torch.testing.assert_close(two, seeded, rtol=0, atol=0)


def test_a_curriculum_stream_cuts_the_same_tokens_and_replays_on_skip(tmp_path):
    """Windows of a length that changes with the global index (stages with their own seq_len) are cut
    one after another from the same token stream; skipping replays those cuts, on any rank split."""
    from transformers import AutoTokenizer

    from kvsurgeon.convert.train.recipe import recipe_from_dict
    from kvsurgeon.convert.train.uptrain import stage_lengths

    write_tiny_tokenizer(tmp_path, 128)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = write_text(tmp_path / "t.jsonl")
    r = recipe_from_dict({"source": "s", "student": "s", "output": "o", "data": {"train": str(text), "seq_len": 8},
                          "stages": [{"tokens": 8 * 2 * 3}, {"tokens": 16 * 2 * 2, "seq_len": 16}], "batch_size": 1})
    # 2 processes x batch 1: 3 steps of 8-token windows, then 2 of 16 (6 and 4 global windows)
    lengths = stage_lengths(r, r.stage_steps(2), 2)
    assert [lengths(i) for i in range(12)] == [8] * 6 + [16] * 6

    def take(rank, world, bs, steps, skip=0, seq=lengths):
        it = PackedStream(tok, str(text), seq, bs, rank=rank, world=world).batches(skip_windows=skip)
        return [next(it) for _ in range(steps)]

    one = take(0, 1, 2, 5)
    assert [b.shape for b in one] == [(2, 8)] * 3 + [(2, 16)] * 2
    plain = torch.cat([b.reshape(-1) for b in take(0, 1, 1, 14, seq=8)])  # 6 x 8 + 4 x 16 tokens
    torch.testing.assert_close(torch.cat([b.reshape(-1) for b in one]), plain, rtol=0, atol=0)
    for b, a, c in zip(one, take(0, 2, 1, 5), take(1, 2, 1, 5)):
        torch.testing.assert_close(b, torch.cat([a, c]), rtol=0, atol=0)
    torch.testing.assert_close(take(1, 2, 1, 1, skip=8)[0], one[4][1:], rtol=0, atol=0)


def test_two_ranks_train_on_disjoint_windows_and_count_globally(runs):
    one, two = rows(runs / "one"), rows(runs / "two")
    assert len(two) == STEPS and all(r["processes"] == 2 for r in two)
    assert [r["tokens"] for r in two] == [SEQ * 2 * (i + 1) for i in range(STEPS)]
    # distinct windows gathered from both ranks: had the ranks shared windows, this would be half
    assert two[-1]["distinct_tokens"] == two[-1]["tokens"] == SEQ * 2 * STEPS
    assert [r["distinct_tokens"] for r in two] == [r["distinct_tokens"] for r in one]


def test_ddp_loss_curve_matches_one_process(runs):
    one, two = rows(runs / "one"), rows(runs / "two")
    assert len(one) == len(two) == STEPS
    # the schedule runs at one step per optimiser step in both (accelerate would step it twice per step)
    assert [r["lr"] for r in one] == pytest.approx([r["lr"] for r in two], rel=1e-9)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in one], dtype=torch.float64), rtol=DDP_RTOL, atol=0)
    # and it learned: the comparison is of a moving curve, not of two flat lines
    assert two[-1]["loss"] < 0.8 * two[0]["loss"]


def test_collective_checkpoints_and_final_on_two_ranks(runs):
    """CPU half of the FSDP path: every rank takes part in save_state (each wrote its RNG state), the
    final model is saved once, loads as a stock class, and equals the last checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpts = sorted((runs / "two" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000009", "step-0000012"]  # keep_checkpoints=2
    last = ckpts[-1]
    assert {f.name for f in last.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list((runs / "two" / "checkpoints").glob(".tmp-*"))
    final = runs / "two" / "final"
    m = AutoModelForCausalLM.from_pretrained(final)
    assert m.config.num_key_value_heads == 1
    saved = load_file(str(last / "model.safetensors"))
    for name, t in m.state_dict().items():
        if name in saved:
            torch.testing.assert_close(t, saved[name], rtol=0, atol=0, msg=name)
    # nothing a resume reads needs unpickling beyond weights_only=True
    for f in last.glob("*.bin"):
        torch.load(f, weights_only=True)
    for f in last.glob("*.pkl"):
        from accelerate.utils import load  # accelerate's weights_only=True loader (numpy arrays allow-listed)

        load(f)


def test_killed_two_process_run_resumes_exactly(runs):
    """SIGKILL the whole 2-process job after a checkpoint, resume it on 2 processes: the losses are the
    uninterrupted 2-process run's, and the metrics hold each step once."""
    base = runs
    d = recipe(base, "killed", batch_size=1, save_every=2)
    path = base / "killed.yaml"
    path.write_text(yaml.safe_dump(d))
    run = base / "killed"
    proc = subprocess.Popen(launch_cmd(path), env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "step-0000002" / "progress.json").exists():
            time.sleep(0.01)
    finally:
        kill_tree(proc)  # the launcher and both ranks, mid-run
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts, "no checkpoint before the kill"
    done = int(ckpts[-1].name.split("-")[1])
    assert done < STEPS, f"the run finished ({done} steps) before it could be killed; nothing was resumed"
    # on one process the steps, data split and RNG states would not match: refused, nothing written
    logged = (run / "metrics.jsonl").read_text()
    with pytest.raises(KvSurgeonError, match=r"written by 2 process\(es\), this is 1; resume with 2"):
        uptrain(recipe_from_dict(d), resume=True, progress=False)
    assert (run / "metrics.jsonl").read_text() == logged and sorted((run / "checkpoints").glob("step-*")) == ckpts
    launch(path, resume=True)
    got, ref = rows(run), rows(base / "two")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in ref], dtype=torch.float64), rtol=1e-6, atol=0)
    assert got[-1]["distinct_tokens"] == ref[-1]["distinct_tokens"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA devices; accelerate runs FSDP on CPU as plain MULTI_CPU")
def test_fsdp_two_gpus_saves_collectively(runs, tmp_path):
    """GPU half: the shipped FSDP2 accelerate config on 2 GPUs; the CPU half above checks the same
    save path on two ranks."""
    cfg = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text()) | {"num_processes": 2, "mixed_precision": "no"}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(runs, str(tmp_path / "fsdp-run"), batch_size=1)))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(tmp_path / "fsdp.yaml"),
           "--main_process_port", str(free_port()), str(ROOT / "scripts" / "uptrain.py"), "--recipe", str(path)]
    p = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp-run" / "final")
    two = rows(runs / "two")
    fsdp = rows(tmp_path / "fsdp-run")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in fsdp]), torch.tensor([r["loss"] for r in two]), rtol=1e-3, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; on CPU test_uptrain.py runs the same evals")
def test_gpu_run_evaluates_on_the_model_device(runs, tmp_path):
    """The GPU run used to crash at its first eval (CPU windows fed to CUDA models)."""
    d = recipe(runs, str(tmp_path / "gpu"), batch_size=2)
    d["data"] |= {"eval": str(runs / "text.jsonl"), "eval_tokens": 128}
    uptrain(recipe_from_dict(d), progress=False)
    evals = rows(tmp_path / "gpu", "eval")
    assert [e["stage"] for e in evals] == ["after conversion", "after uptraining"]
