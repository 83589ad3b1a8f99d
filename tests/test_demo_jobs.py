"""The demo converts each family the way its table is measured: MQA for the context its passkey
prompts use (--serve-context = --passkey-length), the others without it; budgets come from the options."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture
def demo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # demo.py sets it at import; monkeypatch restores it after
    import demo

    return demo


@pytest.mark.parametrize("length", [2048, 4096])
def test_mqa_is_merged_for_the_passkey_length(demo, length):
    from kvsurgeon.convert.pipeline.spec import cli_command

    args = Namespace(calib_tokens=1024, transfer_tokens=512, passkey_length=length)
    specs = {j.name: demo.job_spec(j, args) for j in demo.JOBS}
    assert specs["MQA"].merge_options().context == length
    assert f"--serve-context {length}" in cli_command(demo.SOURCE, specs["MQA"], "out")
    assert all(s.serve_context is None for n, s in specs.items() if n != "MQA")
    assert all(s.calib_tokens == 1024 for s in specs.values())
    assert specs["hybrid-50%"].transfer_tokens == 512
