"""Shared by every tier.

The kernel and e2e tiers (tests/kernel, tests/e2e) need root: real namespaces, veths, nftables,
conntrack. Without root they skip, unless OFL_REQUIRE_KERNEL_TESTS=1 (set by scripts/test and CI),
in which case a missing privilege is an error: CI must never pass by skipping them.

Every lab a test session makes must be gone when it ends: labs carry the session's tag in their id
(OFL_LAB_TAG), so labs of other processes on the same machine are not judged.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from otelflow.netlab.lab import list_labs

TOOLS = ("ip", "nft", "conntrack", "ethtool", "sysctl")
ROOT_TIERS = ("tests/kernel", "tests/e2e")


def why_not_kernel() -> str | None:
    if os.geteuid() != 0:
        return "kernel and e2e tests need root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"kernel and e2e tests need {', '.join(missing)}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = why_not_kernel()
    root_items = [
        i for i in items if any(t in str(i.fspath) for t in ROOT_TIERS) or i.get_closest_marker("kernel")
    ]
    if reason and root_items and os.environ.get("OFL_REQUIRE_KERNEL_TESTS") == "1":
        raise pytest.UsageError(f"kernel/e2e tests are required here but cannot run: {reason}")
    for item in root_items:
        item.add_marker(pytest.mark.kernel if "tests/kernel" in str(item.fspath) else pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kube_binaries() -> tuple[str, str]:
    """(kube-apiserver, etcd) built by scripts/build-kube; skip without them, unless OFL_REQUIRE_KUBE=1."""
    from otelflow.testing.kubeapi import BinariesNotFound, find_binaries

    try:
        apiserver, etcd = find_binaries()
    except BinariesNotFound as e:
        if os.environ.get("OFL_REQUIRE_KUBE") == "1":
            pytest.fail(f"OFL_REQUIRE_KUBE=1, but there is no kube-apiserver/etcd to run: {e}")
        pytest.skip(f"no kube-apiserver/etcd (run scripts/build-kube): {e}")
    return str(apiserver), str(etcd)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_labs() -> Iterator[None]:
    tag = secrets.token_hex(2)
    os.environ["OFL_LAB_TAG"] = tag
    yield
    if why_not_kernel() is None:
        left = [lab for lab in list_labs() if lab.startswith(tag)]
        assert not left, f"tests left labs behind: {sorted(left)}"
