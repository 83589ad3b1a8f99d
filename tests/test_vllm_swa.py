"""vLLM parity for ``--to swa``: the sliding-window outputs, served by a real vLLM (CPU build, side
venv), compute what transformers computes, on prompts several windows long, with the same per-layer
windows. Same harness and tolerance as tests/test_vllm_parity.py (its own launch: that file's
fixture builds every other target too).

Controls: the same weights at full attention give log-probs far beyond TOL from the windowed ones,
in transformers and in vLLM, so parity here means vLLM really windows the sliding layers (and only
them). Qwen2's vLLM class has no per-layer windows: the Qwen2 output is asserted to be refused.
"""

from __future__ import annotations

import pytest
import torch

from kvsurgeon.attention.serving import vllm_support

from conftest import save_tiny
from test_vllm_parity import TINY, TOL, _convert, assert_parity, hf_run, max_diff, serve, token_prompts, vllm_python

W = 16  # tiny models' window; the prompts are 3-12 windows long
SMOL_W = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2):
    """name -> (checkpoint dir, prompts, vLLM result), one vLLM launch."""
    torch.set_num_threads(1)
    vllm_python()
    d = tmp_path_factory.mktemp("vllm_swa")
    llama = save_tiny(d / "llama", num_hidden_layers=3, **TINY)
    qwen2 = save_tiny(d / "qwen2", "qwen2", num_hidden_layers=3, **TINY)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = "In the old harbour town the fishermen mended their nets while the gulls circled above. " * 8
    smol_prompts = [tok(text)["input_ids"][:n] for n in (100, 160)]
    tiny = token_prompts(128, lengths=(48, 120, 200))
    ckpts = {
        "llama source (control)": (llama, tiny),
        "llama -> swa, layer 1 global": (_convert(llama, d / "llama_swa", None, to="swa", window=W, global_layers=[1]), tiny),
        "llama -> swa, all global": (_convert(llama, d / "llama_global", None, to="swa", window=W, keep_global=3), tiny),
        "mistral -> swa, layer 0 global": (
            _convert(save_tiny(d / "mistral", "mistral", num_hidden_layers=3, **TINY), d / "mistral_swa", None, to="swa",
                     window=W, global_layers=[0]), tiny),
        "qwen2 -> swa, layer 1 global": (_convert(qwen2, d / "qwen2_swa", None, to="swa", window=W, global_layers=[1]), tiny),
        "smollm2 source (control)": (smollm2, smol_prompts),
        "smollm2 -> swa, every 4th layer global": (
            _convert(smollm2, d / "smol_swa", None, to="swa", window=SMOL_W, global_layers=list(range(3, 30, 4))),
            smol_prompts),
    }
    results = serve([{"path": str(p), "prompts": pr} for p, pr in ckpts.values()], d)
    return {n: (p, pr, r) for (n, (p, pr)), r in zip(ckpts.items(), results)}


SERVED = ["llama source (control)", "llama -> swa, layer 1 global", "llama -> swa, all global",
          "mistral -> swa, layer 0 global", "smollm2 source (control)", "smollm2 -> swa, every 4th layer global"]


@pytest.mark.parametrize("name", SERVED)
def test_vllm_serves_swa_like_transformers(served, name):
    path, prompts, res = served[name]
    assert_parity(name, path, prompts, res)
    from transformers import AutoConfig

    assert vllm_support(AutoConfig.from_pretrained(path).to_dict()).serves


@pytest.mark.parametrize("source,windowed", [("llama source (control)", "llama -> swa, layer 1 global"),
                                             ("smollm2 source (control)", "smollm2 -> swa, every 4th layer global")])
def test_windows_change_the_function(served, source, windowed):
    """The control: on these prompts the windows matter, in transformers and in vLLM, and the all-global
    output is the source in both."""
    src, prompts, src_res = served[source]
    path, _, res = served[windowed]
    src64, _ = hf_run(src, prompts, torch.float64)
    swa64, _ = hf_run(path, prompts, torch.float64)
    assert max_diff(src64, [x.tolist() for x in swa64]) > 100 * TOL
    assert max_diff(src64, res["prompt_logprobs"]) > 100 * TOL  # vLLM windows: it is not serving full attention
    if source.startswith("llama"):
        assert max_diff(src64, served["llama -> swa, all global"][2]["prompt_logprobs"]) <= TOL


def test_vllm_refuses_mixed_window_qwen2(served):
    """vLLM's Qwen2 has no per-layer windows; the output keeps max_window_layers below the layer count
    so vLLM refuses (asserts) rather than serving every layer at full attention, and serving.py says no."""
    path, _, res = served["qwen2 -> swa, layer 1 global"]
    assert "error" in res and "max_window_layers" in (res["error"] + res.get("log", ""))
    from transformers import AutoConfig

    support = vllm_support(AutoConfig.from_pretrained(path).to_dict())
    assert not support.serves and "per-layer windows" in support.reason
