"""`otelflow demo` on a terminal (tmux): it shows progress, opens `top` on the lab's agents with
named workloads and live byte rates, and on `q` tears everything down and exits 0, with nothing on
stderr."""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

from otelflow.netlab.lab import list_labs
from tests.kernel.test_top import Tmux, rows


def test_demo_opens_top(tmp_path: Path) -> None:
    tag = os.environ.get("OFL_LAB_TAG", "")
    before = {lab for lab in list_labs() if lab.startswith(tag)}
    rc_file = tmp_path / "rc"
    err_file = tmp_path / "stderr"
    demo = shlex.join([sys.executable, "-m", "otelflow", "demo", "--duration", "6"])
    inner = f"{demo} 2> {err_file}; echo $? > {rc_file}"
    env = {"TERM": "xterm-256color", "PATH": os.environ.get("PATH", ""), "OFL_LAB_TAG": tag}
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    tm = Tmux(f"env -u LINES -u COLUMNS {assigns} sh -c {shlex.quote(inner)}")
    try:
        s = tm.wait_for(lambda s: "building" in s, "build progress", timeout=120)
        s = tm.wait_for(
            lambda s: "otelflow top  agents 2/2" in s and "shop/payments" in s and "data/db" in s,
            "top on the demo's agents",
            timeout=180,
        )
        pay = [x for x in rows(s) if x.startswith("shop/frontend") and "shop/payments" in x]
        assert pay, s
        # live rates: the client -> server column of the busiest frontend -> payments row moves bytes
        assert (
            re.search(r"\d+(\.\d+)? [kM]?B/s", pay[0])
            and " 0 B/s" not in pay[0].split("shop/payments")[-1][:40]
        )
        assert any("[internet]" in x and "external" in x for x in rows(s))
        tm.keys("q")
        deadline = time.monotonic() + 120
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc_file.read_text().strip() == "0", err_file.read_text()
        assert err_file.read_text() == ""  # no traceback from the traffic round it cut short
    finally:
        tm.close()
    assert {lab for lab in list_labs() if lab.startswith(tag)} == before
