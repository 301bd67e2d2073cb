"""The EAGLE proposer: every guess it makes in a run equals a reference computed directly
in torch (transformers' Llama layer) from the same weights and the target's hidden states;
outputs with it equal outputs without speculation (greedy and seeded, batched); a head
that copies a one-layer target's layer is mostly accepted (the head's rows pair the
target's state at ``p`` with token ``p + 1``: shifted wrongly, nothing would be); checkpoint
names and refusals."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError, ModelLoadError
from tessellm.interfaces.speculative import ProposerContext, SpeculativeConfig
from tessellm_spec_eagle.checkpoint import eagle_config, save_random_eagle_head
from tessellm_spec_eagle.proposer import EagleProposer

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per model

PROMPTS = [
    [5, 17, 33, 8, 41] * 3,
    list(range(40, 63)),
    [90, 91, 92, 93] * 2 + [7],
]


def make_llm(target: Path, head: Path | None, k: int = 3, **engine_args) -> LLM:
    spec = None
    if head is not None:
        spec = {"method": "eagle", "model": str(head), "num_speculative_tokens": k}
    return LLM(
        model=str(target),
        dtype="float32",
        device="cpu",
        download_dir=str(target.parent / "cache"),
        speculative_config=spec,
        **engine_args,
    )


def generate(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


class ReferenceHead:
    """The head in plain torch: transformers' LlamaModel over ``inputs_embeds`` with the
    first input norm and the final norm removed, run over the whole sequence each guess."""

    def __init__(self, target: Path, head: Path) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel

        self.target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        config = LlamaConfig(**eagle_config(target, 1) | _layers_of(head))
        self.model = LlamaModel(config).eval()
        weights = load_file(str(head / "model.safetensors"))
        fc_weight = weights.pop("fc.weight")
        self.fc_bias = weights.pop("fc.bias", None)
        self.fc_weight = fc_weight
        weights.pop("embed_tokens.weight", None)
        missing, _ = self.model.load_state_dict(weights, strict=False)
        assert set(missing) <= {
            "embed_tokens.weight",
            "layers.0.input_layernorm.weight",
            "norm.weight",
        }
        self.model.layers[0].input_layernorm = torch.nn.Identity()
        self.model.norm = torch.nn.Identity()

    @torch.no_grad()
    def drafts(self, tokens: list[int], count: int) -> list[int]:
        ids = torch.tensor([tokens])
        hidden = self.target.model(ids).last_hidden_state[0]  # the LM head's input
        embed = self.target.model.embed_tokens
        rows = self._fc(embed(ids[0, 1:]), hidden[:-1])  # row p: token p + 1, state p
        out: list[int] = []
        for _ in range(count):
            positions = torch.arange(rows.shape[0])[None]
            last = self.model(inputs_embeds=rows[None], position_ids=positions).last_hidden_state[
                0, -1
            ]
            token = int(torch.argmax(self.target.lm_head(last)))
            out.append(token)
            rows = torch.cat([rows, self._fc(embed(torch.tensor([token])), last[None])])
        return out

    def _fc(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(
            torch.cat([embeds, hidden], -1), self.fc_weight, self.fc_bias
        )


def _layers_of(head: Path) -> dict:
    import json

    return {
        "num_hidden_layers": json.loads((head / "config.json").read_text())["num_hidden_layers"]
    }


def copying_head(target: Path, path: Path) -> Path:
    """A head that is the one-layer target shifted by a token: fc passes the embedding,
    its layer is the target's. The target's embedding rows are made of RMS 1 and its
    norms are 1 (as built), so the head's missing input norm and final norm change no
    argmax: it guesses the target's greedy tokens, but for not seeing the first token."""
    shard = target / "model.safetensors"
    weights = load_file(str(shard))
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = embed / embed.pow(2).mean(-1, keepdim=True).sqrt()
    save_file(weights, str(shard), metadata={"format": "pt"})
    save_random_eagle_head(target, path)
    head = load_file(str(path / "model.safetensors"))
    h = embed.shape[1]
    head["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    for name, tensor in weights.items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            head[name.removeprefix("model.")] = tensor
    save_file(head, str(path / "model.safetensors"))
    return path


def record_proposals(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """Every (known tokens, guesses) pair the proposer returns from now on."""
    proposer = llm.engine.speculator.proposer
    seen: list[tuple[list[int], list[int]]] = []
    propose = proposer.propose

    def recording(requests, max_drafts):
        drafts = propose(requests, max_drafts)
        seen.extend((list(r.all_token_ids), list(d)) for r, d in zip(requests, drafts, strict=True))
        return drafts

    proposer.propose = recording
    return seen


@pytest.mark.parametrize("kind", ["random", "copying"])
def test_guesses_equal_the_torch_reference_and_outputs_are_unchanged(
    tiny_model_factory, tmp_path, kind
):
    if kind == "random":  # two layers and an fc bias: every part of the layout
        target = tiny_model_factory("LlamaForCausalLM")
        head = save_random_eagle_head(target, tmp_path / "head", num_hidden_layers=2, fc_bias=True)
    else:
        target = tiny_model_factory("LlamaForCausalLM", num_hidden_layers=1)
        head = copying_head(target, tmp_path / "head")
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True)
    plain = make_llm(target, None)
    try:
        expected = generate(plain, greedy), generate(plain, seeded)
    finally:
        plain.engine.shutdown()
    # Blocks of 4 with k = 4: a round's guesses cross blocks and run into scratch blocks.
    llm = make_llm(target, head, k=4, block_size=4)
    try:
        seen = record_proposals(llm)
        if kind == "random":  # the head's cache per block: its 2 layers of the target's 3
            target_bytes = llm.engine.executor.runner.bytes_per_block()
            assert 3 * llm.engine.speculator.proposer.bytes_per_block() == 2 * target_bytes
        assert generate(llm, greedy) == expected[0]
        stats = llm.engine.stats()  # greedy: guesses of the target's greedy tokens count
        assert generate(llm, seeded) == expected[1]
        assert llm.engine.stats()["kv_cache_usage"] == 0.0
        assert llm.engine.speculator.proposer._states == {}
    finally:
        llm.engine.shutdown()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if kind == "copying":
        # Accepted runs of several tokens: later rounds catch up over several positions.
        assert stats["spec_decode_acceptance_rate"] > 0.5
        assert stats["spec_decode_mean_accepted_length"] > 2
    reference = ReferenceHead(target, head)
    assert len(seen) > 20
    for tokens, drafts in seen:
        assert drafts == reference.drafts(tokens, len(drafts)), tokens


def test_preemption_and_prefix_cache_hits(tiny_model_factory, tmp_path):
    """Guesses still equal the reference's: after a preemption (the head's state starts
    again) and after prefix-cache hits (the head's KV in the hit blocks is reused)."""
    target = tiny_model_factory("LlamaForCausalLM", num_hidden_layers=1)
    head = copying_head(target, tmp_path / "head")
    reference = ReferenceHead(target, head)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = make_llm(target, None)
    try:
        expected = generate(plain, greedy)
    finally:
        plain.engine.shutdown()
    # 3 prompts of 9-23 tokens + 24 outputs need 17 blocks of 4 at their peaks.
    llm = make_llm(target, head, block_size=4, num_gpu_blocks_override=14)
    try:
        seen = record_proposals(llm)
        assert generate(llm, greedy) == expected
        assert llm.engine.stats()["num_preemptions"] > 0
    finally:
        llm.engine.shutdown()
    for tokens, drafts in seen:
        assert drafts == reference.drafts(tokens, len(drafts)), tokens

    llm = make_llm(target, head, block_size=4)
    try:
        proposer = llm.engine.speculator.proposer
        assert generate(llm, greedy, PROMPTS[1:2]) == expected[1:2]
        starts: list[int] = []
        catch_up = proposer._catch_up

        def recording(request, row, slot):
            result = catch_up(request, row, slot)
            starts.append(row.start)
            return result

        proposer._catch_up = recording
        seen = record_proposals(llm)
        assert generate(llm, greedy, PROMPTS[1:2]) == expected[1:2]
        stats = llm.engine.stats()
        assert stats["prefix_cache_hit_tokens"] >= 20
        # The first round starts past the reused blocks (the prompt's 23 tokens hit 5 of 4).
        assert starts[0] == 20
        assert stats["spec_decode_acceptance_rate"] > 0.5
    finally:
        llm.engine.shutdown()
    for tokens, drafts in seen:
        assert drafts == reference.drafts(tokens, len(drafts)), tokens


def test_checkpoint_errors(tiny_model_factory, tmp_path):
    target = tiny_model_factory("LlamaForCausalLM")
    head = save_random_eagle_head(target, tmp_path / "head")
    weights = load_file(str(head / "model.safetensors"))
    del weights["layers.0.mlp.down_proj.weight"]
    save_file(weights, str(head / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="down_proj"):
        make_llm(target, head)
    other = tiny_model_factory("LlamaForCausalLM", hidden_size=32, intermediate_size=64)
    narrow = save_random_eagle_head(other, tmp_path / "narrow")
    with pytest.raises(ConfigError, match="hidden_size 32"):
        make_llm(target, narrow)
    # The target in another process (tensor parallelism), or a family without the states.
    config = SpeculativeConfig("eagle", model=str(head))
    no_target = ProposerContext(None, None, None, 256, 512, target=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="uniproc executor"):
        EagleProposer(config, no_target)
    stateless = SimpleNamespace(model=torch.nn.Linear(2, 2))
    other = ProposerContext(None, None, None, 256, 512, target=stateless)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hands out no hidden states"):
        EagleProposer(config, other)
    with pytest.raises(ConfigError, match='needs a "model"'):
        LLM(
            model=str(target),
            device="cpu",
            download_dir=str(tmp_path / "cache"),
            speculative_config={"method": "eagle"},
        )
