"""The router's public gRPC API: loopback by default, API_KEY as bearer metadata, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from common.grpc_security import TlsConfig, api_key_interceptors, bearer_matches
from common.ports import free_port
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc
from router.config import parse_config
from router.server import RouterServicer, ServedModel, Serving, create_server
from tests.router.harness import fake_router

KEY = "sk-router-key"


def test_the_router_listens_on_loopback_unless_told():
    assert parse_config([], {}).listen == "127.0.0.1:50051"
    assert parse_config([], {"ROUTER_LISTEN": "0.0.0.0:50051"}).listen == "0.0.0.0:50051"


@pytest.mark.parametrize(
    ("header", "ok"),
    [(f"Bearer {KEY}", True), (f"bearer {KEY}", True), (f"BEARER  {KEY} ", True), (KEY, False),
     (f"Basic {KEY}", False), ("Bearer nope", False), ("", False)],
)  # fmt: skip
def test_the_bearer_scheme_is_matched_in_any_case(header, ok):
    assert bearer_matches(header, KEY) is ok


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    for name in ("server", "client"):
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        ca = ["-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"), "-CAcreateserial"]
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), *ca, "-days", "2",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))  # fmt: skip
    return d


def _tls(d: Path, name: str | None, ca: bool = True) -> TlsConfig:
    read = lambda f: (d / f).read_bytes()  # noqa: E731
    return TlsConfig(
        read(f"{name}.pem") if name else None, read(f"{name}.key") if name else None, read("ca.pem") if ca else None
    )


@asynccontextmanager
async def serving(h, address: str, tls: TlsConfig | None = None, api_key: str | None = None) -> AsyncIterator[None]:
    """The public router API over the harness' scheduler, its batching loop running."""
    model = ServedModel("fake", "float32", "cpu", 1, 256)
    server = create_server(
        RouterServicer(8, serving=Serving.of_scheduler(h.scheduler, h.validator, model)),
        address,
        tls=tls,
        api_key=api_key,
    )
    await server.start()
    loop = asyncio.create_task(h.scheduler.run())
    try:
        yield
    finally:
        loop.cancel()
        await server.stop(None)


async def test_api_key_is_required_except_for_health(tokenizer, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    async with fake_router(tokenizer, tmp_path) as h, serving(h, address, api_key=KEY):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RouterStub(channel)
            await stub.Health(pb.HealthRequest())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Info(pb.InfoRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stream = stub.GenerateStream(pb.GenerateRequest(prompt="hi"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream.read()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = await stub.Info(pb.InfoRequest(), metadata=(("authorization", f"bearer {KEY}"),))
            assert info.model_id == "fake"
        async with grpc.aio.insecure_channel(address, interceptors=api_key_interceptors(KEY)) as channel:
            stub = pb_grpc.RouterStub(channel)
            params = pb.GenerationParameters(max_new_tokens=3, temperature=0)
            answer = await stub.Generate(pb.GenerateRequest(prompt="hi", parameters=params))
            assert answer.usage.completion_tokens == 3
            streamed = [m async for m in stub.GenerateStream(pb.GenerateRequest(prompt="hi", parameters=params))]
            assert streamed[-1].usage.completion_tokens == 3  # streaming calls carry the key too


async def test_tls_and_mutual_tls(tokenizer, tmp_path, certificates):
    address = f"localhost:{free_port()}"
    server_tls = _tls(certificates, "server")  # with a CA: client certificates are required
    async with fake_router(tokenizer, tmp_path) as h, serving(h, address, tls=server_tls):
        async with _tls(certificates, "client").channel(address) as channel:
            info = await pb_grpc.RouterStub(channel).Info(pb.InfoRequest(), timeout=10)
            assert info.model_id == "fake"
        async with _tls(certificates, None).channel(address) as channel:  # verifies the server, has no certificate
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.RouterStub(channel).Info(pb.InfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(address) as channel:  # plaintext to a TLS port
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.RouterStub(channel).Info(pb.InfoRequest(), timeout=5)


def test_tls_files_come_from_the_environment(certificates):
    env = {"GRPC_TLS_CERT": str(certificates / "server.pem"), "GRPC_TLS_KEY": str(certificates / "server.key")}
    tls = TlsConfig.from_env({**env, "GRPC_TLS_CA": str(certificates / "ca.pem"), "GRPC_TLS_SERVER_NAME": "localhost"})
    assert tls.serves_tls and tls.ca and tls.server_name == "localhost"
    with pytest.raises(SystemExit, match="go together"):
        TlsConfig.from_env({"GRPC_TLS_CERT": env["GRPC_TLS_CERT"]})
    with pytest.raises(SystemExit, match="cannot read"):
        TlsConfig.from_env({"GRPC_TLS_CA": "/nonexistent/ca.pem"})
