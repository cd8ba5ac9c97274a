"""The router's Prometheus metrics, with TGI's names where TGI has one.

The router owns the figures; the facade's ``/metrics`` serves them (fetched
over the public API's Metrics call) together with its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting for a batch", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_tokens = Gauge("tgi_batch_current_max_tokens", "KV tokens held by the running batch", registry=r)
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
        self.requests = Counter("tgi_request_count", "Requests received", registry=r)
        self.outcomes = Counter("switchyard_request_outcome", "Finished requests by outcome", ["outcome"], registry=r)
        self.step_duration = Histogram(
            "tgi_batch_inference_duration", "Shard step duration (s)", ["method"], buckets=_STEP_BUCKETS, registry=r
        )
        self.forward_duration = Histogram(
            "tgi_batch_forward_duration", "Model forward duration (s)", ["method"], buckets=_STEP_BUCKETS, registry=r
        )
        self.queue_duration = Histogram(
            "tgi_request_queue_duration", "Time from arrival to first prefill (s)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "switchyard_time_to_first_token",
            "Time from arrival to first token (s)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "switchyard_inter_token_latency", "Time between tokens of a request (s)", buckets=_STEP_BUCKETS, registry=r
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Tokens generated per request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens per request", buckets=_TOKEN_BUCKETS, registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
