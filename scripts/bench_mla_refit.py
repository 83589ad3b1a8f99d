"""What the MLA q refit costs and keeps as calibration windows grow: one real SmolLM2 layer converted
to MLA -50% (R128/Dr64, the calibrated fit), then ``refit_queries`` timed with every key weight fitted
exactly (``keys=None``) and with the heaviest-keys bound, at each window shape.

    HF_HUB_OFFLINE=1 python scripts/bench_mla_refit.py --layer 12 --windows 512x16,2048x4,4096x2 --keys none,256,64

Windows are ``TxN``: N sequences of T tokens from pydocs-train (T x N tokens in all), plus one more
disjoint window of T tokens to measure on. Reported per run: the refit's seconds, the layer's relative
output error against the source layer on a calibration window and on the held-out one, and how far
q_proj moved from the exact refit's. Run it alone on the machine: it times.
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

from bench_common import SOURCE, TRAIN  # noqa: E402


def _windows(tok, T: int, n: int) -> torch.Tensor:
    ids: list[int] = []
    with open(TRAIN) as f:
        for line in f:
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
            if len(ids) >= T * (n + 1):
                break
    if len(ids) < T * (n + 1):
        raise SystemExit(f"pydocs-train holds {len(ids)} tokens; {T}x{n} plus a held-out window needs {T * (n + 1)}")
    return torch.tensor(ids[: T * (n + 1)]).reshape(n + 1, T)


def _attention_inputs(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = model.model.layers[layer].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["hidden_states"][0].double()), with_kwargs=True)
    try:
        with torch.no_grad():
            for b in range(ids.shape[0]):
                model(ids[b:b + 1])
    finally:
        hook.remove()
    return torch.stack(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--windows", default="512x16,2048x4,4096x2", help="TxN, comma-separated")
    ap.add_argument("--keys", default="none,256", help="heaviest keys per query fitted exactly; none = all")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-mla-refit.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvsurgeon.attention.families import DictSource, read_attention
    from kvsurgeon.attention.reference import attention_output, mla_attention_output
    from kvsurgeon.convert.mla.fit import MlaFit, attention_token_weights, convert_layer_to_mla, refit_queries
    from kvsurgeon.convert.mla.plan import MlaTuning, kv_balance

    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SOURCE)
    attn = read_attention(DictSource(model.state_dict()), model.config.to_dict(), args.layer)
    R, Dr, G, D = 128, 64, attn.num_kv_heads, attn.head_dim
    fit = MlaFit(qk_nope_head_dim=D, kv_balance=kv_balance(1 - (R + Dr) / (2 * G * D)), norm_ballast=1)
    tune = MlaTuning()
    keys = [None if k == "none" else int(k) for k in args.keys.split(",")]
    rows = []
    for spec in args.windows.split(","):
        T, n = (int(v) for v in spec.split("x"))
        xs = _attention_inputs(model, _windows(tok, T, n), args.layer)
        x, held = xs[:n], xs[n:]
        w = convert_layer_to_mla(attn, x, R, Dr, "calibrated", fit, token_weights=attention_token_weights(attn, x, mix=tune.token_mix))

        def error(wq, xx):
            ref = attention_output(attn, xx)
            return float((mla_attention_output(wq, xx) - ref).norm() / ref.norm())

        exact_q = None
        for k in keys:
            t0 = time.perf_counter()
            wq = refit_queries(w, attn, x, stride=tune.q_refit_stride, ridge=tune.q_refit_ridge, keys=k)
            seconds = time.perf_counter() - t0
            exact_q = wq.q if k is None else exact_q
            moved = None if exact_q is None else float((wq.q - exact_q).norm() / exact_q.norm())
            row = dict(window=T, windows=n, keys=k, refit_seconds=round(seconds, 1), error_calib_before=error(w, x[:1]),
                       error_calib=error(wq, x[:1]), error_held_before=error(w, held), error_held=error(wq, held),
                       q_vs_exact=moved)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(layer=args.layer, machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                date=time.strftime("%Y-%m-%d"), command="python scripts/bench_mla_refit.py " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print("\n| window x n | keys | refit s | layer error calib (before) | held-out (before) | q vs exact |")
    print("|---|---|---:|---|---|---:|")
    for r in rows:
        qv = "-" if r["q_vs_exact"] is None else f"{r['q_vs_exact']:.2e}"
        print(f"| {r['window']} x {r['windows']} | {r['keys'] or 'all'} | {r['refit_seconds']} | {r['error_calib']:.4f} "
              f"({r['error_calib_before']:.4f}) | {r['error_held']:.4f} ({r['error_held_before']:.4f}) | {qv} |")


if __name__ == "__main__":
    main()
