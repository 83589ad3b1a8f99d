"""Fault safety of a whole conversion: kill -9 mid-write, a full disk, a truncated shard."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny
from kvsurgeon.convert.cli import app

runner = CliRunner()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def slow_source(tmp_path: Path) -> Path:
    # enough layers and calibration that the conversion takes a few seconds
    return save_tiny(tmp_path / "src", num_hidden_layers=12, hidden_size=256, intermediate_size=512,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_shard_size="300KB")


def test_kill_9_mid_conversion_leaves_no_output_and_source_untouched(tmp_path, text_file):
    src = slow_source(tmp_path)
    before = digest(src)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kvsurgeon.convert.cli", "convert", str(src), "--to", "mqa", "--out", str(out),
           "--calib-data", str(text_file), "--calib-tokens", "4096", "--calib-seq-len", "256", "--max-shard-size", "200KB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    tmp = []
    while time.time() < deadline and proc.poll() is None:
        tmp = list(tmp_path.glob(".out.tmp-*"))
        if tmp and list(tmp[0].glob("model-*.safetensors")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "conversion finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "no partial output under the target name"
    assert digest(src) == before, "source must be untouched"
    assert tmp and tmp[0].exists(), "the killed writer's temporary folder is what remains"
    # the next run cleans the dead writer's leftovers and completes
    res = runner.invoke(app, ["convert", str(src), "--to", "mqa", "--method", "mean", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_full_disk_fails_clearly_and_cleans_up(tmp_path):
    src = save_tiny(tmp_path / "src")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {r.stderr.decode().strip()}")
    try:
        res = runner.invoke(app, ["convert", str(src), "--to", "mqa", "--method", "mean", "--out", str(mnt / "out")])
        assert res.exit_code == 2, res.output
        assert "no space left" in res.output
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_truncated_shard_is_named(tmp_path):
    src = save_tiny(tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    res = runner.invoke(app, ["convert", str(src), "--to", "mqa", "--method", "mean", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert victim.name in res.output and "truncated" in res.output
    assert not (tmp_path / "out").exists()


def test_completed_output_files_get_the_umask_mode(tmp_path):
    """A writer that creates 0600 files (safetensors' temporaries) must not leave the finished
    model unreadable to the other users of a shared machine."""
    from kvsurgeon.convert.io.writer import atomic_output

    mask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out") as tmp:
            f = tmp / "model.safetensors"
            f.write_bytes(b"x")
            f.chmod(0o600)
        assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
