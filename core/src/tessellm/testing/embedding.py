"""Tiny random embedding models (sentence-transformers checkpoints) and parity with
sentence-transformers' ``encode``: the reference for tessellm's pooling engine.

``tiny_embedding_model`` writes a random encoder (``BertModel``) or bare decoder
(``Qwen3Model``, ``LlamaModel``; or a causal LM such as ``Qwen3ForCausalLM``) with a
tokenizer and the sentence-transformers files that name its pooling;
``embedding_parity_failures`` embeds sentences with tessellm, batched and one at a time,
and compares each vector with sentence-transformers' (cosine similarity, and the size).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tessellm.testing.models import (
    TEST_PROMPTS,
    WEIGHT_STD,
    UnknownArchitectureError,
    make_tokenizer,
    tiny_config,
)

# Different lengths, from one word to a few dozen tokens.
EMBEDDING_SENTENCES: list[str] = [
    *TEST_PROMPTS,
    " ".join(TEST_PROMPTS[2:5]),
    " ".join(TEST_PROMPTS),
]
MIN_COSINE = 0.9999

TINY_ENCODER: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_tokenizer(path: Path, vocab_size: int) -> Any:
    """A BERT WordPiece tokenizer (lower-cased, ``[CLS] ... [SEP]``) covering
    ``TEST_PROMPTS``, filler words up to ``vocab_size``, saved into ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    words: list[str] = list(_BERT_SPECIALS)
    for prompt in TEST_PROMPTS:
        for ch in ",.():":
            prompt = prompt.replace(ch, f" {ch} ")
        for word in prompt.lower().split():
            if word not in words:
                words.append(word)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def encoder_model_type(architecture: str) -> str | None:
    """The ``model_type`` whose bare model (``AutoModel``) is ``architecture``, if it is an
    encoder transformers knows (not a decoder that also has a causal LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    for model_type, names in MODEL_MAPPING_NAMES.items():
        if architecture in (names if isinstance(names, (list, tuple)) else (names,)):
            causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
            decoder = causal is not None and causal.endswith("ForCausalLM")
            return None if decoder else model_type
    return None


def tiny_encoder_config(architecture: str, **config_overrides: Any) -> Any:
    """A tiny config of an encoder ``architecture``: ``TINY_ENCODER`` sizes where the
    config has the fields, a vocabulary of 256, ``config_overrides`` last."""
    from transformers import AutoConfig

    model_type = encoder_model_type(architecture)
    if model_type is None:
        raise UnknownArchitectureError(f"transformers has no encoder named {architecture!r}")
    default = AutoConfig.for_model(model_type)
    values = {k: v for k, v in {**TINY_ENCODER, "vocab_size": 256}.items() if hasattr(default, k)}
    config = AutoConfig.for_model(model_type, **{**values, **config_overrides})
    config.architectures = [architecture]
    return config


def write_sentence_transformers_files(
    path: Path,
    width: int,
    pooling: Sequence[str],
    normalize: bool,
    max_seq_length: int | None = None,
) -> None:
    """``modules.json`` (Transformer, Pooling, optionally Normalize), the Pooling module's
    config and ``sentence_bert_config.json``."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {"embedding_dimension": width, "pooling_mode": list(pooling)}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    bert_config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (path / "sentence_bert_config.json").write_text(json.dumps(bert_config))


def tiny_embedding_model(
    architecture: str,
    path: Path,
    *,
    pooling: Sequence[str] = ("mean",),
    normalize: bool = True,
    max_seq_length: int | None = None,
    seed: int = 0,
    sentence_transformers_files: bool = True,
    **config_overrides: Any,
) -> Path:
    """A random tiny embedding checkpoint of ``architecture`` in ``path``: an encoder
    (``BertModel``, with a WordPiece tokenizer) or a decoder, bare (``Qwen3Model``) or
    with its LM head (``Qwen3ForCausalLM``), with the word-level test tokenizer
    (``</s>`` pads). ``pooling``/``normalize`` go to the sentence-transformers files
    unless ``sentence_transformers_files`` is false. Returns ``path``."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(transformers, architecture):
        raise UnknownArchitectureError(f"transformers has no model class {architecture!r}")
    if not architecture.endswith("ForCausalLM") and encoder_model_type(architecture):
        config = tiny_encoder_config(architecture, **config_overrides)
        tokenizer = _wordpiece_tokenizer(path, config.vocab_size)
    else:
        causal = architecture
        if not architecture.endswith("ForCausalLM"):
            causal = architecture.removesuffix("Model") + "ForCausalLM"
        config = tiny_config(causal, **config_overrides)
        tokenizer = make_tokenizer(path, config.vocab_size)
        tokenizer.pad_token = "</s>"
        tokenizer.save_pretrained(path)
    config.architectures = [architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, architecture)(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, WEIGHT_STD)
    model.save_pretrained(path, safe_serialization=True)
    if sentence_transformers_files:
        write_sentence_transformers_files(
            path, config.hidden_size, pooling, normalize, max_seq_length
        )
    del tokenizer
    return path


def sentence_transformers_embeddings(
    model_dir: Path | str, sentences: Sequence[str]
) -> tuple[Any, list[list[int]]]:
    """sentence-transformers' fp32 ``encode`` of ``sentences`` ``[n, width]``, and the
    token ids its tokenizer gives each sentence."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(list(sentences), convert_to_tensor=True, batch_size=4).float()
    ids = [model.tokenize([s])["input_ids"][0].tolist() for s in sentences]
    return vectors, ids


def compare_embeddings(label: str, got: Any, expected: Any) -> list[str]:
    """Failures where a row of ``got`` differs from ``expected``'s (size, or cosine
    similarity below ``MIN_COSINE``)."""
    import torch
    import torch.nn.functional as F

    got = torch.as_tensor(got, dtype=torch.float32)
    if got.shape != expected.shape:
        return [f"{label}: shape {tuple(got.shape)}, sentence-transformers {tuple(expected.shape)}"]
    cosine = F.cosine_similarity(got, expected, dim=-1)
    return [
        f"{label}: sentence {i}: cosine similarity {float(c):.6f} < {MIN_COSINE}"
        for i, c in enumerate(cosine)
        if not c >= MIN_COSINE
    ]


def embedding_parity_failures(
    model_dir: Path | str, sentences: Sequence[str] = EMBEDDING_SENTENCES, **engine_args: Any
) -> list[str]:
    """tessellm's embeddings of ``sentences`` (batched, then one at a time) against
    sentence-transformers'; the token ids must agree too. Empty when they match."""
    import gc

    from tessellm import LLM

    expected, expected_ids = sentence_transformers_embeddings(model_dir, sentences)
    args = dict(dtype="float32", device="cpu", **engine_args)
    llm = LLM(model=str(model_dir), **args)
    try:
        batched = llm.embed(list(sentences))
        single = [llm.embed(s)[0] for s in sentences]
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
    failures = []
    for s, out, ids in zip(sentences, batched, expected_ids, strict=True):
        if out.prompt_token_ids != ids:
            failures.append(
                f"token ids of {s!r}: {out.prompt_token_ids}, sentence-transformers {ids}"
            )
    failures += compare_embeddings("batched", [o.outputs.embedding for o in batched], expected)
    failures += compare_embeddings("one at a time", [o.outputs.embedding for o in single], expected)
    return failures


def assert_embedding_parity(model_dir: Path | str, **kwargs: Any) -> None:
    failures = embedding_parity_failures(model_dir, **kwargs)
    assert not failures, "\n".join(failures)
