"""Multi-LoRA: tokens with PEFT adapters equal HF transformers + PEFT with the same
adapter, for two families, in one batch that mixes three adapters and the base model
(the same prompt under each: no KV shared across adapters), with fewer slots than
adapters (swapping), and bad adapters as clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import hf_continuation

from tessellm import LLM, SamplingParams
from tessellm.errors import InvalidRequestError
from tessellm.lora import LoRARequest

peft = pytest.importorskip("peft")

NEW_TOKENS = 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir, out_dir, seed: int, rank: int, targets=TARGETS, alpha=16):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # larger than PEFT's init, so every adapter changes greedy tokens
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    return str(out_dir)


def peft_greedy(model_dir, adapter_dir, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model = base if adapter_dir is None else peft.PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return [hf_continuation(model, p, NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen3ForCausalLM"])
def family(request, tmp_path_factory):
    from tessellm.testing import tiny_model

    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    model_dir = tiny_model(request.param, root / "base")
    adapters = [
        make_adapter(model_dir, root / "a1", seed=1, rank=8),
        make_adapter(model_dir, root / "a2", seed=2, rank=4, targets=["q_proj", "v_proj"]),
        make_adapter(model_dir, root / "a3", seed=3, rank=16, targets=["o_proj", "down_proj"]),
    ]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (7, 19)]
    references = {name: peft_greedy(model_dir, name, prompts) for name in [None, *adapters]}
    return model_dir, adapters, prompts, references


def requests_for(adapters):
    return [None] + [LoRARequest(f"a{i + 1}", i + 1, path) for i, path in enumerate(adapters)]


@pytest.mark.parametrize("max_loras", [3, 2])
def test_mixed_batch_equals_peft(family, max_loras, tmp_path):
    model_dir, adapters, prompts, references = family
    for i, path in enumerate(adapters):  # every adapter changes the greedy tokens
        assert references[path] != references[None], f"adapter {i + 1} changes nothing"
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=16,
        download_dir=str(tmp_path),
    )
    loras = requests_for(adapters)
    batch = [(p, lora) for lora in loras for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p, _ in batch], params, lora_request=[lo for _, lo in batch]
    )
    for (prompt, lora), out in zip(batch, outs, strict=True):
        key = None if lora is None else lora.lora_path
        want = references[key][prompts.index(prompt)]
        assert out.outputs[0].token_ids == want, (lora, prompt)
    assert llm.engine.stats()["kv_cache_usage"] == 0.0


def write_config(path, **fields):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_bad_adapters_are_clear_errors(family, tmp_path):
    import shutil

    model_dir, adapters, prompts, _ = family
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", enable_lora=True,
              max_lora_rank=8, download_dir=str(tmp_path))  # fmt: skip
    params = SamplingParams(max_tokens=2)
    prompt = {"prompt_token_ids": prompts[0]}
    with pytest.raises(InvalidRequestError, match="rank 16; this engine takes ranks up to"):
        llm.generate(prompt, params, lora_request=LoRARequest("big", 3, adapters[2]))
    with pytest.raises(InvalidRequestError, match="no LoRA adapter at"):
        llm.generate(prompt, params, lora_request=LoRARequest("x", 9, str(tmp_path / "nope")))
    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    write_config(dora, use_dora=True)
    with pytest.raises(InvalidRequestError, match="use_dora"):
        llm.generate(prompt, params, lora_request=LoRARequest("d", 4, str(dora)))
    plain = LLM(model=str(model_dir), dtype="float32", device="cpu", download_dir=str(tmp_path))
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        plain.generate(prompt, params, lora_request=LoRARequest("a1", 1, adapters[0]))
    # The engine is unharmed: a good request still runs.
    assert len(llm.generate(prompt, params)[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("family", ["LlamaForCausalLM"], indirect=True)
def test_tensor_parallel_adapters_equal_peft(family, tmp_path):
    """Adapters sharded like their layers (column: B rows; row: A columns, partial sums
    all-reduced) over two gloo ranks give PEFT's tokens too."""
    model_dir, adapters, prompts, references = family
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", enable_lora=True,
              max_loras=3, tensor_parallel_size=2, download_dir=str(tmp_path))  # fmt: skip
    try:
        loras = requests_for(adapters)
        batch = [(p, lora) for lora in loras for p in prompts]
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in batch],
            params,
            lora_request=[lo for _, lo in batch],
        )
        for (prompt, lora), out in zip(batch, outs, strict=True):
            key = None if lora is None else lora.lora_path
            assert out.outputs[0].token_ids == references[key][prompts.index(prompt)]
    finally:
        llm.engine.shutdown()
