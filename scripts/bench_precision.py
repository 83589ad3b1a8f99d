"""What ``precision: auto`` saves on this machine: the matmuls of one SmolLM2 decoder layer over a
2,048-token window, timed in fp32 and under bf16 autocast, beside what auto resolves to here.

    python scripts/bench_precision.py --seq-len 2048 --repeats 3

On a CPU without native bf16 kernels (AVX2 only) PyTorch runs bf16 through a reference GEMM; the ratio
printed is what a bf16 recipe would cost there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1,536 (the head is the same op,
# 85x larger: minutes per call in bf16 on such a CPU)
SHAPES = {"q/o proj": (576, 576), "k/v proj": (576, 192), "mlp up/gate": (576, 1536), "mlp down": (1536, 576)}


def timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from kvsurgeon.convert.hardware import cpu_has_native_bf16
    from kvsurgeon.convert.train.precision import detect_precision

    rows = []
    for name, (k, n) in SHAPES.items():
        x, w = torch.randn(args.seq_len, k), torch.randn(k, n)
        fp32 = timed(lambda: x @ w, args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = timed(lambda: x @ w, args.repeats)
        rows.append({"matmul": name, "shape": f"{args.seq_len}x{k}x{n}", "fp32_s": round(fp32, 4),
                     "bf16_autocast_s": round(bf16, 4), "bf16_over_fp32": round(bf16 / fp32, 1)})
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}, "
          f"precision auto -> {detect_precision('auto')[0]}, {torch.get_num_threads()} threads")
    print("| matmul | shape | fp32 s | bf16 autocast s | bf16 / fp32 |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['matmul']} | {r['shape']} | {r['fp32_s']} | {r['bf16_autocast_s']} | {r['bf16_over_fp32']}x |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
