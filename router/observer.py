"""What the scheduler reports: metrics and trace spans of requests and steps.

The scheduler's logic (``router.planner``, ``router.step_pipeline``,
``router.emitter``) neither counts nor traces; the scheduler hands each plan,
answer, token and finish to this observer, which turns them into TGI's and
vLLM's metrics (``router.metrics``) and OpenTelemetry spans: a ``queue`` span
per request while it waits, and one span per batch step, in the trace of its
oldest request and linked to every other one.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from opentelemetry.trace import Span

from router.metrics import RouterMetrics
from router.planner import Planner, StepPlan
from router.request import Request
from router.shard_client import PrefillItem, StepAnswer

log = logging.getLogger(__name__)


class SchedulerObserver:
    def __init__(self, metrics: RouterMetrics, tracer: trace.Tracer):
        self.metrics = metrics
        self.tracer = tracer

    # --- requests -------------------------------------------------------------------

    def arrived(self, r: Request) -> None:
        attributes = {"switchyard.replica": r.replica} if r.replica else None
        r.queue_span = self.tracer.start_span("queue", context=r.trace_context, attributes=attributes)
        self.metrics.request_arrived(len(r.prompt_ids), r.max_new_tokens)

    def planned(self, plan: StepPlan, batch_size: int) -> None:
        m = self.metrics
        now = time.monotonic()
        for admission in plan.admitted:
            r = admission.request
            if r.queue_span is not None:
                r.queue_span.end()
            if r.admitted_at is None:  # the first admission (not a preempted request coming back)
                r.admitted_at = now
                m.queue_duration.observe(now - r.arrived_at)
                m.vllm_queue_time.observe(now - r.arrived_at)
            m.prefix_hit_tokens.inc(admission.cached)
            if admission.first:  # the client's prompt (a recomputation's hits are not the client's)
                m.prompt_tokens.inc(len(r.prompt_ids))
                m.prefix_queries.inc(len(r.prompt_ids))
                m.prefix_hits.inc(r.cached_tokens)
        if plan.admitted:
            m.batch_next_size.observe(batch_size)
        for r in plan.preempted:
            log.info("preempting request %d (%d tokens) for lack of KV blocks", r.id, r.length)
            m.preemptions.inc()

    def token(self, r: Request, now: float) -> None:
        if r.last_token_at is None:
            self.metrics.ttft.observe(now - r.arrived_at)
        else:
            self.metrics.inter_token.observe(now - r.last_token_at)
        r.last_token_at = now

    def finished(self, r: Request, outcome: str) -> None:
        if r.queue_span is not None and r.queue_span.is_recording():
            r.queue_span.end()
        now = time.monotonic()
        inference_s = now - r.admitted_at if r.admitted_at is not None else None
        self.metrics.request_finished(outcome, len(r.generated), now - r.arrived_at, inference_s, r.spec_accepted)
        if r.adapter:
            self.metrics.adapter_outcomes.labels(r.adapter, outcome).inc()
            if r.trace_context is not None:
                trace.get_current_span(r.trace_context).set_attribute("switchyard.adapter", r.adapter)
        if r.spec_proposed and r.trace_context is not None:
            span = trace.get_current_span(r.trace_context)
            span.set_attribute("switchyard.speculation.proposed", r.spec_proposed)
            span.set_attribute("switchyard.speculation.accepted", r.spec_accepted)

    def speculated(self, proposed: int, accepted: int) -> None:
        """One request's guesses in one step, and how many verification kept."""
        self.metrics.spec_draft_tokens.inc(proposed)
        self.metrics.spec_accepted_tokens.inc(accepted)

    # --- steps ------------------------------------------------------------------------

    def step_span(self, method: str, requests: list[Request]) -> Span:
        """A span for one batch step, in the trace of its oldest request and linked to every other one."""
        contexts = [r.trace_context for r in requests if r.trace_context is not None]
        links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:]]
        first = contexts[0] if contexts else None
        size = {"switchyard.batch": len(requests)}
        return self.tracer.start_span(method, context=first, links=links, attributes=size)

    def step_answered(self, method: str, started: float, answer: StepAnswer, chunks: list[PrefillItem]) -> None:
        m = self.metrics
        m.step_duration.labels(method).observe(time.perf_counter() - started)
        m.forward_duration.labels(method).observe(answer.forward_ns / 1e9)
        m.decode_duration.labels(method).observe(answer.decode_ns / 1e9)
        m.step_finished(method, ok=True)
        for item in chunks:
            m.prefill_tokens.inc(item.chunk_len)

    def step_failed(self, method: str) -> None:
        self.metrics.step_finished(method, ok=False)

    def tokens_delivered(self, count: int, method: str, started: float) -> None:
        self.metrics.generation_tokens.inc(count)
        self.metrics.filter_duration.labels(method).observe(time.perf_counter() - started)

    # --- the batch and the shards ---------------------------------------------------------

    def batch(self, planner: Planner) -> None:
        m, a = self.metrics, planner.allocator
        m.queue_size.set(len(planner.waiting))
        m.batch_size.set(len(planner.active))
        m.batch_tokens.set(sum(r.computed for r in planner.active))
        m.blocks_used.set(a.used_blocks)
        m.blocks_free.set(a.free_blocks)
        m.blocks_cached.set(a.cached_blocks)
        m.running.set(len(planner.active))
        m.waiting.set(len(planner.waiting))
        m.kv_usage.set(a.used_blocks / a.num_blocks)

    def shards_lost(self) -> None:
        self.metrics.shard_recoveries.inc()
        self.metrics.shards_up.set(0)

    def shards_back(self) -> None:
        self.metrics.shards_up.set(1)
