"""Every configuration shipped in collector-config/ is valid for the collector otelflow documents
(`otelcol validate`, with the build from collector-config/builder.yaml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[2] / "collector-config").glob("*.yaml")
    if p.name != "builder.yaml"
)


def test_there_are_configs() -> None:
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_validates(collector_bin: str, config: Path) -> None:
    p = subprocess.run(
        [collector_bin, "validate", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
