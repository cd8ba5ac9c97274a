"""OpenTelemetry tracing, shared by every service: on with OTLP_ENDPOINT, off and free without.

Spans are exported over OTLP/gRPC. The W3C trace context travels in HTTP headers
into the facade and in gRPC metadata facade -> router -> shards, carried by the
OpenTelemetry instrumentations for aiohttp and gRPC. No global provider is
installed: each service hands its own to the instrumentations, so tests can run
several services in one process with an in-memory exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


@dataclass(frozen=True)
class Tracing:
    #: None when tracing is off: no spans are made, nothing is exported.
    provider: TracerProvider | None = None

    def tracer(self, name: str) -> trace.Tracer:
        return self.provider.get_tracer(name) if self.provider else trace.NoOpTracer()

    def grpc_server_interceptors(self) -> list:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider, filter_=_traced_methods())]

    def grpc_client_interceptors(self) -> list:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.provider, filter_=_traced_methods()))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def _traced_methods():  # type: ignore[no-untyped-def]
    """Every RPC but Health and Metrics: probes and scrapes every few seconds would bury real traces."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(filters.method_name("Health"), filters.method_name("Metrics")))


def setup_tracing(service_name: str, otlp_endpoint: str | None, processor: SpanProcessor | None = None) -> Tracing:
    """Tracing for one service; ``processor`` replaces the OTLP exporter (tests use an in-memory one)."""
    if not otlp_endpoint and processor is None:
        return Tracing()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if processor is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
    provider.add_span_processor(processor)
    return Tracing(provider)
