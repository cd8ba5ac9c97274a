"""Batched sampling: every parameter acts on its own row only."""

from __future__ import annotations

import torch

from shard.numerics.sampling import SamplingParams, SequenceView, sample

VOCAB = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def view(params: SamplingParams, tokens: list[int] | None = None, generated: int = 0, step: int = 0) -> SequenceView:
    return SequenceView(params, step, tokens or [1, 2, 3], generated)


def test_greedy_rows_and_raw_logprobs():
    x = logits(3)
    out = sample(x.clone(), [view(SamplingParams())] * 3)
    assert out.tokens == x.argmax(-1).tolist()
    want = torch.log_softmax(x, -1).max(-1).values
    assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-5)


def test_logit_bias_only_moves_its_row():
    x = logits(2)
    target = int(x[0].argmin())
    out = sample(x.clone(), [view(SamplingParams(logit_bias=((target, 100.0),))), view(SamplingParams())])
    assert out.tokens[0] == target and out.tokens[1] == int(x[1].argmax())
    # The reported logprob is the model's, not the biased one.
    assert abs(out.logprobs[0] - float(torch.log_softmax(x[0], -1)[target])) < 1e-5


def test_min_tokens_bans_eos_until_reached():
    x = logits(1)
    eos = int(x[0].argmax())
    p = SamplingParams(min_tokens=2, eos_token_ids=(eos,))
    assert sample(x.clone(), [view(p, generated=1)]).tokens[0] != eos
    assert sample(x.clone(), [view(p, generated=2)]).tokens[0] == eos


def test_penalties_push_away_from_seen_tokens():
    x = torch.zeros(1, VOCAB)
    x[0, 7] = 2.0
    x[0, 8] = 1.9
    seq = [7, 7, 7]
    assert sample(x.clone(), [view(SamplingParams(repetition_penalty=1.5), seq)]).tokens == [8]
    assert sample(x.clone(), [view(SamplingParams(frequency_penalty=0.1), seq, generated=3)]).tokens == [8]
    assert sample(x.clone(), [view(SamplingParams(presence_penalty=0.2), seq, generated=3)]).tokens == [8]
    # Frequency and presence look at generated tokens only.
    assert sample(x.clone(), [view(SamplingParams(presence_penalty=0.2), seq, generated=0)]).tokens == [7]


def test_top_logprobs_are_the_most_likely():
    x = logits(2)
    out = sample(x.clone(), [view(SamplingParams(top_n_tokens=3)), view(SamplingParams())])
    values, ids = torch.log_softmax(x[0], -1).topk(3)
    assert [t for t, _ in out.top[0]] == ids.tolist()
    assert all(abs(a - b) < 1e-5 for (_, a), b in zip(out.top[0], values.tolist(), strict=True))
    assert out.top[1] == []


def test_seeded_sampling_is_reproducible_and_filters_work():
    x = logits(1)
    hot = SamplingParams(temperature=1.0, seed=5)
    draws = [sample(x.clone(), [view(hot, step=s)]).tokens[0] for s in range(200)]
    assert draws == [sample(x.clone(), [view(hot, step=s)]).tokens[0] for s in range(200)]
    assert len(set(draws)) > 5
    top2 = set(x[0].topk(2).indices.tolist())
    for params in (
        SamplingParams(temperature=1.0, seed=5, top_k=2),
        SamplingParams(temperature=1.0, seed=5, top_p=1e-6),
        SamplingParams(temperature=1.0, seed=5, min_p=0.999),
    ):
        picks = {sample(x.clone(), [view(params, step=s)]).tokens[0] for s in range(100)}
        assert picks <= top2, params
    # Typical sampling keeps the token whose surprise is closest to the entropy (and the most likely).
    typical = SamplingParams(temperature=1.0, seed=5, typical_p=1e-6)
    assert len({sample(x.clone(), [view(typical, step=s)]).tokens[0] for s in range(100)}) <= 2


def test_top_candidate_tiers_draw_what_a_full_sort_draws(monkeypatch):
    """Rows that filter draw among their most likely tokens (64, then 1024) without sorting the
    vocabulary; that must pick exactly the token the whole sorted vocabulary gives."""
    import shard.numerics.sampling as sampling

    vocab, generator = 5000, torch.Generator().manual_seed(7)
    x = torch.randn(120, vocab, generator=generator) * torch.linspace(0.5, 6, 120)[:, None]
    params = [
        SamplingParams(
            temperature=[0.2, 0.7, 1.0, 1.5][i % 4],
            top_p=[0.5, 0.9, 0.99, 1.0][i % 3],
            top_k=[0, 5, 100, 3000][i % 4 if i % 5 else 0],
            min_p=0.05 if i % 7 == 0 else 0.0,
            seed=1000 + i,
        )
        for i in range(120)
    ]
    rows = [view(p, step=i) for i, p in enumerate(params)]
    tiered = sample(x.clone(), rows).tokens
    monkeypatch.setattr(sampling, "CANDIDATES", ())
    assert sample(x.clone(), rows).tokens == tiered


def test_unfiltered_sampling_follows_the_distribution():
    """No filter: a draw in token-id order (two-level search, no sort) still samples softmax(x / T)."""
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(3)) * 2
    draws = 6000
    rows = [view(SamplingParams(temperature=0.8, seed=5), step=i) for i in range(draws)]
    tokens = torch.tensor(sample(x.expand(draws, -1).clone(), rows).tokens)
    seen = torch.bincount(tokens, minlength=300).float() / draws
    want = torch.softmax(x[0] / 0.8, -1)
    assert 0.5 * (seen - want).abs().sum() < 0.05  # total variation distance


def _rows_for_argmax(width: int) -> torch.Tensor:
    """Rows that test where a maximum is: ties, NaN, infinities, all -inf, bf16-coarse values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, width, generator=g)
    x[1, width // 2] = x[1, width - 1] = 9.0  # a tie: the first one wins
    x[2, width // 3] = float("nan")  # a NaN is the maximum
    x[3] = float("-inf")
    x[4, -1] = x[4, 0] = float("inf")
    x[5] = x[5].to(torch.bfloat16).float()  # many equal values
    x[6, -1] = 50.0  # in the tail past the last full 16 lanes
    x[7, 0] = float("inf")
    x[7, width - 1] = float("nan")  # a NaN after an infinite maximum
    return x


def test_argmax_kernels_match_torch_max():
    from shard.numerics.row_reductions import max_logsumexp, row_argmax

    for width in (1, 17, 49152 + 3):
        x = _rows_for_argmax(width) if width > 1 else torch.randn(4, 1)
        want = x.max(dim=-1)[1]
        assert torch.equal(row_argmax(x), want)
        assert torch.equal(max_logsumexp(x)[2], want)


def test_greedy_rows_with_adjusted_logits_take_the_adjusted_argmax():
    x = logits(2)
    target = int(x[1].argmin())
    out = sample(x.clone(), [view(SamplingParams()), view(SamplingParams(logit_bias=((target, 100.0),)))])
    assert out.tokens == [int(x[0].argmax()), target]
