"""eBPF feature probes: can this node run the eBPF flow source, and if not, why not.

Used by ``otelflow check`` (one report line per probe) and by the agent's source selection
(:func:`choose_source`). Every probe is real (it asks the kernel, it never guesses from a version
number where an experiment is possible), cheap (well under a second together: loading flow.bpf.o
takes ~35 ms, parsing the kernel's BTF ~20 ms) and leaves nothing behind:

* :func:`probe_btf`: /sys/kernel/btf/vmlinux is readable, its header is sane and libbpf parses it
  (CO-RE needs it to relocate the programs' struct accesses);
* :func:`probe_bpf`: bpf() is permitted: the real ``flow.bpf.o`` is opened, verified and loaded
  with tiny maps, then unloaded;
* :func:`probe_capabilities`: the effective capability set (``CapEff``) against what each source
  needs (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_RESOURCE; CAP_SYS_ADMIN before 5.8);
* :func:`probe_tc_attach`: a real clsact/cls_bpf attach and detach (see its docstring for why it
  disturbs nobody);
* :func:`probe_tcx_attach`: a real tcx link on lo, closed at once (kernels >= 6.6);
* :func:`ebpf_readiness` sums them up (one of the two attach backends must work, the one
  ``source.ebpf.attach`` asks for) and :func:`choose_source` picks the flow source.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
import os
import platform
import re
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf import tcnl
from otelflow.ebpf.loader import ATTACH_MODES

__all__ = [
    "BTF_PATH",
    "PROBE_HANDLE",
    "PROBE_PRIORITY",
    "PROBE_PROG_NAME",
    "Probe",
    "SourceUnavailable",
    "attach_backend",
    "capability_probes",
    "choose_source",
    "ebpf_readiness",
    "parse_btf_header",
    "parse_capeff",
    "parse_release",
    "probe_bpf",
    "probe_btf",
    "probe_capabilities",
    "probe_tc_attach",
    "probe_tcx_attach",
    "readiness_of",
    "tcx_prog_ids",
]

BTF_PATH = "/sys/kernel/btf/vmlinux"
SOURCES = ("auto", "ebpf", "conntrack")


@dataclass(frozen=True)
class Probe:
    """One feature-probe outcome: ``remedy`` says what to do when ``ok`` is false."""

    name: str
    ok: bool
    detail: str
    remedy: str = ""


class SourceUnavailable(RuntimeError):
    """The requested flow source cannot run on this node; ``str(e)`` says why, in one line."""


# ---- BTF -----------------------------------------------------------------------------------------

BTF_MAGIC = 0xEB9F
_BTF_HDR = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len
BTF_KIND_STRUCT = 4


class BtfHeader(NamedTuple):
    version: int
    hdr_len: int
    type_len: int
    str_len: int


def parse_btf_header(data: bytes, size: int) -> BtfHeader:
    """The header of a raw BTF blob of ``size`` bytes (``data``: at least its first 24 bytes).
    Raises ValueError naming what is wrong. Accepts either byte order, as libbpf does."""
    if len(data) < _BTF_HDR.size:
        raise ValueError(f"{len(data)} bytes: too short for a BTF header")
    fmt = _BTF_HDR
    if struct.unpack_from("<H", data)[0] != BTF_MAGIC:
        if struct.unpack_from(">H", data)[0] != BTF_MAGIC:
            raise ValueError(f"bad magic {data[:2].hex()} (expected 9feb)")
        fmt = struct.Struct(">HBBIIIII")
    _magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = fmt.unpack_from(data)
    if version != 1:
        raise ValueError(f"BTF version {version} (expected 1)")
    if hdr_len < _BTF_HDR.size:
        raise ValueError(f"header length {hdr_len} < {_BTF_HDR.size}")
    end = hdr_len + max(type_off + type_len, str_off + str_len)
    if end > size:
        raise ValueError(f"sections end at byte {end}, past the end of the data ({size} bytes)")
    if type_len == 0 or str_len == 0:
        raise ValueError("no types or no strings")
    return BtfHeader(version, hdr_len, type_len, str_len)


def _fn(name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
    """A libbpf function with its own prototype (libbpf.py's shared table stays untouched)."""
    return C.CFUNCTYPE(restype, *argtypes, use_errno=True)((name, lb.lib()))


def probe_btf(path: str = BTF_PATH) -> Probe:
    """Kernel BTF readable, with a sane header, parsed by libbpf and describing struct sk_buff."""
    remedy = (
        "the eBPF source needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution "
        "since 2020) and /sys/kernel/btf mounted into the agent's container; otherwise it uses conntrack"
    )
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(_BTF_HDR.size)
            # sysfs reports the blob's size; read it whole once to prove it is readable
            while f.read(1 << 20):
                pass
    except OSError as e:
        return Probe("kernel BTF", False, f"{path}: {e.strerror or e}", remedy)
    try:
        hdr = parse_btf_header(head, size)
    except ValueError as e:
        return Probe("kernel BTF", False, f"{path}: not valid BTF: {e}", remedy)
    try:
        parse = _fn("btf__parse", C.c_void_p, C.c_char_p, C.c_void_p)
        type_cnt = _fn("btf__type_cnt", C.c_uint32, C.c_void_p)
        find = _fn("btf__find_by_name_kind", C.c_int32, C.c_void_p, C.c_char_p, C.c_uint32)
        free = _fn("btf__free", None, C.c_void_p)
    except (OSError, AttributeError) as e:
        return Probe("kernel BTF", False, f"libbpf cannot parse BTF: {e}", LIBBPF_REMEDY)
    btf = parse(path.encode(), None)
    if not btf:
        err = C.get_errno() or errno.EINVAL
        return Probe("kernel BTF", False, f"{path}: libbpf cannot parse it: {os.strerror(err)}", remedy)
    try:
        n = int(type_cnt(btf))
        if find(btf, b"sk_buff", BTF_KIND_STRUCT) < 0:
            return Probe("kernel BTF", False, f"{path}: has no struct sk_buff (not vmlinux BTF?)", remedy)
    finally:
        free(btf)
    return Probe("kernel BTF", True, f"{path}: {n} types, {size} bytes (BTF v{hdr.version}): CO-RE works")


# ---- bpf() ---------------------------------------------------------------------------------------

BPF_REMEDY = (
    "grant CAP_BPF and CAP_NET_ADMIN (CAP_SYS_ADMIN on kernels < 5.8) in the DaemonSet's "
    "securityContext; a seccomp or LSM policy may also forbid bpf(); a verifier or relocation "
    "error needs Linux >= 5.12 with kernel BTF (see the kernel BTF line)"
)
LIBBPF_REMEDY = "install libbpf1 (libbpf >= 1.0): the eBPF source loads libbpf.so.1 at run time"


def probe_bpf(path: str | None = None) -> Probe:
    """bpf() is permitted: load the real flow.bpf.o (verifier, CO-RE relocations, map creation) with
    64-entry maps, then unload it. Nothing is attached."""
    from otelflow.ebpf.loader import DEFAULT_OBJECT, FlowCounter

    obj = str(path or DEFAULT_OBJECT)
    t0 = time.perf_counter()
    try:
        fc = FlowCounter(obj, max_entries=64, attach_mode="tc")  # "tc": no attach probe here
    except lb.BPFError as e:
        step = re.match(r"\w+", e.strerror or "")
        why = os.strerror(e.errno) if e.errno else str(e)
        detail = f"loading {Path(obj).name} failed: {why}" + (f" ({step.group(0)})" if step else "")
        if "libbpf.so" in str(e):  # the library itself is missing
            return Probe("bpf() permitted", False, str(e.strerror), LIBBPF_REMEDY)
        return Probe("bpf() permitted", False, detail, BPF_REMEDY)
    except OSError as e:
        return Probe("bpf() permitted", False, f"loading {Path(obj).name}: {e.strerror or e}", BPF_REMEDY)
    fc.close()
    ms = (time.perf_counter() - t0) * 1000
    return Probe(
        "bpf() permitted", True, f"{Path(obj).name} verified and loaded in {ms:.0f} ms, then unloaded"
    )


# ---- capabilities ------------------------------------------------------------------------------

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39


def parse_capeff(status: str) -> int:
    """The effective capability mask from /proc/<pid>/status text. Raises ValueError."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status, re.MULTILINE)
    if not m:
        raise ValueError("no CapEff line")
    return int(m.group(1), 16)


def parse_release(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as '6.18.44-fc-v657'. Raises ValueError."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"kernel release {release!r}: no version number")
    return int(m.group(1)), int(m.group(2))


def _has(capeff: int, cap: int) -> bool:
    return bool(capeff >> cap & 1)


def capability_probes(
    capeff: int, last_cap: int, kernel: tuple[int, int], memlock_unlimited: bool = False
) -> list[Probe]:
    """What each source needs, against an effective capability set (pure: see probe_capabilities).

    ``last_cap`` is /proc/sys/kernel/cap_last_cap (CAP_BPF and CAP_PERFMON exist when it is >= 39,
    kernel 5.8+); before that, CAP_SYS_ADMIN stands in for both. CAP_SYS_RESOURCE matters only
    before 5.11, where BPF maps count against RLIMIT_MEMLOCK and libbpf must raise it."""
    out: list[Probe] = []
    sys_admin = _has(capeff, CAP_SYS_ADMIN)
    if last_cap >= CAP_BPF:
        for cap, name, use in (
            (CAP_BPF, "CAP_BPF", "the eBPF source and TCP health: load programs, create maps"),
            (CAP_PERFMON, "CAP_PERFMON", "TCP health: tracing programs (tp_btf/raw_tp)"),
        ):
            if _has(capeff, cap):
                out.append(Probe(name, True, f"present ({use})"))
            elif sys_admin:
                out.append(
                    Probe(name, True, f"via CAP_SYS_ADMIN ({use}); grant {name} instead: it is narrower")
                )
            else:
                out.append(
                    Probe(
                        name,
                        False,
                        f"missing: needed by {use}",
                        f"add {name} to the DaemonSet's securityContext.capabilities.add",
                    )
                )
    else:
        use = "this kernel has no CAP_BPF/CAP_PERFMON (< 5.8): the eBPF source and TCP health need it"
        if sys_admin:
            out.append(Probe("CAP_SYS_ADMIN", True, f"present ({use})"))
        else:
            out.append(
                Probe(
                    "CAP_SYS_ADMIN",
                    False,
                    f"missing: {use}",
                    "add CAP_SYS_ADMIN (or upgrade the kernel to >= 5.8 and grant CAP_BPF + CAP_PERFMON)",
                )
            )
    use = "the eBPF source: TC attach; the conntrack source: ctnetlink dump and events"
    if _has(capeff, CAP_NET_ADMIN):
        out.append(Probe("CAP_NET_ADMIN", True, f"present ({use})"))
    else:
        out.append(
            Probe(
                "CAP_NET_ADMIN",
                False,
                f"missing: needed by {use}",
                "add CAP_NET_ADMIN to the DaemonSet's securityContext.capabilities.add",
            )
        )
    if kernel >= (5, 11):
        have = "present" if _has(capeff, CAP_SYS_RESOURCE) else "absent"
        out.append(
            Probe(
                "CAP_SYS_RESOURCE",
                True,
                f"{have}; not needed: kernel {kernel[0]}.{kernel[1]} charges BPF memory to the cgroup",
            )
        )
    elif _has(capeff, CAP_SYS_RESOURCE):
        out.append(
            Probe("CAP_SYS_RESOURCE", True, "present (raise RLIMIT_MEMLOCK for BPF maps, kernel < 5.11)")
        )
    elif memlock_unlimited:
        out.append(Probe("CAP_SYS_RESOURCE", True, "absent, but RLIMIT_MEMLOCK is already unlimited"))
    else:
        out.append(
            Probe(
                "CAP_SYS_RESOURCE",
                False,
                "missing: kernel < 5.11 counts BPF maps against RLIMIT_MEMLOCK, which cannot be raised",
                "add CAP_SYS_RESOURCE, or run with an unlimited memlock limit (ulimit -l unlimited)",
            )
        )
    return out


def probe_capabilities() -> list[Probe]:
    """This process's CapEff against what each source needs (one Probe per capability)."""
    try:
        capeff = parse_capeff(Path("/proc/self/status").read_text())
    except (OSError, ValueError) as e:
        return [
            Probe("capabilities", False, f"cannot read CapEff from /proc/self/status: {e}", "mount /proc")
        ]
    try:
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last_cap = CAP_BPF  # /proc/sys hidden: assume a kernel that has it (>= 5.8)
    try:
        kernel = parse_release(platform.release())
    except ValueError:
        kernel = (0, 0)
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unlimited = soft == resource.RLIM_INFINITY
    return capability_probes(capeff, last_cap, kernel, unlimited)


# ---- TC attach ---------------------------------------------------------------------------------

PROBE_IFNAME = "lo"
PROBE_PRIORITY = 0xFFFF  # the last priority: every other filter runs before the probe's
PROBE_HANDLE = 0x0F1F
PROBE_PROG_NAME = "otelflow_probe"
BPF_PROG_TYPE_SCHED_CLS = 3
TC_ACT_UNSPEC = -1
# r0 = TC_ACT_UNSPEC; exit  (struct bpf_insn: u8 code, u8 dst:4/src:4, s16 off, s32 imm)
_NOOP_PROG = struct.pack("<BBhiBBhi", 0xB7, 0, 0, TC_ACT_UNSPEC, 0x95, 0, 0, 0)


def _load_noop_prog() -> int:
    """Load the two-instruction SCHED_CLS program that returns TC_ACT_UNSPEC; return its fd."""
    prog_load = _fn(
        "bpf_prog_load", C.c_int, C.c_int, C.c_char_p, C.c_char_p, C.c_char_p, C.c_size_t, C.c_void_p
    )
    fd = int(prog_load(BPF_PROG_TYPE_SCHED_CLS, PROBE_PROG_NAME.encode(), b"GPL", _NOOP_PROG, 2, None))
    if fd < 0:
        raise lb.BPFError(-fd, f"loading a no-op tc program failed: {os.strerror(-fd)} (bpf_prog_load)")
    return fd


@contextlib.contextmanager
def _probe_filter(ifindex: int, prog_fd: int) -> Iterator[int]:
    """Attach prog_fd at (PROBE_PRIORITY, PROBE_HANDLE) on ifindex's clsact ingress; yield the
    program id the kernel reports there; always detach, and remove clsact if we created it and it
    is empty. Only our own filter is ever removed."""
    L = lb.lib()
    hook = lb.bpf_tc_hook(sz=C.sizeof(lb.bpf_tc_hook), ifindex=ifindex, attach_point=lb.BPF_TC_INGRESS)
    r = L.bpf_tc_hook_create(C.byref(hook))
    if r < 0 and r != -errno.EEXIST:
        lb.check(r, "creating a clsact qdisc on lo (bpf_tc_hook_create)")
    created = r == 0
    attached = False
    try:
        _remove_stale_probe(ifindex, hook)
        opts = lb.bpf_tc_opts(
            sz=C.sizeof(lb.bpf_tc_opts), prog_fd=prog_fd, handle=PROBE_HANDLE, priority=PROBE_PRIORITY
        )
        r = L.bpf_tc_attach(C.byref(hook), C.byref(opts))
        if r < 0:
            taken = [f for f in tcnl.list_filters(ifindex, "ingress") if f.priority == PROBE_PRIORITY]
            if taken:
                f = taken[0]
                raise lb.BPFError(
                    -r,
                    f"bpf_tc_attach(lo ingress, priority {PROBE_PRIORITY}): {os.strerror(-r)}; the "
                    f"priority is taken by a {f.kind} filter (handle {f.handle:#x}), left alone",
                )
            lb.check(r, f"bpf_tc_attach(lo ingress, priority {PROBE_PRIORITY})")
        attached = True
        yield int(opts.prog_id)
    finally:
        errors: list[str] = []
        if attached:
            d = lb.bpf_tc_opts(sz=C.sizeof(lb.bpf_tc_opts), handle=PROBE_HANDLE, priority=PROBE_PRIORITY)
            r = L.bpf_tc_detach(C.byref(hook), C.byref(d))
            if r < 0 and r not in (-errno.ENOENT, -errno.ENODEV):
                errors.append(f"bpf_tc_detach: {os.strerror(-r)}")
        if created:
            try:
                left = tcnl.list_filters(ifindex, "ingress") + tcnl.list_filters(ifindex, "egress")
            except OSError as e:
                left = []
                errors.append(f"listing filters: {e}")
            if not left and not errors:
                h = lb.bpf_tc_hook(
                    sz=C.sizeof(lb.bpf_tc_hook),
                    ifindex=ifindex,
                    attach_point=lb.BPF_TC_INGRESS | lb.BPF_TC_EGRESS,
                )
                r = L.bpf_tc_hook_destroy(C.byref(h))
                if r < 0 and r not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
                    errors.append(f"bpf_tc_hook_destroy: {os.strerror(-r)}")
        if errors:
            raise lb.BPFError(errno.EIO, "tc probe cleanup on lo: " + "; ".join(errors))


PROBE_LOCK = b"\0otelflow-tc-probe"  # an abstract unix socket name: one per network namespace


@contextlib.contextmanager
def _netns_lock(timeout: float = 5.0) -> Iterator[None]:
    """Serialise tc probes of one network namespace (the agent's at start and an `otelflow check`
    run at the same moment must not share lo's priority/handle or remove each other's clsact).
    The lock is an abstract unix socket bound in the calling thread's namespace: abstract names
    are per network namespace, and the kernel releases it when the process dies, even by SIGKILL,
    so a filter found at our priority/handle while holding it is a stale one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.bind(PROBE_LOCK)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise lb.BPFError(
                        e.errno or errno.EBUSY, f"another tc probe held the lock for {timeout:g}s: {e}"
                    ) from None
                time.sleep(0.005)
        yield
    finally:
        sock.close()


def _remove_stale_probe(ifindex: int, hook: lb.bpf_tc_hook) -> None:
    """A probe killed with SIGKILL between attach and detach leaves its no-op filter behind (it
    changes nothing: it returns TC_ACT_UNSPEC): remove it when it is there. Called with the
    namespace's probe lock held, so no live probe owns it."""
    for f in tcnl.list_filters(ifindex, "ingress"):
        if (
            f.priority == PROBE_PRIORITY
            and f.handle == PROBE_HANDLE
            and f.kind == "bpf"
            and f.name.startswith(PROBE_PROG_NAME)
        ):
            d = lb.bpf_tc_opts(sz=C.sizeof(lb.bpf_tc_opts), handle=PROBE_HANDLE, priority=PROBE_PRIORITY)
            lb.lib().bpf_tc_detach(C.byref(hook), C.byref(d))


def _verify_attached(ifindex: int, prog_id: int) -> None:
    """The kernel lists our filter, running our program, where we put it."""
    seen = [
        f
        for f in tcnl.list_filters(ifindex, "ingress")
        if f.priority == PROBE_PRIORITY and f.handle == PROBE_HANDLE
    ]
    if not seen or seen[0].prog_id != prog_id:
        raise lb.BPFError(errno.EIO, "the attached filter is not visible in the filter dump")


def probe_tc_attach(netns: str | None = None) -> Probe:
    """A real TC attach and detach, in the namespace the agent attaches in (``netns``: a
    /run/netns/NAME or /proc/PID/ns/net path; None: this process's).

    Why this disturbs nobody: the filter goes on the clsact *ingress* of ``lo`` (every namespace
    has it; it carries only local traffic) at the **last** priority (65535), so every existing
    filter runs before it and one that ends classification never even reaches it; its program is
    two instructions returning TC_ACT_UNSPEC ("no verdict": the packet continues exactly as if the
    filter were absent); it stays for a few milliseconds. A clsact qdisc is created only when lo
    has none (clsact adds hooks, it never replaces lo's root qdisc) and removed afterwards only if
    this probe created it and no filter is left on it. A foreign filter at that priority is never
    replaced (the probe then fails, naming it). Detaching runs in ``finally`` (exceptions
    included); a probe killed with SIGKILL in that window leaves a harmless no-op filter named
    ``otelflow_probe``, which the next probe removes (the clsact it had created then stays, empty:
    nobody can tell any more whose it was). Probes in one namespace take turns (a lock
    per network namespace, see _netns_lock), so concurrent probes never meet on lo.

    Alternatives rejected: a throwaway namespace with a dummy interface needs CAP_SYS_ADMIN
    (unshare/setns), which a least-privilege agent lacks, and would test another namespace than
    the agent's. The tcx backend has its own probe (probe_tcx_attach): this one proves the
    clsact/cls_bpf path, used where tcx is not (kernels < 6.6, or ``source.ebpf.attach: tc``).
    """
    remedy = (
        "the eBPF source needs CAP_NET_ADMIN and CAP_BPF, and a kernel with clsact and cls_bpf "
        "(CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_BPF)"
    )
    t0 = time.perf_counter()
    try:
        fd = _load_noop_prog()
    except lb.BPFError as e:
        return Probe("tc attach", False, str(e.strerror), remedy)
    ns: tcnl.NetnsFd | None = None
    try:
        ns = tcnl.NetnsFd(netns)
        with tcnl.in_netns(ns):
            ifindex = socket.if_nametoindex(PROBE_IFNAME)
            with _netns_lock(), _probe_filter(ifindex, fd) as prog_id:
                _verify_attached(ifindex, prog_id)
    except lb.BPFError as e:
        return Probe("tc attach", False, f"lo: {e.strerror}", remedy)
    except OSError as e:
        return Probe("tc attach", False, f"lo: {e.strerror or e}", remedy)
    finally:
        os.close(fd)
        if ns is not None:
            ns.close()
    ms = (time.perf_counter() - t0) * 1000
    return Probe(
        "tc attach",
        True,
        f"clsact + cls_bpf attach and detach on lo (priority {PROBE_PRIORITY}) in {ms:.0f} ms; nothing left",
    )


# ---- tcx attach ----------------------------------------------------------------------------------

TCX_HOOKS = {"ingress": lb.BPF_TCX_INGRESS, "egress": lb.BPF_TCX_EGRESS}


def tcx_prog_ids(ifindex: int, direction: str) -> list[int]:
    """Program ids on an interface's tcx hook ("ingress" | "egress"), in the order they run
    (BPF_PROG_QUERY; the calling thread's namespace). Raises BPFError where tcx does not exist.
    (Debian 12's bpftool 7.1 does not list tcx links.) A tcx chain holds at most 64 programs."""
    return lb.prog_query(ifindex, TCX_HOOKS[direction], 64)


def probe_tcx_attach(netns: str | None = None) -> Probe:
    """A real tcx attach and detach (Linux >= 6.6), in the namespace the agent attaches in: the
    two-instruction no-op program (returns TCX_NEXT: the packet goes on exactly as if it were
    absent) is linked to the tcx ingress hook of ``lo`` at the end of the chain, found there with
    BPF_PROG_QUERY, and the link's fd is closed, which detaches it. Nothing can be left behind:
    the kernel closes the fd of a process that dies, even by SIGKILL, and the link is never pinned.
    Concurrent probes do not meet: each links its own program."""
    remedy = (
        "tcx needs Linux >= 6.6 (and CAP_NET_ADMIN + CAP_BPF); without it the eBPF source attaches "
        "with cls_bpf on clsact (the tc attach line)"
    )
    t0 = time.perf_counter()
    try:
        fd = _load_noop_prog()
    except lb.BPFError as e:
        return Probe("tcx attach", False, str(e.strerror), remedy)
    ns: tcnl.NetnsFd | None = None
    try:
        ns = tcnl.NetnsFd(netns)
        with tcnl.in_netns(ns):
            ifindex = socket.if_nametoindex(PROBE_IFNAME)
            link = lb.lib().bpf_link_create(fd, ifindex, lb.BPF_TCX_INGRESS, None)
            if link < 0:
                why = os.strerror(-link)
                if link in (-errno.EINVAL, -errno.EOPNOTSUPP):
                    why += " (no tcx in this kernel: Linux >= 6.6)"
                return Probe("tcx attach", False, f"lo: bpf_link_create(BPF_TCX_INGRESS): {why}", remedy)
            try:
                pid = lb.prog_id(fd)
                if pid not in tcx_prog_ids(ifindex, "ingress"):
                    return Probe(
                        "tcx attach", False, "lo: the link's program is not in the tcx chain", remedy
                    )
            finally:
                os.close(link)
            if pid in tcx_prog_ids(ifindex, "ingress"):
                return Probe(
                    "tcx attach", False, "lo: the program stayed attached after its link closed", remedy
                )
    except lb.BPFError as e:
        return Probe("tcx attach", False, f"lo: {e.strerror}", remedy)
    except OSError as e:
        return Probe("tcx attach", False, f"lo: {e.strerror or e}", remedy)
    finally:
        os.close(fd)
        if ns is not None:
            ns.close()
    ms = (time.perf_counter() - t0) * 1000
    return Probe(
        "tcx attach", True, f"tcx link on lo, found by BPF_PROG_QUERY, closed in {ms:.0f} ms; nothing left"
    )


# ---- readiness and source choice ---------------------------------------------------------------


def attach_backend(attach: str, probes: list[Probe]) -> str:
    """The TC attach backend ("tcx" | "tc") the loader will use for ``source.ebpf.attach``, from
    ebpf_readiness()'s probes; "" when the backend it needs does not work."""
    ok = {p.name: p.ok for p in probes}
    if attach == "tcx" or (attach == "auto" and ok.get("tcx attach")):
        return "tcx" if ok.get("tcx attach") else ""
    return "tc" if ok.get("tc attach") else ""


def ebpf_readiness(netns: str | None = None, attach: str = "auto") -> tuple[bool, str, list[Probe]]:
    """(usable, one-line reason, the probes behind it) for the eBPF flow source: kernel BTF,
    bpf() permitted and a TC attach: both backends are probed (both lines show in `check`); the
    one ``attach`` ("auto" | "tcx" | "tc", source.ebpf.attach) needs must work: auto needs either.
    Capabilities are reported by probe_capabilities(); what they deny shows up here as a failed
    load or attach, which is the ground truth."""
    if attach not in ATTACH_MODES:
        raise ValueError(f"attach {attach!r}: must be one of {', '.join(ATTACH_MODES)}")
    probes = [probe_btf(), probe_bpf(), probe_tc_attach(netns), probe_tcx_attach(netns)]
    return readiness_of(probes, attach)


def readiness_of(probes: list[Probe], attach: str) -> tuple[bool, str, list[Probe]]:
    """ebpf_readiness()'s verdict on probes already run (kernel BTF, bpf() permitted, tc attach,
    tcx attach): every probe but the attach lines must pass, and of those the one ``attach`` needs
    (auto: tcx when it works, else tc; a reason then names the tc failure first)."""
    attach_lines = {"tc attach", "tcx attach"}
    needed = [p for p in probes if p.name not in attach_lines]
    by_name = {p.name: p for p in probes if p.name in attach_lines}
    backend = attach_backend(attach, probes)
    if backend:
        needed.append(by_name[f"{backend} attach"])
    elif attach == "auto":
        needed += [by_name[n] for n in ("tc attach", "tcx attach") if n in by_name]
    elif f"{attach} attach" in by_name:
        needed.append(by_name[f"{attach} attach"])
    failed = [p for p in needed if not p.ok]
    if not failed:
        return True, "kernel BTF, bpf() and TC attach all work", probes
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return False, f"{failed[0].name}: {failed[0].detail}{more}", probes


def choose_source(
    requested: str,
    netns: str | None = None,
    *,
    readiness: tuple[bool, str, list[Probe]] | None = None,
) -> tuple[str, str]:
    """("ebpf" | "conntrack", why) for a requested source ("auto", "ebpf" or "conntrack").

    auto: eBPF when ebpf_readiness() is ok, else conntrack with the reason; "ebpf" when eBPF is
    not usable raises SourceUnavailable(reason). ``readiness``: a result of ebpf_readiness() to
    reuse instead of probing again."""
    if requested not in SOURCES:
        raise ValueError(f"source {requested!r}: must be one of {', '.join(SOURCES)}")
    if requested == "conntrack":
        return "conntrack", "requested (source.mode=conntrack)"
    ok, reason, _ = readiness if readiness is not None else ebpf_readiness(netns)
    if requested == "ebpf":
        if not ok:
            raise SourceUnavailable(f"the eBPF source cannot run here: {reason}")
        return "ebpf", f"requested; {reason}"
    if ok:
        return "ebpf", f"auto: {reason}"
    return "conntrack", f"auto: eBPF unavailable ({reason})"
