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
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, config, fastmesh_cmd, free_port, service, stop_process, wait_for_port
from fastmesh import __version__, healthcheck

KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = f"localhost/fastmesh:{__version__}"
SIDECAR_IMAGE = f"localhost/fastmesh-sidecar:{__version__}"
PROXY_GID = 1337                # the sidecar image's group, the one mesh-init exempts
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


def dockerfile_stage(name: str) -> list[str]:
    """The instructions of one Dockerfile stage, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stage, lines = None, []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stage = line.split(" AS ")[-1].strip() if " AS " in line else None
        elif stage == name and line.strip() and not line.startswith("#"):
            lines.append(line)
    assert lines, f"no stage {name} in the Dockerfile"
    return lines


def image_listen_port() -> int:
    """The port of the standalone image's FASTMESH_LISTEN (it wins over the config's listen)."""
    env = [line for line in dockerfile_stage("standalone") if line.startswith("ENV FASTMESH_LISTEN=")]
    assert len(env) == 1, dockerfile_stage("standalone")
    return int(env[0].split("=", 1)[1].rsplit(":", 1)[1])


def start_sidecar(env: dict[str, str], args: list[str], tmp_path: Path):
    """`fastmesh sidecar` with a deployment's environment and arguments, on free loopback ports
    and a registry file in place of its Redis: proves the names it passes are the ones the
    sidecar reads. Returns the process and its admin address."""
    registry = tmp_path / "mesh.yaml"
    registry.write_text("services: {}\n")
    inbound, outbound, admin = free_port(), free_port(), free_port()
    assert "FASTMESH_REGISTRY" in env
    env = {**os.environ, **env, "FASTMESH_REGISTRY": f"file:{registry}", "PYTHONUNBUFFERED": "1"}
    assert args[0] == "sidecar"
    proc = subprocess.Popen(
        fastmesh_cmd(*args, "--inbound", f"127.0.0.1:{inbound}", "--outbound",
                     f"127.0.0.1:{outbound}", "--admin", f"127.0.0.1:{admin}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    return proc, f"127.0.0.1:{admin}"


def sidecar_gets_ready(env: dict[str, str], args: list[str], tmp_path: Path) -> str:
    proc, admin = start_sidecar(env, args, tmp_path)
    try:
        deadline = time.monotonic() + 20
        healthy, line = False, "not started"
        while time.monotonic() < deadline and proc.poll() is None:
            healthy, line = healthcheck.probe(admin, sidecar=True, timeout=1)
            if healthy:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
        assert healthy, line
        result = run_cli("health", "--sidecar", "--admin", admin)
        assert result.returncode == 0, result.stderr
    finally:
        stop_process(proc)
    output = proc.stdout.read()
    assert proc.returncode == 0, output
    return output


# --- Kubernetes manifests ------------------------------------------------------------------------

def test_the_kubernetes_examples_hold_the_expected_objects():
    kinds = sorted(name for name, _ in manifests())
    assert kinds == [
        "echo.yaml:Deployment/echo", "echo.yaml:Service/echo",
        "gateway-config.yaml:ConfigMap/fastmesh-gateway",
        "gateway.yaml:Deployment/fastmesh-gateway", "gateway.yaml:Service/fastmesh-gateway",
        "mesh-app.yaml:Deployment/orders", "mesh-app.yaml:Service/orders",
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
    assert_typo_fails("fastmesh-gateway", mutate, what)


def assert_typo_fails(name: str, mutate, what: str) -> None:
    """Deployment `name` validates as written and fails, naming `what`, once mutated."""
    deployment = copy.deepcopy(by_kind("Deployment")[name])
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)   # valid as written
    mutate(deployment)
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    assert what in str(caught.value)


def init_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["initContainers"][0]


@pytest.mark.parametrize("mutate,what", [
    (lambda d: init_container(d)["securityContext"]["capabilities"].update(
        ad=init_container(d)["securityContext"]["capabilities"].pop("add")), "ad"),
    (lambda d: d["spec"]["template"]["spec"].update(
        initContainer=d["spec"]["template"]["spec"].pop("initContainers")), "initContainer"),
    (lambda d: init_container(d)["securityContext"].update(runAsUser="root"), "root"),
], ids=["misspelt-capabilities", "misspelt-initContainers", "wrong-type-runAsUser"])
def test_a_typo_in_the_mesh_app_fails_validation(mutate, what):
    assert_typo_fails("orders", mutate, what)


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
    # The image's `run` serves /etc/fastmesh/fastmesh.yaml when it exists: no --config needed.
    assert container["args"] == ["run"]
    assert mount["mountPath"] == "/etc/fastmesh"
    assert "fastmesh.yaml" in configmap["data"]

    document = yaml.safe_load(configmap["data"]["fastmesh.yaml"])
    listen_port = int(document["gateway"]["listen"].rsplit(":", 1)[1])
    assert listen_port == container["ports"][0]["containerPort"] == image_listen_port()
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
    assert set(compose["services"]) == {"gateway", "echo", "redis", "orders", "orders-sidecar",
                                        "payments", "payments-sidecar"}
    gateway, echo = compose["services"]["gateway"], compose["services"]["echo"]
    assert gateway["build"]["target"] == "standalone"
    assert gateway["image"] == echo["image"] == IMAGE
    # The gateway runs the image's CMD (`run`): the config at the image's default path, on the
    # image's FASTMESH_LISTEN.
    assert "command" not in gateway
    source, target, _ = gateway["volumes"][0].split(":")
    assert target == "/etc/fastmesh/fastmesh.yaml"
    result = run_cli("echo", "--help")
    assert result.returncode == 0, result.stderr
    config_file = COMPOSE.parent / source
    result = run_cli("check", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(config_file.read_text())
    host, port = document["services"][0]["url"].removeprefix("http://").split(":")
    assert host in compose["services"]
    assert echo["command"] == ["echo", "--listen", f"0.0.0.0:{port}"]
    published = gateway["ports"][0].split(":")
    assert int(published[-1]) == image_listen_port()
    assert document["gateway"]["listen"].rsplit(":", 1)[1] == published[-1]


def compose_mesh() -> dict[str, tuple[dict, dict]]:
    """Each mesh service of compose.yaml: (its app, its sidecar)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name.removesuffix("-sidecar"): (services[name.removesuffix("-sidecar")], svc)
            for name, svc in services.items() if name.endswith("-sidecar")}


def test_the_compose_mesh_is_wired_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    mesh = compose_mesh()
    assert sorted(mesh) == ["orders", "payments"]
    for name, (app, sidecar) in mesh.items():
        # The sidecar joins its app's network namespace; the app owns (and publishes) the ports.
        assert sidecar["network_mode"] == f"service:{name}"
        assert "ports" not in sidecar
        assert sidecar["build"]["target"] == "sidecar" and sidecar["image"] == SIDECAR_IMAGE
        assert app["image"] == IMAGE
        env = sidecar["environment"]
        assert env["FASTMESH_SERVICE"] == name
        assert app["command"][:2] == ["echo", "--listen"]
        assert app["command"][2] == f"127.0.0.1:{env['FASTMESH_APP_PORT']}"
        registry = env["FASTMESH_REGISTRY"].removeprefix("redis://")
        host, port = registry.split("/")[0].split(":")
        assert host in compose["services"] and port == "6379"
        assert sidecar["depends_on"]["redis"]["condition"] == "service_healthy"
        assert sidecar.get("command", ["sidecar"])[0] == "sidecar"
    # What the header's curl commands reach: orders' sidecar, inbound and outbound.
    assert mesh["orders"][0]["ports"] == ["127.0.0.1:15006:15006", "127.0.0.1:15001:15001"]
    assert mesh["orders"][1]["command"] == ["sidecar", "--outbound", "0.0.0.0:15001"]


@pytest.mark.parametrize("name", ["orders", "payments"])
def test_a_compose_sidecar_starts_with_its_settings(name, tmp_path):
    """The environment and command of compose.yaml start a real sidecar that gets ready."""
    app, sidecar = compose_mesh()[name]
    args = [a for a in sidecar.get("command", ["sidecar"]) if a != "--outbound" and ":15001" not in a]
    output = sidecar_gets_ready(sidecar["environment"], args, tmp_path)
    assert f"sidecar for '{name}'" in output


# --- the mesh app in Kubernetes -----------------------------------------------------------------

def test_the_mesh_app_is_wired_into_the_mesh():
    """mesh-init, the sidecar and the app of mesh-app.yaml: what the schemas cannot see."""
    deployment = by_kind("Deployment")["orders"]
    pod = pod_spec(deployment)
    init = init_container(deployment)
    containers = {c["name"]: c for c in pod["containers"]}
    app, sidecar = containers["app"], containers["fastmesh-sidecar"]
    assert init["image"] == sidecar["image"] == SIDECAR_IMAGE and app["image"] == IMAGE

    # mesh-init: root with NET_ADMIN, exempting the sidecar's group (a real dry run of its args).
    assert init["args"][0] == "mesh-init"
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["runAsNonRoot"] is False
    assert "NET_ADMIN" in init["securityContext"]["capabilities"]["add"]
    assert init["args"][init["args"].index("--proxy-gid") + 1] == str(PROXY_GID)
    dry = run_cli(*init["args"], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"--gid-owner {PROXY_GID} -j RETURN" in dry.stdout
    inbound_port = int(dry.stdout.split("REDIRECT --to-ports ")[1].split()[0])

    # The sidecar runs with that group, the app with another one, and nothing adds it to the app.
    def effective(container: dict, field: str):
        return container.get("securityContext", {}).get(field, pod["securityContext"].get(field))

    assert effective(sidecar, "runAsGroup") == PROXY_GID
    assert effective(app, "runAsGroup") != PROXY_GID
    assert effective(app, "runAsUser") != 0
    assert PROXY_GID != pod["securityContext"].get("fsGroup")
    assert PROXY_GID not in pod["securityContext"].get("supplementalGroups", [])
    assert "--intercept" in sidecar["args"]
    assert sidecar["ports"][0]["containerPort"] == inbound_port

    # Its settings: this service (the name callers resolve), the app's port, the Redis here.
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    services = by_kind("Service")
    assert env["FASTMESH_SERVICE"] == "orders" and "orders" in services
    app_port = app["ports"][0]["containerPort"]
    assert env["FASTMESH_APP_PORT"] == str(app_port)
    assert app["args"] == ["echo", "--listen", f"127.0.0.1:{app_port}"]
    host, port = env["FASTMESH_REGISTRY"].removeprefix("redis://").split("/")[0].split(":")
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    assert sidecar["readinessProbe"]["exec"]["command"] == ["fastmesh", "health", "--sidecar"]


def test_the_mesh_app_sidecar_starts_with_its_settings(tmp_path):
    sidecar = next(c for c in pod_spec(by_kind("Deployment")["orders"])["containers"]
                   if c["name"] == "fastmesh-sidecar")
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    # --intercept only changes how connections are taken: without iptables here, leave it out.
    args = [a for a in sidecar["args"] if a != "--intercept"]
    output = sidecar_gets_ready(env, args, tmp_path)
    assert "sidecar for 'orders'" in output


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


def image_config(tag: str) -> dict:
    inspected = vfs("inspect", "--type", "image", tag, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    return json.loads(inspected.stdout)


def run_in_image(tag: str, script: str) -> subprocess.CompletedProcess:
    ctr = vfs("from", "--quiet", tag).stdout.strip()
    assert ctr, "buildah from failed"
    try:
        return vfs("run", "--isolation", "chroot", ctr, "--", "sh", "-c", script, timeout=120)
    finally:
        vfs("rm", ctr, timeout=120)


# The final images hold the runtime only: no compiler, no pip cache, no build venv or wheels, no C
# sources, none of this machine's package index settings, no apt lists; and the data path imports.
RUNTIME_ONLY = (
    "for p in gcc cc cython image-apt; do command -v $p; done; "
    "ls -d /opt/build /wheels /root/.cache/pip /opt/fastmesh/bin/pip* "
    "/opt/fastmesh/lib/python3*/site-packages/fastmesh/_core/*.c /var/lib/apt/lists/*_Packages "
    "/etc/apt/sources.list.d/host.* /tmp/apt-sources /run/secrets/* 2>/dev/null; "
    "/opt/fastmesh/bin/python -c "
    "'import fastmesh._core.proxy, uvloop, redis; print(\"imports ok\")'")

# What the runtime uses of an image, beyond the smoke test (which runs `run` and a request,
# `health`, the sidecar and mesh-init): the commands that load the rest of fastmesh, every fastmesh
# module and the dependencies' lazily imported parts importing (what the local base leaves out:
# iconv modules, CPython's tests, pydoc_data, turtle, must not be among them), the bytecode kept,
# and the system CA bundle that HTTPS upstreams verify against by default, loaded by Python's
# default context.
IMPORT_ALL = (
    "import importlib, pkgutil, ssl, fastmesh; "
    "names = [m.name for m in pkgutil.walk_packages(fastmesh.__path__, \"fastmesh.\") "
    "if m.name != \"fastmesh.__main__\"]; "
    "[importlib.import_module(n) for n in names + [\"dns.asyncresolver\", \"dns.resolver\", "
    "\"jwt\", \"cryptography.x509\", \"cryptography.hazmat.primitives.asymmetric.ec\", "
    "\"redis.asyncio\", \"hiredis\", \"msgpack\", \"yaml\", \"orjson\", \"uvloop\"]]; "
    "print(\"modules\", len(names)); "
    "print(\"ca\", ssl.create_default_context().cert_store_stats()[\"x509_ca\"])")
RUNTIME_USES = (
    "set -e; cd /tmp; fastmesh --version; "
    "printf 'services:\\n  - name: echo\\n    url: http://127.0.0.1:9000\\n"
    "    routes:\\n      - name: echo\\n        paths: [/]\\n' > check.yaml; "
    "fastmesh check --config check.yaml; "
    "fastmesh sidecar --help > help.txt; head -n 1 help.txt; "
    "{ CA_HELP; } ; "
    "ls /opt/fastmesh/lib/python3*/site-packages/fastmesh/__pycache__/cli.*.pyc >/dev/null; "
    "echo bytecode kept; "
    "test -s /etc/ssl/certs/ca-certificates.crt; echo bundle present; "
    f"/opt/fastmesh/bin/python -c '{IMPORT_ALL}'")


def check_runtime_uses(tag: str) -> None:
    # `fastmesh ca` where this tree has it (the mesh CA): then the image must have it too.
    has_ca = run_cli("ca", "--help").returncode == 0
    ca_help = "fastmesh ca --help > ca.txt; head -n 1 ca.txt" if has_ca else "true"
    script = RUNTIME_USES.replace("CA_HELP", ca_help)
    probe = run_in_image(tag, script)
    out = probe.stdout
    assert probe.returncode == 0, out + probe.stderr
    lines = out.splitlines()
    assert lines[0] == f"fastmesh {__version__}", out
    assert "check.yaml: OK (1 service(s), 1 route(s)" in lines[1], out
    assert lines[2].startswith("usage: fastmesh sidecar "), out
    if has_ca:
        assert any(line.startswith("usage: fastmesh ca ") for line in lines), out
    assert "bytecode kept" in lines and "bundle present" in lines, out
    modules = int(measured(out, "modules ", "\n"))
    assert modules >= 50, out               # the whole package, not a stray subset
    assert int(measured(out, "ca ", "\n")) >= 100, out   # Debian's bundle: ~140 roots


@pytest.fixture
def built_images():
    """scripts/build-image (both targets) under test tags; the images are removed afterwards
    (vfs storage keeps a full copy of every image)."""
    which = engine()
    if which is None:
        pytest.skip("neither buildah nor a Docker engine is on this machine: the image builds and "
                    "their smoke tests did not run (apt-get install buildah, then run again)")
    tag = f"localhost/fastmesh-test:{__version__}"
    sidecar_tag = f"localhost/fastmesh-test-sidecar:{__version__}"
    result = subprocess.run([str(ROOT / "scripts" / "build-image"), "--target", "all",
                             "--tag", tag, "--sidecar-tag", sidecar_tag],
                            capture_output=True, text=True, timeout=3600, cwd=ROOT)
    yield which, tag, sidecar_tag, result
    for name in (tag, sidecar_tag):
        if which == "docker":
            subprocess.run(["docker", "rmi", name], capture_output=True, timeout=120)
        else:
            vfs("rmi", name, timeout=120)


def measured(stdout: str, prefix: str, unit: str) -> float:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stdout
    return float(lines[0].removeprefix(prefix).split(unit)[0])


@pytest.mark.slow
def test_the_images_build_and_pass_their_smoke_tests(built_images):
    which, tag, sidecar_tag, result = built_images
    assert result.returncode == 0, result.stdout + result.stderr
    err = result.stderr
    assert f"in {tag}: fastmesh {__version__} (uid 10001, gid 10001)" in err
    assert "healthy: fastmesh" in err
    assert "SIGTERM: drained and exited 0" in err
    assert f"in {sidecar_tag}: fastmesh {__version__} (uid 10001, gid {PROXY_GID})" in err
    assert "sidecar: Host: smoke through the outbound listener -> the inbound one -> the app: 200" in err
    assert "healthy: sidecar on 127.0.0.1:" in err
    assert "mesh-init --dry-run: " in err
    assert "sidecar: SIGTERM: deregistered, drained and exited 0" in err
    size = measured(result.stdout, "size: ", " MB")
    sidecar_size = measured(result.stdout, "sidecar size: ", " MB")
    first_200 = measured(result.stdout, "container start to first proxied 200: ", "s")
    sidecar_first_200 = measured(result.stdout,
                                 "sidecar start to first 200 through its inbound listener: ", "s")
    # Issue 10's goals are <= 150 MB and <= 1 s. On the local base that scripts/build-image makes
    # both images meet the size goal (README: 144.2 MB, sidecar 147.4 MB); the official base was
    # not measured here, so it gets only a bound against a gross regression. The start-time
    # bounds do not fail on a loaded 2-core machine (README: 0.3-0.5 s quiet, about 1 s loaded).
    local_base = "base image: localhost/fastmesh-base:" in result.stdout
    limit = 150 if local_base else 175
    assert size <= limit, f"image is {size} MB (144.2 MB on the local base in the README)"
    assert sidecar_size <= limit, f"sidecar image is {sidecar_size} MB (147.4 MB in the README)"
    assert first_200 <= 5, f"first proxied 200 after {first_200}s"
    assert sidecar_first_200 <= 5, f"sidecar: first 200 after {sidecar_first_200}s"
    if which != "buildah":
        return

    image = image_config(tag)
    docker = image["Docker"]["config"]
    assert docker["Entrypoint"] == ["/usr/local/bin/tini", "-s", "--", "fastmesh"]
    assert docker["Cmd"] == ["run"]
    assert docker["User"] == "10001:10001"
    assert "FASTMESH_LISTEN=0.0.0.0:8000" in docker["Env"]
    assert docker["Healthcheck"]["Test"] == ["CMD", "fastmesh", "health"]
    labels = docker["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"

    sidecar = image_config(sidecar_tag)
    sidecar_docker = sidecar["Docker"]["config"]
    assert sidecar_docker["Entrypoint"] == docker["Entrypoint"]
    assert sidecar_docker["Cmd"] == ["sidecar"]
    assert sidecar_docker["User"] == f"10001:{PROXY_GID}"
    assert sidecar_docker["Healthcheck"]["Test"] == ["CMD", "fastmesh", "health", "--sidecar"]
    assert not any(e.startswith("FASTMESH_LISTEN=") for e in sidecar_docker["Env"])
    assert sidecar_docker["Labels"]["org.opencontainers.image.version"] == __version__
    # Both targets are the runtime stage plus, for the sidecar, one layer (iptables). (Not the
    # same digests: the working tree may change between the two builds, then the build stage
    # runs again; the base layer is always shared.)
    standalone_layers = image["OCIv1"]["rootfs"]["diff_ids"]
    sidecar_layers = sidecar["OCIv1"]["rootfs"]["diff_ids"]
    assert len(sidecar_layers) == len(standalone_layers) + 1
    assert sidecar_layers[0] == standalone_layers[0]
    assert 0 < sidecar_size - size <= 10, (size, sidecar_size)

    # The secrets' contents stay out of both images' history (the sidecar's iptables step names
    # the secret ids, `--mount=type=secret,id=apt-sources`, nothing more).
    host_apt_urls = {url for path in [Path("/etc/apt/sources.list"),
                                      *Path("/etc/apt/sources.list.d").glob("*")] if path.is_file()
                     for url in re.findall(r"https?://[^\s]+", path.read_text())}
    for config_ in (image, sidecar):
        history = json.dumps(config_.get("History") or config_["Docker"].get("history"))
        assert "PIP_CONFIG_FILE" not in history and "/run/secrets/" not in history
        assert "Dir::Etc::SourceParts" not in history
        assert not [url for url in host_apt_urls if url in history]
    probe = run_in_image(tag, RUNTIME_ONLY + "; command -v iptables")   # the sidecar's only
    assert probe.stdout.strip() == "imports ok", probe.stdout + probe.stderr
    probe = run_in_image(sidecar_tag, RUNTIME_ONLY + "; for p in iptables iptables-legacy; do command -v $p; done")
    assert probe.stdout.split() == ["imports", "ok", "/usr/sbin/iptables", "/usr/sbin/iptables-legacy"], \
        probe.stdout + probe.stderr
    check_runtime_uses(tag)
    check_runtime_uses(sidecar_tag)
