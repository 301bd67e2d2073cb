"""Template of a platform plugin: a platform on the CPU device under a new name."""

from __future__ import annotations

DESCRIPTION = "Hardware platform $name"
IMPL_MODULE = "platform"
IMPL_SUMMARY = (
    "`$class_name`, a platform on torch's CPU device with a priority below every "
    'first-party platform, so that it runs only when asked for (`device="$name"`).'
)
TEST_SUMMARY = (
    "the platform conformance check (`check_platform`) and greedy parity with HF "
    "transformers with the engine on this platform."
)
USAGE = """\
Use it: `tessellm generate --device $name ...` or `LLM(model, device="$name")`. To port
tessellm to a new device, set `device_type` to its torch device type, make
`is_available` detect it cheaply, and give it a priority above the CPU's (0).
"""

PLUGIN_IMPORTS = """\
from tessellm import hookimpl
"""

PLUGIN = """\


@hookimpl
def register_platforms(register):
    register(
        "$name",
        "$package.platform:$class_name",
    )
"""

IMPL = '''\
"""$class_name: the few device facts tessellm's engine asks a platform for.

It runs on torch's CPU device; the engine chooses the available platform of highest
``priority`` unless the user names one (``device="$name"``), and this one stays below
every first-party platform (the CPU's is 0) so that installing it changes nothing else.
"""

from __future__ import annotations

import os

import torch
from tessellm.interfaces.platform import Platform

# The most the KV cache takes, whatever the machine's memory.
KV_CACHE_CAP_BYTES = 2 << 30


def available_memory_bytes() -> int:
    """Memory the operating system reports free (8 GiB where it cannot tell)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class $class_name(Platform):
    name = "$name"
    device_type = "cpu"  # the torch device type tensors are created on
    priority = -100
    distributed_backend = "gloo"
    # Attention backends in preference order; the first that can serve the model wins.
    attention_backends = ("torch",)

    @classmethod
    def is_available(cls) -> bool:
        # Called for every installed platform each time the engine chooses one: keep it
        # cheap (no heavy imports, no device initialisation).
        return True

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        free = available_memory_bytes() * utilization - model_bytes
        return int(max(0, min(free, KV_CACHE_CAP_BYTES)))
'''

TEST = '''\
"""Tests of this platform with tessellm's conformance kit (tessellm.testing)."""

from tessellm.plugins import get_plugins
from tessellm.selection import choose_platform
from tessellm.testing import assert_greedy_parity, check_platform, tiny_model

PLATFORM = "$name"


def test_conforms_to_the_platform_contract():
    result = check_platform(PLATFORM)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()


def test_chosen_only_when_asked_for():
    plugins = get_plugins()
    _, auto = choose_platform(plugins)
    if auto.chosen == PLATFORM:  # no other installed platform is available here
        assert not any("lower priority" in why for why in auto.refused.values())
    else:
        assert auto.refused[PLATFORM].startswith("lower priority")
    platform, asked = choose_platform(plugins, PLATFORM)
    assert asked.chosen == PLATFORM and platform.device().type == "cpu"


def test_greedy_tokens_match_transformers(tmp_path):
    model = tiny_model("LlamaForCausalLM", tmp_path / "model")
    assert_greedy_parity(model, device=PLATFORM)
'''
