"""Server-side apply of rendered manifests, the way ``kubectl apply --server-side`` does it.

    applier = Applier(api)                       # an otelflow.testing.kubeapi.KubeAPI (admin)
    status, out = applier.apply(obj, dry_run=True)
    applier.delete(obj)

For each object kubectl finds its resource through the API server's discovery (group/version ->
resource name, namespaced or not) and sends one PATCH with ``Content-Type:
application/apply-patch+yaml`` and ``?fieldManager=kubectl`` (``&dryRun=All`` for
``--dry-run=server``). This sends exactly that request, one object at a time, so a test can look
at each object's answer (status, resourceVersion, a refused object's error); the README's own
kubectl lines run through a real kubectl (scripts/build-kubectl) in tests/e2e/test_manifests_apply.py.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Protocol

__all__ = ["Applier", "ApplyError", "resource_path"]

FIELD_MANAGER = "kubectl"  # what `kubectl apply --server-side` uses


class ApplyError(RuntimeError):
    """Discovery failed or an object's kind is unknown to the API server."""


class _Api(Protocol):
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any]: ...


def _group_prefix(api_version: str) -> str:
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


def resource_path(prefix: str, plural: str, namespaced: bool, namespace: str | None, name: str) -> str:
    """The URL path of one object."""
    if namespaced:
        if not namespace:
            raise ApplyError(f"{plural}/{name}: a namespaced object needs metadata.namespace")
        return f"{prefix}/namespaces/{namespace}/{plural}/{name}"
    return f"{prefix}/{plural}/{name}"


class Applier:
    """Discovery-driven server-side apply and delete against one API server."""

    def __init__(self, api: _Api, field_manager: str = FIELD_MANAGER) -> None:
        self.api = api
        self.field_manager = field_manager
        self._kinds: dict[tuple[str, str], tuple[str, bool]] = {}

    def _discover(self, api_version: str) -> None:
        status, out = self.api.request("GET", _group_prefix(api_version))
        if status != 200 or not isinstance(out, dict):
            raise ApplyError(f"discovery of {api_version}: HTTP {status}: {out}")
        for r in out.get("resources", []):
            if "/" in r["name"]:  # subresources (pods/status, ...)
                continue
            self._kinds[(api_version, r["kind"])] = (r["name"], bool(r["namespaced"]))

    def path(self, obj: dict[str, Any]) -> str:
        """The URL path of ``obj`` (its kind looked up through discovery, once per group/version)."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        if (api_version, kind) not in self._kinds:
            self._discover(api_version)
        try:
            plural, namespaced = self._kinds[(api_version, kind)]
        except KeyError:
            raise ApplyError(f"the API server does not serve {kind} in {api_version}") from None
        meta = obj["metadata"]
        return resource_path(
            _group_prefix(api_version), plural, namespaced, meta.get("namespace"), meta["name"]
        )

    def apply(self, obj: dict[str, Any], *, dry_run: bool = False, force: bool = False) -> tuple[int, Any]:
        """One server-side apply PATCH; (HTTP status, decoded body). Errors are returned, not raised."""
        q = {"fieldManager": self.field_manager}
        if dry_run:
            q["dryRun"] = "All"
        if force:
            q["force"] = "true"
        url = f"{self.path(obj)}?{urllib.parse.urlencode(q)}"
        # JSON is YAML: the apply-patch+yaml content type takes it as is.
        return self.api.request("PATCH", url, obj, content_type="application/apply-patch+yaml")

    def get(self, obj: dict[str, Any]) -> tuple[int, Any]:
        return self.api.request("GET", self.path(obj))

    def delete(self, obj: dict[str, Any]) -> tuple[int, Any]:
        """DELETE, as ``kubectl delete -k`` does it (background propagation)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return self.api.request("DELETE", self.path(obj), body)
