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


# -- cluster mode: the Kubernetes overlay ------------------------------------------------------

CLUSTER_K8S = DEPLOY / "k8s" / "cluster"
#: Stand-ins for what the pod is given at run time (its IP, the Secrets' values).
POD_IP = "10.42.0.17"
SECRET_VALUES = {
    ("mirror-cold", "access-key-id"): "AKIAEXAMPLE",
    ("mirror-cold", "secret-access-key"): "example-secret-access-key",
}


def merge_patch(base: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies the ones of the overlay: maps merge key by
    key, lists of maps merge item by item on their merge key (`name`, or `mountPath` for
    volume mounts), anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge_patch(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) for i in base + patch)
    ):
        merge_key = "mountPath" if any("mountPath" in i for i in base + patch) else "name"
        out_list = list(base)
        for item in patch:
            at = [i for i, old in enumerate(out_list) if old.get(merge_key) == item[merge_key]]
            if at:
                out_list[at[0]] = merge_patch(out_list[at[0]], item)
            else:
                out_list.append(item)
        return out_list
    return patch


def overlay() -> list[dict[str, Any]]:
    """The overlay rendered: the base's resources, the overlay's own, then its patches, each
    of which must name a resource (kind and name) that exists."""
    kustomization = load_yaml(CLUSTER_K8S / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (CLUSTER_K8S / resource).resolve()
        if path.is_dir():
            assert path == DEPLOY / "k8s", resource
            docs += manifests()
        else:
            with path.open() as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    for entry in kustomization["patches"]:
        patch = load_yaml(CLUSTER_K8S / entry["path"])
        ident = (patch["kind"], patch["metadata"]["name"])
        at = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == ident]
        assert len(at) == 1, (entry, ident)
        docs[at[0]] = merge_patch(docs[at[0]], patch)
    return docs


def overlay_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in overlay() if d["kind"] == kind]


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets: downward-API fields, Secret keys, and `$(VAR)`
    expanded as Kubernetes does it, only from variables defined before it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", var
            value = POD_IP
        else:
            ref = source["secretKeyRef"]
            value = SECRET_VALUES[ref["name"], ref["key"]]
        env[var["name"]] = value
    return env


def cluster_pod() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(StatefulSet, its pod spec, the mirror container) of the overlay."""
    (sts,) = overlay_kind("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return sts, pod, container


def cluster_config(tmp_path: Path) -> tuple[Config, dict[str, str]]:
    """The overlay ConfigMap's config.toml loaded by the mirror's loader with the pod's
    environment, every mounted Secret put at a stand-in of its mount path; and those paths."""
    _, pod, container = cluster_pod()
    args = serve_args(container["args"])
    (configmap,) = [
        c for c in overlay_kind("ConfigMap") if c["metadata"]["name"] == "mirror-config"
    ]
    text = configmap["data"][Path(args.config).name]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_files = {}
    for volume in pod["volumes"]:
        if "secret" not in volume:
            continue
        where = tmp_path / volume["name"]
        where.mkdir()
        for item in volume["secret"]["items"]:
            (where / item["path"]).write_text("s" * 64 + "\n")
            secret_files[f"{mounts[volume['name']]}/{item['path']}"] = (
                f"{volume['secret']['secretName']}/{item['key']}"
            )
        text = text.replace(mounts[volume["name"]] + "/", f"{where}/")
    (tmp_path / "config.toml").write_text(text)
    return load_config(tmp_path / "config.toml", env=pod_env(container)), secret_files


def test_cluster_overlay_runs_three_replicas_of_the_base() -> None:
    """The overlay is the base plus Redis: the same StatefulSet (its PVC per replica, probes,
    non-root container, no service links) with 3 replicas."""
    assert load_yaml(CLUSTER_K8S / "kustomization.yaml")["resources"][0] == "../"
    sts, pod, container = cluster_pod()
    assert sts["spec"]["replicas"] == 3
    assert pod["enableServiceLinks"] is False
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container["volumeMounts"]
    }
    assert container["readinessProbe"]["httpGet"]["path"] == READINESS
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    spread = pod["topologySpreadConstraints"][0]
    assert matches(
        spread["labelSelector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]
    )


def test_cluster_overlay_redis_is_what_redis_url_names(tmp_path: Path) -> None:
    """The Redis Service is redis_url's host and port, selects the Redis pods (the official
    redis:7 image, persistence off) and not the mirror's; the mirror's Services do not select
    Redis; the NetworkPolicy lets only the mirror's pods reach it."""
    config, _ = cluster_config(tmp_path)
    url = urlsplit(config.cluster.redis_url)
    services = {s["metadata"]["name"]: s for s in overlay_kind("Service")}
    redis_service = services[url.hostname]
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [url.port]
    (redis,) = overlay_kind("Deployment")
    redis_pod = redis["spec"]["template"]
    (server,) = redis_pod["spec"]["containers"]
    assert server["image"] == "redis:7"
    assert redis_pod["spec"]["enableServiceLinks"] is False
    args = server["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert "persistentVolumeClaim" not in str(redis_pod["spec"]["volumes"])
    assert {p["name"] for p in server["ports"]} >= {redis_service["spec"]["ports"][0]["targetPort"]}
    assert matches(redis_service["spec"]["selector"], redis_pod["metadata"]["labels"])
    mirror_labels = cluster_pod()[0]["spec"]["template"]["metadata"]["labels"]
    for name, service in services.items():
        if name != url.hostname:
            assert not matches(service["spec"]["selector"], redis_pod["metadata"]["labels"]), name
            assert matches(service["spec"]["selector"], mirror_labels), name
    assert not matches(redis_service["spec"]["selector"], mirror_labels)
    (policy,) = overlay_kind("NetworkPolicy")
    assert matches(policy["spec"]["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    assert matches(rule["from"][0]["podSelector"]["matchLabels"], mirror_labels)
    assert [p["port"] for p in rule["ports"]] == [url.port]


def test_cluster_overlay_config_loads_with_what_the_pod_gets(tmp_path: Path) -> None:
    """With the pod's environment the config loads: advertise is the pod's IP (status.podIP
    through the downward API, defined before the variable that uses it) on the container
    port; the secret is read from the mounted Secret's file; the shared cold bucket is S3 with
    its credentials from Secret keys, and no cold eviction of its own."""
    _, _, container = cluster_pod()
    env = [v["name"] for v in container["env"]]
    assert env.index("POD_IP") < env.index("MIRROR_CLUSTER__ADVERTISE")
    config, secret_files = cluster_config(tmp_path)
    port = [p["containerPort"] for p in container["ports"]]
    assert [config.host_port[1]] == port
    assert config.cluster.enabled
    assert config.cluster.advertise == f"http://{POD_IP}:{port[0]}"
    assert config.cluster.secret == "s" * 64
    original = load_yaml(CLUSTER_K8S / "configmap.yaml")["data"]["config.toml"]
    secret_file = re.search(r'secret_file = "([^"]+)"', original)
    assert secret_file is not None
    assert secret_files == {secret_file[1]: "mirror-cluster/secret"}
    assert urlsplit(config.cold.url).scheme == "s3"
    assert (config.cold.access_key_id, config.cold.secret_access_key) == (
        SECRET_VALUES["mirror-cold", "access-key-id"],
        SECRET_VALUES["mirror-cold", "secret-access-key"],
    )
    assert (config.cold.max_bytes, config.cold.max_idle) == (0, 0)
    documented = (CLUSTER_K8S / "kustomization.yaml").read_text()
    for secret, key in [*SECRET_VALUES, secret_files[secret_file[1]].split("/")]:
        assert f'"{secret}"' in documented and f'"{key}"' in documented, (secret, key)
    assert {u.name for u in config.upstreams} >= {"docker.io", "ghcr.io", "quay.io"}


# -- cluster mode: compose ---------------------------------------------------------------------

REPLICAS = ("mirror-1", "mirror-2", "mirror-3")


def compose_cluster() -> dict[str, Any]:
    doc = load_yaml(DEPLOY / "compose.cluster.yaml")
    assert isinstance(doc, dict)
    return doc


def replica_config(name: str, tmp_path: Path) -> Config:
    """A replica's configuration from its environment and the image's command, its secret
    at a stand-in path."""
    doc = compose_cluster()
    service = doc["services"][name]
    env = {k: str(v) for k, v in service["environment"].items()}
    (secret,) = service["secrets"]
    assert secret in doc["secrets"]
    assert env["MIRROR_CLUSTER__SECRET_FILE"] == f"/run/secrets/{secret}"  # compose's target
    stand_in = tmp_path / f"{name}.secret"
    stand_in.write_text("s" * 64 + "\n")
    image = serve_args(json.loads(one("CMD")))  # compose runs the image's own command
    return load_config(
        env={**env, "MIRROR_CLUSTER__SECRET_FILE": str(stand_in)},
        flags={"listen": image.listen, "data_dir": image.data_dir},
    )


def test_compose_cluster_replicas_each_join_with_their_own_disk(tmp_path: Path) -> None:
    """Three replicas of the image, each with [cluster] on through its environment:
    advertising its own service name on the mirror's port, the Redis service of the file as
    redis_url, its own data volume, the one shared cold volume as its file:// cold tier."""
    doc = compose_cluster()
    services = doc["services"]
    assert set(services) == {"lb", "redis", *REPLICAS}
    data_volumes = set()
    for name in REPLICAS:
        service = services[name]
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        config = replica_config(name, tmp_path)
        assert config.cluster.enabled
        assert config.cluster.advertise == f"http://{name}:{config.host_port[1]}"
        redis = urlsplit(config.cluster.redis_url)
        assert redis.hostname in services and services[redis.hostname]["image"] == "redis:7"
        volumes = dict(v.split(":")[::-1] for v in service["volumes"])
        data_volumes.add(volumes[config.data_dir])
        cold = urlsplit(config.cold.url)
        assert cold.scheme == "file" and volumes[cold.path] == "mirror-cold"
        assert config.limits.max_connections_per_client == 0  # all clients come from the LB
        assert "ports" not in service  # reached through the load balancer only
    assert len(data_volumes) == len(REPLICAS)
    named = {
        v.split(":")[0]
        for s in services.values()
        for v in s.get("volumes", [])
        if not v.startswith(".")
    }
    assert named == set(doc["volumes"])
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--save") + 1] == ""
    dockerfile_text = (DEPLOY / "Dockerfile").read_text()
    assert (
        f"/var/lib/mirror {urlsplit(replica_config(REPLICAS[0], tmp_path).cold.url).path}"
        in dockerfile_text
    )


def test_compose_cluster_lb_round_robins_over_the_three_replicas(tmp_path: Path) -> None:
    """nginx's config is mounted where the image reads it; its one upstream names the three
    replicas on the mirror's port with no balancing directive (round-robin); the server
    proxies everything to it without spooling to disk, on the port compose publishes."""
    lb = compose_cluster()["services"]["lb"]
    (conf_file,) = [src for src, dst in binds(lb) if dst == "/etc/nginx/nginx.conf"]
    conf = conf_file.read_text()
    conf = "\n".join(re.sub(r"#.*", "", line) for line in conf.splitlines())
    ((upstream, body),) = re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", conf)
    port = replica_config(REPLICAS[0], tmp_path).host_port[1]
    assert re.findall(r"^\s*server\s+(\S+)", body, re.M) == [f"{n}:{port}" for n in REPLICAS]
    assert not re.search(r"\b(least_conn|ip_hash|hash|random)\b", body)
    assert re.findall(r"proxy_pass\s+http://([^;/]+);", conf) == [upstream]
    assert re.search(r"proxy_max_temp_file_size\s+0;", conf)  # no blob spooled to disk
    listen = re.findall(r"^\s*listen\s+(\d+);", conf, re.M)
    assert published(lb) == {int(listen[0]): 5000}
