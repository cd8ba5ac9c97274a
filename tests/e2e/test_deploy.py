"""Deployment shape: the compose file, the services as separate processes over TCP, graceful shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from compose_spec import PyCompose

from tests.conftest import ROOT, free_port, launched_stack

TGI_ENV = {
    "MAX_INPUT_LENGTH": "4096",
    "MAX_BATCH_PREFILL_TOKENS": "4096",
    "MAX_TOTAL_TOKENS": "32000",
    "MAX_BATCH_TOTAL_TOKENS": "1024000",
}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` interpolation, done before validation as ``docker compose`` does."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def test_compose_file_follows_the_compose_specification():
    raw = (ROOT / "docker-compose.yml").read_text()
    text = interpolate(raw, {})
    PyCompose.from_yaml(text)  # raises ValueError on anything the specification does not allow
    PyCompose.from_yaml(interpolate(raw, {**TGI_ENV, "MODEL_ID": "/repository", "SWITCHYARD_TARGET": "cpu"}))
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"shard", "router", "facade"} <= services.keys()
    assert services["facade"]["ports"] == ["8080:8080"]
    gpus = services["shard"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    assert services["jaeger"]["profiles"] == ["observability"] == services["prometheus"]["profiles"]
    for name in (
        "MODEL_ID",
        "MAX_INPUT_LENGTH",
        "MAX_TOTAL_TOKENS",
        "MAX_BATCH_PREFILL_TOKENS",
        "MAX_BATCH_TOTAL_TOKENS",
    ):
        assert name in services["shard"]["environment"] and name in services["router"]["environment"]
    assert "/health" in " ".join(services["facade"]["healthcheck"]["test"])
    for name in ("shard", "router"):  # what a start derives from the weights survives a container restart
        assert "switchyard-cache:/cache" in services[name]["volumes"]
        assert services[name]["environment"]["SWITCHYARD_CACHE"] == "/cache"
    assert "switchyard-cache" in compose["volumes"]
    assert (ROOT / "deploy" / "prometheus.yml").exists() and (ROOT / "Dockerfile").exists()


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_services_as_separate_processes_over_tcp_with_a_tgi_env_block(tiny_model_dir, tmp_path):
    """The compose topology without Docker: shards, router and facade talk over TCP, configured by TGI's env."""
    shard_port, router_port, http_port = free_port(), free_port(), free_port()
    env = {**os.environ, **TGI_ENV, "MODEL_ID": str(tiny_model_dir("llama")), "DTYPE": "float32", "NUM_SHARD": "2",
           "SHARD_LISTEN": f"127.0.0.1:{shard_port}", "SHARD_ADVERTISE_HOST": "localhost"}  # fmt: skip
    if free_port() == shard_port + 1:  # rank 1 takes the next port
        pytest.skip("port clash")
    procs = [
        _start(["-m", "launcher", "shards"], env, tmp_path / "shards.log"),
        _start(
            ["-m", "router", "--listen", f"127.0.0.1:{router_port}", "--shard-address", f"localhost:{shard_port}"],
            env,
            tmp_path / "router.log",
        ),
        _start(
            [
                "-m",
                "facade",
                "--hostname",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--router",
                f"127.0.0.1:{router_port}",
            ],
            env,
            tmp_path / "facade.log",
        ),
    ]
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        while True:
            assert all(p.poll() is None for p in procs), [(f.name, f.read_text()[-2000:]) for f in tmp_path.iterdir()]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not healthy"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1/", api_key="-")
        answer = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert answer.choices[0].message.content is not None
        info = httpx.get(f"{url}/info").json()
        assert info["max_input_tokens"] <= info["max_total_tokens"] <= 2048  # capped to the model's context
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)


def test_sigterm_lets_an_in_flight_stream_finish(tiny_model_dir):
    with launched_stack({"MODEL_ID": str(tiny_model_dir("llama"))}) as (url, launcher):
        client = openai.OpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0)
        stream = client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": "Keep going."}],
            max_tokens=600,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = []
        for i, chunk in enumerate(stream):
            if i == 3:
                threading.Thread(target=launcher.send_signal, args=(signal.SIGTERM,)).start()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)
        assert finish == ["length"]  # the stream ran to its end, not cut by the shutdown
        assert launcher.wait(timeout=60) == 0


def test_the_docker_build_context_is_only_what_the_image_copies():
    """.dockerignore is an allowlist: every COPY source is in it, and the 2+ GB .venv and build/ are not."""
    lines = [
        x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and not x.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {x[1:] for x in lines if x.startswith("!")}
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied |= set(line.split()[1:-1])
    assert copied and copied <= allowed, copied - allowed
    assert not allowed & {".venv", "build", "tests", ".git", "models"}


def test_every_documented_setting_reaches_compose():
    """Each variable of the README's settings table is passed through docker-compose.yml (those the
    services take as command-line flags there excepted), and no host folder is needed for the default model."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| variable | meaning | default |") :]
    table = table[: table.index("\n\n")]
    names = {n for line in table.splitlines()[2:] for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    compose = (ROOT / "docker-compose.yml").read_text()
    set_by_flags = {"PORT", "HOSTNAME", "ROUTER_LISTEN"}  # facade --port/--hostname, router --listen
    set_by_flags |= {"NUM_REPLICAS"}  # make serve's: compose runs a replica per shard service
    assert len(names) > 20
    assert sorted(n for n in names - set_by_flags if f"{n}:" not in compose) == []
    assert ":-./models" not in compose  # the default is the named volume


# --- Kubernetes -------------------------------------------------------------------------

KUBERNETES = ROOT / "deploy" / "kubernetes"
#: Objects kustomize leaves cluster-wide.
CLUSTER_SCOPED = {"Namespace"}


def _kustomize(folder: Path) -> list[dict]:
    """What ``kustomize build`` gives for our kustomization: its resources, with the namespace,
    labels and image it sets (the transformers this file uses, and only those)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "namespace", "labels", "resources", "images"}, set(spec)
    image = spec["images"][0]
    objects = []
    for name in spec["resources"]:
        for obj in yaml.safe_load_all((folder / name).read_text()):
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
            for labels in spec["labels"]:
                obj["metadata"].setdefault("labels", {}).update(labels["pairs"])
            for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
            objects.append(obj)
    return objects


def test_kubernetes_manifests_validate_against_the_api_schemas():
    import kubernetes_validate

    objects = _kustomize(KUBERNETES)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)  # raises naming the object and field
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    kinds = {kind for kind, _ in by_kind}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    assert {"HorizontalPodAutoscaler", "Namespace"} <= kinds
    shards = by_kind["StatefulSet", "shard"]["spec"]
    assert shards["serviceName"] == "shard" and by_kind["Service", "shard"]["spec"]["clusterIP"] == "None"
    shard = shards["template"]["spec"]["containers"][0]
    assert shard["resources"]["requests"]["nvidia.com/gpu"] and shard["image"] == "switchyard:cuda"
    facade = by_kind["Deployment", "facade"]["spec"]["template"]
    assert facade["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"
    assert facade["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    config = by_kind["ConfigMap", "switchyard-config"]["data"]
    assert config["SHARD_ADDRESSES"] == "dns:shard:50060"  # every pod of the StatefulSet, via its headless Service
    assert {"MODEL_ID", "MAX_TOTAL_TOKENS", "MAX_BATCH_TOTAL_TOKENS", "NUM_SHARD"} <= set(config)
