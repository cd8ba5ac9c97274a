"""Metric names and types as TGI's and vLLM's dashboards query them, with values that move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from router.metrics import RouterMetrics
from tests.router.harness import expected_tokens, fake_router

#: TGI's documented router metrics (huggingface.co/docs/text-generation-inference/reference/metrics),
#: plus the two failure counters its router also exports.
TGI = {
    "tgi_batch_current_max_tokens": "gauge", "tgi_batch_current_size": "gauge", "tgi_queue_size": "gauge",
    "tgi_batch_decode_duration": "histogram", "tgi_batch_filter_duration": "histogram",
    "tgi_batch_forward_duration": "histogram", "tgi_batch_inference_duration": "histogram",
    "tgi_batch_next_size": "histogram", "tgi_request_duration": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_request_inference_duration": "histogram", "tgi_request_input_length": "histogram",
    "tgi_request_max_new_tokens": "histogram", "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_queue_duration": "histogram", "tgi_request_skipped_tokens": "histogram",
    "tgi_request_validation_duration": "histogram",
    "tgi_batch_inference_count": "counter", "tgi_batch_inference_success": "counter",
    "tgi_batch_inference_failure": "counter", "tgi_request_count": "counter", "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
}  # fmt: skip
#: vLLM's core series (docs.vllm.ai, production metrics), each with a model_name label.
VLLM = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter", "vllm:request_success": "counter",
    "vllm:spec_decode_num_draft_tokens": "counter", "vllm:spec_decode_num_accepted_tokens": "counter",
}  # fmt: skip


def _families(metrics: RouterMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def _value(families: dict, sample_name: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(sample_name)


def test_every_tgi_and_vllm_series_is_there_with_its_type():
    families = _families(RouterMetrics(model_name="m"))
    for name, kind in {**TGI, **VLLM}.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)


def test_tgi_counters_have_no_total_suffix():
    text = RouterMetrics().exposition().decode()
    assert "\ntgi_request_count 0.0\n" in text and "# TYPE tgi_request_count counter" in text
    assert "tgi_request_count_total" not in text


async def test_series_move_with_traffic(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        h.scheduler.metrics = metrics = RouterMetrics(model_name="fake")
        requests = [h.request("one two three", max_new_tokens=4, seed=i) for i in range(2)]
        for r in requests:
            h.scheduler.submit(r)
        while h.scheduler.waiting or h.scheduler.active:
            await h.scheduler.step()
        assert all(r.generated == expected_tokens(r) for r in requests)
        f = _families(metrics)
        counters = metrics.counters  # rendered without _total, which the parser would add back
        assert counters.get("tgi_request_count") == 2 and counters.get("tgi_request_success") == 2
        assert counters.get("tgi_batch_inference_success", "decode") >= 3
        assert _value(f, "tgi_request_mean_time_per_token_duration_count") == 2
        assert _value(f, "vllm:request_success_total", model_name="fake", finished_reason="length") == 2
        assert _value(f, "vllm:generation_tokens_total", model_name="fake") == 8
        assert _value(f, "vllm:time_to_first_token_seconds_count", model_name="fake") == 2
        assert _value(f, "vllm:num_requests_running", model_name="fake") == 0


def test_the_shipped_dashboard_queries_only_series_we_export():
    """Every metric name in deploy/grafana's dashboard is a sample name of our /metrics (router and facade)."""
    import json
    import re
    from pathlib import Path

    from facade.metrics import FacadeMetrics

    facade = FacadeMetrics()
    facade.requests.labels("/v1/chat/completions", "200").inc()  # labelled series appear once used
    router = RouterMetrics(model_name="m")
    router.step_duration.labels("decode").observe(0.01)
    router.forward_duration.labels("decode").observe(0.01)
    router.request_finished("error", 1, 0.1, 0.1)
    text = (router.exposition() + facade.exposition()).decode()
    exported = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}
    dashboard = json.loads((Path(__file__).parents[2] / "deploy/grafana/dashboards/switchyard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\b(?:tgi_|vllm:|switchyard_)[A-Za-z0-9_:]+", e)}
    assert len(queried) >= 15
    assert sorted(queried - exported) == []
