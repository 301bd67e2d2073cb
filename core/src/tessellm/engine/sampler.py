"""Vectorised sampling over the batch: penalties, temperature, top-k/top-p/min-p, seeds.

Sampling uses the exponential-race trick (``argmax(p / q)`` with ``q ~ Exp(1)``), which
draws from ``p`` and lets seeded rows take their noise from their own generator, seeded
by (seed, number of tokens generated so far): a seeded request gets the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import torch

from tessellm.engine.schedule import ScheduledSeq

NEG_INF = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: list[ScheduledSeq]) -> torch.Tensor:
    """Repetition (prompt and output, HF/vLLM form), frequency and presence penalties."""
    n, vocab = logits.shape
    device = logits.device
    rows = [i for i, s in enumerate(seqs) if s.output_token_ids or s.prompt_token_ids]
    if not rows:
        return logits
    counts = torch.zeros(n, vocab, device=device)
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    for i in rows:
        out = torch.tensor(seqs[i].output_token_ids, dtype=torch.long, device=device)
        counts[i].index_add_(0, out, torch.ones(out.shape[0], device=device))
        if seqs[i].prompt_token_ids:
            seen[i, torch.tensor(seqs[i].prompt_token_ids, device=device)] = True
    seen |= counts > 0
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=device)[:, None]
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * counts - pres * (counts > 0).float()


def mask_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside top-k (0 = off), the top-p nucleus, or min-p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]
    remove = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    remove |= before >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __call__(
        self, logits: torch.Tensor, seqs: list[ScheduledSeq]
    ) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]] | None] | None]:
        logits = logits.float()
        raw = logits
        params = [s.params for s in seqs]
        if any(p.logit_bias for p in params):
            logits = logits.clone()
            for i, p in enumerate(params):
                for token, bias in (p.logit_bias or {}).items():
                    if 0 <= int(token) < logits.shape[1]:
                        logits[i, int(token)] += bias
        if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
            logits = logits.clone() if logits is raw else logits
            for i, s in enumerate(seqs):
                if s.num_output_tokens < s.params.min_tokens:
                    banned = set(s.params.stop_token_ids or ())
                    if not s.params.ignore_eos:
                        banned |= s.eos_token_ids
                    logits[i, list(banned)] = NEG_INF
        logits = apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        if not all(p.temperature == 0 for p in params):
            tokens = self._sample(logits, seqs, tokens)
        token_list = tokens.tolist()
        logprobs = None
        if any(p.logprobs is not None for p in params):
            logprobs = self._logprobs(raw, tokens, params)
        return token_list, logprobs

    def _sample(
        self, logits: torch.Tensor, seqs: list[ScheduledSeq], greedy_tokens: torch.Tensor
    ) -> torch.Tensor:
        device = logits.device
        params = [s.params for s in seqs]
        temp = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        logits = logits / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
            logits = mask_top_k_top_p_min_p(
                logits,
                torch.tensor([p.top_k for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                torch.tensor([p.min_p for p in params], device=device),
            )
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(device))
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed((s.params.seed * 1_000_003 + s.num_output_tokens) % (2**63))
                noise[i] = torch.empty_like(noise[i]).exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
        return torch.where(greedy, greedy_tokens, sampled)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params):
        logprobs = raw.log_softmax(dim=-1)
        k = max(p.logprobs or 0 for p in params)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        out: list[tuple[float, list[tuple[int, float]]] | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            top = []
            if p.logprobs and top_ids is not None:
                top = list(
                    zip(
                        top_ids[i, : p.logprobs].tolist(),
                        top_vals[i, : p.logprobs].tolist(),
                        strict=True,
                    )
                )
            out.append((chosen[i], top))
        return out
