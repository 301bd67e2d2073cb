"""Model IDs from the Hugging Face Hub, offline: a Hub cache laid out as huggingface_hub lays
it out (``models--org--name/{refs,snapshots,blobs}``), found through ``HF_HUB_CACHE`` or
``--download-dir``; ``org/name:QUANT`` picks one GGUF file; a model neither local nor
cached, with the Hub out of reach, is one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_cli import run_cli

import tessellm.sources.hub as hub
from tessellm import LLM, SamplingParams
from tessellm.errors import ModelLoadError
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def add_snapshot(
    cache: Path, repo: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Write ``files`` into ``cache`` as huggingface_hub does: content in ``blobs/<hash>``,
    ``snapshots/<commit>/<name>`` a relative link to it, ``refs/<ref>`` the commit."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache in HF_HUB_CACHE, offline; tessellm's own cache elsewhere."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TESSELLM_CACHE", str(tmp_path / "tessellm-cache"))
    return cache


def resolve(model: str, revision: str | None = None, cache_dir: Path | None = None):
    from tessellm.config import default_cache_dir

    return resolve_model(get_plugins(), model, cache_dir or default_cache_dir(), revision)


def test_model_id_loads_from_the_hub_cache_offline(tiny_llama, hub_cache):
    snapshot = add_snapshot(hub_cache, "org/tiny", folder_files(tiny_llama), COMMIT_MAIN)
    resolved = resolve("org/tiny")
    assert (resolved.source_name, resolved.path, resolved.format_name) == (
        "hub",
        snapshot,
        "safetensors",
    )
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    from_hub = LLM(model="org/tiny", dtype="float32", device="cpu")
    from_folder = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    ids = [out.outputs[0].token_ids for out in from_hub.generate(["Hello , my"], params)]
    assert ids == [out.outputs[0].token_ids for out in from_folder.generate(["Hello , my"], params)]


def test_revision_picks_a_branch_or_commit(tiny_llama, hub_cache):
    files = folder_files(tiny_llama)
    main = add_snapshot(hub_cache, "org/tiny", files, COMMIT_MAIN)
    v1 = add_snapshot(hub_cache, "org/tiny", files, COMMIT_V1, refs=("v1",))
    assert resolve("org/tiny").path == main
    assert resolve("org/tiny", revision="v1").path == v1
    assert resolve("org/tiny", revision=COMMIT_MAIN).path == main
    with pytest.raises(ModelLoadError, match="at revision 'v2' is not in the cache") as info:
        resolve("org/tiny", revision="v2")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="--revision applies to Hugging Face model IDs"):
        resolve(str(tiny_llama), revision="v1")


def test_download_dir_holds_the_hub_layout(tiny_llama, hub_cache, tmp_path):
    download_dir = tmp_path / "downloads"
    snapshot = add_snapshot(download_dir, "org/tiny", folder_files(tiny_llama), COMMIT_MAIN)
    assert resolve("org/tiny", cache_dir=download_dir).path == snapshot
    with pytest.raises(ModelLoadError, match="not in the cache"):
        resolve("org/tiny")  # HF_HUB_CACHE is empty


def test_a_local_folder_that_looks_like_an_id_is_a_path(
    tiny_llama, hub_cache, tmp_path, monkeypatch
):
    add_snapshot(hub_cache, "org/tiny", folder_files(tiny_llama), COMMIT_MAIN)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama, tmp_path / "org" / "tiny")
    resolved = resolve("org/tiny")
    assert resolved.source_name == "local"
    assert resolved.path == (tmp_path / "org" / "tiny").resolve()


GGUF_FILES = {
    "model-Q4_K_M.gguf": b"q4km",
    "model-Q8_0.gguf": b"q80",
    "model-IQ4_XS.gguf": b"iq4xs",
    "mmproj-model-f16.gguf": b"mmproj",
    "README.md": b"readme",
}


def test_quant_tag_picks_one_gguf_file(hub_cache):
    snapshot = add_snapshot(hub_cache, "org/tiny-GGUF", GGUF_FILES, COMMIT_MAIN)
    assert resolve("org/tiny-GGUF:q8_0").path == snapshot / "model-Q8_0.gguf"
    assert resolve("org/tiny-GGUF:IQ4_XS").path == snapshot / "model-IQ4_XS.gguf"
    # No tag in a GGUF-only repository: llama.cpp's default quant.
    resolved = resolve("org/tiny-GGUF")
    assert resolved.path == snapshot / "model-Q4_K_M.gguf"
    assert resolved.path.suffix == ".gguf"
    # A whole tag only: Q4_XS is not IQ4_XS; F16 is only in the projector, never chosen.
    for tag in ("Q4_XS", "F16", "Q4_K"):
        with pytest.raises(ModelLoadError, match=f"no .gguf file in org/tiny-GGUF matches .*{tag}"):
            resolve(f"org/tiny-GGUF:{tag}")


def test_gguf_choice_rules():
    split = ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]
    assert hub.choose_gguf("o/r", ["b-Q2_K.gguf", "a-Q3_K_S.gguf"], None) == "a-Q3_K_S.gguf"
    assert hub.choose_gguf("o/r", ["Q8_0/m-q8_0.gguf", "m-Q4_K_M.gguf"], "Q8_0") == (
        "Q8_0/m-q8_0.gguf"
    )
    with pytest.raises(ModelLoadError, match="split GGUF"):
        hub.choose_gguf("o/r", split, "Q4_K_M")
    with pytest.raises(ModelLoadError, match=r"has no \.gguf files"):
        hub.plan_fetch(hub.HubModelId("o/r", "Q4_K_M"), ["config.json", "model.safetensors"])


def test_fetch_plan_takes_safetensors_and_tokenizer_never_pickles():
    listing = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "original/consolidated.00.pth",
        "onnx/model.onnx",
        "extra/model.safetensors",
    ]
    plan = hub.plan_fetch(hub.HubModelId("o/r"), listing)
    assert plan.gguf is None
    assert set(plan.files) == {
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    with pytest.raises(ModelLoadError, match="only pickle checkpoints"):
        hub.plan_fetch(hub.HubModelId("o/r"), ["config.json", "pytorch_model.bin"])


def test_online_resolution_downloads_only_what_it_plans(tiny_llama, hub_cache, monkeypatch):
    """The Hub's answers stand in for the network; the calls tessellm makes are checked."""
    import huggingface_hub

    files = folder_files(tiny_llama)
    listing = [*files, "pytorch_model.bin", "README.md", "model-Q4_K_M.gguf"]
    calls: list[tuple[str, dict]] = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        wanted = {name: files[name] for name in kwargs["allow_patterns"]}
        return str(add_snapshot(Path(kwargs["cache_dir"]), repo_id, wanted, COMMIT_MAIN))

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, {"filename": filename, **kwargs}))
        snapshot = add_snapshot(Path(kwargs["cache_dir"]), repo_id, {filename: b"x"}, COMMIT_V1)
        return str(snapshot / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    siblings = [SimpleNamespace(rfilename=name) for name in listing]
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "model_info",
        lambda self, repo, **kw: SimpleNamespace(siblings=siblings),
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    resolved = resolve("org/tiny", revision="main")
    repo, kwargs = calls[-1]
    assert repo == "org/tiny" and resolved.path.parent.parent.name == "models--org--tiny"
    assert sorted(kwargs["allow_patterns"]) == sorted(files)  # no .bin, README or GGUF
    assert (kwargs["revision"], kwargs["token"], Path(kwargs["cache_dir"])) == (
        "main",
        "hf_secret",
        hub_cache,
    )
    resolved = resolve("org/tiny:Q4_K_M")
    assert calls[-1][1]["filename"] == "model-Q4_K_M.gguf"
    assert resolved.path.name == "model-Q4_K_M.gguf"


def test_unreachable_hub_falls_back_to_the_cache(tiny_llama, hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelLoadError, match="the Hub cannot be reached") as info:
        resolve("org/tiny")
    assert "\n" not in str(info.value)
    snapshot = add_snapshot(hub_cache, "org/tiny", folder_files(tiny_llama), COMMIT_MAIN)
    assert resolve("org/tiny").path == snapshot


def test_incomplete_cached_snapshot_is_named(tiny_llama, hub_cache):
    files = folder_files(tiny_llama)
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    add_snapshot(hub_cache, "org/tiny", files, COMMIT_MAIN)
    with pytest.raises(ModelLoadError, match=r"lacks model-00002-of-00002\.safetensors"):
        resolve("org/tiny")


def test_uncached_model_offline_is_one_line(hub_cache):
    with pytest.raises(ModelLoadError, match="'org/absent' is not a local path") as info:
        LLM(model="org/absent", dtype="float32", device="cpu")
    assert "HF_HUB_OFFLINE is set" in str(info.value) and "\n" not in str(info.value)
    proc = run_cli("generate", "--model", "org/absent", "x", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "not in the cache" in errors[0], proc.stderr
