"""Platform detection (CUDA, ROCm, TPU) and the runner's platform hooks, on a CPU machine."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.engine.profile_run import profile_batch, scheduled_token_budget
from tessellm.plugins import get_plugins
from tessellm.selection import choose_platform

cuda_detect = pytest.importorskip("tessellm_cuda.detect")
from tessellm_cuda.graphs import capture_sizes  # noqa: E402
from tessellm_cuda.platform import CudaPlatform, fused_op_names  # noqa: E402
from tessellm_rocm import detect as rocm_detect  # noqa: E402
from tessellm_rocm import platform as rocm  # noqa: E402
from tessellm_tpu import platform as tpu  # noqa: E402


@pytest.fixture
def fresh_probes():
    for probe in (cuda_detect.probe_cuda, rocm.probe_rocm, tpu.probe_tpu):
        probe.cache_clear()
    yield
    for probe in (cuda_detect.probe_cuda, rocm.probe_rocm, tpu.probe_tpu):
        probe.cache_clear()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, 4),
        ("", 0),
        ("-1", 0),
        ("0,2", 2),
        ("1,7,2", 1),  # 7 is out of range and ends the list
        ("GPU-8c2e,MIG-1a", 2),
        (" 3 , 0", 2),
    ],
)
def test_cuda_visible_devices_as_cuda_reads_it(env, expected):
    assert cuda_detect.visible_device_count(4, env) == expected


def test_cuda_probe_paths(monkeypatch, fresh_probes):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(cuda_detect, "nvml_device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert CudaPlatform.is_available()
    assert "2 of 2" in CudaPlatform.unavailable_reason()

    cuda_detect.probe_cuda.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not CudaPlatform.is_available()
    assert "hides all 2" in CudaPlatform.unavailable_reason()

    cuda_detect.probe_cuda.cache_clear()
    monkeypatch.setattr(cuda_detect, "nvml_device_count", lambda: 0)
    assert "no NVIDIA GPU" in CudaPlatform.unavailable_reason()

    cuda_detect.probe_cuda.cache_clear()
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert "ROCm" in CudaPlatform.unavailable_reason()


def test_detection_does_not_start_cuda(fresh_probes):
    CudaPlatform.is_available()
    rocm.RocmPlatform.is_available()
    tpu.TpuPlatform.is_available()
    assert not torch.cuda.is_initialized()


def test_rocm_probe_paths(monkeypatch, fresh_probes):
    monkeypatch.setattr(torch.version, "hip", None)
    assert "not a ROCm" in rocm.RocmPlatform.unavailable_reason()
    rocm.probe_rocm.cache_clear()
    monkeypatch.setattr(torch.version, "hip", "6.4.1")
    monkeypatch.setattr(rocm_detect.os.path, "exists", lambda path: path == rocm_detect.KFD_DEVICE)
    monkeypatch.setattr(rocm_detect, "render_nodes", lambda: ["/dev/dri/renderD128"])
    monkeypatch.setattr(rocm_detect, "kfd_gpu_archs", lambda: ["gfx942"])
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert rocm.RocmPlatform.is_available()
    rocm.probe_rocm.cache_clear()
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "")
    assert "hides every GPU" in rocm.RocmPlatform.unavailable_reason()
    # ROCm reuses the CUDA platform's logic, with torch's name for HIP devices.
    assert issubclass(rocm.RocmPlatform, CudaPlatform)
    assert rocm.RocmPlatform.device_type == "cuda"
    assert rocm.RocmPlatform.attention_backends == ("triton", "torch")


def test_tpu_probe_paths(monkeypatch, fresh_probes):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.setattr(tpu.importlib.util, "find_spec", lambda name: None)
    assert "torch_xla is not installed" in tpu.TpuPlatform.unavailable_reason()
    tpu.probe_tpu.cache_clear()
    monkeypatch.setattr(tpu.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(tpu, "tpu_device_nodes", lambda: [])
    assert "no TPU device node" in tpu.TpuPlatform.unavailable_reason()
    tpu.probe_tpu.cache_clear()
    monkeypatch.setattr(tpu, "tpu_device_nodes", lambda: ["/dev/accel0"])
    assert tpu.TpuPlatform.is_available()
    assert (tpu.TpuPlatform.device_type, tpu.TpuPlatform.distributed_backend) == ("xla", "xla")
    assert tpu.TpuPlatform.attention_backends == ("xla", "torch")


def test_cpu_is_chosen_here_and_the_gpus_say_why_not():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    platform, choice = choose_platform(get_plugins())
    assert platform.name == "cpu"
    assert "CUDA" in choice.refused["cuda"] or "NVIDIA" in choice.refused["cuda"]
    assert CudaPlatform.distributed_backend == "nccl"
    assert CudaPlatform.attention_backends == ("triton", "torch")


def test_fused_op_selection_and_capture_sizes():
    assert fused_op_names(None) is None and fused_op_names("all") is None
    assert fused_op_names("none") == [] and fused_op_names("") == []
    assert fused_op_names("rms_norm, silu_and_mul") == ["rms_norm", "silu_and_mul"]
    assert capture_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(2048)[-1] == 512  # larger decode batches run eagerly


def test_profile_batch_fills_the_token_budget():
    ids, positions, md = profile_batch(100, 8, 512, 16, torch.device("cpu"))
    assert ids.shape == (100,) and md.query_start_loc_cpu.tolist()[-1] == 100
    assert md.num_seqs == 8 and md.max_query_len == 13
    assert bool((md.slot_mapping == -1).all())  # the scratch cache is never written
    assert positions[:13].tolist() == list(range(13))
    # A budget larger than the sequences can hold is capped by max_model_len.
    _, _, capped = profile_batch(100, 2, 20, 16, torch.device("cpu"))
    assert capped.seq_lens_cpu.tolist() == [20, 20]


def test_runner_hands_the_profiling_pass_to_the_platform(tiny_llama):
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32", max_num_seqs=4)
    runner = llm.engine.executor.runner
    assert scheduled_token_budget(runner.args, runner.max_model_len) == 8192
    k_before = runner.attn_layers[0].k_cache
    seen = []

    def record(module, args):
        seen.append((args[0].shape[0], [layer.k_cache.shape[0] for layer in runner.attn_layers]))

    hook = runner.model.register_forward_pre_hook(record)
    try:
        runner.platform.measure_peak_memory = lambda run_profile: run_profile()
        assert runner.available_blocks() > 0
    finally:
        hook.remove()
    # One pass on a one-block scratch cache, over the token budget as far as 4 sequences
    # of max_model_len (512) hold it.
    assert seen == [(4 * 512, [1] * len(runner.attn_layers))]
    assert runner.attn_layers[0].k_cache is k_before  # and the real cache is back
    # The CPU platform's runner compiles nothing while TESSELLM_CPU_COMPILE=0 (conftest).
    assert runner.graph_runner is not None and runner.graph_runner.failure is not None


def test_profiling_pass_runs_a_model_with_windowed_kv_groups(tmp_path):
    """Windowed layers read their metadata from ``kv_groups``: the profiling step (on
    CUDA, before the cache exists) must carry one per group (an IndexError on an H100)."""
    from tessellm.testing import tiny_model

    layer_types = ["sliding_attention", "full_attention"] * 2
    gemma3 = tiny_model(
        "Gemma3ForCausalLM",
        tmp_path / "g3",
        num_hidden_layers=len(layer_types),
        sliding_window=8,
        layer_types=layer_types,
    )
    llm = LLM(model=str(gemma3), device="cpu", dtype="float32", max_num_seqs=2)
    runner = llm.engine.executor.runner
    assert len(runner.cache_layout.groups) > 1
    runner.platform.measure_peak_memory = lambda run_profile: run_profile()
    assert runner.available_blocks() > 0


@pytest.mark.parametrize("windowed_groups", [False, True])
def test_platforms_that_compile_per_shape_warm_the_eager_steps(
    tiny_llama, tmp_path, monkeypatch, windowed_groups
):
    """A platform with ``warm_eager_steps`` runs one eager step per power-of-two class of the
    longest query after its graph capture, writing nothing to the KV cache (also for a
    model whose windowed layers have KV groups of their own)."""
    from tessellm.engine import model_runner
    from tessellm.testing import tiny_model
    from tessellm_cpu.platform import CpuPlatform

    model = str(tiny_llama)
    if windowed_groups:
        layer_types = ["sliding_attention", "full_attention"] * 2
        config = {"sliding_window": 8, "layer_types": layer_types}
        gemma3 = tiny_model(
            "Gemma3ForCausalLM", tmp_path / "g3", num_hidden_layers=len(layer_types), **config
        )
        model = str(gemma3)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    plain = LLM(model=model, device="cpu", dtype="float32", max_num_seqs=4)
    assert (len(plain.engine.executor.runner.cache_layout.groups) > 1) == windowed_groups
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert plain.engine.executor.runner.platform.warm_eager_steps is False

    warmed = []
    real_warm = model_runner.warm_eager_steps

    def recording_warm(runner):
        caches = [layer.k_cache.clone() for layer in runner.attn_layers]

        def record(module, args):
            metadata = args[2]
            warmed.append(
                (metadata.max_query_len, metadata.num_seqs, int(metadata.slot_mapping.max()))
            )

        hook = runner.model.register_forward_pre_hook(record)
        try:
            lengths = real_warm(runner)
        finally:
            hook.remove()
        for layer, before in zip(runner.attn_layers, caches, strict=True):
            assert torch.equal(layer.k_cache, before)
        return lengths

    monkeypatch.setattr(CpuPlatform, "warm_eager_steps", True)
    monkeypatch.setattr(model_runner, "warm_eager_steps", recording_warm)
    llm = LLM(model=model, device="cpu", dtype="float32", max_num_seqs=4)
    assert warmed == [(n, 1, -1) for n in (2, 4, 8, 16, 32, 64)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
