"""The README's first command: `otelflow demo` builds a lab, shows named flows, agrees with the
kernel's counters to the byte, and removes everything."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from otelflow.netlab.lab import list_labs


def test_demo_runs_names_flows_and_is_exact() -> None:
    tag = os.environ.get("OFL_LAB_TAG", "")  # the demo inherits it: its lab is this session's
    before = {lab for lab in list_labs() if lab.startswith(tag)}
    p = subprocess.run(
        [sys.executable, "-m", "otelflow", "demo", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "shop/frontend" in out and "shop/payments" in out and "data/db" in out
    assert "[internet]" in out and "cross-zone" in out
    m = re.search(r"counted ([\d,]+) bytes.*\n.*say ([\d,]+) bytes \(0\.000% apart\)", out)
    assert m and m.group(1) == m.group(2), out[-800:]
    assert {lab for lab in list_labs() if lab.startswith(tag)} == before
