"""The pooling engine's pieces: batches under the limits, input checks, pooling recipes
read from sentence-transformers files, the pooling modes against a per-sequence loop, and
the padded attention against a per-sequence reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tessellm.config import EngineArgs
from tessellm.engine import pooler
from tessellm.engine.pooling import PoolingEngine, runs_pooling
from tessellm.errors import ConfigError, InvalidRequestError, ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.layers.dense_attention import dense_attention, padded_layout
from tessellm.pooling_params import PoolingParams
from tessellm.testing.embedding import EMBEDDING_SENTENCES, tiny_embedding_model

ENGINE = dict(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_embedding_model(
        "BertModel", tmp_path_factory.mktemp("pool-bert"), max_seq_length=80
    )


def engine(path, **kwargs) -> PoolingEngine:
    return PoolingEngine(EngineArgs(model=str(path), **ENGINE, **kwargs))


def test_batches_keep_the_limits_and_change_nothing(bert_dir):
    small = engine(bert_dir, max_num_seqs=3, max_num_batched_tokens=80)
    lengths = [len(small.prepare(s)) for s in EMBEDDING_SENTENCES]
    batches = small.batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 80
    assert len(batches) > len(lengths) // 3  # the token budget split some
    wide = engine(bert_dir)
    assert len(wide.batches(lengths)) == 1
    got = small.embed(EMBEDDING_SENTENCES)
    expected = wide.embed(EMBEDDING_SENTENCES)
    for a, b in zip(got, expected, strict=True):
        assert a.outputs.embedding == pytest.approx(b.outputs.embedding, abs=1e-6)
    assert small.stats()["steps"] == len(batches)
    assert small.stats()["prompt_tokens"] == sum(lengths)


def test_inputs_are_checked(bert_dir):
    eng = engine(bert_dir)
    assert eng.max_model_len == 80  # sentence_bert_config.json's max_seq_length
    top = eng.max_token_id
    for bad, message in [
        ("", "empty"),
        ([], "empty"),
        ([top + 1], "token ids must be integers"),
        ([1, True], "token ids must be integers"),
        ([5] * 81, "maximum context length is 80"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            eng.prepare(bad)
    with pytest.raises(InvalidRequestError, match="positive integer"):
        eng.validate_params(PoolingParams(dimensions=0))
    with pytest.raises(ConfigError, match="at least max_model_len"):
        engine(bert_dir, max_num_batched_tokens=40)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be 1"):
        engine(bert_dir, tensor_parallel_size=2)


def test_which_engine_a_model_gets(bert_dir, tiny_llama, tmp_path):
    assert runs_pooling(EngineArgs(model=str(bert_dir)))
    assert not runs_pooling(EngineArgs(model=str(tiny_llama)))
    assert runs_pooling(EngineArgs(model=str(tiny_llama), runner="pooling"))
    assert not runs_pooling(EngineArgs(model=str(bert_dir), runner="generate"))
    with pytest.raises(ConfigError, match="unknown runner"):
        runs_pooling(EngineArgs(model=str(bert_dir), runner="embed"))
    bare = tiny_embedding_model("LlamaModel", tmp_path / "bare", sentence_transformers_files=False)
    assert runs_pooling(EngineArgs(model=str(bare)))


def test_the_generation_engine_can_refuse_an_embedding_model(bert_dir, tiny_llama):
    from tessellm.engine.pooling import check_generative
    from tessellm.formats.safetensors import SafetensorsFormat
    from tessellm.plugins import get_plugins

    plugins = get_plugins()
    for path, pooling in ((bert_dir, True), (tiny_llama, False)):
        config = SafetensorsFormat().load_config(path)
        args = EngineArgs(model=str(path))
        if pooling:
            with pytest.raises(ConfigError, match="is an embedding model"):
                check_generative(args, plugins, config, path)
        else:
            check_generative(args, plugins, config, path)
    with pytest.raises(ConfigError, match="is an embedding model"):
        check_generative(EngineArgs(model="x", runner="pooling"), plugins, None, tiny_llama)


def write_pooling(path, modules, pooling_config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    if pooling_config is not None:
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))


TRANSFORMER = {"path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def test_pooling_recipes_are_read(tmp_path):
    class Config:
        pass

    legacy = {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}
    write_pooling(tmp_path / "a", [TRANSFORMER, POOLING, NORMALIZE], legacy)
    recipe = pooler.read_pooling_config(tmp_path / "a", Config(), "lasttoken")
    assert recipe.modes == ("cls", "max") and recipe.normalize
    write_pooling(tmp_path / "b", [TRANSFORMER, POOLING], {"pooling_mode": "lasttoken"})
    recipe = pooler.read_pooling_config(tmp_path / "b", Config(), "cls")
    assert recipe.modes == ("lasttoken",) and not recipe.normalize
    assert pooler.read_pooling_config(tmp_path / "none", Config(), "cls").modes == ("cls",)
    dense = {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    write_pooling(tmp_path / "c", [TRANSFORMER, POOLING, dense], {"pooling_mode": "mean"})
    with pytest.raises(ModelLoadError, match="'Dense'"):
        pooler.read_pooling_config(tmp_path / "c", Config(), "cls")
    write_pooling(tmp_path / "d", [TRANSFORMER, POOLING], {"pooling_mode": "median"})
    with pytest.raises(ModelLoadError, match="median"):
        pooler.read_pooling_config(tmp_path / "d", Config(), "cls")


def test_pooling_modes_against_a_loop():
    torch.manual_seed(0)
    lens = [3, 1, 7, 4]
    hidden = torch.randn(sum(lens), 5)
    pieces = hidden.split(lens)
    expected = {
        "cls": [p[0] for p in pieces],
        "lasttoken": [p[-1] for p in pieces],
        "max": [p.max(0).values for p in pieces],
        "mean": [p.mean(0) for p in pieces],
        "mean_sqrt_len_tokens": [p.sum(0) / len(p) ** 0.5 for p in pieces],
        "weightedmean": [
            (p * torch.arange(1, len(p) + 1)[:, None]).sum(0) / (len(p) * (len(p) + 1) / 2)
            for p in pieces
        ],
    }
    for mode, rows in expected.items():
        assert torch.allclose(pooler.pool(hidden, lens, (mode,)), torch.stack(rows), atol=1e-6)
    both = pooler.pool(hidden, lens, ("cls", "mean"))
    assert both.shape == (4, 10)
    assert torch.allclose(pooler.finish(both, 3, True), F.normalize(both[:, :3], dim=-1))


def metadata_of(lens: list[int]) -> AttentionMetadata:
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    return AttentionMetadata(cu, lens_t, empty, empty.long(), max(lens), max(lens), cu, lens_t)


@pytest.mark.parametrize(
    "causal, window, cap",
    [(False, None, None), (True, None, None), (True, 3, None), (True, 4, 5.0)],
)
def test_padded_attention_against_each_sequence_alone(causal, window, cap):
    torch.manual_seed(1)
    lens = [5, 1, 9, 9, 2]
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(sum(lens), heads, dim)
    k = torch.randn(sum(lens), kv_heads, dim)
    v = torch.randn(sum(lens), kv_heads, dim)
    got = dense_attention(
        q,
        k,
        v,
        padded_layout(metadata_of(lens)),
        causal=causal,
        scale=0.3,
        sliding_window=window,
        logits_soft_cap=cap,
    )
    start = 0
    for n in lens:
        qs, ks, vs = (t[start : start + n] for t in (q, k, v))
        ks, vs = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (ks, vs))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * 0.3
        if cap:
            scores = cap * torch.tanh(scores / cap)
        pos = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= pos[None, :] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - pos[None, :] < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
        assert torch.allclose(got[start : start + n], ref, atol=1e-5)
        start += n
