"""Shared fixtures: tiny random models built on the fly, and the real SmolLM2 from the Hub cache."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group or a local server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    kw = {**TINY, **overrides}
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return widen_matrices(model).eval()


def widen_matrices(model):
    """Redraw every weight matrix from N(0, 0.08): transformers' random init is tiny, so heads would barely differ."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def save_tiny(folder: Path, model_type: str = "llama", max_shard_size: str = "40KB", seed: int = 0, **overrides) -> Path:
    """A real sharded safetensors checkpoint on disk, with a real (tiny) tokenizer."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_tiny_tokenizer(folder, model.config.vocab_size)
    return Path(folder)


def tiny_with_dead_layer_2(folder: Path, **overrides) -> Path:
    """A 4-layer tiny model (Llama unless model_type says) whose layer 2 has zero values: windowing (or
    linearising) that layer changes nothing."""
    from safetensors.torch import load_file, save_file

    src = save_tiny(folder, num_hidden_layers=4, max_position_embeddings=512, max_shard_size="10GB", **overrides)
    shard = next(src.glob("*.safetensors"))
    sd = load_file(shard)
    sd["model.layers.2.self_attn.v_proj.weight"].zero_()
    save_file(sd, shard, metadata={"format": "pt"})
    return src


def write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges: real tokenizers-library files, vocab < vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    keep = sorted(alphabet)[: vocab_size - 2]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(keep)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose float comparisons were measured that way (and the machine is
    shared); the setting is restored for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    return save_tiny(tmp_path / "tiny")


def write_text(path: Path) -> Path:
    """20 seeded documents of 200 words: a real .jsonl for calibration, training and eval."""
    import json

    words = "the quick brown fox jumps over a lazy dog while python documentation explains modules".split()
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(20):
            idx = torch.randint(len(words), (200,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    return write_text(tmp_path / "text.jsonl")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2 through its Hub id, offline, as a user with a warm cache has it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from kvsurgeon.convert.io.resolve import resolve_model

    try:
        return resolve_model(SMOL_ID)
    except Exception as e:  # a missing fixture is a broken set-up, not a reason to skip
        pytest.fail(f"real fixture missing ({e}); run `python scripts/build_fixture.py` (README set-up does)")
