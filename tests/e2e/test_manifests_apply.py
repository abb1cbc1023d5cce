"""The README's install, upgrade, verify and uninstall steps against a real kube-apiserver (v1.35 +
etcd, built from Go modules), with the manifests rendered by the real kustomize (built from its Go
module) and the Prometheus Operator's own PodMonitor CRD (from its Go module).

`kubectl apply --server-side -k DIR` is kustomize's rendering plus one server-side apply PATCH per
object (otelflow/deploy_apply.py sends exactly those requests; no kubectl binary is built here):

* every overlay passes a server-side dry-run (dryRun=All: admission, defaulting, validation, the
  CRD's schema) once its Namespace exists, and a broken object is refused;
* applied for real in the README's order (base, then each overlay over it), every object exists as
  rendered, and a second apply changes nothing (every resourceVersion stays);
* under a token of the shipped ServiceAccount, `otelflow check`'s Kubernetes lines pass: exactly the
  metadata cache's permissions are granted, and reading Secrets or changing pods is denied;
* `kubectl delete -k` removes every object (the Namespace is left Terminating: no namespace
  controller runs here to finish it);
* on a fresh API server, the README's own `kubectl apply --server-side -k ...` and `kubectl delete
  -k ...` lines run as written through a real kubectl v1.35 (built from Go modules).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otelflow.check import check_kubernetes
from otelflow.deploy_apply import Applier
from otelflow.deploy_render import (
    MANIFESTS,
    OVERLAYS,
    ToolNotFound,
    find_kubectl,
    find_kustomize,
    find_podmonitor_crd,
    render,
)
from otelflow.k8s.cache import RBAC_RULES
from otelflow.testing.kubeapi import KubeAPI, write_kubeconfig
from tests.unit.test_manifests import agent_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
INSTALL = README.split("## Install on Kubernetes", 1)[1].split("\n## ", 1)[0]
# kubectl lines of the install section that need nodes (a kubelet running the pods): none runs here
NEEDS_NODES = {
    "kubectl -n otelflow rollout status ds/otelflow-agent",
    "kubectl -n otelflow exec ds/otelflow-agent -- otelflow check",
}


def _tool(find: Any) -> Path:
    try:
        return Path(find())
    except ToolNotFound as e:
        if os.environ.get("OFL_REQUIRE_KUBE") == "1":
            pytest.fail(f"OFL_REQUIRE_KUBE=1, but {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kustomize = _tool(find_kustomize)
    return {name: render(kustomize, MANIFESTS / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def api(kube_binaries: tuple[str, str]) -> Iterator[KubeAPI]:
    with KubeAPI(*kube_binaries) as k:
        yield k


@pytest.fixture(scope="module")
def applier(api: KubeAPI) -> Applier:
    """Server-side apply against `api`, with the Prometheus Operator's PodMonitor CRD installed
    (the podmonitor overlay's prerequisite: the operator)."""
    crd = yaml.safe_load(_tool(find_podmonitor_crd).read_text())
    a = Applier(api)
    status, out = a.apply(crd)
    assert status in (200, 201), out
    deadline = time.monotonic() + 60
    while True:
        _, got = a.get(crd)
        conds = {c["type"]: c["status"] for c in (got.get("status") or {}).get("conditions") or []}
        if conds.get("Established") == "True":
            break
        assert time.monotonic() < deadline, f"the PodMonitor CRD is not established: {conds}"
        time.sleep(0.5)
    return Applier(api)  # a fresh discovery: the new group is served now


def apply_all(applier: Applier, objs: list[dict[str, Any]], **kw: Any) -> list[tuple[int, Any]]:
    return [applier.apply(o, **kw) for o in objs]


def env_of(ds: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, value, downward API field) of the DaemonSet's container environment, in order."""
    [c] = ds["spec"]["template"]["spec"]["containers"]
    return [
        (e["name"], e.get("value", ""), e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", ""))
        for e in c["env"]
    ]


def readme_install_dirs() -> list[str]:
    return re.findall(r"kubectl apply --server-side -k (manifests/\S+)", README)


def test_readme_installs_what_is_tested() -> None:
    dirs = readme_install_dirs()
    assert dirs, "README has no `kubectl apply --server-side -k manifests/...` line"
    assert set(dirs) <= {f"manifests/{o}" for o in OVERLAYS}


def test_server_side_dry_run_of_every_overlay(
    applier: Applier, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    [namespace] = [o for o in rendered["base"] if o["kind"] == "Namespace"]
    status, out = applier.apply(namespace, dry_run=True)
    assert status == 201, out
    assert applier.get(namespace)[0] == 404  # a dry run creates nothing
    # namespaced objects are checked against their Namespace, so it must exist first
    status, out = applier.apply(namespace)
    assert status == 201, out
    for name, objs in rendered.items():
        results = apply_all(applier, objs, dry_run=True)
        bad = [(o["kind"], o["metadata"]["name"], s, r) for o, (s, r) in zip(objs, results, strict=True)
               if s not in (200, 201)]  # fmt: skip
        assert not bad, f"{name}: {bad}"
        # nothing was created by the dry run
        created = [o["kind"] for o in objs if o["kind"] != "Namespace" and applier.get(o)[0] != 404]
        assert created == [], name


def test_dry_run_refuses_a_broken_object(applier: Applier, rendered: dict[str, list[dict[str, Any]]]) -> None:
    [ds] = [o for o in rendered["base"] if o["kind"] == "DaemonSet"]
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["metadata"]["labels"] = {"app": "other"}  # the selector no longer selects
    status, out = applier.apply(bad, dry_run=True)
    assert status == 422, out
    [pm] = [o for o in rendered["overlays/podmonitor"] if o["kind"] == "PodMonitor"]
    bad = yaml.safe_load(yaml.safe_dump(pm))
    bad["spec"]["podMetricsEndpoints"][0]["scheme"] = "gopher"  # not in the CRD's enum
    status, out = applier.apply(bad, dry_run=True)
    assert status == 422, out


def test_install_then_each_overlay_over_it(
    applier: Applier, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for name in OVERLAYS:  # base, then gateway over it, then podmonitor over that
        objs = rendered[name]
        results = apply_all(applier, objs)
        bad = [(o["kind"], o["metadata"]["name"], s, r) for o, (s, r) in zip(objs, results, strict=True)
               if s not in (200, 201)]  # fmt: skip
        assert not bad, f"{name}: {bad}"
        versions = [r["metadata"]["resourceVersion"] for _, r in results]
        # what the server holds is what was rendered
        for o, (_, got) in zip(objs, results, strict=True):
            if o["kind"] == "ConfigMap":
                assert got["data"] == o["data"]
            elif o["kind"] == "ClusterRole":
                assert got["rules"] == [dict(r) for r in RBAC_RULES]
            elif o["kind"] == "DaemonSet":
                # (the server drops an empty value and defaults fieldRef.apiVersion)
                assert env_of(got) == env_of(o)
        # applying the same again is a no-op
        again = apply_all(applier, objs)
        assert [s for s, _ in again] == [200] * len(objs), name
        assert [r["metadata"]["resourceVersion"] for _, r in again] == versions, name


def test_check_passes_under_the_shipped_service_account(
    api: KubeAPI, applier: Applier, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objs = rendered["base"]
    [sa] = [o for o in objs if o["kind"] == "ServiceAccount"]
    for o in objs:  # installed (idempotent when the test above ran)
        status, out = applier.apply(o)
        assert status in (200, 201), out
    token = api.create_service_account_token(sa["metadata"]["namespace"], sa["metadata"]["name"])
    kcfg = write_kubeconfig(api, token, tmp_path / "agent.kubeconfig")
    # the shipped configuration and environment; the kubeconfig stands in for the pod's token mount
    cfg = agent_config(objs, tmp_path, {"OTELFLOW_METADATA__KUBERNETES__KUBECONFIG": kcfg})
    assert cfg.metadata.kubernetes.enabled == "true"
    results = {r.name: r for r in check_kubernetes(cfg)}
    assert [r.status for r in results.values()] == ["pass", "pass"], results
    # and nothing more than the cache's rules
    for group, resource, verb in [
        ("", "secrets", "get"),
        ("", "configmaps", "list"),
        ("", "pods", "create"),
        ("", "pods", "delete"),
        ("apps", "daemonsets", "list"),
        ("", "nodes", "patch"),
    ]:
        status, out = api.request(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"group": group, "resource": resource, "verb": verb}},
            },
            token,
        )
        assert status == 201 and out["status"]["allowed"] is False, (group, resource, verb, out)


def test_uninstall_removes_everything(applier: Applier, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = {(o["kind"], o["metadata"]["name"]): o for name in OVERLAYS for o in rendered[name]}
    for o in objs.values():
        applier.apply(o)  # installed (idempotent when the tests above ran)
    for o in reversed(list(objs.values())):  # kubectl delete -k manifests/overlays/...
        status, out = applier.delete(o)
        assert status in (200, 202), (o["kind"], o["metadata"]["name"], status, out)
    left = []
    for (kind, name), o in objs.items():
        status, got = applier.get(o)
        if kind == "Namespace":
            # no namespace controller runs here: the Namespace stays Terminating, being deleted
            assert status == 404 or got["metadata"].get("deletionTimestamp"), got
        elif status != 404:
            left.append((kind, name, status))
    assert left == []


def readme_kubectl_lines() -> list[str]:
    """Every kubectl command of the README's install section: code-block lines and `inline` ones."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", INSTALL, re.S):
        lines += [ln.split("#", 1)[0].strip() for ln in block.splitlines() if ln.startswith("kubectl ")]
    # inline ones that name a directory or the namespace (not prose like "`kubectl apply -k`")
    lines += re.findall(r"`(kubectl [^`]*(?:-k manifests/|-n otelflow)[^`]*)`", INSTALL)
    return lines


def rendered_dir(line: str) -> list[dict[str, Any]]:
    """What kustomize renders for the directory of a `kubectl ... -k DIR` line."""
    return render(_tool(find_kustomize), ROOT / line.split("-k ", 1)[1].split()[0])


def test_readme_kubectl_lines_as_written(kube_binaries: tuple[str, str], tmp_path: Path) -> None:
    kubectl = _tool(find_kubectl)
    crd = _tool(find_podmonitor_crd)
    lines = readme_kubectl_lines()
    applies = [ln for ln in lines if ln.startswith("kubectl apply ")]
    deletes = [ln for ln in lines if ln.startswith("kubectl delete ")]
    assert set(lines) - set(applies) - set(deletes) == NEEDS_NODES
    assert len(applies) == len(OVERLAYS) and len(deletes) == 1
    with KubeAPI(*kube_binaries) as api:  # a cluster of its own: the README from a fresh start
        env = {**os.environ, "KUBECONFIG": str(api.kubeconfig_path)}

        def kubectl_run(argv: list[str]) -> str:
            assert argv[0] == "kubectl"
            proc = subprocess.run(
                [str(kubectl), *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 0, f"{shlex.join(argv)}: {proc.stderr}"
            return proc.stdout

        # the podmonitor overlay's prerequisite: the Prometheus Operator's CRDs
        kubectl_run(["kubectl", "apply", "--server-side", "-f", str(crd)])
        kubectl_run(["kubectl", "wait", "--for=condition=Established", "--timeout=60s",
                     "crd/podmonitors.monitoring.coreos.com"])  # fmt: skip
        for line in applies:
            out = kubectl_run(shlex.split(line))
            # one "<resource>[.<group>]/<name> serverside-applied" line per rendered object
            want = {(o["kind"].lower(), o["metadata"]["name"]) for o in rendered_dir(line)}
            applied = [ln.split()[0].split("/", 1) for ln in out.splitlines()]
            assert {(r.split(".", 1)[0], n) for r, n in applied} == want, (line, out)
            assert all(ln.endswith(" serverside-applied") for ln in out.splitlines()), out
        agent = Applier(api)
        ref = {"name": "otelflow-agent", "namespace": "otelflow"}
        status, ds = agent.get({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": ref})
        assert status == 200, ds
        # the last line applied wins: its DaemonSet is what the cluster runs
        [want_ds] = [o for o in rendered_dir(applies[-1]) if o["kind"] == "DaemonSet"]
        assert env_of(ds) == env_of(want_ds)
        # uninstall; --wait=false only because no namespace controller runs here to finish the
        # Namespace's deletion (kubectl would wait for it forever)
        [delete] = deletes
        kubectl_run([*shlex.split(delete), "--wait=false"])
        for o in rendered_dir(delete):
            status, got = agent.get(o)
            if o["kind"] == "Namespace":
                assert status == 404 or got["metadata"].get("deletionTimestamp"), got
            else:
                assert status == 404, (o["kind"], o["metadata"]["name"], got)
