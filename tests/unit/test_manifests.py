"""manifests/: generated files current, every overlay rendered by the real kustomize and validated
against the Kubernetes 1.35 schemas (kubernetes-validate), and the wiring between the objects exact:
the agent's configuration loads with the DaemonSet's environment, probes reach api.listen, selectors
select, the OTLP endpoint names the gateway's Service port, the PodMonitor's port is the agent's
Prometheus listener, the ClusterRole is RBAC_RULES.

kustomize comes from scripts/build-kustomize's cache (built from its Go module); without it the
rendering tests skip, unless OFL_REQUIRE_KUBE=1 (scripts/test), where that is a failure. The server
side (dry-run and real server-side apply against a real kube-apiserver) is
tests/e2e/test_manifests_apply.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from otelflow import deploy
from otelflow.config import load_config
from otelflow.deploy_render import (
    MANIFESTS,
    OVERLAYS,
    ToolNotFound,
    find_kustomize,
    find_podmonitor_crd,
    render,
)
from otelflow.k8s.cache import RBAC_RULES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
KUBE_VERSION = "1.35"  # the API server the e2e tests run (scripts/build-kube)
CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}
BASE_KINDS = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"]
BASE_KINDS += ["PriorityClass", "DaemonSet"]
KINDS = {
    "base": sorted(BASE_KINDS),
    "overlays/gateway": sorted([*BASE_KINDS, "ConfigMap", "Service", "Deployment"]),
    "overlays/podmonitor": sorted([*BASE_KINDS, "PodMonitor"]),
}
# what the downward API gives a pod on a node, for resolving $(VAR) references
DOWNWARD = {"spec.nodeName": "node-a", "status.hostIP": "10.0.0.5"}


def _require(reason: str) -> None:
    if os.environ.get("OFL_REQUIRE_KUBE") == "1":
        pytest.fail(f"OFL_REQUIRE_KUBE=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def kustomize() -> Path:
    try:
        return find_kustomize()
    except ToolNotFound as e:
        _require(str(e))
        raise


@pytest.fixture(scope="module")
def rendered(kustomize: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: render(kustomize, MANIFESTS / name) for name in OVERLAYS}


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def agent_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: downward API values, $(VAR) expanded."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "valueFrom" in e:
            env[e["name"]] = DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], e.get("value", ""))
    return env


def agent_config(objs: list[dict[str, Any]], tmp_path: Path, extra_env: dict[str, str] | None = None) -> Any:
    """The agent's Config, loaded from the rendered ConfigMap's file with the DaemonSet's environment
    (plus ``extra_env``)."""
    c = agent_container(objs)
    env = resolved_env(c) | (extra_env or {})
    pod = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    mount = next(m for m in c["volumeMounts"] if env["OTELFLOW_CONFIG"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    key = env["OTELFLOW_CONFIG"][len(mount["mountPath"]) + 1 :]
    path = tmp_path / key
    path.write_text(cm["data"][key])
    return load_config(path, env)


# --- generated files ---------------------------------------------------------------------------


def test_generated_files_are_current() -> None:
    assert deploy.stale_files(ROOT) == [], "run: python -m otelflow.deploy"


def test_clusterrole_is_exactly_rbac_rules() -> None:
    role = yaml.safe_load((ROOT / deploy.CLUSTERROLE).read_text())
    assert role["kind"] == "ClusterRole"
    assert role["rules"] == [dict(r) for r in RBAC_RULES]


def test_the_check_fails_when_the_rules_change(tmp_path: Path) -> None:
    (tmp_path / "collector-config").mkdir()
    (tmp_path / deploy.GATEWAY_SOURCE).write_text((ROOT / deploy.GATEWAY_SOURCE).read_text())
    assert deploy.main(["--root", str(tmp_path)]) == 0
    assert deploy.main(["--root", str(tmp_path), "--check"]) == 0
    more = [*RBAC_RULES, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    (tmp_path / deploy.CLUSTERROLE).write_text(deploy.clusterrole(more))
    assert deploy.stale_files(tmp_path) == [deploy.CLUSTERROLE]
    (tmp_path / deploy.GATEWAY_CONFIG).write_text("receivers: {}\n")
    assert deploy.main(["--root", str(tmp_path), "--check"]) == 1


# --- rendering and schemas -----------------------------------------------------------------------


def test_every_overlay_renders_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objs in rendered.items():
        assert sorted(o["kind"] for o in objs) == KINDS[name], name
        for o in objs:
            cluster_scoped = o["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass")
            assert o["metadata"].get("namespace") == (None if cluster_scoped else "otelflow"), o["metadata"]


def test_builtin_objects_pass_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for objs in rendered.values():
        for o in objs:
            if o["kind"] == "PodMonitor":
                # not a built-in kind: kubernetes-validate has no schema for it (below, and the
                # e2e dry-run against the real CRD)
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
                continue
            # strict: unknown fields are errors too
            assert kubernetes_validate.validate(o, KUBE_VERSION, strict=True) == KUBE_VERSION
            checked += 1
    assert checked == 7 + 10 + 7


def test_schema_validation_catches_a_broken_daemonset(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ds = one(rendered["base"], "DaemonSet")
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_podmonitor_passes_the_operators_own_crd_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    try:
        crd = yaml.safe_load(find_podmonitor_crd().read_text())
    except ToolNotFound as e:
        _require(str(e))
    pm = one(rendered["overlays/podmonitor"], "PodMonitor")
    [version] = [
        v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == pm["apiVersion"]
    ]
    schema = version["schema"]["openAPIV3Schema"]
    # JSON Schema check of the structural schema (the API server's checks are in the e2e dry-run)
    jsonschema.validate(pm, schema)
    bad = yaml.safe_load(yaml.safe_dump(pm))
    bad["spec"]["podMetricsEndpoints"][0]["interval"] = "thirty seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --- the agent -----------------------------------------------------------------------------------


def test_daemonset_security_and_scheduling(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for objs in rendered.values():
        ds = one(objs, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        c = agent_container(objs)
        sc = c["securityContext"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert "hostPID" not in pod and "hostIPC" not in pod
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sorted(sc["capabilities"]["add"]) == sorted(CAPABILITIES)
        assert not any("hostPath" in v for v in pod["volumes"])  # nothing of the node's filesystem
        assert pod["tolerations"] == [{"operator": "Exists"}]
        assert pod["priorityClassName"] == one(objs, "PriorityClass")["metadata"]["name"]
        assert c["resources"] == {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        }
        sa = one(objs, "ServiceAccount")
        assert pod["serviceAccountName"] == sa["metadata"]["name"]
        binding = one(objs, "ClusterRoleBinding")
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": sa["metadata"]["name"],
                "namespace": sa["metadata"]["namespace"],
            }
        ]
        assert binding["roleRef"]["name"] == one(objs, "ClusterRole")["metadata"]["name"]
        assert (
            ds["spec"]["selector"]["matchLabels"].items()
            <= ds["spec"]["template"]["metadata"]["labels"].items()
        )


def test_image_tag_is_the_package_version(rendered: dict[str, list[dict[str, Any]]]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for objs in rendered.values():
        assert agent_container(objs)["image"] == f"otelflow:{version}"


def test_readme_image_step_sets_the_image(kustomize: Path, tmp_path: Path) -> None:
    """The README's `kustomize edit set image ...` line, run as written (REGISTRY filled in) on a
    copy of manifests/: every overlay then runs that image."""
    [(cwd, arg)] = re.findall(r"\(cd (manifests/base) && kustomize edit set image (\S+)\)", README)
    arg = arg.replace("REGISTRY", "registry.invalid")
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    subprocess.run([str(kustomize), "edit", "set", "image", arg], cwd=tmp_path / cwd, check=True)
    for name in OVERLAYS:
        objs = render(kustomize, tmp_path / "manifests" / name)
        assert agent_container(objs)["image"] == "registry.invalid/otelflow:0.1.0", name


@pytest.mark.parametrize("name", OVERLAYS)
def test_agent_config_loads_and_probes_reach_the_api(
    rendered: dict[str, list[dict[str, Any]]], name: str, tmp_path: Path
) -> None:
    objs = rendered[name]
    cfg = agent_config(objs, tmp_path)
    assert cfg.node_name == "node-a"  # NODE_NAME from the downward API
    assert cfg.metadata.kubernetes.enabled == "true"
    c = agent_container(objs)
    host, _, port = cfg.api.listen.rpartition(":")
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = c[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (host, int(port), path), probe
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in resolved_env(c)


def test_base_exports_nowhere_until_configured(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    cfg = agent_config(rendered["base"], tmp_path)
    assert cfg.export.otlp.endpoint == ""
    assert cfg.export.prometheus.listen == ""


def test_gateway_wiring(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objs = rendered["overlays/gateway"]
    cfg = agent_config(objs, tmp_path)
    svc = one(objs, "Service", "otelflow-gateway")
    dep = one(objs, "Deployment", "otelflow-gateway")
    http = next(p for p in svc["spec"]["ports"] if p["name"] == "otlp-http")
    ns = svc["metadata"]["namespace"]
    assert cfg.export.otlp.endpoint == f"http://{svc['metadata']['name']}.{ns}.svc:{http['port']}"
    assert (cfg.export.otlp.protocol, cfg.export.otlp.compression) == ("http/protobuf", "gzip")
    assert cfg.export.otlp.compression_level == 1
    pod = dep["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # the agents' selector must not catch the gateway, nor the gateway's the agents
    agent_labels = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= agent_labels.items()
    [c] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for p in svc["spec"]["ports"]:
        assert ports[p["targetPort"]] == p["port"]
    # the config file: collector-config/gateway.yaml, where --config points
    [arg] = c["args"]
    conf = arg.removeprefix("--config=")
    [mount] = c["volumeMounts"]
    [vol] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    cm = one(objs, "ConfigMap", vol["configMap"]["name"])
    assert conf == f"{mount['mountPath']}/gateway.yaml"
    assert cm["data"]["gateway.yaml"] == (ROOT / "collector-config/gateway.yaml").read_text()
    gw = yaml.safe_load(cm["data"]["gateway.yaml"])
    assert gw["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{ports['otlp-grpc']}")
    assert gw["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(f":{ports['otlp-http']}")
    assert gw["extensions"]["health_check"]["endpoint"].endswith(f":{ports['health']}")
    assert c["livenessProbe"]["httpGet"]["port"] == "health"
    # the stock image at the release the tests validate collector-config/ with
    builder = (ROOT / "collector-config/builder.yaml").read_text()
    version = re.search(r"^# ocb-version: v(\S+)", builder, re.M)
    assert version and c["image"] == f"otel/opentelemetry-collector-contrib:{version[1]}"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_podmonitor_wiring(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objs = rendered["overlays/podmonitor"]
    cfg = agent_config(objs, tmp_path)
    assert cfg.export.prometheus.listen == f"{DOWNWARD['status.hostIP']}:9464"
    c = agent_container(objs)
    [port] = [p for p in c["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == 9464
    pm = one(objs, "PodMonitor")
    [ep] = pm["spec"]["podMetricsEndpoints"]
    assert (ep["port"], ep["path"]) == ("metrics", "/metrics")
    labels = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pm["metadata"]["namespace"] == one(objs, "DaemonSet")["metadata"]["namespace"]


# --- docs ----------------------------------------------------------------------------------------


def test_readme_documents_install_and_every_capability() -> None:
    for overlay in ("base", "overlays/gateway", "overlays/podmonitor"):
        assert f"kubectl apply --server-side -k manifests/{overlay}" in README, overlay
    for cap in CAPABILITIES:
        assert f"`{cap}`" in README, cap
    assert "kubectl delete -k" in README
    assert "otelflow check" in README
