"""The deployment files parse and agree with each other and with the code.

deploy/ holds a Dockerfile, a compose file (mirror + Prometheus + Grafana), Kubernetes
manifests and a systemd unit. Nothing here starts a container: these tests read the files
(YAML with PyYAML, the ConfigMap's config.toml with the mirror's own loader, the commands
with the mirror's own argument parser) and check that every path, port, probe, label, mount
and key they name exists where it should, so a rename on one side fails here first.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mirror.cli import _parser
from mirror.config import Config, load_config

PROJECT = Path(__file__).resolve().parent.parent
DEPLOY = PROJECT / "deploy"
DASHBOARD = PROJECT / "grafana" / "mirror-dashboard.json"
#: The health endpoints every orchestrator probes: the process is up / ready for traffic.
LIVENESS, READINESS = "/healthz", "/readyz"
PROBE_PATHS = {LIVENESS, READINESS}


# -- Dockerfile --------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [
        ln
        for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
        if not ln.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def arg_default(name: str) -> str:
    return next(
        rest.split("=", 1)[1]
        for word, rest in final_stage()
        if word == "ARG" and rest.startswith(name + "=")
    )


def expand(value: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: arg_default(m.group(1)), value)


def one(word: str) -> str:
    found = [rest for w, rest in final_stage() if w == word]
    assert len(found) == 1, (word, found)
    return found[0]


def serve_args(argv: list[str]) -> Any:
    """Parse `mirror …` arguments with the CLI's own parser (a typo'd flag fails here)."""
    assert argv[0] == "serve", argv
    return _parser().parse_args(argv)


def url_in(command: str) -> str:
    found = re.findall(r"https?://[^'\" ]+", command)
    assert len(found) == 1, command
    return found[0]


def base_images() -> list[str]:
    """The image of every FROM, with the defaults of the ARGs declared before the first FROM
    (the only ones a FROM line can use) put in."""
    steps = dockerfile()
    first = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    defaults = dict(
        rest.split("=", 1) for word, rest in steps[:first] if word == "ARG" and "=" in rest
    )
    return [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], rest.split()[0])
        for word, rest in steps
        if word == "FROM"
    ]


def test_dockerfile_is_slim_non_root_with_healthcheck_and_volume() -> None:
    """python:3.11-slim in every stage (the default of the BASE build argument); the final
    stage runs as a non-root uid, keeps the cache in a VOLUME that is the `--data-dir` of its
    command, listens on the EXPOSEd port, and its HEALTHCHECK asks the liveness path on that
    port."""
    assert base_images() == ["python:3.11-slim"] * 2
    user = expand(one("USER")).split(":")[0]
    assert user.isdigit() and int(user) >= 1000
    volume = json.loads(one("VOLUME"))
    assert json.loads(one("ENTRYPOINT")) == ["mirror"]
    args = serve_args(json.loads(one("CMD")))
    assert volume == [args.data_dir] == ["/var/lib/mirror"]
    port = load_config(env={}, flags={"listen": args.listen}).host_port[1]
    assert one("EXPOSE") == str(port)
    health = urlsplit(url_in(one("HEALTHCHECK")))
    assert (health.hostname, health.port, health.path) == ("127.0.0.1", port, LIVENESS)


def test_dockerfile_copies_only_what_exists_and_the_context_lets_through() -> None:
    """Every COPY source (build context = repository root) exists and is re-included by the
    root `.dockerignore`, which otherwise excludes everything."""
    ignore = [
        ln.strip()
        for ln in (PROJECT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ignore[0] == "*"
    sources = [
        src
        for word, rest in dockerfile()
        if word == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (PROJECT / src).exists(), src
        assert f"!{src.rstrip('/')}" in {i.rstrip("/") for i in ignore}, src


# -- compose, Prometheus, Grafana ----------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def compose() -> dict[str, Any]:
    doc = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def binds(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """(host path resolved from deploy/, container path) of each bind mount."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            yield (DEPLOY / source).resolve(), target


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port → host port."""
    return {int(p.split(":")[1]): int(p.split(":")[0]) for p in service.get("ports", [])}


def test_compose_mirror_service_matches_the_image() -> None:
    services = compose()["services"]
    assert set(services) == {"mirror", "prometheus", "grafana"}
    mirror = services["mirror"]
    build = mirror["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert any(
        v.split(":")[1] == "/var/lib/mirror" and not v.startswith(".") for v in mirror["volumes"]
    )
    assert published(mirror) == {5000: 5000}
    health = urlsplit(url_in(" ".join(mirror["healthcheck"]["test"])))
    assert (health.port, health.path) == (5000, LIVENESS)
    named = {
        v.split(":")[0]
        for s in services.values()
        for v in s.get("volumes", [])
        if not v.startswith(".")
    }
    assert named == set(compose()["volumes"])


def test_compose_bind_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for source, _ in binds(service):
            assert source.exists(), (name, source)


def test_prometheus_scrapes_the_mirror_metrics_path() -> None:
    """The scrape target is the compose service and port, and the path the mirror serves
    metrics on by default."""
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_file = next(
        src for src, dst in binds(prometheus) if dst == "/etc/prometheus/prometheus.yml"
    )
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    jobs = load_yaml(config_file)["scrape_configs"]
    assert len(jobs) == 1
    assert jobs[0]["metrics_path"] == Config().metrics_path
    assert jobs[0]["static_configs"] == [
        {"targets": [f"mirror:{next(iter(published(services['mirror'])))}"]}
    ]


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    """The provisioning directory is mounted where Grafana reads it, the data source points
    at the compose Prometheus, the dashboard provider's folder is where the repository's
    dashboard is mounted, and every data source the dashboard names is a variable of the
    provisioned type (`__inputs` placeholders alone are not resolved for provisioned files)."""
    services = compose()["services"]
    grafana = {dst: src for src, dst in binds(services["grafana"])}
    provisioning = grafana["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    sources = [
        d
        for f in (provisioning / "datasources").glob("*.yaml")
        for d in load_yaml(f)["datasources"]
    ]
    assert len(sources) == 1 and sources[0]["isDefault"] is True
    prometheus_port = next(iter(published(services["prometheus"])))
    assert sources[0]["url"] == f"http://prometheus:{prometheus_port}"
    providers = [
        p for f in (provisioning / "dashboards").glob("*.yaml") for p in load_yaml(f)["providers"]
    ]
    assert len(providers) == 1
    folder = providers[0]["options"]["path"]
    mounted = {dst: src for dst, src in grafana.items() if dst.startswith(folder + "/")}
    assert list(mounted.values()) == [DASHBOARD]
    assert (
        services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in mounted
    )

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    for uid in uids:
        name = re.fullmatch(r"\$\{(\w+)\}", uid)
        assert name is not None, uid
        assert variables[name.group(1)]["query"] == sources[0]["type"]


# -- Kubernetes ----------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    docs = []
    for resource in kustomization["resources"]:
        path = DEPLOY / "k8s" / resource
        assert path.is_file(), resource
        with path.open() as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_statefulset_config_and_storage_agree(tmp_path: Path) -> None:
    """The ConfigMap's config.toml loads with the mirror's own loader; the container's
    `--config` is that file at its mount; `data_dir` is the PVC's mount (from
    volumeClaimTemplates); the listen port is the container port; the pod runs as the
    image's non-root uid; no service-link variables are injected."""
    (sts,) = of_kind("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    args = serve_args(container["args"])
    config_volume = next(v for v in pod["volumes"] if v.get("configMap"))
    (configmap,) = [
        c
        for c in of_kind("ConfigMap")
        if c["metadata"]["name"] == config_volume["configMap"]["name"]
    ]
    assert args.config == f"{mounts[config_volume['name']]}/config.toml"
    config_file = Path(args.config).name
    (tmp_path / config_file).write_text(configmap["data"][config_file])
    config = load_config(tmp_path / config_file, env={})
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert config.data_dir == mounts[claim["metadata"]["name"]]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert [p["containerPort"] for p in container["ports"]] == [config.host_port[1]]
    assert {u.name for u in config.upstreams} >= {
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == expand(one("USER")).split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_kubernetes_probes_and_resources() -> None:
    """Liveness and startup ask /healthz, readiness /readyz, on a named container port;
    requests and limits are set for CPU and memory."""
    (sts,) = of_kind("StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    expected = {"livenessProbe": LIVENESS, "startupProbe": LIVENESS, "readinessProbe": READINESS}
    for probe, path in expected.items():
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] in ports
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}


def test_kubernetes_services_and_servicemonitor_select_the_pods() -> None:
    """Both Services select the pods and target a port the container names; the StatefulSet's
    serviceName is the headless one; the ServiceMonitor selects exactly one Service and
    scrapes the mirror's metrics path on a port that Service names."""
    (sts,) = of_kind("StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert matches(sts["spec"]["selector"]["matchLabels"], pod_labels)
    container_ports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = of_kind("Service")
    for service in services:
        assert matches(service["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    (headless,) = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    (monitor,) = of_kind("ServiceMonitor")
    selected = [
        s
        for s in services
        if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(selected) == 1
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == Config().metrics_path


# -- systemd -------------------------------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    """`Key` → every value it is given in deploy/mirror.service (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "mirror.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize(
    "key",
    [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "DynamicUser",
    ],
)
def test_systemd_unit_hardening_option(key: str) -> None:
    assert unit()[key] == ["yes"]


def test_systemd_unit_sandbox_and_command() -> None:
    """A strict read-only system with the state directory as the only writable place, no
    capabilities, a syscall allow-list; the environment it sets is configuration the mirror
    accepts, and its data directory is the state directory."""
    u = unit()
    assert u["ProtectSystem"] == ["strict"]
    assert u["CapabilityBoundingSet"] == [""]
    assert u["SystemCallFilter"][0] == "@system-service"
    env = dict(e.split("=", 1) for e in u["Environment"])
    config = load_config(env=env)
    assert config.data_dir == f"/var/lib/{u['StateDirectory'][0]}" == u["WorkingDirectory"][0]
    argv = shlex.split(u["ExecStart"][0])
    assert Path(argv[0]).name == "mirror"
    serve_args(argv[1:])
