"""Choosing the next token for a whole batch at once, as tensor operations.

Order of operations on the logits (as vLLM and TGI apply them): logit bias and
end-of-sequence suppression (min_tokens), then repetition, frequency and
presence penalties, then temperature, then top-k, top-p, min-p and typical-p
filtering, then sampling. Reported log-probabilities are those of the model's
raw distribution, as OpenAI's and vLLM's are.

Randomness is counter-based: the uniform number behind the n-th sampled token
of a request is a hash of ``(seed, n)``. A seeded request therefore gets the
same tokens whatever batch it lands in, on any rank, with no per-request
``torch.Generator`` and no Python loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from common.sampling_params import SamplingParams
from shard.numerics.row_reductions import exp_shifted, max_logsumexp, row_argmax, row_sums

_MASK31 = (1 << 31) - 1


@dataclass(frozen=True)
class SequenceView:
    """What sampling needs of a sequence."""

    params: SamplingParams
    #: Index of the token being sampled among the request's generated tokens.
    step: int
    token_ids: list[int]
    #: How many of ``token_ids`` (at the end) the request generated.
    generated: int
    #: The sequence's grammar matcher (xgrammar), when its output is constrained.
    matcher: Any = None


@dataclass
class SampledTokens:
    tokens: list[int]
    logprobs: list[float]
    #: Per row: (token id, logprob) of the most likely tokens, when asked for.
    top: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class LogitStats:
    """What every step needs of each row's raw logits: computed once, per row, in an order
    that does not depend on the other rows (``shard.numerics.row_reductions``), so a logprob is the
    same bits whatever the step held."""

    best: torch.Tensor  # [B] largest logit
    lse: torch.Tensor  # [B] logsumexp
    argmax: torch.Tensor  # [B] int64, where each row first holds its largest logit

    def rows(self, start: int, count: int) -> LogitStats:
        """The statistics of rows [start, start + count)."""
        span = slice(start, start + count)
        return LogitStats(self.best[span], self.lse[span], self.argmax[span])


def logit_stats(logits: torch.Tensor) -> LogitStats:
    return LogitStats(*max_logsumexp(logits))


def _hash31(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser on 31-bit values held in int64, so that every
    # product fits without overflow: 2^31 * 0x45d9f3b < 2^63.
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """A deterministic uniform in [0, 1) per row, from (seed, step)."""
    lo, hi = seed & _MASK31, (seed >> 31) & _MASK31
    x = _hash31(_hash31(lo ^ _hash31(hi + 0x2545F491)) ^ (step & _MASK31))
    x = _hash31(x + 0x9E3779B)
    return x.to(torch.float64) / float(1 << 31)


def sample(logits: torch.Tensor, rows: list[SequenceView], stats: LogitStats | None = None) -> SampledTokens:
    """Next tokens for ``rows``; logits: [B, vocab] float32, the model's raw scores
    (``stats``: theirs, when the forward computed them)."""
    device = logits.device
    params = [r.params for r in rows]
    stats = stats or logit_stats(logits)
    raw_lse = stats.lse
    scores = _adjusted(logits, rows)
    top = _top_logprobs(logits, raw_lse, [p.top_n_tokens for p in params])
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = _most_likely(scores, logits, stats)
    else:
        tokens = _sample_filtered(scores, rows)
        if any(greedy):
            is_greedy = torch.tensor(greedy, dtype=torch.bool, device=device)
            tokens = torch.where(is_greedy, _most_likely(scores, logits, stats), tokens)
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1) - raw_lse
    return SampledTokens(tokens.tolist(), logprobs.tolist(), top)


def score_tokens(
    logits: torch.Tensor, stats: LogitStats, targets: list[int], top_n: list[int]
) -> tuple[list[float], list[int], list[list[tuple[int, float]]]]:
    """Per row, ``targets``' logprob under the raw distribution (as a sampled token's, ``sample``),
    its 1-based rank (how many tokens score higher, plus one) and the ``top_n`` most likely."""
    chosen = logits.gather(1, torch.tensor(targets, device=logits.device)[:, None])
    logprobs = chosen.squeeze(1) - stats.lse
    ranks = (logits > chosen).sum(dim=1) + 1
    return logprobs.tolist(), ranks.tolist(), _top_logprobs(logits, stats.lse, top_n)


def _most_likely(scores: torch.Tensor, logits: torch.Tensor, stats: LogitStats) -> torch.Tensor:
    """Each row's greedy token; for unadjusted logits it came with their statistics."""
    return stats.argmax if scores is logits else row_argmax(scores)


def _adjusted(logits: torch.Tensor, rows: list[SequenceView]) -> torch.Tensor:
    """Logits after bias, end-of-sequence suppression and penalties (a copy only if any applies)."""
    biased = [(b, r) for b, r in enumerate(rows) if r.params.logit_bias]
    banned = [(b, r) for b, r in enumerate(rows) if r.generated < r.params.min_tokens and r.params.eos_token_ids]
    penalised = any(r.params.penalised for r in rows)
    constrained = any(r.matcher is not None for r in rows)
    if not biased and not banned and not penalised and not constrained:
        return logits
    scores = logits.clone()
    if constrained:
        from shard.runtime.grammar import apply_masks

        apply_masks(scores, [r.matcher for r in rows])
    for b, r in biased:  # sparse: a handful of entries per request
        ids = torch.tensor([t for t, _ in r.params.logit_bias], dtype=torch.long, device=logits.device)
        bias = torch.tensor([v for _, v in r.params.logit_bias], dtype=scores.dtype, device=logits.device)
        scores[b].index_add_(0, ids, bias)
    for b, r in banned:
        scores[b, list(r.params.eos_token_ids)] = float("-inf")
    if penalised:
        _apply_penalties(scores, rows)
    return scores


def _apply_penalties(scores: torch.Tensor, rows: list[SequenceView]) -> None:
    """Repetition (HF/TGI: divides positive logits, over prompt and output), frequency and
    presence (OpenAI: subtract per occurrence / once, over the output) penalties, batched."""
    device, vocab = scores.device, scores.shape[1]
    seen = torch.zeros_like(scores, dtype=torch.bool)
    counts = torch.zeros_like(scores)
    for b, r in enumerate(rows):
        if not r.params.penalised:
            continue
        seen[b, torch.tensor(r.token_ids, dtype=torch.long, device=device).clamp(max=vocab - 1)] = True
        if r.generated:
            out = torch.tensor(r.token_ids[-r.generated :], dtype=torch.long, device=device)
            counts[b].index_add_(0, out, torch.ones(len(out), dtype=counts.dtype, device=device))
    rep = torch.tensor([r.params.repetition_penalty for r in rows], dtype=scores.dtype, device=device)[:, None]
    penalised = torch.where(scores > 0, scores / rep, scores * rep)
    scores.copy_(torch.where(seen, penalised, scores))
    freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=scores.dtype, device=device)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=scores.dtype, device=device)[:, None]
    scores -= freq * counts + pres * (counts > 0)


def _top_logprobs(logits: torch.Tensor, lse: torch.Tensor, wanted: list[int]) -> list[list[tuple[int, float]]]:
    most = max(wanted, default=0)
    if most == 0:
        return [[] for _ in wanted]
    values, ids = logits.topk(most, dim=-1)
    values = values - lse[:, None]
    return [list(zip(i[:n], v[:n], strict=True)) for i, v, n in zip(ids.tolist(), values.tolist(), wanted, strict=True)]


#: How many of the most likely tokens a row that filters (top-k/p, min-p) examines, in turn.
CANDIDATES = (64, 1024)


def _sample_filtered(scores: torch.Tensor, rows: list[SequenceView]) -> torch.Tensor:
    """One token per row, drawn by inverse CDF with the row's counter-based uniform.

    Sorting the whole vocabulary costs more than the forward (docs/performance.md,
    "Sampling"). So: a row without filters draws in token-id order (no sort);
    a row with filters draws among its most likely tokens (``_draw_among_top``);
    only rows whose kept set is larger than every candidate tier, or that use
    typical-p (not ordered by probability), sort the whole vocabulary.
    """
    device, vocab = scores.device, scores.shape[1]
    p = [r.params for r in rows]
    temperature = torch.tensor([max(x.temperature, 1e-5) for x in p], dtype=scores.dtype, device=device)[:, None]
    scaled = scores / temperature
    seeds = torch.tensor([x.seed & ((1 << 62) - 1) for x in p], dtype=torch.long, device=device)
    steps = torch.tensor([r.step for r in rows], dtype=torch.long, device=device)
    u = uniform(seeds, steps)
    tokens = torch.zeros(len(rows), dtype=torch.long, device=device)
    plain = [b for b, x in enumerate(p) if not _filters(x)]
    if plain:
        index = torch.tensor(plain, device=device)
        rows_scaled = scaled if len(plain) == len(rows) else scaled[index]
        # Unnormalised probabilities (a maximum is exact in any order: torch's will do).
        weights = exp_shifted(rows_scaled, rows_scaled.amax(dim=-1))
        tokens[index] = _search(weights, u[index].to(weights.dtype) * row_sums(weights))
    # Rows that filter: the most likely CANDIDATES tokens, then more for rows whose kept set reaches
    # the last candidate, then (typical-p, or still not enough) the whole sorted vocabulary.
    pending = [b for b, x in enumerate(p) if _filters(x) and x.typical_p >= 1.0]
    full = [b for b, x in enumerate(p) if x.typical_p < 1.0]
    for candidates in CANDIDATES:
        if not pending or candidates >= vocab:
            break
        pending = _draw_among_top(scaled, pending, candidates, p, u, tokens)
    full += pending
    if full:
        index = torch.tensor(sorted(full), device=device)
        sorted_logits, sorted_ids = torch.sort(scaled[index], dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)  # [B, V], descending
        keep = _keep_mask(probs, [p[b] for b in sorted(full)])
        tokens[index] = sorted_ids.gather(1, _draw(probs, keep, u[index])[:, None]).squeeze(1)
    return tokens


def _draw_among_top(
    scaled: torch.Tensor,
    rows: list[int],
    candidates: int,
    p: list[SamplingParams],
    u: torch.Tensor,
    tokens: torch.Tensor,
) -> list[int]:
    """Draws ``tokens`` for ``rows`` among their top ``candidates``; returns the rows that need more.

    Exact: the candidates' probabilities are normalised over the whole vocabulary, and
    a row is only drawn here when its kept set ends before its last candidate.
    """
    index = torch.tensor(rows, device=scaled.device)
    rows_scaled = scaled if len(rows) == scaled.shape[0] else scaled[index]
    values, ids = rows_scaled.topk(candidates, dim=-1)
    probs = (values - max_logsumexp(rows_scaled)[1][:, None]).exp()
    keep = _keep_mask(probs, [p[b] for b in rows])
    drawn = ids.gather(1, _draw(probs, keep, u[index])[:, None]).squeeze(1)
    fits = ~keep[:, -1]
    tokens[index[fits]] = drawn[fits]
    return [b for b, fit in zip(rows, fits.tolist(), strict=True) if not fit]


def _filters(x: SamplingParams) -> bool:
    return x.top_k > 0 or x.top_p < 1.0 or x.min_p > 0.0 or x.typical_p < 1.0


def _search(weights: torch.Tensor, target: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per row, the first index where the running sum of ``weights`` exceeds ``target``.

    Two levels (sums of chunks, then one chunk) instead of a cumulative sum over the
    whole vocabulary: torch's CPU cumsum is a serial loop (docs/performance.md, "Sampling").
    """
    rows, width = weights.shape
    pad = -width % chunk
    padded = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = padded.view(rows, -1, chunk)
    sums = row_sums(blocks.reshape(-1, chunk)).view(rows, -1)
    block_cdf = sums.cumsum(dim=-1)
    block = torch.searchsorted(block_cdf, target[:, None], right=True).clamp(max=blocks.shape[1] - 1)
    remaining = target[:, None] - (block_cdf.gather(1, block) - sums.gather(1, block))
    inner_cdf = blocks.gather(1, block[:, :, None].expand(rows, 1, chunk)).squeeze(1).cumsum(dim=-1)
    inner = torch.searchsorted(inner_cdf, remaining, right=True).clamp(max=chunk - 1)
    return (block * chunk + inner).squeeze(1).clamp(max=width - 1)


def _draw(probs: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index into each row of ``probs`` where the CDF of its kept entries passes u * (kept mass)."""
    cdf = (probs * keep).cumsum(dim=-1)
    target = u.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[1] - 1).squeeze(1)


def _keep_mask(probs: torch.Tensor, p: list[SamplingParams]) -> torch.Tensor:
    """Which of the sorted tokens survive top-k, top-p, min-p and typical-p; the most likely always does."""
    device, vocab = probs.device, probs.shape[1]
    rank = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([x.top_k if x.top_k > 0 else vocab for x in p], device=device)[:, None]
    top_p = torch.tensor([x.top_p for x in p], dtype=probs.dtype, device=device)[:, None]
    min_p = torch.tensor([x.min_p for x in p], dtype=probs.dtype, device=device)[:, None]
    # Nucleus: drop a token when the mass before it already reaches top_p.
    keep = (rank < top_k) & (probs.cumsum(dim=-1) - probs < top_p) & (probs >= min_p * probs[:, :1])
    if any(x.typical_p < 1.0 for x in p):
        keep &= _typical_mask(probs, torch.tensor([x.typical_p for x in p], dtype=probs.dtype, device=device))
    return keep | (rank == 0)


def _typical_mask(probs: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprise is closest to the
    entropy, up to ``typical_p`` of the mass. probs: sorted descending; returns a mask in that order."""
    logp = probs.clamp(min=1e-30).log()
    entropy = -(probs * logp).sum(dim=-1, keepdim=True)
    distance = (-logp - entropy).abs()
    order = distance.argsort(dim=-1)
    mass = probs.gather(1, order).cumsum(dim=-1)
    keep_sorted = (mass - probs.gather(1, order)) < typical_p[:, None]
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep | (typical_p[:, None] >= 1.0)
