#!/usr/bin/env python
"""The effect of fitting calibrated MLA with the source's scaled RoPE (llama3) rather than unscaled
frequencies: a random Llama with Llama-3.1-style rope scaling active inside the calibration window
(original context 64, factor 8, windows of 256), converted to MLA -50% by the calibrated method,
then KL and top-1 agreement of the final logits against the source on held-out text of the same kind.

    python scripts/experiments/scaled_rope_mla.py            # this tree
    PYTHONPATH=/tmp/oldpkg python scripts/experiments/scaled_rope_mla.py   # another tree of kvsurgeon
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def main() -> None:
    from conftest import save_tiny  # noqa: E402 - the test suite's tiny-checkpoint writer
    from transformers import AutoModelForCausalLM

    import kvsurgeon.convert as kc
    from kvsurgeon.convert.pipeline.calibration import CalibConfig
    from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion
    from kvsurgeon.convert.pipeline.driver import ConvertOptions

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = save_tiny(d / "src", hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=32, num_hidden_layers=4, max_position_embeddings=2048, rope_parameters=rope, vocab_size=256)
        words = "the quick brown fox jumps over a lazy dog while python documentation explains modules".split()
        g = torch.Generator().manual_seed(0)
        with open(d / "calib.jsonl", "w") as f:
            for _ in range(40):
                f.write(json.dumps({"text": " ".join(words[i] for i in torch.randint(len(words), (300,), generator=g))}) + "\n")
        calib = CalibConfig(data=str(d / "calib.jsonl"), tokens=4096, seq_len=256)
        spec = ConversionSpec(to="mla", kv_lora_rank=96, rope_dim=32, method="calibrated", calib=calib)
        run_conversion(str(src), spec, ConvertOptions(out=d / "mla", calib=calib, progress=False, measure="off"))
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
        b = AutoModelForCausalLM.from_pretrained(d / "mla", dtype=torch.float64).eval()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        g = torch.Generator().manual_seed(1)  # held-out text of the calibration's kind
        text = " ".join(words[i] for i in torch.randint(len(words), (2000,), generator=g))
        ids = torch.tensor(tok(text)["input_ids"][: 4 * 512]).reshape(4, 512)
        with torch.no_grad():
            la, lb = a(ids).logits.log_softmax(-1), b(ids).logits.log_softmax(-1)
        kl = float((la.exp() * (la - lb)).sum(-1).mean())
        top1 = float((la.argmax(-1) == lb.argmax(-1)).double().mean())
        print(json.dumps({"kvsurgeon": kc.__file__, "kl": kl, "top1": top1}))


if __name__ == "__main__":
    main()
