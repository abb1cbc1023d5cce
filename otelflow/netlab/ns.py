"""Thin helpers over the kernel's network namespaces: run commands in them, open sockets in them,
find and remove the ones a lab left behind. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns_lock = threading.Lock()


class NetlabError(RuntimeError):
    """A lab operation failed; the message names the command and the kernel's answer."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetlabError("netlab needs root (network namespaces, veths, nftables): run it with sudo")


def run(cmd: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
    """Run a command, return stdout; on failure raise NetlabError with its stderr's first line."""
    try:
        p = subprocess.run(list(cmd), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NetlabError(
            f"{cmd[0]}: command not found (install iproute2, nftables, ethtool, conntrack)"
        ) from None
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        first = err[0] if err else f"exit {p.returncode}"
        raise NetlabError(f"{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}: {first}")
    return p.stdout


def ns_cmd(ns: str, cmd: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def ns_run(ns: str, cmd: Sequence[str], **kw: object) -> str:
    return run(ns_cmd(ns, cmd), **kw)  # type: ignore[arg-type]


def ip_batch(ns: str | None, lines: Sequence[str]) -> None:
    """Apply many `ip` commands in one process (`ip -batch`), in namespace ns (None: this one)."""
    if not lines:
        return
    cmd = ["ip", "-batch", "-"] if ns is None else ["ip", "-n", ns, "-batch", "-"]
    run(cmd, input="\n".join(lines) + "\n")


def nft_apply(ns: str, ruleset: str) -> None:
    ns_run(ns, ["nft", "-f", "-"], input=ruleset)


def sysctl(ns: str, values: dict[str, str | int]) -> None:
    if values:
        ns_run(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Switch the calling thread into namespace ns for the block (sockets made inside stay there).

    Serialised by a lock: only one thread at a time may be away from its own namespace."""
    with _setns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(os.path.join(NETNS_RUN_DIR, ns), os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise NetlabError(f"setns({ns}): {os.strerror(e)}")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread stranded
                    e = ctypes.get_errno()
                    raise NetlabError(f"setns(back from {ns}): {os.strerror(e)}")
        finally:
            os.close(own)
            os.close(target)


def socket_in(ns: str, family: int, type_: int) -> socket.socket:
    """A socket that lives in namespace ns (its binds, routes and conntrack are that namespace's)."""
    with entered(ns):
        return socket.socket(family, type_)


def list_netns(prefix: str) -> list[str]:
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def kill_ns_processes(ns: str, grace: float = 2.0) -> None:
    """SIGTERM every process in ns, wait up to `grace` seconds, then SIGKILL the rest."""
    pids = netns_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not pids:
            return


def delete_netns(names: Sequence[str]) -> list[str]:
    """Kill processes in and delete each namespace; return the ones that could not be removed."""
    failed = []
    for ns in names:
        kill_ns_processes(ns)
        run(["ip", "netns", "del", ns], check=False)
        if os.path.exists(os.path.join(NETNS_RUN_DIR, ns)):
            failed.append(ns)
    return failed
