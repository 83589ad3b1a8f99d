"""Publishing: model cards, local checks, and pushes through the real huggingface_hub client to a fake Hub."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants, snapshot_download

from hub_server import FakeHub
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.hub.model_card import (
    CardInfo,
    FidelityRow,
    read_card_info,
    refresh_model_card,
    render_model_card,
    source_license,
    write_model_card,
)
from kvsurgeon.convert.hub.publish import PublishError, _choose_uploader, files_to_upload, push_folder

TOKEN = "hf_fakeValidToken_for_tests_0123456789"
WRONG_TOKEN = "hf_WRONGsecretTOKEN_must_not_leak_9876543210"
IDS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 8]])


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _card(**overrides) -> CardInfo:
    fields = dict(
        base_model="org/tiny-llama",
        conversion="gqa",
        summary="Grouped the 4 KV heads into 2 by mean-pooling each pair of key/value projections.",
        command="kvsurgeon convert org/tiny-llama out --to gqa --kv-heads 2",
        recipe=None,
        license="apache-2.0",
        kv_bytes_per_token_before=2048,
        kv_bytes_per_token_after=1024,
        fidelity=[
            FidelityRow("after conversion", "wikitext-2 test", 4096, 12.345, 11.111, 0.0421, 0.9312),
            FidelityRow("after uptraining", "wikitext-2 test", 4096, 11.502, 11.111, 0.0107, 0.9755),
        ],
        extra_tags=["llama"],
    )
    fields.update(overrides)
    return CardInfo(**fields)


# ---------------------------------------------------------------------------- model card


def test_card_front_matter_and_sections():
    text = render_model_card(_card(), repo_id="me/tiny-gqa")
    meta = _front_matter(text)
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"][:2] == ["kvsurgeon", "gqa"] and "llama" in meta["tags"]

    assert "```bash\nkvsurgeon convert org/tiny-llama out --to gqa --kv-heads 2\n```" in text
    # KV section: bytes per token, reduction, and the 32K-context size (2048 * 32768 B = 64 MiB).
    assert "| source | 2,048 | 64.0 MiB |" in text
    assert "| this model | 1,024 | 32.0 MiB |" in text
    assert "50.0%" in text
    # Fidelity: the given numbers, nothing else.
    for number in ("12.345", "11.111", "0.0421", "93.12%", "11.502", "0.0107", "97.55%", "4,096"):
        assert number in text
    fidelity = text.split("## Measured fidelity")[1].split("## Long context")[0]
    assert "not measured" not in fidelity.lower()
    assert "## Long context\n\nNot measured yet" in text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-gqa")' in text
    assert "trust_remote_code" not in text


def test_card_long_context_section_and_round_trip(tmp_path):
    from kvsurgeon.convert.evaluation.long_context import LongContextOptions, LongContextResult

    opts = dataclasses.asdict(LongContextOptions(tasks=("passkey", "long-ppl"), lengths=(1024, 2048), depths=2, samples=3))
    rows = [
        LongContextResult(model=name, options=opts, depths=[0.0, 1.0], passkey=[[1.0, a], [b, 0.0]],
                          passkey_by_length={"1024": (1 + a) / 2, "2048": b / 2}, long_ppl_buckets=["0-512", "512-1024", "1024-2048"],
                          long_ppl=[20.0, p, 9.0], long_ppl_tokens=2047).as_dict()
        for name, a, b, p in (("src (reference)", 1.0, 1.0, 10.5), ("conv", 0.0, 1 / 3, 17.25))
    ]
    info = _card(long_context=rows)
    write_model_card(tmp_path, info)
    text = (tmp_path / "README.md").read_text()
    section = text.split("## Long context")[1].split("## Loading")[0]
    assert "| src (reference) | 100% | 50% | 20.00 | 10.50 | 9.00 |" in section
    assert "| conv | 50% | 17% | 20.00 | 17.25 | 9.00 |" in section
    assert "3 prompts per length and depth" in section and "2 depths" in section
    assert read_card_info(tmp_path).long_context == json.loads(json.dumps(rows))  # tuples come back as lists


def test_card_without_measurements_says_so():
    text = render_model_card(_card(fidelity=[], license=None, command=None, recipe="lr: 1.0e-4\nsteps: 100\n"))
    assert "Not measured yet" in text
    assert "| Stage |" not in text
    assert "```yaml\nlr: 1.0e-4\nsteps: 100\n```" in text
    assert "license" not in _front_matter(text)


def test_card_local_base_model_is_not_put_in_front_matter():
    # The Hub rejects non-ids in `base_model`; a local path is only mentioned in the text.
    text = render_model_card(_card(base_model="/data/ckpt/my-llama"))
    meta = _front_matter(text)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "/data/ckpt/my-llama" in text


def test_card_info_round_trips(tmp_path):
    info = _card(summary="Tricky text --> with a comment end, `backticks` and | pipes.\nSecond line.")
    write_model_card(tmp_path, info)
    assert read_card_info(tmp_path) == info
    # The embedded JSON must not close the HTML comment early.
    text = (tmp_path / "README.md").read_text()
    comment = text[text.index("<!-- kvsurgeon-card:") :]
    assert comment.count("-->") == 1


def test_read_card_info_none_without_embedded_data(tmp_path):
    assert read_card_info(tmp_path) is None
    (tmp_path / "README.md").write_text("# A hand-written card\n")
    assert read_card_info(tmp_path) is None
    assert refresh_model_card(tmp_path, "me/x") is False


def test_refresh_model_card_sets_repo_id(tmp_path):
    write_model_card(tmp_path, _card())
    assert "path/to/this/folder" in (tmp_path / "README.md").read_text()
    assert refresh_model_card(tmp_path, "me/tiny-gqa") is True
    text = (tmp_path / "README.md").read_text()
    assert 'from_pretrained("me/tiny-gqa")' in text
    assert read_card_info(tmp_path) == _card()


def test_fidelity_row_rejects_percentages():
    with pytest.raises(ValueError, match="fraction"):
        FidelityRow("after conversion", "x", 10, 1.0, 1.0, 0.0, 93.1)


def test_source_license(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: llama3.1\ntags: [a]\n---\n# Model\n")
    assert source_license(tmp_path) == "llama3.1"

    class Config:
        _name_or_path = str(tmp_path)

    assert source_license(Config()) == "llama3.1"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert source_license(tmp_path) is None
    assert source_license(tmp_path / "missing") is None


# ---------------------------------------------------------------------------- fixtures for pushing


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama saved with save_pretrained (safetensors), plus its logits on IDS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(IDS).logits
    return folder, logits


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint with a model card (tests may modify it)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    write_model_card(folder, _card())
    return folder


@pytest.fixture
def hub(request, monkeypatch, tmp_path):
    """The fake Hub. Param "env" (default): configured as if HF_ENDPOINT pointed at it; "argument": only the
    explicit `endpoint=` arguments point at it."""
    server = FakeHub(token=TOKEN).start()
    if getattr(request, "param", "env") == "env":
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        # huggingface_hub reads HF_ENDPOINT at import time into these two constants: set both as the import would.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    else:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-cached-login"))
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Single-commit upload path; the large-folder test opts into the Xet pipeline explicitly.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    yield server
    server.stop()


def _all_text(error: BaseException) -> str:
    parts, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def _download_and_compare(hub: FakeHub, repo_id: str, tiny_checkpoint, cache_dir: Path, revision: str | None = None):
    from transformers import AutoModelForCausalLM

    path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, endpoint=hub.url)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = loaded(IDS).logits
    assert torch.equal(logits, tiny_checkpoint[1])
    return Path(path)


# ---------------------------------------------------------------------------- pushing


@pytest.mark.parametrize("hub", ["env", "argument"], indirect=True)
def test_push_then_download_gives_identical_logits(hub, checkpoint, tiny_checkpoint, tmp_path):
    (checkpoint / "__pycache__").mkdir()
    (checkpoint / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (checkpoint / ".DS_Store").write_bytes(b"junk")
    (checkpoint / "model.safetensors.tmp123").write_bytes(b"junk")

    url = push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, refresh_card=refresh_model_card)

    head = hub.repos["kv/tiny-gqa"].branches["main"]
    assert url == f"{hub.url}/kv/tiny-gqa/commit/{head}"
    remote = hub.files("kv/tiny-gqa")
    assert {"config.json", "model.safetensors", "README.md"} <= set(remote)
    assert not any("pycache" in p or p.endswith(".DS_Store") or ".tmp" in p for p in remote)

    path = _download_and_compare(hub, "kv/tiny-gqa", tiny_checkpoint, tmp_path / "fresh-cache")
    card = (path / "README.md").read_text()
    assert 'from_pretrained("kv/tiny-gqa")' in card
    assert read_card_info(path) == _card()


def test_push_to_new_branch(hub, checkpoint, tiny_checkpoint, tmp_path):
    push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, revision="conversion-v1")
    repo = hub.repos["kv/tiny-gqa"]
    assert "conversion-v1" in repo.branches
    assert "model.safetensors" not in repo.resolve("main").files
    _download_and_compare(hub, "kv/tiny-gqa", tiny_checkpoint, tmp_path / "fresh", revision="conversion-v1")
    # Pushing again to the existing branch works and changes nothing.
    before = repo.branches["conversion-v1"]
    push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, revision="conversion-v1")
    assert repo.branches["conversion-v1"] == before


@pytest.mark.parametrize("via", ["environment", "argument"])
def test_wrong_token_is_an_authentication_error_without_the_token(hub, checkpoint, monkeypatch, caplog, capsys, via):
    caplog.set_level(logging.DEBUG)
    if via == "environment":
        monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
        token = None
    else:
        token = WRONG_TOKEN
    with pytest.raises(PublishError) as info:
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, token=token, backoff_seconds=0.01)
    message = str(info.value)
    assert "not authenticated" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert isinstance(info.value, KvSurgeonError)
    out = capsys.readouterr()
    for text in (_all_text(info.value), caplog.text, out.out, out.err):
        assert WRONG_TOKEN not in text
    assert hub.count("info") == 1 and hub.count("create") <= 1  # auth errors are not retried
    assert "kv/tiny-gqa" not in hub.repos


@pytest.mark.parametrize("hub", ["env", "argument"], indirect=True)
def test_read_only_repo_is_a_permission_error(hub, checkpoint):
    hub.add_repo("someone/locked", read_only=True)
    with pytest.raises(PublishError, match="no write permission to someone/locked"):
        push_folder(checkpoint, "someone/locked", endpoint=hub.url, backoff_seconds=0.01)
    assert hub.count("commit") == 0
    assert set(hub.files("someone/locked")) == {".gitattributes"}


def test_transient_commit_errors_are_retried(hub, checkpoint, tiny_checkpoint, tmp_path):
    hub.fail_next("commit", times=2, status=503)
    push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, backoff_seconds=0.01)
    assert hub.count("commit") == 3
    _download_and_compare(hub, "kv/tiny-gqa", tiny_checkpoint, tmp_path / "fresh")


def test_retries_give_up_with_a_clear_error(hub, checkpoint):
    hub.fail_next("commit", times=10, status=503)
    with pytest.raises(PublishError, match="503") as info:
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, retries=2, backoff_seconds=0.01)
    assert "try again later" in str(info.value)
    assert hub.count("commit") == 3


def test_non_transient_errors_are_not_retried(hub, checkpoint):
    hub.fail_next("commit", times=1, status=422)
    with pytest.raises(PublishError, match="422"):
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url, backoff_seconds=0.01)
    assert hub.count("commit") == 1


def test_missing_config_fails_before_any_request(hub, checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(PublishError, match="no config.json"):
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url)
    assert hub.requests == []


def test_missing_weights_fail_before_any_request(hub, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="no weights"):
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url)
    assert hub.requests == []


def test_missing_shard_fails_before_any_request(hub, checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {"total_size": 1},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PublishError, match="model-00002-of-00002.safetensors"):
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url)
    assert hub.requests == []


def test_config_needing_custom_code_fails_before_any_request(hub, checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "kvsurgeon_custom_attention"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(PublishError, match="without custom code"):
        push_folder(checkpoint, "kv/tiny-gqa", endpoint=hub.url)
    assert hub.requests == []


def test_choose_uploader():
    assert _choose_uploader(10, 100) == "upload_folder"
    assert _choose_uploader(100, 100) == "upload_folder"
    assert _choose_uploader(101, 100) == "upload_large_folder"


def test_files_to_upload_skips_junk(checkpoint):
    (checkpoint / ".cache" / "huggingface").mkdir(parents=True)
    (checkpoint / ".cache" / "huggingface" / "meta").write_text("x")
    (checkpoint / "sub" / "__pycache__").mkdir(parents=True)
    (checkpoint / "sub" / "__pycache__" / "m.pyc").write_text("x")
    (checkpoint / "sub" / ".hidden").write_text("x")
    (checkpoint / "shard.tmp").write_text("x")
    names = {p.relative_to(checkpoint).as_posix() for p in files_to_upload(checkpoint)}
    expected = {"config.json", "model.safetensors", "README.md"}
    if (checkpoint / "generation_config.json").exists():
        expected.add("generation_config.json")
    assert names == expected


def test_large_folder_uses_the_multi_commit_pipeline(hub, checkpoint, tiny_checkpoint, tmp_path, monkeypatch):
    """Over the threshold: huggingface_hub >= 2 streams through its resumable Xet pipeline inside upload_folder."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    if hasattr(HfApi, "upload_large_folder"):
        pytest.skip("this huggingface_hub has upload_large_folder; covered by the next test")
    import huggingface_hub._upload_pipeline as pipeline

    used = []
    real = pipeline.pipelined_upload

    def spy(*args, **kwargs):
        used.append(kwargs["repo_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "pipelined_upload", spy)
    push_folder(checkpoint, "kv/tiny-large", endpoint=hub.url, large_folder_threshold_bytes=1, backoff_seconds=0.01)
    assert used == ["kv/tiny-large"]
    assert hub.count("commit") >= 1
    _download_and_compare(hub, "kv/tiny-large", tiny_checkpoint, tmp_path / "fresh")


def test_large_folder_calls_upload_large_folder_when_available(hub, checkpoint, tiny_checkpoint, tmp_path, monkeypatch):
    """huggingface_hub 1.x has HfApi.upload_large_folder: it must be chosen over the threshold, with our options."""
    calls = []

    def upload_large_folder(
        self,
        repo_id,
        folder_path,
        *,
        repo_type,
        revision=None,
        private=None,
        allow_patterns=None,
        ignore_patterns=None,
        num_workers=None,
        print_report=True,
        print_report_every=60,
    ):
        # Stand-in with the 1.x signature: records the call, then uploads for real through the fake Hub.
        calls.append(
            dict(repo_id=repo_id, repo_type=repo_type, revision=revision, private=private, ignore_patterns=ignore_patterns)
        )
        self.upload_folder(
            repo_id=repo_id,
            folder_path=folder_path,
            repo_type=repo_type,
            revision=revision,
            ignore_patterns=ignore_patterns,
            commit_message="large upload",
        )

    if not hasattr(HfApi, "upload_large_folder"):
        monkeypatch.setattr(HfApi, "upload_large_folder", upload_large_folder, raising=False)
    else:
        real = HfApi.upload_large_folder

        def recording(self, *args, **kwargs):
            calls.append(kwargs)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(HfApi, "upload_large_folder", recording)

    url = push_folder(checkpoint, "kv/tiny-large", endpoint=hub.url, large_folder_threshold_bytes=1)
    assert len(calls) == 1 and calls[0]["repo_type"] == "model" and calls[0]["repo_id"] == "kv/tiny-large"
    assert ".*" in calls[0]["ignore_patterns"]
    assert url == f"{hub.url}/kv/tiny-large/commit/{hub.repos['kv/tiny-large'].branches['main']}"
    _download_and_compare(hub, "kv/tiny-large", tiny_checkpoint, tmp_path / "fresh")

    # Under the threshold the regular path is used.
    calls.clear()
    push_folder(checkpoint, "kv/tiny-small", endpoint=hub.url)
    assert calls == []
