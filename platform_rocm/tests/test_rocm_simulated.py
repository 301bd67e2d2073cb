"""The ROCm platform's decisions on a simulated HIP build of torch.

No AMD GPU here: ``torch.version.hip`` is set, the amdgpu driver's files (``/dev/kfd``,
KFD's sysfs topology, a render node) are laid out in a temporary folder, and
``torch.cuda``'s device queries answer for a fake device. What runs for real is tessellm's
platform and attention-backend selection, the Triton backend's reading of an fp8 cache
and the fused-kernel table, the parts a HIP build would run before touching the GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tessellm.errors import ConfigError
from tessellm.interfaces.attention import AttentionSpec, kv_cache_torch_dtype
from tessellm.interfaces.platform import GraphSpec
from tessellm.plugins import get_plugins
from tessellm.selection import choose_attention_backend, choose_platform
from tessellm_attention_triton.backend import TritonPagedAttention
from tessellm_attention_triton.kernels import common as triton_common
from tessellm_cuda import detect as cuda_detect
from tessellm_cuda import graphs as cuda_graphs
from tessellm_cuda.platform import CudaPlatform
from tessellm_rocm import arch as rocm_arch
from tessellm_rocm import detect
from tessellm_rocm.platform import RocmPlatform, wave_scaled_warps
from tessellm_triton_kernels.norm_gemv import DEFAULT_CONFIG, DEFAULT_SILU_CONFIG

MI300X = "gfx942:sramecc+:xnack-"
HIP_VERSION = "6.4.43484-123"


def cpu_node() -> str:
    return "cpu_cores_count 64\nsimd_count 0\ngfx_target_version 0\n"


def gpu_node(target_version: int) -> str:
    return f"cpu_cores_count 0\nsimd_count 1216\ngfx_target_version {target_version}\n"


def lay_out_topology(root, nodes: list[str]) -> str:
    for index, text in enumerate(nodes):
        (root / str(index)).mkdir(parents=True)
        (root / str(index) / "properties").write_text(text)
    return str(root)


class HipBuild:
    """Switches on the simulated HIP build; ``device(arch)`` sets the fake GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
        self.mp, self.tmp = monkeypatch, tmp_path
        monkeypatch.setattr(torch.version, "hip", HIP_VERSION)
        kfd = tmp_path / "kfd"
        kfd.write_text("")
        monkeypatch.setattr(detect, "KFD_DEVICE", str(kfd))
        nodes = [cpu_node(), gpu_node(90402), gpu_node(90402)]
        self.topology(nodes)
        monkeypatch.setattr(detect, "render_nodes", lambda: ["/dev/dri/renderD128"])
        for var in detect.VISIBILITY_VARIABLES:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        self.device(MI300X)
        clear_probes()

    def topology(self, nodes: list[str]) -> None:
        root = self.tmp / f"nodes{len(list(self.tmp.iterdir()))}"
        self.mp.setattr(detect, "KFD_TOPOLOGY", lay_out_topology(root, nodes))

    def device(self, gcn_arch_name: str) -> None:
        props = SimpleNamespace(
            gcnArchName=gcn_arch_name,
            name="AMD Instinct (simulated)",
            multi_processor_count=304,
            total_memory=192 * 2**30,
            warp_size=rocm_arch.lookup(gcn_arch_name).wavefront_size,
        )
        self.mp.setattr(torch.cuda, "get_device_properties", lambda index=None: props)


def clear_probes() -> None:
    detect.probe_rocm.cache_clear()
    cuda_detect.probe_cuda.cache_clear()


@pytest.fixture
def hip(monkeypatch, tmp_path):
    yield HipBuild(monkeypatch, tmp_path)
    clear_probes()


# -- selection ----------------------------------------------------------------------------


def test_a_hip_build_selects_rocm_over_cuda_with_rccl(hip):
    platform, choice = choose_platform(get_plugins())
    assert type(platform) is RocmPlatform and choice.chosen == "rocm"
    assert choice.refused["cuda"] == "this torch is a ROCm (HIP) build; the rocm platform serves it"
    assert choice.refused["cpu"] == "lower priority than rocm"
    assert RocmPlatform.unavailable_reason() == (
        f"HIP {HIP_VERSION}, 2 GPU(s) (gfx942) in KFD's topology"
    )
    # torch's HIP build names its devices "cuda" and RCCL "nccl".
    assert (platform.device_type, platform.distributed_backend) == ("cuda", "nccl")
    with pytest.raises(ConfigError, match="ROCm \\(HIP\\) build"):
        choose_platform(get_plugins(), "cuda")


def test_without_a_hip_build_rocm_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    clear_probes()
    try:
        _, choice = choose_platform(get_plugins(), "auto")
    except ConfigError as exc:  # no platform at all would still name rocm's reason
        assert "not a ROCm (HIP) build" in str(exc)
    else:
        assert (
            choice.refused["rocm"] == f"this torch ({torch.__version__}) is not a ROCm (HIP) build"
        )
    finally:
        clear_probes()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no kfd", "is missing: no amdgpu kernel driver"),
        ("no render node", "no GPU render node under /dev/dri"),
        ("HIP_VISIBLE_DEVICES=''", "HIP_VISIBLE_DEVICES='' hides every GPU"),
        ("ROCR_VISIBLE_DEVICES=-1", "ROCR_VISIBLE_DEVICES='-1' hides every GPU"),
        ("cpu nodes only", "KFD's topology lists no GPU node"),
        ("no topology, no runtime device", "no KFD topology and the HIP runtime finds no device"),
    ],
)
def test_refusal_reasons_on_a_hip_build(hip, monkeypatch, tmp_path, case, reason):
    if case == "no kfd":
        monkeypatch.setattr(detect, "KFD_DEVICE", str(tmp_path / "absent"))
    elif case == "no render node":
        monkeypatch.setattr(detect, "render_nodes", lambda: [])
    elif "=" in case:
        var, value = case.split("=")
        monkeypatch.setenv(var, value.strip("'"))
    elif case == "cpu nodes only":
        hip.topology([cpu_node()])
    else:
        monkeypatch.setattr(detect, "KFD_TOPOLOGY", str(tmp_path / "no-sysfs"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not RocmPlatform.is_available()
    assert reason in RocmPlatform.unavailable_reason()
    _, choice = choose_platform(get_plugins())
    assert reason in choice.refused["rocm"]


def test_without_a_topology_the_hip_runtime_is_asked(hip, monkeypatch, tmp_path):
    monkeypatch.setattr(detect, "KFD_TOPOLOGY", str(tmp_path / "no-sysfs"))
    assert RocmPlatform.is_available()
    assert RocmPlatform.unavailable_reason() == "2 device(s) (HIP runtime)"


@pytest.mark.parametrize(
    ("version", "name"),
    [
        (90402, "gfx942"),
        (90010, "gfx90a"),
        (90500, "gfx950"),
        (110000, "gfx1100"),
        (120001, "gfx1201"),
    ],
)
def test_kfd_target_versions_name_the_architecture(version, name):
    assert rocm_arch.gfx_name(version) == name


def test_the_topology_reports_each_gpu_architecture(hip):
    hip.topology([cpu_node(), gpu_node(90500), gpu_node(90402), cpu_node()])
    assert detect.kfd_gpu_archs() == ["gfx950", "gfx942"]
    assert RocmPlatform.unavailable_reason().endswith("2 GPU(s) (gfx942, gfx950) in KFD's topology")


# -- capabilities -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gcn_name", "wavefront", "fp8_e4m3", "default_dtype"),
    [
        (MI300X, 64, torch.float8_e4m3fnuz, torch.bfloat16),
        ("gfx950:sramecc+:xnack-", 64, torch.float8_e4m3fn, torch.bfloat16),
        ("gfx90a:sramecc+:xnack-", 64, None, torch.bfloat16),
        ("gfx906:sramecc-:xnack-", 64, None, torch.float16),
        ("gfx1100", 32, None, torch.bfloat16),
        ("gfx1201", 32, torch.float8_e4m3fn, torch.bfloat16),
        ("gfx1151", 32, None, torch.bfloat16),  # not in the table: from the name
        ("gfx90c:xnack-", 64, None, torch.float16),
    ],
)
def test_capabilities_follow_the_architecture(hip, gcn_name, wavefront, fp8_e4m3, default_dtype):
    hip.device(gcn_name)
    platform = RocmPlatform()
    arch = platform.arch()
    assert arch.gfx == gcn_name.split(":")[0]
    assert (arch.wavefront_size, arch.fp8_e4m3) == (wavefront, fp8_e4m3)
    assert platform.default_dtype() == default_dtype
    assert platform.default_dtype() in platform.supported_dtypes()
    assert (torch.bfloat16 in platform.supported_dtypes()) == (default_dtype == torch.bfloat16)


def test_the_attention_backend_is_triton_then_torch(hip):
    platform = RocmPlatform()
    spec = AttentionSpec("cuda", torch.bfloat16, 64, 9, 3, 16, kv_cache_dtype="fp8_e4m3")
    cls, choice = choose_attention_backend(get_plugins(), platform, spec)
    assert cls is TritonPagedAttention and choice.chosen == "triton"
    # A head size Triton's kernels do not take falls back to the torch backend.
    wide = AttentionSpec("cuda", torch.bfloat16, 512, 8, 8, 16)
    cls, choice = choose_attention_backend(get_plugins(), platform, wide)
    assert choice.chosen == "torch"
    assert "head size 512" in choice.refused["triton"]


def test_an_fp8_kv_cache_keeps_the_ocp_format_on_mi300(hip):
    platform = RocmPlatform()
    assert platform.arch().fp8_e4m3 == torch.float8_e4m3fnuz  # MI300's own e4m3
    for name, ocp in (("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        decision = platform.kv_cache_fp8(name)
        # What the engine allocates for this kv_cache_dtype, whatever the platform.
        assert decision.dtype == ocp == kv_cache_torch_dtype(name, torch.bfloat16)
        assert not decision.hardware_conversion and "fnuz" in decision.reason
        # The Triton backend takes that storage as fp8 and, on ROCm, decodes its bits in
        # software; a fnuz cache it would read as if it held the run dtype.
        assert triton_common.kv_format(decision.dtype) != triton_common.KV_SAME
    assert not triton_common.native_e4m3(torch.device("cuda", 0))
    assert triton_common.kv_format(torch.float8_e4m3fnuz) == triton_common.KV_SAME
    assert platform.kv_cache_fp8("auto") is None


@pytest.mark.parametrize(
    ("gcn_name", "native", "words"),
    [
        ("gfx950:sramecc+:xnack-", True, "computes in OCP fp8"),
        ("gfx1201", True, "computes in OCP fp8"),
        ("gfx90a:sramecc+:xnack-", False, "no fp8 hardware"),
    ],
)
def test_fp8_kv_cache_elsewhere(hip, gcn_name, native, words):
    hip.device(gcn_name)
    decision = RocmPlatform().kv_cache_fp8("fp8_e4m3")
    assert decision.dtype == torch.float8_e4m3fn
    assert decision.hardware_conversion is native and words in decision.reason


# -- kernels and graphs -------------------------------------------------------------------


def test_wave_scaled_warps_keep_the_threads_per_program():
    assert [wave_scaled_warps(w, 64) for w in (1, 2, 4, 8, 16)] == [1, 1, 2, 4, 8]
    assert [wave_scaled_warps(w, 32) for w in (1, 4, 8)] == [1, 4, 8]


def test_fused_ops_on_64_wide_wavefronts_launch_half_the_warps(hip, monkeypatch):
    monkeypatch.delenv("TESSELLM_FUSED_OPS", raising=False)
    table = RocmPlatform().fused_ops(torch.bfloat16)
    cuda_table = CudaPlatform().fused_ops(torch.bfloat16)
    assert table.names() == cuda_table.names()
    for name in ("add_rms_norm", "rms_norm", "silu_and_mul", "rotary_neox"):
        assert getattr(table, name) is getattr(cuda_table, name)
    fusions = table.rms_norm_linear.__self__
    assert table.linear_silu_and_mul.__self__ is fusions
    assert fusions.norm_config.num_warps == DEFAULT_CONFIG.num_warps // 2
    assert fusions.silu_config.num_warps == DEFAULT_SILU_CONFIG.num_warps // 2
    assert fusions.norm_config.block_n == DEFAULT_CONFIG.block_n  # only the width changes


def test_fused_ops_on_32_wide_wavefronts_are_cudas(hip, monkeypatch):
    hip.device("gfx1100")
    monkeypatch.delenv("TESSELLM_FUSED_OPS", raising=False)
    table = RocmPlatform().fused_ops(torch.bfloat16)
    assert table.rms_norm_linear.__self__.norm_config is None  # the kernel's defaults
    monkeypatch.setenv("TESSELLM_FUSED_OPS", "none")
    assert RocmPlatform().fused_ops(torch.bfloat16) is None
    hip.device(MI300X)
    monkeypatch.setenv("TESSELLM_FUSED_OPS", "rms_norm,silu_and_mul")
    assert RocmPlatform().fused_ops(torch.bfloat16).names() == ["rms_norm", "silu_and_mul"]


def test_decode_steps_are_captured_as_hip_graphs(hip, monkeypatch):
    built = []

    def fake_runner(model, attention, spec, device):
        built.append((attention.name, spec.max_num_seqs, device))
        return "runner"

    monkeypatch.setattr(cuda_graphs, "CudaGraphRunner", fake_runner)
    platform = RocmPlatform()
    spec = GraphSpec(max_num_seqs=64, max_model_len=2048, block_size=16)
    triton = TritonPagedAttention(AttentionSpec("cuda", torch.bfloat16, 64, 9, 3, 16))
    assert platform.graph_runner(nn.Linear(2, 2), triton, spec) == "runner"
    assert built == [("triton", 64, torch.device("cuda", 0))]

    class HostReading(TritonPagedAttention):
        graph_capturable = False

    assert platform.graph_runner(nn.Linear(2, 2), HostReading(triton.spec), spec) is None
