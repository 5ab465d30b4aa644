"""The deployment files: every kustomize overlay renders and validates offline, and what
they render is what the design asks for (probes, hardening, the authorisation matrix in
network policies, real configuration keys). Also the compose file and the Dockerfile.

Rendering needs ``kubectl``; without it those tests skip and say so.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cuga.cli.tokens import LOCAL_IDENTITIES
from cuga.services.approval.config import ApprovalConfig
from cuga.services.audit.config import AuditConfig
from cuga.services.coordinator.config import CoordinatorConfig
from cuga.services.planning.config import PlanningConfig
from cuga.services.routing.config import RoutingConfig
from cuga.services.worker.config import WorkerConfig
from cuga.shared.config import DEFAULT_PORTS, GRPC_SERVICE_NAMES, SERVICE_NAMES, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod")
SECTIONS: Mapping[str, type] = {
    "coordinator": CoordinatorConfig,
    "planning": PlanningConfig,
    "routing": RoutingConfig,
    "audit": AuditConfig,
    "approval": ApprovalConfig,
    "worker": WorkerConfig,
}
#: callee -> who may call it (services, and pods labelled cuga.io/role=<role>).
CALLERS: Mapping[str, set[str]] = {
    "coordinator": {"role:client", "console"},
    "planning": {"coordinator"},
    "routing": {"coordinator", "planning", "worker"},
    "approval": {"coordinator", "role:reviewer", "console"},
    "worker": {"coordinator", "planning"},
    "audit": {"coordinator", "role:auditor", "console"},
}

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not on PATH: cannot render the kustomize overlays",
)

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """Each overlay's manifests as ``kubectl kustomize`` renders them."""
    out: dict[str, list[Doc]] = {}
    for overlay in OVERLAYS:
        text = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        out[overlay] = [d for d in yaml.safe_load_all(text) if d]
    return out


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _each(rendered: dict[str, list[Doc]]) -> Iterator[tuple[str, str, list[Doc]]]:
    for overlay, docs in rendered.items():
        for service in SERVICE_NAMES:
            yield overlay, service, docs


@needs_kubectl
def test_deploy_check_renders_and_validates_every_overlay(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for overlay in OVERLAYS:
        assert re.search(rf"^ok +{overlay}: \d+ resources valid", done.stdout, re.M), done.stdout
        assert re.search(rf"^ok +{overlay}: policy checks pass", done.stdout, re.M), done.stdout
        assert (tmp_path / f"{overlay}.yaml").stat().st_size > 0


@needs_kubectl
def test_deploy_check_fails_on_an_invalid_manifest(tmp_path: Path) -> None:
    # The check must be able to fail: a copy of the tree with one broken field.
    copy = tmp_path / "repo"
    shutil.copytree(DEPLOY, copy / "deploy")
    shutil.rmtree(copy / "deploy" / "k8s" / "overlays" / "prod")  # one overlay is enough
    (copy / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "deploy_check.py", copy / "scripts")
    shutil.copy(ROOT / "scripts" / "kube_policy.py", copy / "scripts")
    base = copy / "deploy" / "k8s" / "base" / "routing.yaml"
    base.write_text(base.read_text().replace("containerPort: 50053", "containerPort: high"))
    done = subprocess.run(
        [sys.executable, str(copy / "scripts" / "deploy_check.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL dev" in done.stdout and "containerPort" in done.stdout, done.stdout


@needs_kubectl
def test_every_service_has_account_config_service_and_hardened_deployment(
    rendered: dict[str, list[Doc]],
) -> None:
    for overlay, name, docs in _each(rendered):
        where = f"{overlay}/{name}"
        port = DEFAULT_PORTS[name]
        _find(docs, "ServiceAccount", f"cuga-{name}")
        _find(docs, "ConfigMap", f"cuga-{name}")
        service = _find(docs, "Service", name)
        assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", port)]
        # Headless, so a client's dns:/// target resolves to every ready pod (issue 25).
        assert service["spec"]["clusterIP"] == "None", where
        deployment = _find(docs, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == f"cuga-{name}", where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        (container,) = pod["containers"]
        assert container["args"] == [name], where
        assert container["ports"][0] == {"name": "grpc", "containerPort": port}, where
        # With mutual TLS (prod), kubelet's plain-text gRPC probes read the health-only port.
        health = _env_of(docs, name).get("CUGA_HEALTH_PORT")
        probed = int(health) if health else port
        if health:
            assert container["ports"][1:] == [{"name": "health", "containerPort": probed}]
        else:
            assert container["ports"] == [{"name": "grpc", "containerPort": port}], where
        assert container["readinessProbe"]["grpc"] == {
            "port": probed,
            "service": GRPC_SERVICE_NAMES[name],
        }, where
        assert container["livenessProbe"]["grpc"]["port"] == probed, where
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, where
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/var/lib/cuga", "/tmp"} <= mounts, where
        # Auth is on by default: each pod reads the trust file and its own signing key,
        # read-only, and no other service's key: the Secrets `cuga tokens init` prepares.
        auth = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/cuga/auth")
        assert auth["readOnly"] is True, where
        volume = next(v for v in pod["volumes"] if v["name"] == auth["name"])
        sources = [s["secret"]["name"] for s in volume["projected"]["sources"]]
        assert sources == ["cuga-trust", f"cuga-key-{name}"], where
        env = _env_of(docs, name)
        assert env["CUGA_AUTH__TOKENS_FILE"] == "/etc/cuga/auth/tokens.yaml", where
        assert env["CUGA_AUTH__IDENTITY"] == name, where
        assert env["CUGA_AUTH__SIGNING_KEY_FILE"] == f"/etc/cuga/auth/{name}.key", where
        assert name in LOCAL_IDENTITIES, where


def _env_of(docs: list[Doc], name: str) -> dict[str, str]:
    """The environment a service's container starts with (secrets as placeholders)."""
    deployment = _find(docs, "Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    fields = {"metadata.name": f"{name}-5d8f7c9b4-x2x7q", "status.podIP": "10.1.2.3"}
    for var in container.get("env", []):
        if "value" in var:
            # $(VAR) refers to an earlier variable of the same list, as Kubernetes expands it.
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = "postgresql://cuga:secret@postgres:5432/cuga"
    return env


def _assert_real_config(env: Mapping[str, str], name: str, where: str) -> None:
    cuga = {k: v for k, v in env.items() if k.startswith("CUGA_")}
    for key in cuga:
        # Unknown top-level names are ignored by the loader, so a typo would pass silently.
        first = key[len("CUGA_") :].split("__")[0].lower()
        assert first in SECTIONS or first in {
            "data_dir",
            "host",
            "grace_period_s",
            "max_connection_age_s",
            "health_port",
            "tls",
            "addresses",
            "calls",
            "limits",
            "log_format",
            "log_level",
            "auth",
        }, f"{where}: {key} is not a configuration key"
    settings = load_settings(env=cuga)  # raises ConfigError naming any bad key
    settings.section(SECTIONS[name], name)
    assert str(settings.common.data_dir) == "/var/lib/cuga", where
    assert settings.common.host == "0.0.0.0", where
    assert settings.common.addresses.of(name).endswith(f":{DEFAULT_PORTS[name]}"), where


@needs_kubectl
def test_configuration_keys_are_real_and_addresses_resolve(
    rendered: dict[str, list[Doc]],
) -> None:
    for overlay, name, docs in _each(rendered):
        env = _env_of(docs, name)
        _assert_real_config(env, name, f"{overlay}/{name}")
        services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
        for key, value in env.items():
            if key.startswith("CUGA_ADDRESSES__"):
                # Every client balances over every ready pod: dns:/// on a headless Service.
                assert value.startswith("dns:///"), f"{overlay}/{name}: {key}={value}"
                host, _, port = value.removeprefix("dns:///").rpartition(":")
                assert host in services, f"{overlay}/{name}: {key}={value} names no Service"
                assert int(port) == DEFAULT_PORTS[host]
        if overlay == "dev" or name not in ("coordinator", "planning", "audit", "approval"):
            assert "postgres" not in env.values(), f"{overlay}/{name} uses PostgreSQL"
    prod = rendered["prod"]
    assert _env_of(prod, "audit")["CUGA_AUDIT__BACKEND"] == "postgres"
    assert _env_of(prod, "coordinator")["CUGA_COORDINATOR__RUN_STORE"] == "postgres"
    assert _env_of(prod, "planning")["CUGA_PLANNING__STORE"] == "postgres"
    assert _env_of(prod, "approval")["CUGA_APPROVAL__STORE"] == "postgres"
    for name in ("audit", "coordinator", "planning", "approval"):
        key = f"CUGA_{name.upper()}__DSN"
        (container,) = _find(prod, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        (dsn,) = [v for v in container["env"] if v["name"] == key]
        assert dsn["valueFrom"]["secretKeyRef"] == {"name": "cuga-postgres", "key": "dsn"}
    assert all(
        "OTEL_EXPORTER_OTLP_ENDPOINT" in _env_of(docs, name) for _, name, docs in _each(rendered)
    )


def _peers(rule_peers: list[Doc]) -> set[str]:
    out = set()
    for peer in rule_peers:
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if "cuga.io/role" in labels:
            out.add(f"role:{labels['cuga.io/role']}")
        elif labels.get("app.kubernetes.io/name") == "cuga":
            out.add(labels["app.kubernetes.io/component"])
        else:
            out.add(labels.get("app.kubernetes.io/name", "?"))
    return out


@needs_kubectl
def test_network_policies_allow_exactly_the_authorisation_matrix(
    rendered: dict[str, list[Doc]],
) -> None:
    for docs in rendered.values():
        policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
        deny = policies["deny-all"]
        assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
        assert "ingress" not in deny and "egress" not in deny
        calls: dict[str, set[str]] = {}
        for name in SERVICE_NAMES:
            policy = policies[name]
            assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
            callers = set().union(*(_peers(rule["from"]) for rule in policy["ingress"]))
            assert callers == CALLERS[name], name
            for rule in policy["ingress"]:
                assert rule["ports"] == [{"protocol": "TCP", "port": DEFAULT_PORTS[name]}]
            calls[name] = set().union(*(_peers(r.get("to", [])) for r in policy["egress"]))
        # Egress mirrors ingress: a service may call exactly the services that admit it.
        for caller in SERVICE_NAMES:
            allowed = {callee for callee, who in CALLERS.items() if caller in who}
            assert calls[caller] & set(SERVICE_NAMES) == allowed, caller


@needs_kubectl
def test_the_console_is_deployed_like_a_service_and_holds_no_credential(
    rendered: dict[str, list[Doc]],
) -> None:
    for overlay, docs in rendered.items():
        _find(docs, "ServiceAccount", "cuga-console")
        service = _find(docs, "Service", "console")
        assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8080)]
        pod = _find(docs, "Deployment", "console")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, overlay
        (container,) = pod["containers"]
        assert container["command"] == ["cuga", "console"], overlay
        assert "--secure-cookies" in container["args"], overlay
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz", overlay
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, overlay
        assert security["capabilities"]["drop"] == ["ALL"], overlay
        # The console calls as its users: no Secret, no key, no trust file in its pod.
        assert not [v for v in pod["volumes"] if "secret" in v or "projected" in v], overlay
        env = _env_of(docs, "console")
        assert not [k for k in env if k.startswith("CUGA_AUTH__")], overlay
        settings = load_settings(env={k: v for k, v in env.items() if k.startswith("CUGA_")})
        services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
        for name in ("coordinator", "approval", "audit"):
            host, _, port = (
                settings.common.addresses.of(name).removeprefix("dns:///").rpartition(":")
            )
            assert host in services and int(port) == DEFAULT_PORTS[name], (overlay, name)
        policy = _find(docs, "NetworkPolicy", "console")["spec"]
        called = set().union(*(_peers(r["to"]) for r in policy["egress"]))
        assert called == {"coordinator", "approval", "audit"}, overlay
        assert [r["ports"] for r in policy["ingress"]] == [[{"protocol": "TCP", "port": 8080}]]


@needs_kubectl
def test_dev_is_one_replica_of_everything(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["dev"]
    for name in SERVICE_NAMES:
        assert _find(docs, "Deployment", name)["spec"]["replicas"] == 1
    assert not [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "StatefulSet")]
    assert _env_of(docs, "audit")["CUGA_AUDIT__BACKEND"] == "sqlite"


@needs_kubectl
def test_prod_replicates_stateless_services_with_budgets_and_worker_autoscaling(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prod"]
    scaled = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    }
    for name in ("coordinator", "planning", "audit", "approval", "worker"):
        spec = _find(docs, "Deployment", name)["spec"]
        if name in scaled:
            # The HPA owns the count: a spec.replicas would reset it on every apply.
            assert "replicas" not in spec, name
        else:
            assert spec["replicas"] >= 2, name
        pdb = _find(docs, "PodDisruptionBudget", name)["spec"]
        assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == name
        assert pdb["minAvailable"] == 1
    for name in ("routing",):
        # SQLite state: one replica on a claim, never two pods on the file at once.
        deployment = _find(docs, "Deployment", name)["spec"]
        assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
        (data,) = [v for v in deployment["template"]["spec"]["volumes"] if v["name"] == "data"]
        _find(docs, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
    hpa = _find(docs, "HorizontalPodAutoscaler", "worker")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "worker",
    }
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert scaled == {"worker"}
    _find(docs, "StatefulSet", "postgres")
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created out of band"


def test_compose_runs_the_six_services_hardened_with_real_configuration() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {
        *SERVICE_NAMES,
        "postgres",
        "otel-collector",
        "jaeger",
        "auth-init",
    }
    for name in SERVICE_NAMES:
        service = services[name]
        assert service["command"] == [name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["user"] == "10001:10001" and service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        env = {k: str(v) for k, v in service["environment"].items()}
        _assert_real_config(env, name, f"compose/{name}")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert services["audit"]["environment"]["CUGA_AUDIT__BACKEND"] == "postgres"
    assert services["planning"]["environment"]["CUGA_PLANNING__STORE"] == "postgres"
    assert services["coordinator"]["ports"] == ["50051:50051"]
    gitignored = (DEPLOY.parent / ".gitignore").read_text().splitlines()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./cuga-auth/"):  # made by `cuga tokens init`, never committed
                # Only the one-shot that hands the files to uid 10001 reads them directly.
                assert name == "auth-init", name
                assert volume == "./cuga-auth/tokens:/in:ro", volume
                assert "deploy/cuga-auth/" in gitignored
            elif source.startswith("."):  # a bind mount must name a file of the repository
                assert (DEPLOY / source).is_file(), f"{name}: {source}"
    # `cuga tokens init` writes owner-only files owned by the operator, which uid 10001
    # cannot read through a bind mount: auth-init copies each service's trust file and own
    # key into that service's volume as 10001:10001 0400, and each service mounts its own
    # volume alone, read-only, after auth-init has finished.
    init = services["auth-init"]
    script = init["command"][0]
    assert init["user"] == "0:0" and init["network_mode"] == "none"
    assert init["cap_drop"] == ["ALL"] and set(init["cap_add"]) <= {
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
    }
    assert "install -o 10001 -g 10001 -m 0400 /in/tokens.yaml /in/$$s.key /out/$$s/" in script
    for name in SERVICE_NAMES:
        assert name in script.split("for s in ")[1].split(";")[0], name
        assert f"auth-{name}:/out/{name}" in init["volumes"]
        service = services[name]
        auth = [v for v in service["volumes"] if ":/etc/cuga/auth" in v]
        assert auth == [f"auth-{name}:/etc/cuga/auth:ro"], name
        assert service["depends_on"]["auth-init"] == {"condition": "service_completed_successfully"}
        assert service["environment"]["CUGA_AUTH__SIGNING_KEY_FILE"] == (
            f"/etc/cuga/auth/{name}.key"
        )
        assert service["environment"]["CUGA_AUTH__TOKENS_FILE"] == "/etc/cuga/auth/tokens.yaml"


def _dockerfile_lines() -> list[str]:
    """Instructions of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        " ".join(line.split())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _froms(lines: list[str]) -> list[str]:
    """The base images, ARG defaults substituted."""
    args = dict(
        line.split(maxsplit=1)[1].split("=", 1)
        for line in lines
        if line.startswith("ARG ") and "=" in line
    )
    return [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
        for line in lines
        if line.startswith("FROM ")
    ]


def test_dockerfile_pins_its_base_image_by_digest() -> None:
    froms = _froms(_dockerfile_lines())
    assert len(froms) == 2
    for image in froms:
        assert re.fullmatch(r"python:3\.\d+-slim@sha256:[0-9a-f]{64}", image), image


def test_dockerfile_installs_dependencies_before_it_copies_the_code() -> None:
    # A code change must not reinstall the dependencies: the layer that installs them
    # comes from pyproject.toml and constraints.txt alone, before any source is copied.
    lines = _dockerfile_lines()
    first, second = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    build = lines[first:second]
    copies = [i for i, line in enumerate(build) if line.startswith("COPY ")]
    deps = next(i for i, line in enumerate(build) if "-r requirements.txt" in line)
    assert build[copies[0]] == "COPY pyproject.toml constraints.txt ./"
    assert [i for i in copies if i < deps] == [copies[0]]
    code = next(i for i, line in enumerate(build) if line.startswith("COPY services"))
    assert deps < code
    (install,) = [line for line in build[code:] if "pip install" in line and " . " in line]
    assert "--no-deps" in install


def test_dockerignore_keeps_credentials_data_and_tooling_out_of_the_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", "**/.git", "deploy/cuga-auth", ".cuga", "tests", "**/*.key"):
        assert needed in patterns, needed
    # Nothing the Dockerfile copies is ignored.
    copied = {"pyproject.toml", "constraints.txt", "README.md", "protos", "services"}
    copied |= {"clients/python", "examples/tools"}
    assert not copied & set(patterns)
    assert not any(p.startswith("!") for p in patterns)


def test_dockerfile_runs_cuga_serve_as_a_non_root_user() -> None:
    lines = _dockerfile_lines()
    froms = _froms(lines)
    assert froms and all(f.startswith("python:") and "-slim" in f for f in froms)
    assert 'ENTRYPOINT ["cuga", "serve"]' in lines
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user.split(":")[0] not in ("0", "root")
    exposed = next(line for line in lines if line.startswith("EXPOSE ")).split()[1:]
    assert sorted(map(int, exposed)) == sorted(DEFAULT_PORTS.values())
    assert lines.index(f"USER {user}") > max(
        i for i, line in enumerate(lines) if line.startswith(("RUN ", "COPY "))
    )


@needs_kubectl
def test_kubernetes_and_compose_run_one_collector_pipeline_with_metrics_to_prometheus(
    rendered: dict[str, list[Doc]],
) -> None:
    # Kubernetes used to send metrics and logs to `debug` while compose sent metrics to
    # Prometheus: now both load the very same file (issue 25).
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    (mount,) = compose["services"]["otel-collector"]["volumes"]
    source = (DEPLOY / mount.split(":")[0]).read_text()
    config = yaml.safe_load(source)
    metrics = config["service"]["pipelines"]["metrics"]
    assert metrics["exporters"] == ["prometheus"]
    port = int(config["exporters"]["prometheus"]["endpoint"].rpartition(":")[2])
    for overlay, docs in rendered.items():
        (configmap,) = [
            d
            for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("otel-collector")
        ]
        assert configmap["data"]["config.yaml"] == source, overlay
        pod = _find(docs, "Deployment", "otel-collector")["spec"]["template"]
        names = [v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v]
        assert names == [configmap["metadata"]["name"]], overlay
        (container,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": port} in container["ports"], overlay
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        service = _find(docs, "Service", "otel-collector")["spec"]
        assert {"name": "metrics", "port": port, "targetPort": "metrics"} in service["ports"]
        policy = _find(docs, "NetworkPolicy", "otel-collector")["spec"]
        scrape = [r for r in policy["ingress"] if {"protocol": "TCP", "port": port} in r["ports"]]
        assert scrape and _peers(scrape[0]["from"]) == {"prometheus"}, overlay


def _policy() -> Any:
    """scripts/kube_policy.py, the policy checks make deploy-check runs."""
    spec = importlib.util.spec_from_file_location(
        "kube_policy", ROOT / "scripts" / "kube_policy.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _container(docs: list[Doc], name: str) -> Doc:
    (container,) = _find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return container


def _break_readonly(docs: list[Doc]) -> None:
    _container(docs, "planning")["securityContext"]["readOnlyRootFilesystem"] = False


def _break_hpa(docs: list[Doc]) -> None:
    _find(docs, "Deployment", "worker")["spec"]["replicas"] = 2


def _break_tag(docs: list[Doc]) -> None:
    _container(docs, "audit")["image"] = "ghcr.io/cuga/cuga-orchestrator:latest"


def _break_secret(docs: list[Doc]) -> None:
    _container(docs, "audit")["env"].append({"name": "CUGA_AUDIT__DSN", "value": "postgresql://x"})


def _break_service(docs: list[Doc]) -> None:
    _find(docs, "Service", "routing")["spec"]["selector"]["app.kubernetes.io/component"] = "rout"


def _break_pdb(docs: list[Doc]) -> None:
    _find(docs, "PodDisruptionBudget", "planning")["spec"]["minAvailable"] = 2


def _break_issuer(docs: list[Doc]) -> None:
    _find(docs, "Certificate", "cuga-tls-audit")["spec"]["issuerRef"]["name"] = "letsencrypt"


def _break_certificate(docs: list[Doc]) -> None:
    docs.remove(_find(docs, "Certificate", "cuga-tls-worker"))


def _break_probe(docs: list[Doc]) -> None:
    _container(docs, "approval")["readinessProbe"]["grpc"]["port"] = 9999


def _break_account(docs: list[Doc]) -> None:
    docs.remove(_find(docs, "ServiceAccount", "cuga-routing"))


@needs_kubectl
@pytest.mark.parametrize(
    ("breaks", "finding"),
    [
        (_break_readonly, "Deployment/planning container planning: no-read-only-root-fs"),
        (_break_hpa, "Deployment/worker: hpa-replicas (cuga)"),
        (_break_tag, "Deployment/audit container audit: latest-tag"),
        (_break_secret, "Deployment/audit container audit: env-var-secret"),
        (_break_service, "Service/routing: dangling-service"),
        (_break_pdb, "PodDisruptionBudget/planning: pdb-min-available"),
        (_break_issuer, "Certificate/cuga-tls-audit: certificate (cuga)"),
        (_break_certificate, "Deployment/worker: certificate (cuga): Secret cuga-tls-worker"),
        (_break_probe, "Deployment/approval container approval: probe-port (cuga)"),
        (_break_account, "Deployment/routing: non-existent-service-account"),
    ],
)
def test_policy_checks_find_what_a_kubernetes_linter_finds(
    rendered: dict[str, list[Doc]], breaks: Any, finding: str
) -> None:
    policy = _policy()
    assert policy.check(rendered["prod"]) == []
    docs = copy.deepcopy(rendered["prod"])
    breaks(docs)
    found = policy.check(docs)
    assert [line for line in found if line.startswith(finding)], found


@needs_kubectl
def test_prod_turns_mutual_tls_on_with_one_cert_manager_certificate_per_service(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prod"]
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    assert issuers["cuga-ca"] == {"ca": {"secretName": "cuga-ca"}}
    assert _find(docs, "Certificate", "cuga-ca")["spec"]["isCA"] is True
    for name in SERVICE_NAMES:
        cert = _find(docs, "Certificate", f"cuga-tls-{name}")["spec"]
        assert cert["issuerRef"]["name"] == "cuga-ca"
        # Clients dial dns:///<svc>:<port>: the certificate must name the Service.
        assert cert["dnsNames"] == [name] and cert["commonName"] == name
        assert {"server auth", "client auth"} <= set(cert["usages"])
        pod = _find(docs, "Deployment", name)["spec"]["template"]["spec"]
        (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        # Its own certificate only: no pod mounts another's key or the CA's.
        assert tls["secret"]["secretName"] == cert["secretName"] == f"cuga-tls-{name}"
        (mount,) = [m for m in _container(docs, name)["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        env = _env_of(docs, name)
        for key, file in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt")):
            assert env[f"CUGA_TLS__{key}_FILE"] == f"{mount['mountPath']}/{file}", name
        assert env["CUGA_CALLS__WORKER__SERVER_NAME"] == "worker"
        settings = load_settings(env={k: v for k, v in env.items() if k.startswith("CUGA_")})
        assert settings.common.tls.enabled and settings.common.health_port == 8086
    assert not [
        v
        for d in docs
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"].get("volumes", [])
        if v.get("secret", {}).get("secretName") == "cuga-ca"
    ]
    for name in SERVICE_NAMES:  # dev stays plain text
        assert "CUGA_TLS__CERT_FILE" not in _env_of(rendered["dev"], name)
