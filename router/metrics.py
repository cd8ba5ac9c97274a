"""The router's Prometheus metrics, under TGI's and vLLM's names so that either ecosystem's
dashboards work unchanged, plus ``switchyard_*`` series for what neither has.

TGI's exporter writes counters without the ``_total`` suffix prometheus_client adds
(``tgi_request_count 5``), and TGI's dashboards query those exact names, so the TGI
counters are kept here (``ExactCounters``) and rendered the way TGI renders them.
vLLM uses prometheus_client itself, so its names come out right as they are; they
carry vLLM's ``model_name`` label. The router owns the figures; the facade's
``/metrics`` serves them (fetched over the public API's Metrics call) with its own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: TGI's counters: name -> (help, label names).
TGI_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tgi_request_count": ("Total number of requests", ()),
    "tgi_request_success": ("Number of successful requests", ()),
    "tgi_request_failure": ("Number of failed requests, by error kind", ("err",)),
    "tgi_batch_inference_count": ("Inference calls per method (prefill or decode)", ("method",)),
    "tgi_batch_inference_success": ("Successful inference calls per method", ("method",)),
    "tgi_batch_inference_failure": ("Failed inference calls per method", ("method",)),
}


@dataclass
class ExactCounters:
    """Counters rendered as ``# TYPE name counter`` + ``name{labels} value``, without ``_total``."""

    values: dict[str, dict[tuple[str, ...], float]] = field(default_factory=lambda: defaultdict(dict))

    def inc(self, name: str, *labels: str, amount: float = 1.0) -> None:
        series = self.values[name]
        series[labels] = series.get(labels, 0.0) + amount

    def get(self, name: str, *labels: str) -> float:
        return self.values[name].get(labels, 0.0)

    def exposition(self) -> bytes:
        lines = []
        for name, (doc, label_names) in TGI_COUNTERS.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            series = self.values.get(name) or ({(): 0.0} if not label_names else {})
            for labels, value in sorted(series.items()):
                pairs = ",".join(f'{k}="{v}"' for k, v in zip(label_names, labels, strict=True))
                lines.append(f"{name}{{{pairs}}} {value}" if pairs else f"{name} {value}")
        return ("\n".join(lines) + "\n").encode()


@dataclass
class RouterMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    #: vLLM's ``model_name`` label.
    model_name: str = ""
    counters: ExactCounters = field(default_factory=ExactCounters)

    def __post_init__(self) -> None:
        self._tgi_series()
        self._vllm_series()
        self._switchyard_series()

    def _tgi_series(self) -> None:
        r = self.registry
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Current batch size", registry=r)
        self.batch_tokens = Gauge("tgi_batch_current_max_tokens", "KV tokens held by the current batch", registry=r)
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Batch size once new requests joined", buckets=_BATCH_BUCKETS, registry=r
        )

        def step_histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["method"], buckets=_STEP_BUCKETS, registry=r)

        self.step_duration = step_histogram("tgi_batch_inference_duration", "Batch inference duration (s)")
        self.forward_duration = step_histogram("tgi_batch_forward_duration", "Model forward duration (s)")
        self.decode_duration = step_histogram("tgi_batch_decode_duration", "Shard time sampling tokens (s)")
        self.filter_duration = step_histogram(
            "tgi_batch_filter_duration", "Time spent filtering the batch and sending tokens (s)"
        )

        def request_histogram(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.request_duration = request_histogram("tgi_request_duration", "End-to-end request latency (s)")
        self.validation_duration = request_histogram("tgi_request_validation_duration", "Validation time (s)")
        self.queue_duration = request_histogram("tgi_request_queue_duration", "Time in the queue (s)")
        self.inference_duration = request_histogram("tgi_request_inference_duration", "Time from admission (s)")
        self.time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration", "Mean time per token (s)", buckets=_STEP_BUCKETS, registry=r
        )
        self.input_length = request_histogram("tgi_request_input_length", "Prompt tokens", _TOKEN_BUCKETS)
        self.generated_tokens = request_histogram("tgi_request_generated_tokens", "Generated tokens", _TOKEN_BUCKETS)
        self.max_new_tokens = request_histogram("tgi_request_max_new_tokens", "max_new_tokens asked", _TOKEN_BUCKETS)
        self.skipped_tokens = request_histogram(
            "tgi_request_skipped_tokens", "Guessed tokens verification kept, per request (SPECULATE)", _TOKEN_BUCKETS
        )

    def _vllm_series(self) -> None:
        """vLLM's core series; each bound to this model's ``model_name`` once, not per observation."""
        r, label, m = self.registry, ["model_name"], self.model_name

        def gauge(name: str, doc: str):  # type: ignore[no-untyped-def]
            return Gauge(name, doc, label, registry=r).labels(m)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):  # type: ignore[no-untyped-def]
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(m)

        def counter(name: str, doc: str):  # type: ignore[no-untyped-def]
            return Counter(name, doc, label, registry=r).labels(m)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.inter_token = histogram("vllm:inter_token_latency_seconds", "Inter-token latency", _STEP_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds", "End-to-end latency", _LATENCY_BUCKETS)
        self.vllm_queue_time = histogram("vllm:request_queue_time_seconds", "Time in the queue", _LATENCY_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Speculative tokens guessed")
        self.spec_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Speculative tokens kept")
        self.request_success = Counter(
            "vllm:request_success", "Finished requests by reason", [*label, "finished_reason"], registry=r
        )
        # vLLM's LoRA gauge: the adapters of running and waiting requests, in its labels; the value is
        # when they last changed. max_lora is 0: a step mixes any number of adapters.
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)  # fmt: skip
        self._lora_state: tuple[frozenset[str], frozenset[str]] | None = None

    def _switchyard_series(self) -> None:
        r = self.registry
        self.blocks_used = Gauge("switchyard_kv_blocks_used", "KV blocks held by requests", registry=r)
        self.blocks_free = Gauge("switchyard_kv_blocks_free", "KV blocks free (cached or empty)", registry=r)
        self.blocks_cached = Gauge("switchyard_kv_blocks_cached", "KV blocks findable by the prefix cache", registry=r)
        self.prefix_hit_tokens = Counter(
            "switchyard_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.prefill_tokens = Counter(
            "switchyard_prefill_tokens", "Prompt tokens computed by prefill steps", registry=r
        )
        self.preemptions = Counter("switchyard_preemptions", "Requests preempted for lack of KV blocks", registry=r)
        self.shard_recoveries = Counter(
            "switchyard_shard_recoveries", "Shard restarts the router recovered from (re-warm, recompute)", registry=r
        )
        self.outcomes = Counter("switchyard_request_outcome", "Finished requests by outcome", ["outcome"], registry=r)
        self.adapter_outcomes = Counter(
            "switchyard_adapter_requests", "Finished LoRA adapter requests by adapter and outcome",
            ["adapter", "outcome"], registry=r,
        )  # fmt: skip
        self.shards_up = Gauge("switchyard_shards_up", "1 while the shards serve, 0 while being recovered", registry=r)
        self.shards_up.set(1)

    # --- events the scheduler and the API report ------------------------------------------------

    def request_arrived(self, prompt_tokens: int, max_new_tokens: int) -> None:
        self.counters.inc("tgi_request_count")
        self.input_length.observe(prompt_tokens)
        self.max_new_tokens.observe(max_new_tokens)

    def request_refused(self, err: str) -> None:
        """Before it reached the queue: ``validation`` or ``overloaded`` (TGI's err labels)."""
        self.counters.inc("tgi_request_count")
        self.counters.inc("tgi_request_failure", err)

    def request_finished(
        self, outcome: str, generated: int, e2e_s: float, inference_s: float | None, skipped: int = 0
    ) -> None:
        self.outcomes.labels(outcome).inc()
        self.generated_tokens.observe(generated)
        reason = {"cancelled": "abort", "error": "abort", "stop_sequence": "stop", "tool_calls": "stop"}
        self.request_success.labels(self.model_name, reason.get(outcome, outcome)).inc()
        if outcome in ("cancelled", "error"):
            self.counters.inc("tgi_request_failure", "generation" if outcome == "error" else "cancelled")
            return
        self.counters.inc("tgi_request_success")
        self.request_duration.observe(e2e_s)
        self.e2e_latency.observe(e2e_s)
        self.skipped_tokens.observe(skipped)
        if inference_s is not None:
            self.inference_duration.observe(inference_s)
            self.time_per_token.observe(inference_s / max(1, generated))

    def lora_requests(self, running: frozenset[str], waiting: frozenset[str]) -> None:
        """The adapters of the running and waiting requests (from the first adapter request on)."""
        state = (running, waiting)
        if state == self._lora_state or (self._lora_state is None and not running and not waiting):
            return
        self._lora_state = state
        self.lora_info.clear()
        self.lora_info.labels("0", ",".join(sorted(running)), ",".join(sorted(waiting))).set(time.time())

    def step_finished(self, method: str, ok: bool) -> None:
        self.counters.inc("tgi_batch_inference_count", method)
        self.counters.inc("tgi_batch_inference_success" if ok else "tgi_batch_inference_failure", method)

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + self.counters.exposition()

    def refusals_exposition(self) -> bytes:
        """What a router in front of several replicas counts itself: requests refused before
        placement (TGI's request counters) and validation time."""
        name = "tgi_request_validation_duration"
        samples = [f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum", "_created")]
        return generate_latest(self.registry.restricted_registry(samples)) + self.counters.exposition()
