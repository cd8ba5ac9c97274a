"""Speculation in the router: n-gram guesses, the width policy, and the planner with guesses
driven against a shard that verifies them as the real one does: every request still ends with
exactly the tokens it gets without speculation, blocks balance, and guesses never preempt."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.blocks import BlockAllocator
from router.config import Limits
from router.metrics import RouterMetrics
from router.observer import SchedulerObserver
from router.planner import Planner, StepPlan
from router.request import Phase, Request
from router.speculation import PROBE_EVERY, Guesses, SpeculationPolicy, ngram_guesses
from tests.router.test_planner import BLOCK, Shard, check, expected, make_request, next_token


def test_ngram_guesses():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3]
    assert ngram_guesses(tokens, 2) == [4, 5]  # "2 3" occurred before, followed by 4 5
    assert ngram_guesses([7, 8, 9], 3) == []
    assert ngram_guesses([5, 1, 5, 1, 5], 4) == [1, 5]  # the longest suffix found earlier: "5 1 5", at 0
    assert ngram_guesses([1, 2, 1], 0) == []
    big = [0x01000000, 0x00000001]  # byte patterns that straddle tokens do not count as matches
    assert ngram_guesses([*big, 7, 0x00010000], 2) == []


def test_guesses_share_the_step_rows():
    policy = SpeculationPolicy(most=3, step_rows=4)
    assert [policy.share(n) for n in (0, 1, 2, 3, 4, 16)] == [0, 3, 1, 0, 0, 0]


def test_width_halves_on_misses_and_grows_back():
    policy = SpeculationPolicy(most=4)
    r = make_request(1, 6, 10)
    policy.verified(r, 4, 0)
    assert r.speculation_width == 2
    policy.verified(r, 2, 0)
    assert r.speculation_width == 1
    policy.verified(r, 1, 1)
    assert r.speculation_width == 2 and (r.spec_proposed, r.spec_accepted) == (7, 1)


class VerifyingShard(Shard):
    """Takes guesses as the shard does: draws at each position with the history guesses give,
    keeps guesses while they equal the draw before them, and the first differing draw. Its
    "draft model" guesses right for even request ids and wrong for odd ones."""

    @staticmethod
    def drafted(r: Request, k: int) -> list[int]:
        if r.id % 2:
            return [999] * k
        return expected(r)[len(r.generated) : len(r.generated) + k]

    def run(self, plan: StepPlan) -> None:
        p = self.planner
        p.chunks_computed(plan.chunks)
        sampled = [i.request for i in plan.chunks if i.request.computed == i.request.length]
        for r in plan.decoding + sampled:
            asked = plan.guesses.get(r.id, Guesses())
            guesses = asked.tokens or self.drafted(r, asked.drafted)
            if r in plan.decoding:  # KV slots for the pending token and every guess
                assert len(r.blocks) * p.allocator.block_size >= r.computed + 1 + len(guesses)
            else:
                assert not guesses
            for k in itertools.count():
                token = next_token(r)
                p.token_computed(r, token)
                if len(r.generated) >= r.max_new_tokens or r.length >= p.limits.max_total_tokens:
                    p.retire(r)
                    self.finished.append(r)
                    break
                if k >= len(guesses) or token != guesses[k]:
                    break


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 16)), min_size=1, max_size=8),
    num_blocks=st.integers(13, 40),
    most=st.integers(1, 5),
    method=st.sampled_from(["ngram", "draft"]),
)
def test_guesses_keep_every_token_and_balance_blocks(arrivals, num_blocks, most, method):
    limits = Limits(47, 48, 16, 4, 0.0, 0)
    planner = Planner(BlockAllocator(num_blocks, BLOCK), limits, SpeculationPolicy(most, step_rows=8, method=method))
    shard = VerifyingShard(planner)
    requests = [make_request(i + 1, p, n) for i, (p, n) in enumerate(arrivals)]
    for r in requests:
        planner.enqueue(r)
    guessed = 0
    for _ in range(3000):
        if not planner.waiting and not planner.active:
            break
        plan = planner.plan()
        check(planner, plan)
        guessed += sum(len(g) for g in plan.guesses.values())
        assert not plan.preempted or not plan.guesses or all(r.id not in plan.guesses for r in plan.preempted)
        shard.run(plan)
        check(planner)
    assert planner.allocator.used_blocks == 0
    for r in requests:
        assert r.phase is Phase.FINISHED
        assert r.generated == expected(r), "speculation changed a token"


def test_draft_method_asks_the_shards_for_guesses():
    """With SPECULATIVE_METHOD=draft the router sends a number of guesses, within the step's rows
    and the request's limits, and grows blocks for them."""
    planner = Planner(BlockAllocator(64, BLOCK), Limits(47, 48, 64, 4, 0.0, 0), SpeculationPolicy(3, method="draft"))
    shard = VerifyingShard(planner)
    r: Request = make_request(2, 10, 5)
    planner.enqueue(r)
    asked = []
    while r.phase is not Phase.FINISHED:
        plan = planner.plan()
        if r.id in plan.guesses:
            asked.append(plan.guesses[r.id])
            assert len(r.blocks) * BLOCK >= r.computed + 1 + len(plan.guesses[r.id])
        shard.run(plan)
    assert asked and all(not g.tokens for g in asked)
    assert asked[0].drafted == 3 and all(len(r.generated[:1]) + len(g) < 5 for g in asked[1:])
    assert r.generated == expected(r) and planner.allocator.used_blocks == 0


def test_repetitive_output_is_guessed():
    """The model of these tests repeats itself (5 token values): n-gram guesses find it."""
    planner = Planner(BlockAllocator(64, BLOCK), Limits(47, 48, 64, 4, 0.0, 0), SpeculationPolicy(4))
    shard = VerifyingShard(planner)
    r: Request = make_request(1, 10, 30)
    planner.enqueue(r)
    steps = 0
    while r.phase is not Phase.FINISHED:
        plan = planner.plan()
        shard.run(plan)
        steps += 1
    assert r.generated == expected(r) and steps < 30


def test_a_request_reports_its_guesses_in_its_span_and_the_metrics():
    """The request's own span (the public RPC's) gets proposed/accepted when it finishes, and
    tgi_request_skipped_tokens observes the guesses it kept."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    metrics = RouterMetrics()
    observer = SchedulerObserver(metrics, tracer)
    r = make_request(1, 6, 10)
    with tracer.start_as_current_span("Generate"):
        r.trace_context = otel_context.get_current()
        observer.arrived(r)
        for proposed, accepted in ((3, 3), (3, 1)):
            SpeculationPolicy(3).verified(r, proposed, accepted)
            observer.speculated(proposed, accepted)
        observer.finished(r, "length")
    [span] = [s for s in exporter.get_finished_spans() if s.name == "Generate"]
    assert span.attributes is not None
    assert (span.attributes["switchyard.speculation.proposed"], span.attributes["switchyard.speculation.accepted"]) == (
        6,
        4,
    )
    text = metrics.exposition().decode()
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="' in text
    assert metrics.spec_draft_tokens._value.get() == 6 and metrics.spec_accepted_tokens._value.get() == 4
    assert "tgi_request_skipped_tokens_sum 4.0" in text


def test_draft_method_needs_a_draft_model_on_the_shards():
    from protos import shard_pb2 as pb
    from router.__main__ import missing_draft
    from router.config import parse_config

    config = parse_config(["--speculative-method", "draft"], {})
    assert "set DRAFT_MODEL_ID" in (missing_draft(config, pb.InfoResponse(model_id="m")) or "")
    assert missing_draft(config, pb.InfoResponse(model_id="m", draft_model_id="d")) is None
    assert missing_draft(parse_config([], {}), pb.InfoResponse(model_id="m")) is None


def test_a_failing_draft_steps_aside_until_a_probe():
    """Draft guesses that all fail: the request stops guessing, its steps go ahead of their
    predecessors' answers again, and it guesses once more on a probe step."""
    policy = SpeculationPolicy(3, method="draft")
    r: Request = make_request(1, 10, 200)
    assert policy.guesses(r, 1, 1000).drafted == 3
    policy.verified(r, 3, 0)
    assert not policy.wait_for_answer([r]) and not policy.guesses(r, 1, 1000)
    for _ in range(PROBE_EVERY):
        policy.planned(ahead=True)
    assert policy.wait_for_answer([r]) and policy.guesses(r, 1, 1000).drafted == 1
