"""Render the manifests with the real kustomize, and find the real CRDs their objects need.

    kustomize = find_kustomize()                 # or raises ToolNotFound (a reason to skip)
    objects = render(kustomize, "manifests/overlays/gateway")
    crd = find_podmonitor_crd()                  # the Prometheus Operator's own CRD (a YAML path)
    kubectl = find_kubectl()                     # to run the README's kubectl lines as written

kustomize comes from scripts/build-kustomize (built from its Go module, cached by version), or
``OFL_KUSTOMIZE`` (a kustomize binary); kubectl from scripts/build-kubectl (k8s.io/kubernetes, the
API server's version), or ``OFL_KUBECTL``. The PodMonitor CRD comes from scripts/fetch-crds (the
operator's Go module), or ``OFL_PODMONITOR_CRD`` (a file). All only look in the cache: the builds
and downloads are scripts/test's job.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MANIFESTS",
    "OVERLAYS",
    "RenderError",
    "ToolNotFound",
    "find_kubectl",
    "find_kustomize",
    "find_podmonitor_crd",
    "render",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / "manifests"
# Everything a user applies: the base alone and every overlay (relative to manifests/).
OVERLAYS = ("base", "overlays/gateway", "overlays/podmonitor")


class ToolNotFound(RuntimeError):
    """kustomize or a CRD is not in the cache; str(exc) says how to get it."""


class RenderError(RuntimeError):
    """kustomize failed; the message carries its stderr."""


def _cached(script: str, env_var: str) -> Path:
    override = os.environ.get(env_var)
    if override:
        p = Path(override)
        if not p.is_file():
            raise ToolNotFound(f"{env_var}={override} is not a file")
        return p
    cmd = [str(REPO_ROOT / "scripts" / script), "--cached-only"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolNotFound(f"scripts/{script} --cached-only failed: {e}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ToolNotFound(f"not in the cache: run scripts/{script} (or set {env_var})")
    return Path(lines[-1])


def find_kustomize() -> Path:
    """The kustomize binary (see the module docstring); raises ToolNotFound."""
    return _cached("build-kustomize", "OFL_KUSTOMIZE")


def find_kubectl() -> Path:
    """The kubectl binary (see the module docstring); raises ToolNotFound."""
    return _cached("build-kubectl", "OFL_KUBECTL")


def find_podmonitor_crd() -> Path:
    """The Prometheus Operator's PodMonitor CRD file (see the module docstring); raises ToolNotFound."""
    return _cached("fetch-crds", "OFL_PODMONITOR_CRD")


def render(kustomize: Path, directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``kustomize build DIRECTORY`` (default load restrictions, as ``kubectl apply -k`` has them),
    as a list of objects in kustomize's output order."""
    proc = subprocess.run(
        [str(kustomize), "build", os.fspath(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RenderError(f"kustomize build {os.fspath(directory)}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
