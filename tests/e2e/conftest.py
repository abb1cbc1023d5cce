"""e2e tier: the agent against real components (OpenTelemetry Collector, Prometheus, kube-apiserver).

Components come from scripts/build-collector and scripts/build-kube (cached by version; scripts/test
builds them). A missing component skips, unless OFL_REQUIRE_KERNEL_TESTS=1 (scripts/test and CI),
where it is an error.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def collector_bin() -> str:
    p = subprocess.run(
        [str(ROOT / "scripts" / "build-collector")], capture_output=True, text=True, timeout=3600
    )
    path = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
    if not path or not os.access(path, os.X_OK):
        msg = f"collector not built: scripts/build-collector failed: {p.stderr.strip()[-500:]}"
        if os.environ.get("OFL_REQUIRE_KERNEL_TESTS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
