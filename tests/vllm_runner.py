"""Serve checkpoints in vLLM and print what the parity tests compare. Runs in the vLLM side venv
(scripts/setup_vllm.sh), never imported by the test suite's own interpreter.

    python tests/vllm_runner.py JOB.json  ->  one JSON line on stdout, prefixed with RESULT:

JOB: {"models": [{"path": DIR, "prompts": [[token ids], ...]}], "max_tokens": 16,
      "max_model_len": 512}
Per model: {"path", "prompt_logprobs": [[logprob of token t | tokens < t, for t = 1..n-1], ...],
"greedy": [[token ids], ...]} or
{"path", "error": str} when vLLM refuses the model (the test decides whether that is expected).
Several models share one process: vLLM's import and platform set-up are paid once. ``parse_output``
(importable without vLLM) reads the results back and adds each model's logged KV-cache capacity
(vLLM logs it once per process: only the first model of a job gets it).
A model entry may carry "llm_kwargs" passed to ``LLM`` (e.g. a workaround for a known engine bug),
"dtype" (default "float32"; MLA checkpoints served in float32 get vLLM's reference CPU_MLA backend, see
``cpu_mla_backend``) and "bench": {"prompt_len": P, "new_tokens": N} to time one P-token prompt with 1 and with N new
tokens (scripts/bench_vllm.py): "bench": {"prefill_s", "decode_tokens_per_s"}.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tests' models are tiny
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the machine is shared: no pinning
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: clean teardown
os.environ.setdefault("HF_HUB_OFFLINE", "1")


MARK = "KVSURGEON-MODEL-BEGIN "


def kv_capacity(lines: list[str]) -> dict:
    """The KV-cache capacity vLLM logs at start-up ("CPU KV cache size: N tokens, Maximum concurrency
    for L tokens per request: Cx"), read from its log lines."""
    tokens = conc = None
    for line in lines:
        m = re.search(r"KV cache size:\s*([\d,]+)\s*tokens", line)
        if m:
            tokens = int(m.group(1).replace(",", ""))
        m = re.search(r"Maximum concurrency for\s*[\d,]+\s*tokens per request:\s*([\d.]+)x", line)
        if m:
            conc = float(m.group(1))
    return {"tokens": tokens, "concurrency": conc}


def parse_output(stdout: str) -> list[dict]:
    """The runner's results, each with the KV capacity from the log lines printed while it loaded."""
    head, sep, tail = stdout.rpartition("RESULT:")
    if not sep:
        raise RuntimeError("vLLM runner printed no RESULT line")
    results = json.loads(tail.strip().splitlines()[0])
    logs = head.split(MARK)[1:]
    for r, log in zip(results, logs):
        if "error" in r:
            r["log"] = log[-6000:]  # vLLM logs the cause of some refusals (e.g. an inspection failure)
        else:
            r["kv_cache"] = kv_capacity(log.splitlines())
    return results


def cpu_mla_backend(path: str) -> dict:
    """Pin vLLM's reference CPU MLA backend for an MLA checkpoint. On a CPU with AMX tiles vLLM picks
    AMX_MLA instead, whose weight packing takes only bf16/fp16/int8 ("expect weight to be bfloat16,
    ..."), and these runs serve float32 to compare with transformers at float tolerance. CPU_MLA is
    what every CPU without AMX gets, so the results no longer depend on the host."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            is_mla = "kv_lora_rank" in json.load(f)
    except (OSError, ValueError):
        return {}  # vLLM reports the unreadable checkpoint itself
    return {"attention_backend": "CPU_MLA"} if is_mla else {}


def run_model(spec: dict, max_tokens: int, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    print(MARK + spec["path"], flush=True)  # vLLM logs to stdout: split its lines per model
    llm = None
    try:
        dtype = spec.get("dtype", "float32")
        kwargs = {**(cpu_mla_backend(spec["path"]) if dtype == "float32" else {}), **spec.get("llm_kwargs", {})}
        llm = LLM(model=spec["path"], dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
                  seed=0, **kwargs)
        params = SamplingParams(temperature=0, prompt_logprobs=0, logprobs=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
        lps, greedy = [], []
        for p, o in zip(spec["prompts"], outs):
            # prompt_logprobs[t] maps token ids to Logprob for position t (None at t = 0); with
            # prompt_logprobs=0 it holds the prompt's own token.
            lps.append([o.prompt_logprobs[t][p[t]].logprob for t in range(1, len(p))])
            greedy.append(list(o.outputs[0].token_ids))
        out = {"path": spec["path"], "prompt_logprobs": lps, "greedy": greedy}
        if "bench" in spec:
            out["bench"] = _bench(llm, **spec["bench"])
        return out
    except Exception as e:  # noqa: BLE001 - reported to the test, which knows what is expected
        msg = f"{type(e).__name__}: {e}"
        return {"path": spec["path"], "error": msg[-2000:], "traceback": traceback.format_exc()[-4000:]}
    finally:
        del llm
        gc.collect()


def _bench(llm, prompt_len: int, new_tokens: int) -> dict:
    """Wall time of one long prompt with 1 and with ``new_tokens`` greedy tokens: prefill, and decode
    speed from the difference (same prompt, so prefill cancels)."""
    import time

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompt = TokensPrompt(prompt_token_ids=[(7919 * i) % (vocab - 2) + 1 for i in range(prompt_len)])
    times = {}
    for n in (1, new_tokens):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate([prompt], params, use_tqdm=False)  # warm-up (and prefix caching stays off: see bench_vllm.py)
        t0 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        times[n] = time.perf_counter() - t0
    return {"prefill_s": times[1], "decode_tokens_per_s": (new_tokens - 1) / max(times[new_tokens] - times[1], 1e-9)}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = [run_model(m, job.get("max_tokens", 16), job.get("max_model_len", 512)) for m in job["models"]]
    print("RESULT:" + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
