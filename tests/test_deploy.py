"""Deployment: the manifests validate and fit together, `fastmesh health` judges a real gateway,
and (slow, where buildah or docker is here) the image builds and its smoke test passes.

Manifests are checked offline against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
an unknown field is an error), so a typo fails here rather than at `kubectl apply`.
"""
from __future__ import annotations

import copy
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, config, fastmesh_cmd, free_port, service, wait_for_port
from fastmesh import __version__, healthcheck

KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(fastmesh_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# --- Kubernetes manifests ------------------------------------------------------------------------

def test_the_kubernetes_examples_hold_the_expected_objects():
    kinds = sorted(name for name, _ in manifests())
    assert kinds == [
        "echo.yaml:Deployment/echo", "echo.yaml:Service/echo",
        "gateway-config.yaml:ConfigMap/fastmesh-gateway",
        "gateway.yaml:Deployment/fastmesh-gateway", "gateway.yaml:Service/fastmesh-gateway",
        "redis.yaml:Deployment/redis", "redis.yaml:Service/redis",
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,doc", manifests(), ids=[name for name, _ in manifests()])
def test_every_manifest_validates_against_the_kubernetes_schema(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("mutate,what", [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
        containerPrt=d["spec"]["template"]["spec"]["containers"][0]["ports"][0].pop("containerPort")),
     "containerPrt"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        readinesProbe=d["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")),
     "readinesProbe"),
    (lambda d: d["spec"].update(replicas="two"), "two"),
], ids=["misspelt-field", "misspelt-probe", "wrong-type"])
def test_a_typo_in_a_manifest_fails_validation(mutate, what):
    deployment = copy.deepcopy(by_kind("Deployment")["fastmesh-gateway"])
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)   # valid as written
    mutate(deployment)
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    assert what in str(caught.value)


def test_the_configmap_config_passes_fastmesh_check(tmp_path):
    path = tmp_path / "fastmesh.yaml"
    path.write_text(by_kind("ConfigMap")["fastmesh-gateway"]["data"]["fastmesh.yaml"])
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK (1 service(s), 1 route(s)" in result.stdout


def test_fastmesh_check_catches_a_typo_in_the_configmap_config(tmp_path):
    text = by_kind("ConfigMap")["fastmesh-gateway"]["data"]["fastmesh.yaml"]
    assert "        paths: [/echo]" in text
    path = tmp_path / "fastmesh.yaml"
    path.write_text(text.replace("        paths: [/echo]", "        pathz: [/echo]"))
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 1
    assert "unknown field 'pathz' (did you mean 'paths'?)" in result.stderr


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def test_the_manifests_fit_together():
    """What the schemas cannot see: selectors, named ports, the ConfigMap, the config's addresses."""
    deployments, services = by_kind("Deployment"), by_kind("Service")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
    for name, svc in services.items():
        pods = [d for d in deployments.values()
                if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {name} selects {len(pods)} deployments"
        port_names = {p["name"] for c in pod_spec(pods[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: {port['targetPort']}"

    gateway = pod_spec(deployments["fastmesh-gateway"])
    container = gateway["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in gateway["volumes"] if v["name"] == "config")
    configmap = by_kind("ConfigMap")[volume["configMap"]["name"]]
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mount['mountPath']}/fastmesh.yaml"
    assert "fastmesh.yaml" in configmap["data"]

    document = yaml.safe_load(configmap["data"]["fastmesh.yaml"])
    listen_port = int(document["gateway"]["listen"].rsplit(":", 1)[1])
    assert listen_port == container["ports"][0]["containerPort"]
    assert document["gateway"]["admin"]["listen"].startswith("127.0.0.1:")   # probes run in the pod
    upstream = document["services"][0]["url"].removeprefix("http://")
    host, port = upstream.split(":")
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    # The image's non-root user, and probes that are real fastmesh subcommands.
    assert gateway["securityContext"]["runAsUser"] == 10001
    assert container["readinessProbe"]["exec"]["command"] == ["fastmesh", "health"]


# --- compose ------------------------------------------------------------------------------------

def test_the_compose_file_fits_the_image_and_its_config(tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    assert set(compose["services"]) == {"gateway", "echo", "redis"}
    gateway, echo = compose["services"]["gateway"], compose["services"]["echo"]
    assert gateway["build"]["target"] == "standalone"
    assert gateway["image"] == echo["image"] == f"localhost/fastmesh:{__version__}"
    # Every fastmesh command in the file is one the CLI takes.
    for svc in (gateway, echo):
        result = run_cli(*svc["command"][:1], "--help")
        assert result.returncode == 0, result.stderr
    source, target, _ = gateway["volumes"][0].split(":")
    assert target == gateway["command"][gateway["command"].index("--config") + 1]
    config_file = COMPOSE.parent / source
    result = run_cli("check", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(config_file.read_text())
    host, port = document["services"][0]["url"].removeprefix("http://").split(":")
    assert host in compose["services"]
    assert echo["command"][-1] == f"0.0.0.0:{port}"
    published = gateway["ports"][0].split(":")
    assert published[-1] == document["gateway"]["listen"].rsplit(":", 1)[1]


# --- fastmesh health ------------------------------------------------------------------------------

def start_gateway(gateway, echo, *extra: str, **settings):
    admin = free_port()
    cfg = config(service("echo", echo.url, [{"name": "echo", "paths": ["/"]}]), **settings)
    proc = gateway(cfg, "--admin", f"127.0.0.1:{admin}", *extra)
    wait_for_port(admin, proc.proc)     # the admin API starts after the workers listen
    return proc, admin


def test_health_exits_0_for_a_serving_gateway(gateway, echo):
    proc, admin = start_gateway(gateway, echo)
    result = run_cli("health", "--admin", f"127.0.0.1:{admin}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"healthy: fastmesh {__version__}, 1/1 worker(s) alive, config ")
    assert result.stdout.count("\n") == 1


def test_health_exits_1_when_nothing_answers():
    port = free_port()
    result = run_cli("health", "--admin", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.startswith(f"admin API on 127.0.0.1:{port} did not answer")
    assert result.stdout == ""


def test_health_rejects_a_bad_admin_address():
    result = run_cli("health", "--admin", "localhost")
    assert result.returncode == 1
    assert "--admin: expected HOST:PORT" in result.stderr


def test_health_needs_the_admin_token_when_one_is_set(gateway, echo):
    token = "a-long-admin-token"
    proc, admin = start_gateway(gateway, echo, admin={"token": token})
    without = run_cli("health", "--admin", f"127.0.0.1:{admin}")
    assert without.returncode == 1
    assert "answered 401" in without.stderr
    with_token = subprocess.run(
        fastmesh_cmd("health", "--admin", f"127.0.0.1:{admin}"), capture_output=True, text=True,
        timeout=30, env={**os.environ, "FASTMESH_ADMIN_TOKEN": token})
    assert with_token.returncode == 0, with_token.stderr


def test_health_reports_a_dead_worker_until_it_is_replaced(gateway, echo):
    proc, admin = start_gateway(gateway, echo, "--workers", "2")
    address = f"127.0.0.1:{admin}"
    healthy, line = healthcheck.probe(address)
    assert healthy, line
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    conn.request("GET", "/status")
    status = json.loads(conn.getresponse().read())
    conn.close()
    victim = status["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        healthy, line = healthcheck.probe(address)
        seen.append((healthy, line))
        if not healthy:
            assert "1/2 worker(s) alive" in line
        elif any(not h for h, _ in seen):
            break                       # unhealthy, then healthy again: the worker was replaced
        time.sleep(0.02)
    assert any(not h for h, _ in seen), "a killed worker never showed as unhealthy"
    assert seen[-1][0], f"still unhealthy after 10 s: {seen[-1][1]}"


# --- the image (slow) -----------------------------------------------------------------------------

def engine() -> str | None:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return "docker"
    return "buildah" if shutil.which("buildah") else None


def vfs(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", "--storage-driver", "vfs", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def built_image():
    """scripts/build-image under a test tag; the image is removed afterwards (vfs storage keeps
    a full copy of every image)."""
    which = engine()
    if which is None:
        pytest.skip("neither buildah nor a Docker engine is on this machine: the image build and "
                    "its smoke test did not run (apt-get install buildah, then run again)")
    tag = f"localhost/fastmesh-test:{__version__}"
    result = subprocess.run([str(ROOT / "scripts" / "build-image"), "--tag", tag],
                            capture_output=True, text=True, timeout=3600, cwd=ROOT)
    yield which, tag, result
    if which == "docker":
        subprocess.run(["docker", "rmi", tag], capture_output=True, timeout=120)
    else:
        vfs("rmi", tag, timeout=120)


@pytest.mark.slow
def test_the_image_builds_and_passes_its_smoke_test(built_image):
    which, tag, result = built_image
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"in the image: fastmesh {__version__} (user 10001)" in result.stderr
    assert "healthy: fastmesh" in result.stderr
    assert "SIGTERM: drained and exited 0" in result.stderr
    size = float(result.stdout.split("size: ")[1].split(" MB")[0])
    first_200 = float(result.stdout.split("first proxied 200: ")[1].split("s")[0])
    # Issue 10's goals are <= 150 MB and <= 1 s; measured 154.2 MB and 0.37-1.04 s (README). These
    # bounds catch a regression without failing on a loaded 2-core machine.
    assert size <= 160, f"image is {size} MB (154.2 MB when measured for the README)"
    assert first_200 <= 5, f"first proxied 200 after {first_200}s"
    if which != "buildah":
        return

    inspected = vfs("inspect", "--type", "image", tag, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    image = json.loads(inspected.stdout)
    docker = image["Docker"]["config"]
    assert docker["Entrypoint"] == ["/usr/local/bin/tini", "-s", "--", "fastmesh"]
    assert docker["Cmd"] == ["run"]
    assert docker["User"] == "10001:10001"
    assert docker["Healthcheck"]["Test"] == ["CMD", "fastmesh", "health"]
    labels = docker["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    history = json.dumps(image.get("History") or image["Docker"].get("history"))
    assert "PIP_CONFIG_FILE" not in history and "apt-sources" not in history
    # The final image holds the runtime only: no compiler, no pip cache, no build venv or wheels,
    # no C sources, none of this machine's package index settings; and the data path imports.
    ctr = vfs("from", "--quiet", tag).stdout.strip()
    assert ctr, "buildah from failed"
    try:
        probe = vfs("run", "--isolation", "chroot", ctr, "--", "sh", "-c",
                    "for p in gcc cc cython; do command -v $p; done; "
                    "ls -d /opt/build /wheels /root/.cache/pip /opt/fastmesh/bin/pip* "
                    "/opt/fastmesh/lib/python3*/site-packages/fastmesh/_core/*.c "
                    "/etc/apt/sources.list.d/host.* /run/secrets/* 2>/dev/null; "
                    "/opt/fastmesh/bin/python -c "
                    "'import fastmesh._core.proxy, uvloop, redis; print(\"imports ok\")'",
                    timeout=120)
    finally:
        vfs("rm", ctr, timeout=120)
    assert probe.stdout.strip() == "imports ok", probe.stdout + probe.stderr
