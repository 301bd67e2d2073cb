"""Model IDs from the Hugging Face Hub: ``org/name`` and ``org/name:QUANT``.

``org/name`` fetches a Hugging Face directory through ``huggingface_hub``: only the
safetensors shards, config, tokenizer, chat template and generation config (never
``*.bin``/``*.pt``/pickle). ``org/name:QUANT`` picks one ``.gguf`` file from a GGUF
repository as llama.cpp's ``-hf`` does: the file whose name holds the quant tag
(case-insensitive); a repository with GGUF files only and no tag gets ``Q4_K_M``, or its
first file.

Files land in the Hub's own cache (``HF_HUB_CACHE``, shared with transformers and vLLM), or
in the layout ``models--org--name/{refs,snapshots,blobs}`` under ``--download-dir`` when one
is given. ``HF_TOKEN`` authenticates; with ``HF_HUB_OFFLINE=1``, or when the Hub cannot be
reached, the cached snapshot is used and nothing is fetched.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import ModelSource

# The Hub's rule for repository names: letters, digits, '-', '_', '.'; at most 96 each.
MODEL_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
    r"(?::(?P<quant>[A-Za-z0-9._-]+))?$"
)
# What a Hugging Face directory needs, at the top level of the repository; no pickles.
HF_DIR_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's -hf default
SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
LIST_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class HubModelId:
    repo: str
    quant: str | None = None


@dataclass(frozen=True, slots=True)
class Fetch:
    """The repository files one model needs; ``gguf`` names the single file if it is one."""

    files: tuple[str, ...]
    gguf: str | None = None


class HubUnreachable(Exception):
    """The Hub gave no answer about the repository (offline, no network, or a server error)."""


def parse_model_id(model: str) -> HubModelId | None:
    match = MODEL_ID.match(model)
    if match is None or "--" in model or ".." in model:
        return None
    return HubModelId(match["repo"], match["quant"])


def _env_true(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as it is now (huggingface_hub reads it once, at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = _env_true(name)
        if value is not None:
            return value
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: Path) -> Path:
    """``cache_dir`` when it was given (``--download-dir``), else the Hub's own cache."""
    from tessellm.config import default_cache_dir

    if Path(cache_dir).expanduser().resolve() != default_cache_dir().expanduser().resolve():
        return Path(cache_dir)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def choose_gguf(repo: str, files: list[str], quant: str | None) -> str:
    """The one ``.gguf`` file for ``quant`` (as llama.cpp's ``-hf`` picks it)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    if not ggufs:
        raise ModelLoadError(
            f"{repo} has no .gguf files, so the tag :{quant} picks nothing "
            "(without a tag its safetensors are loaded)"
        )
    wanted = quant or DEFAULT_QUANT
    # The tag as a whole word of the name: Q4_K does not pick Q4_K_M, nor Q4_XS IQ4_XS.
    tag = re.compile(rf"(?<![A-Za-z0-9]){re.escape(wanted)}(?![A-Za-z0-9_])", re.IGNORECASE)
    hits = [f for f in ggufs if tag.search(f)]
    if not hits:
        if quant is not None:
            shown = ", ".join(Path(f).name for f in ggufs[:8]) + (" ..." if len(ggufs) > 8 else "")
            raise ModelLoadError(f"no .gguf file in {repo} matches the quant {quant!r} ({shown})")
        hits = ggufs[:1]
    hits.sort(key=lambda f: (SPLIT_GGUF.search(f) is not None, len(f), f))
    choice = hits[0]
    if SPLIT_GGUF.search(choice):
        raise ModelLoadError(
            f"{repo}: {choice} is one part of a split GGUF, and tessellm reads single-file "
            "GGUFs; merge the parts with `llama-gguf-split --merge`, or pick another quant"
        )
    return choice


def plan_fetch(model_id: HubModelId, files: list[str]) -> Fetch:
    """Which of the repository's ``files`` to fetch, or a ModelLoadError saying why none."""
    repo = model_id.repo
    top = [f for f in files if "/" not in f]
    has_weights = any(f.endswith(".safetensors") for f in top)
    has_gguf = any(f.lower().endswith(".gguf") for f in files)
    if model_id.quant is not None or (has_gguf and not has_weights):
        gguf = choose_gguf(repo, files, model_id.quant)
        return Fetch((gguf,), gguf)
    if has_weights and "config.json" in top:
        wanted = [f for f in top if any(fnmatch.fnmatch(f, p) for p in HF_DIR_PATTERNS)]
        return Fetch(tuple(sorted(wanted)))
    pickles = sorted(f for f in top if f.endswith(PICKLE_SUFFIXES))
    if pickles and not has_weights:
        raise ModelLoadError(
            f"{repo} holds only pickle checkpoints ({', '.join(pickles[:3])}); tessellm "
            "loads safetensors only, since unpickling can run arbitrary code"
        )
    missing = "config.json" if has_weights else "*.safetensors or .gguf files"
    raise ModelLoadError(f"{repo} has no {missing}: it is not a model tessellm can load")


def cached_snapshot(cache: Path, repo: str, revision: str) -> Path | None:
    """The snapshot folder the cache holds for ``revision`` (a branch, tag or commit)."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    commit = revision if COMMIT_HASH.match(revision) else None
    if commit is None:
        ref = storage / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def cached_files(snapshot: Path) -> list[str]:
    """Files present in a snapshot (links whose blob is missing do not count)."""
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def missing_shards(folder: Path) -> list[str]:
    """Shards a ``*.safetensors.index.json`` in ``folder`` names that are not there."""
    missing: set[str] = set()
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            continue  # the weight format reports a broken checkpoint with its own words
        missing |= {f for f in set(weight_map.values()) if not (folder / f).is_file()}
    return sorted(missing)


class HubSource(ModelSource):
    """``org/name`` and ``org/name:QUANT`` from the Hugging Face Hub."""

    name = "hub"

    def matches(self, model: str) -> bool:
        # A local folder that looks like an ID (``models/llama``) is a path.
        return parse_model_id(model) is not None and not Path(model).expanduser().exists()

    def resolve(self, model: str, cache_dir: Path, revision: str | None = None) -> Path:
        model_id = parse_model_id(model)
        if model_id is None:
            raise ModelLoadError(f"{model!r} is not a Hugging Face model ID (org/name[:QUANT])")
        cache = hub_cache_dir(cache_dir)
        if hub_offline():
            return self._from_cache(model, model_id, cache, revision, "HF_HUB_OFFLINE is set")
        try:
            files = self._list_remote(model_id.repo, revision)
        except HubUnreachable as exc:
            return self._from_cache(model, model_id, cache, revision, str(exc))
        return self._download(model_id, plan_fetch(model_id, files), cache, revision)

    @staticmethod
    def _list_remote(repo: str, revision: str | None) -> list[str]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            # One request, not the paginated tree listing, which retries a dead network
            # with back-off for half a minute before the cache may answer.
            info = HfApi().model_info(
                repo, revision=revision, token=os.environ.get("HF_TOKEN"), timeout=LIST_TIMEOUT_S
            )
            return [sibling.rfilename for sibling in info.siblings or []]
        except GatedRepoError:
            raise ModelLoadError(
                f"{repo} is gated on the Hugging Face Hub: accept its terms on "
                f"https://huggingface.co/{repo} and set HF_TOKEN"
            ) from None
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"{repo!r} is neither a local path nor a model on the Hugging Face Hub "
                "(a private repository needs HF_TOKEN)"
            ) from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"{repo} has no revision {revision!r} on the Hub") from None
        except OfflineModeIsEnabled:
            raise HubUnreachable("HF_HUB_OFFLINE is set") from None
        except HfHubHTTPError as exc:  # the Hub is down or refuses: the cache may still serve
            raise HubUnreachable(f"the Hub answered {_first_line(exc)}") from None
        except Exception as exc:  # requests and httpx raise their own errors
            raise HubUnreachable(f"the Hub cannot be reached ({_first_line(exc)})") from None

    @staticmethod
    def _download(model_id: HubModelId, fetch: Fetch, cache: Path, revision: str | None) -> Path:
        from huggingface_hub import hf_hub_download, snapshot_download

        repo, token = model_id.repo, os.environ.get("HF_TOKEN")
        what = fetch.gguf or f"{len(fetch.files)} files"
        print(
            f"tessellm: {repo}: {what} from the Hugging Face Hub (cache: {cache})", file=sys.stderr
        )
        try:
            if fetch.gguf is not None:
                return Path(
                    hf_hub_download(
                        repo, fetch.gguf, revision=revision, cache_dir=cache, token=token
                    )
                )
            folder = snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                allow_patterns=list(fetch.files),
                token=token,
            )
        except Exception as exc:  # network, disk and Hub errors alike
            raise ModelLoadError(
                f"downloading {repo} from the Hub failed: {_first_line(exc)}"
            ) from None
        return Path(folder)

    @staticmethod
    def _from_cache(
        model: str, model_id: HubModelId, cache: Path, revision: str | None, reason: str
    ) -> Path:
        repo = model_id.repo
        at = f" at revision {revision!r}" if revision else ""
        snapshot = cached_snapshot(cache, repo, revision or "main")
        if snapshot is None:
            raise ModelLoadError(
                f"{model!r} is not a local path, and the Hugging Face model {repo}{at} is not "
                f"in the cache ({cache}) while {reason}; fetch it once with network access, "
                "or pass a local directory"
            )
        fetch = plan_fetch(model_id, cached_files(snapshot))
        if fetch.gguf is not None:
            return snapshot / fetch.gguf
        missing = missing_shards(snapshot)
        if missing:
            raise ModelLoadError(
                f"the cached snapshot of {repo}{at} ({snapshot}) lacks {', '.join(missing[:3])} "
                f"while {reason}; finish the download with network access"
            )
        return snapshot
