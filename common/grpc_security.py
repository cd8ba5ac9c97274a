"""TLS and bearer-key authentication for the gRPC services.

TLS is configured by three environment variables, the same in every service:

- ``GRPC_TLS_CERT`` and ``GRPC_TLS_KEY``: this service's certificate chain and
  private key (PEM). A server with them listens with TLS; a client presents them
  to servers that ask for a client certificate.
- ``GRPC_TLS_CA``: the CA bundle (PEM) peers are verified against. A client with
  it connects over TLS; a server with it also *requires* client certificates
  signed by it (mutual TLS between the services).
- ``GRPC_TLS_SERVER_NAME`` (optional): the name a client expects in the server's
  certificate when the address does not carry it (a Unix socket, an IP).

The router's public API also honours ``API_KEY``: every call but Health must
carry ``authorization: Bearer <key>`` metadata (the scheme in any case, as RFC
7235 says), like the HTTP API.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.settings import env_str

#: Methods a probe may call without the key (as ``/health`` over HTTP).
OPEN_METHODS = frozenset({"/switchyard.router.v1.Router/Health", "/switchyard.shard.v1.ShardService/Health"})


@dataclass(frozen=True)
class TlsConfig:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsConfig:
        def read(name: str) -> bytes | None:
            path = env_str(env, name)
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise SystemExit(f"{name}: cannot read {path}: {exc.strerror}") from exc

        config = cls(
            read("GRPC_TLS_CERT"), read("GRPC_TLS_KEY"), read("GRPC_TLS_CA"), env_str(env, "GRPC_TLS_SERVER_NAME")
        )
        if (config.cert is None) != (config.key is None):
            raise SystemExit("GRPC_TLS_CERT and GRPC_TLS_KEY go together: set both or neither")
        return config

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None

    def add_port(self, server: grpc.aio.Server, address: str) -> None:
        """Listens on ``address``: TLS with our certificate if we have one (clients verified if we have a CA)."""
        if self.cert is None or self.key is None:
            server.add_insecure_port(address)
            return
        credentials = grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )
        server.add_secure_port(address, credentials)

    def channel(
        self, target: str, options: list[tuple[str, object]] | None = None, interceptors: list | None = None
    ) -> grpc.aio.Channel:
        """A channel to ``target``: TLS, verified against our CA, when we have one."""
        options = list(options or [])
        if self.ca is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)
        credentials = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors or None)


def bearer_matches(header: str, api_key: str) -> bool:
    """``header`` is ``Bearer <api_key>``, the scheme in any case; compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    # Both comparisons always run, so timing tells nothing about which part was wrong.
    scheme_ok = scheme.lower() == "bearer"
    return hmac.compare_digest(token.strip().encode(), api_key.encode()) and scheme_ok


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <API_KEY>`` (UNAUTHENTICATED), Health excepted."""

    def __init__(self, api_key: str):
        self.api_key = api_key

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method in OPEN_METHODS:
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_matches(str(metadata.get("authorization", "")), self.api_key):
            return await continuation(handler_call_details)
        return _refusal(await continuation(handler_call_details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape that aborts with UNAUTHENTICATED."""
    if handler is None:
        return None
    message = "incorrect or missing API key: send metadata 'authorization: Bearer <key>'"

    # Not marked as a message for end users: behind the facade, a refused key is the facade's own
    # misconfiguration (API_KEY differs between them), which it reports as a fault.
    async def unary(request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as the streaming handler it replaces

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


# One class per call kind: grpc.aio files an interceptor under the first kind it is an
# instance of, so a class implementing both would never see streaming calls.
class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, api_key: str):
        self.pair = ("authorization", f"Bearer {api_key}")

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_metadata(client_call_details, self.pair), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, api_key: str):
        self.pair = ("authorization", f"Bearer {api_key}")

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_metadata(client_call_details, self.pair), request)


def _with_metadata(details, pair: tuple[str, str]):  # type: ignore[no-untyped-def]
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), pair))


def api_key_interceptors(api_key: str | None) -> list:
    """Client interceptors that send ``api_key`` with every call, streaming or not (none without a key)."""
    return [_BearerUnary(api_key), _BearerStream(api_key)] if api_key else []
