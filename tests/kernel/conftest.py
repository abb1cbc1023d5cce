"""Kernel tier: real namespaces, veths, nftables and conntrack. Needs root.

Without root these tests skip, unless OFL_REQUIRE_KERNEL_TESTS=1 (set by scripts/test and CI),
in which case a missing privilege is an error: CI must never pass by skipping the kernel tier.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from otelflow.netlab.lab import Lab, list_labs
from otelflow.netlab.topology import demo_topology

TOOLS = ("ip", "nft", "conntrack", "ethtool", "sysctl")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"kernel tests need {', '.join(missing)}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not()
    kernel_items = [i for i in items if "tests/kernel" in str(i.fspath) or i.get_closest_marker("kernel")]
    if reason and kernel_items and os.environ.get("OFL_REQUIRE_KERNEL_TESTS") == "1":
        raise pytest.UsageError(f"kernel tests are required here but cannot run: {reason}")
    for item in kernel_items:
        item.add_marker(pytest.mark.kernel)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_labs() -> Iterator[None]:
    """Every lab this session made is gone at the end (labs carry the session's tag in their id, so
    labs of other processes on the machine are not judged)."""
    tag = secrets.token_hex(2)
    os.environ["OFL_LAB_TAG"] = tag
    yield
    if _why_not() is None:
        left = [lab for lab in list_labs() if lab.startswith(tag)]
        assert not left, f"tests left labs behind: {sorted(left)}"


@pytest.fixture(scope="module")
def demo_lab() -> Iterator[Lab]:
    with Lab(demo_topology()) as lab:
        yield lab
