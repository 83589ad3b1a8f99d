"""Checkpoint I/O: lazy sharded reading, atomic sharded writing, and every bad input named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvsurgeon.convert.io.checkpoint import CheckpointError, LazyCheckpoint, read_config
from kvsurgeon.convert.io.resolve import ResolveError, resolve_model
from kvsurgeon.convert.io.safetensors_io import PlannedShardWriter, TensorSpec
from kvsurgeon.convert.io.writer import OutputError, atomic_output, copy_extras, parse_size


def specs_of(ck: LazyCheckpoint) -> list[TensorSpec]:
    return [TensorSpec(k, ck.info(k).shape, ck.info(k).dtype) for k in ck.keys()]


def copy_checkpoint(src: Path, dst_target: Path, max_shard_size="40KB", overwrite=False) -> Path:
    src_ck = LazyCheckpoint(src)
    with atomic_output(dst_target, overwrite=overwrite, protect=[src]) as tmp:
        w = PlannedShardWriter(tmp, specs_of(src_ck), parse_size(max_shard_size))
        for name in reversed(src_ck.keys()):  # any arrival order lands in the planned place
            w.write(name, src_ck.get_tensor(name))
        w.finish()
        shutil.copyfile(src / "config.json", tmp / "config.json")
        copy_extras(src, tmp)
    return dst_target


def test_sharded_round_trip(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(list(tiny_ckpt.glob("model-*.safetensors"))) > 1, "fixture should be sharded"
    out = copy_checkpoint(tiny_ckpt, tmp_path / "copy", max_shard_size="30KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_ckpt).chat_template
    a = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    b = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 17))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_single_shard_named_model_safetensors(tiny_ckpt, tmp_path):
    out = copy_checkpoint(tiny_ckpt, tmp_path / "one", max_shard_size="1GB")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()


def test_lazy_reading_loads_only_what_is_asked(tiny_ckpt):
    ck = LazyCheckpoint(tiny_ckpt)
    assert ck.loads == 0 and len(ck.keys()) > 10
    name = "model.layers.1.self_attn.k_proj.weight"
    t = ck.get_tensor(name)
    assert ck.loads == 1 and t.shape == (4 * 16, 64)


def test_reading_does_not_map_the_shard(tmp_path):
    """Peak RSS while reading one 64 MB tensor after another stays near one tensor, not the file."""
    import resource
    import subprocess
    import sys

    from safetensors.torch import save_file

    save_file({f"t{i}": torch.randn(4096, 4096) for i in range(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    code = (
        "import resource, sys; from kvsurgeon.convert.io.checkpoint import LazyCheckpoint;"
        "ck = LazyCheckpoint(sys.argv[1]); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "[ck.get_tensor(f't{i}').sum() for i in range(4)];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)"
    )
    grew_kb = int(subprocess.check_output([sys.executable, "-c", code, str(tmp_path)]).decode().split()[-1])
    assert grew_kb < 200 * 1024, f"RSS grew by {grew_kb} KB reading a 256 MB file tensor by tensor"


def test_planned_writer_rejects_wrong_shapes_and_missing(tmp_path):
    w = PlannedShardWriter(tmp_path, [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)], 10**6)
    with pytest.raises(ValueError, match="a: produced shape"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="not part of the planned output"):
        w.write("c", torch.zeros(1))
    w.write("b", torch.ones(4))
    with pytest.raises(ValueError, match="never written"):
        w.finish()


def test_failure_mid_write_leaves_nothing(tiny_ckpt, tmp_path):
    target = tmp_path / "out"
    ck = LazyCheckpoint(tiny_ckpt)
    with pytest.raises(RuntimeError, match="injected"):
        with atomic_output(target) as tmp:
            w = PlannedShardWriter(tmp, specs_of(ck), 20_000)
            for i, name in enumerate(ck.keys()):  # (left open on purpose: the failure path must still clean up)
                w.write(name, ck.get_tensor(name))
                if i == 8:
                    assert len(list(tmp.glob("model-*.safetensors"))) > 1, "shards were already on disk"
                    raise RuntimeError("injected failure")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "temporary folder must be removed"


def test_refuses_overwrite_and_source(tiny_ckpt, tmp_path):
    out = copy_checkpoint(tiny_ckpt, tmp_path / "out")
    before = (out / "config.json").stat().st_mtime_ns
    with pytest.raises(OutputError, match="--overwrite"):
        copy_checkpoint(tiny_ckpt, out)
    assert (out / "config.json").stat().st_mtime_ns == before
    copy_checkpoint(tiny_ckpt, out, overwrite=True)  # explicit overwrite works
    with pytest.raises(OutputError, match="source model"):
        copy_checkpoint(tiny_ckpt, tiny_ckpt, overwrite=True)


def test_refuses_pickle_unless_allowed(tmp_path):
    from conftest import tiny_model

    m = tiny_model()
    m.save_pretrained(tmp_path / "pk", safe_serialization=False)
    if not (tmp_path / "pk" / "pytorch_model.bin").exists():  # transformers 5 may refuse pickle saving
        torch.save(m.state_dict(), tmp_path / "pk" / "pytorch_model.bin")
        for f in (tmp_path / "pk").glob("*.safetensors*"):
            f.unlink()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        LazyCheckpoint(tmp_path / "pk")
    ck = LazyCheckpoint(tmp_path / "pk", allow_pickle=True)
    assert torch.equal(ck.get_tensor("model.embed_tokens.weight"), m.model.embed_tokens.weight)


def test_missing_shard_is_named(tiny_ckpt):
    victim = sorted(tiny_ckpt.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        LazyCheckpoint(tiny_ckpt)


def test_corrupt_shard_is_named(tiny_ckpt):
    victim = sorted(tiny_ckpt.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim.name):
        ck = LazyCheckpoint(tiny_ckpt)
        for k in ck.keys():
            ck.get_tensor(k)


def test_garbage_header_is_named(tiny_ckpt):
    victim = sorted(tiny_ckpt.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=victim.name):
        ck = LazyCheckpoint(tiny_ckpt)
        for k in ck.keys():
            ck.get_tensor(k)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        LazyCheckpoint(tmp_path)


def test_uptrain_run_folder_points_at_its_model(tmp_path):
    """An uptraining run's folder (metrics, checkpoints/, final/) given where a model is expected: the error
    names final/, the model it holds."""
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"looks like an uptraining run, whose model is .*final$"):
        read_config(tmp_path)


def test_unknown_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ResolveError, match="nobody/no-such-model"):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ResolveError, match="neither a local folder"):
        resolve_model("./does/not/exist")


def test_disk_full_is_clear_and_cleans_up(tiny_ckpt, tmp_path):
    """A real full disk: a 256 KiB tmpfs (needs root, as CI has; skipped with the reason otherwise)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {r.stderr.decode().strip()}")
    try:
        big = torch.randn(200_000)  # 800 KB: cannot fit
        specs = [TensorSpec(f"t{i}", (25_000,), torch.float32) for i in range(8)]
        with pytest.raises(OutputError, match="no space left"):
            with atomic_output(mnt / "out") as tmp:
                with PlannedShardWriter(tmp, specs, 100_000) as w:
                    for i in range(8):
                        w.write(f"t{i}", big[i * 25_000 : (i + 1) * 25_000])
                    w.finish()
        assert list(mnt.iterdir()) == [], "temporary folder must be removed after ENOSPC"
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(OutputError, match="cannot read size"):
        parse_size("lots")
