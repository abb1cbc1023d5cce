"""Kernel tier fixtures (root and skip handling: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology


@pytest.fixture(scope="module")
def demo_lab() -> Iterator[Lab]:
    with Lab(demo_topology()) as lab:
        yield lab
