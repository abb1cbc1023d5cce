"""TCP health from eBPF tracing programs (bpf/health.bpf.c, shipped compiled as health.bpf.o).

    with TcpHealth() as th:                        # probe, load the chosen programs, attach
        th.hooks                                   # {"retransmits": "tp_btf/tcp_retransmit_skb", ...}
        ...
        d = th.drain()                             # per-socket counters since the previous drain
        for s in d.sockets: print(s.local_ip, s.lport, s.remote_ip, s.rport, s.netns, s.retrans_segs)
        d.drops["opened"]                          # state changes not recorded: the map was full

Features and their alternatives, in order of preference (FEATURES): each feature uses the first
alternative whose programs the kernel lets us load *and* attach; a feature without one is skipped
and its Probe says why (``probe_hooks()`` reports the same without keeping anything loaded):

    retransmits  tp_btf/tcp_retransmit_skb (3 args, Linux >= 6.17, failed attempts reported apart),
                 raw_tp/ the same, then the 2-argument forms of older kernels (success only)
    rtt          tp_btf/tcp_probe, fentry/tcp_rcv_established, raw_tp/tcp_probe
    resets       tp_btf/tcp_send_reset + tp_btf/tcp_receive_reset, then the raw_tp pair
    state        tp_btf/inet_sock_set_state, raw_tp/inet_sock_set_state

Measured on this project's test machine (kernel 6.18): every tp_btf and raw_tp alternative loads
and attaches; fentry is refused at load (EPERM, the VM's kernel forbids it), so the RTT feature's
fentry alternative is probed and skipped there. A node whose kernel allows fentry still uses
tp_btf/tcp_probe first: both run at the start of tcp_rcv_established.

**Global programs.** Tracing programs are not attached to an interface or a namespace: they see
every TCP socket of the machine, in every network namespace. An agent per node therefore sees the
sockets of every pod on its node (and of the host network) with one set of programs; each record
carries the socket's network namespace inode (``netns``: the inode of /proc/PID/ns/net, the same
for every process of a pod) so the agent can tell pods apart and join records onto flows by
(namespace, tuple). Two agents on one node would both count everything: run one per node.
``netns_filter`` restricts recording to a set of namespace inodes (the others are counted in
``stats["netns_filtered"]``, never recorded).

**Lifetime.** Tracing attachments are BPF links owned by this process's file descriptors: they go
away with the process, even on SIGKILL (unlike tc filters). close() detaches explicitly; it runs on
exceptions (context manager), at interpreter exit, on garbage collection and, with
:func:`otelflow.ebpf.loader.close_on_signals`, on SIGTERM/SIGINT/SIGHUP.

**Draining** is lossless as in the flow counter (loader.py), by the same machinery (maps.py): two
maps behind a one-slot ARRAY_OF_MAPS, swapped (the kernel waits for running programs), then the
quiet map is read and emptied with bpf_map_lookup_and_delete_batch.

**Needs** CAP_BPF and CAP_PERFMON (CAP_SYS_ADMIN before 5.8), kernel BTF, Linux >= 5.12; no
privileged container.
"""

from __future__ import annotations

import ctypes as C
import errno
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf.features import Probe
from otelflow.ebpf.loader import EbpfError, Loaded, coarse_now_ns, ip_str
from otelflow.ebpf.maps import Layout, SwapMaps, map_fd, size_inner

DEFAULT_OBJECT = Path(__file__).with_name("health.bpf.o")
DEFAULT_MAX_ENTRIES = 16384

# struct hl_key / struct hl_val of bpf/health.bpf.c (tests check them against the object's BTF)
KEY = struct.Struct("=16s16sIHHB7x")  # laddr, raddr, netns, lport, rport, family, pad
VAL = struct.Struct("=QQQQQQIIIIIIQ")
assert KEY.size == 48 and VAL.size == 80

# enum hl_drop / enum hl_stat of bpf/health.bpf.c, in index order
DROP_NAMES = (
    "retrans_segs",
    "retrans_failed",
    "resets_sent",
    "resets_received",
    "rtt_samples",
    "opened",
    "closed",
    "failed",
)
STAT_NAMES = (
    "no_map",
    "insert_race",
    "insert_error",
    "netns_filtered",
    "not_inet",
    "reset_from_skb",
    "reset_no_tuple",
    "rtt_unset",
)
CFG_NETNS_FILTER = 1  # HL_CFG_NETNS_FILTER
NETNS_FILTER_MAX = 1024  # max_entries of netns_allow

# include/net/tcp_states.h (SocketHealth.last_state)
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}


@dataclass(frozen=True, slots=True)
class Hook:
    """One program of the object and the hook it attaches to (its ELF section)."""

    program: str
    section: str

    @property
    def kind(self) -> str:
        """The program type: "tp_btf", "raw_tp" or "fentry"."""
        return self.section.split("/", 1)[0]


HOOK_KINDS = ("tp_btf", "raw_tp", "fentry")

# feature -> alternatives in order of preference; an alternative is the programs it needs together
FEATURES: dict[str, tuple[tuple[Hook, ...], ...]] = {
    "retransmits": (
        (Hook("hl_retx_btf", "tp_btf/tcp_retransmit_skb"),),
        (Hook("hl_retx_raw", "raw_tp/tcp_retransmit_skb"),),
        (Hook("hl_retx_btf2", "tp_btf/tcp_retransmit_skb (2 args)"),),
        (Hook("hl_retx_raw2", "raw_tp/tcp_retransmit_skb (2 args)"),),
    ),
    "rtt": (
        (Hook("hl_rtt_btf", "tp_btf/tcp_probe"),),
        (Hook("hl_rtt_fentry", "fentry/tcp_rcv_established"),),
        (Hook("hl_rtt_raw", "raw_tp/tcp_probe"),),
    ),
    "resets": (
        (Hook("hl_rstx_btf", "tp_btf/tcp_send_reset"), Hook("hl_rsrx_btf", "tp_btf/tcp_receive_reset")),
        (Hook("hl_rstx_raw", "raw_tp/tcp_send_reset"), Hook("hl_rsrx_raw", "raw_tp/tcp_receive_reset")),
    ),
    "state": (
        (Hook("hl_state_btf", "tp_btf/inet_sock_set_state"),),
        (Hook("hl_state_raw", "raw_tp/inet_sock_set_state"),),
    ),
}
PROGRAMS = tuple(h.program for alts in FEATURES.values() for alt in alts for h in alt)
MAPS = ("health_a", "health_b", "health_maps", "hl_config", "netns_allow", "drops", "stats")
# the drain maps (maps.py); health_a: the object's static initialisation of health_maps[0]
LAYOUT = Layout("health", ("health_a", "health_b"), "health_maps", KEY, VAL, DROP_NAMES, STAT_NAMES)

REMEDY = (
    "TCP health needs kernel BTF, Linux >= 5.12 and CAP_BPF + CAP_PERFMON (CAP_SYS_ADMIN before "
    "5.8) in the DaemonSet's securityContext; flows are still counted without it"
)


class SocketHealth(NamedTuple):
    """One socket direction's TCP health for one drain interval (hl_key then hl_val fields)."""

    laddr: bytes  # 16 bytes, IPv4 as ::ffff:a.b.c.d: the socket's local address
    raddr: bytes  # the peer's address
    netns: int  # network namespace inode of the socket
    lport: int
    rport: int
    family: int  # 4 | 6 (an AF_INET6 socket talking to a v4-mapped peer is 4)
    retrans_segs: int  # segments retransmitted (sent); what tcpi_total_retrans counts
    retrans_failed: int  # retransmission attempts that failed (kernels >= 6.17 report them)
    resets_sent: int  # RSTs sent
    resets_received: int  # RSTs received (connection reset by peer)
    rtt_sum_us: int  # sum of srtt samples, microseconds
    rtt_samples: int  # samples: segments received in ESTABLISHED
    srtt_us: int  # latest smoothed RTT (tcpi_rtt), microseconds; 0: no sample
    rtt_min_us: int  # smallest sample this interval, microseconds; 0: no sample
    opened: int  # SYN_SENT/SYN_RECV -> ESTABLISHED
    closed: int  # an opened connection -> CLOSE
    failed: int  # SYN_SENT/SYN_RECV -> CLOSE (never opened)
    last_state: int  # new state of the latest counted state change (TCP_STATES), 0: none
    last_seen_ns: int  # CLOCK_MONOTONIC_COARSE ns of the latest event

    @property
    def local_ip(self) -> str:
        return ip_str(self.family, self.laddr)

    @property
    def remote_ip(self) -> str:
        return ip_str(self.family, self.raddr)

    def tuple4(self) -> tuple[str, int, str, int]:
        """(local ip, local port, remote ip, remote port) with addresses as strings."""
        return (self.local_ip, self.lport, self.remote_ip, self.rport)

    @property
    def rtt_mean_us(self) -> float:
        return self.rtt_sum_us / self.rtt_samples if self.rtt_samples else 0.0


def parse_entries(keys: memoryview | bytes, values: memoryview | bytes, n: int) -> list[SocketHealth]:
    """SocketHealth records from n packed keys and n packed values (a batch lookup's arrays)."""
    kv = memoryview(keys)[: n * KEY.size]
    vv = memoryview(values)[: n * VAL.size]
    return [SocketHealth(*k, *v) for k, v in zip(KEY.iter_unpack(kv), VAL.iter_unpack(vv), strict=True)]


@dataclass(slots=True)
class HealthDrain:
    """What one drain read: every socket with events since the previous drain, and the loss counters."""

    sockets: list[SocketHealth]
    drops: dict[str, int]  # since the previous drain: DROP_NAMES (events that could not be recorded)
    stats: dict[str, int]  # since the previous drain: STAT_NAMES
    since_ns: int  # CLOCK_MONOTONIC_COARSE: this generation became active
    until_ns: int  # CLOCK_MONOTONIC_COARSE: it was swapped out
    read_seconds: float
    # since the previous drain, per feature in use: events the kernel skipped because the program
    # was already running on that CPU (TcpHealth.missed); machine-wide, not per socket
    missed: dict[str, int] = field(default_factory=dict)


# ---- probing -----------------------------------------------------------------------------------


def _describe(alt: tuple[Hook, ...]) -> str:
    return " + ".join(h.section for h in alt)


def _open(path: str) -> int:
    L = lb.lib()
    return lb.check(L.bpf_object__open_file(path.encode(), None), f"bpf_object__open_file({path})")


def _select(obj: int, wanted: set[str]) -> dict[str, int]:
    """Autoload only the wanted programs; return every program's libbpf handle by name."""
    L = lb.lib()
    progs = {}
    for name in PROGRAMS:
        p = lb.check(L.bpf_object__find_program_by_name(obj, name.encode()), f"program {name}")
        lb.check(L.bpf_program__set_autoload(p, name in wanted), f"set_autoload({name})")
        progs[name] = p
    return progs


def _attach(prog: int, hook: Hook) -> int:
    link = lb.lib().bpf_program__attach(prog)
    return lb.check(link, f"attaching {hook.program} to {hook.section}")


def _try_alternative(path: str, alt: tuple[Hook, ...]) -> str | None:
    """Load and attach one alternative in a throwaway object (1-entry maps), then drop it all.
    None when it works, else why not (one line)."""
    try:
        L = lb.lib()
        obj = _open(path)
    except lb.BPFError as e:
        return str(e)
    links: list[int] = []
    try:
        progs = _select(obj, {h.program for h in alt})
        size_inner(obj, LAYOUT.inner, 1)
        r = L.bpf_object__load(obj)
        if r < 0:
            return f"load: {_errno_text(-r)}"
        for h in alt:
            link = L.bpf_program__attach(progs[h.program])
            if not link:
                return f"attach {h.section}: {_errno_text(C.get_errno() or errno.EINVAL)}"
            links.append(link)
        return None
    except lb.BPFError as e:
        return str(e)
    finally:
        for link in links:
            L.bpf_link__destroy(link)
        L.bpf_object__close(obj)


def _errno_text(e: int) -> str:
    name = errno.errorcode.get(e, str(e))
    hint = {
        errno.EPERM: "not permitted (missing CAP_BPF/CAP_PERFMON, or the kernel forbids this program type)",
        errno.EACCES: "refused by the verifier",
        errno.ENOENT: "no such hook in this kernel",
        errno.ESRCH: "no such hook in this kernel's BTF",
        errno.EINVAL: "invalid for this kernel (arguments or program type)",
        errno.EOPNOTSUPP: "not supported by this kernel",
        errno.ENOTSUP: "not supported by this kernel",
    }.get(e, "")
    return f"{name}{': ' + hint if hint else ''}"


def _probe_feature(
    path: str, feature: str, *, exhaustive: bool, avoid: frozenset[str] = frozenset()
) -> tuple[Probe, tuple[Hook, ...] | None]:
    chosen: tuple[Hook, ...] | None = None
    notes: list[str] = []
    for alt in FEATURES[feature]:
        if chosen is not None and not exhaustive:
            break
        if any(h.kind in avoid for h in alt):
            notes.append(f"{_describe(alt)}: avoided")
            continue
        err = _try_alternative(path, alt)
        if err is None:
            if chosen is None:
                chosen = alt
            else:
                notes.append(f"{_describe(alt)}: also works")
        else:
            notes.append(f"{_describe(alt)}: {err}")
    name = f"TCP health: {feature}"
    if chosen is None:
        return Probe(name, False, "no hook works: " + "; ".join(notes), REMEDY), None
    detail = f"uses {_describe(chosen)}"
    if notes:
        detail += " (" + "; ".join(notes) + ")"
    return Probe(name, True, detail), chosen


def probe_hooks(
    path: str | Path | None = None,
    *,
    features: Iterable[str] | None = None,
    exhaustive: bool = False,
    avoid: Iterable[str] = (),
) -> list[Probe]:
    """One Probe per feature: which hook TcpHealth would use, or why none works. Each alternative
    is really loaded and attached (in a throwaway object with 1-entry maps, detached and unloaded
    at once; ~10-40 ms each). exhaustive: also try the alternatives after the first that works.
    avoid: hook kinds never to use (HOOK_KINDS)."""
    obj = str(path or DEFAULT_OBJECT)
    av = _avoid(avoid)
    return [_probe_feature(obj, f, exhaustive=exhaustive, avoid=av)[0] for f in _features(features)]


def _avoid(kinds: Iterable[str]) -> frozenset[str]:
    out = frozenset(kinds)
    bad = sorted(out - set(HOOK_KINDS))
    if bad:
        raise ValueError(f"hook kind {bad[0]!r}: must be one of {', '.join(HOOK_KINDS)}")
    return out


def _features(features: Iterable[str] | None) -> list[str]:
    out = list(FEATURES) if features is None else list(features)
    for f in out:
        if f not in FEATURES:
            raise ValueError(f"TCP health feature {f!r}: must be one of {', '.join(FEATURES)}")
    return out


# ---- the loader --------------------------------------------------------------------------------


class bpf_prog_info_head(C.Structure):
    """struct bpf_prog_info (UAPI, append-only) up to recursion_misses (Linux >= 5.12): the kernel
    fills what the caller's length covers."""

    _u32, _u64 = C.c_uint32, C.c_uint64
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", C.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", C.c_char * 16),
        ("ifindex", _u32),
        ("gpl_compatible", _u32, 1),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
        ("recursion_misses", _u64),
    ]


assert C.sizeof(bpf_prog_info_head) == 216 and bpf_prog_info_head.recursion_misses.offset == 208


def _prog_info(fd: int) -> bpf_prog_info_head:
    """A loaded program's info (id, run statistics, recursion misses)."""
    info = bpf_prog_info_head()  # zeroed: no array is requested
    n = C.c_uint32(C.sizeof(info))
    lb.check(lb.lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "bpf_obj_get_info_by_fd")
    return info


class _State:
    """Everything close() needs, apart from TcpHealth so a finalizer can hold it."""

    def __init__(self) -> None:
        self.obj: int | None = None
        self.links: list[int] = []
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            L = lb.lib() if (self.links or self.obj is not None) else None
            for link in self.links:
                assert L is not None
                L.bpf_link__destroy(link)  # detaches; an fd close cannot fail in a way we could fix
            self.links = []
            if self.obj is not None:
                assert L is not None
                L.bpf_object__close(self.obj)
                self.obj = None


class TcpHealth(Loaded[_State]):
    """The loaded TCP health programs (see the module docstring).

    features: the features to enable (default all); a feature no alternative of which works is
    skipped (``probes`` says why), unless ``require`` lists it; EbpfError names the missing ones
    (also when no feature works at all: nothing would be loaded).
    max_entries: size of each of the two socket maps. netns_filter: namespace inodes to record
    (None: all). avoid: hook kinds never to use (HOOK_KINDS: "tp_btf", "raw_tp", "fentry"), for a
    node where one misbehaves; the next alternative is used."""

    what = "TCP health"

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        features: Iterable[str] | None = None,
        require: Iterable[str] = (),
        netns_filter: Iterable[int] | None = None,
        avoid: Iterable[str] = (),
    ) -> None:
        if not 1 <= max_entries <= (1 << 22):
            raise ValueError(f"max_entries {max_entries}: must be 1..4194304")
        wanted = _features(features)
        required = _features(require)
        av = _avoid(avoid)
        self.path = str(path or DEFAULT_OBJECT)
        self.max_entries = max_entries
        self.probes: list[Probe] = []
        self.hooks: dict[str, str] = {}  # feature -> the hook(s) in use
        chosen: dict[str, tuple[Hook, ...]] = {}
        for f in wanted:
            probe, alt = _probe_feature(self.path, f, exhaustive=False, avoid=av)
            self.probes.append(probe)
            if alt is not None:
                chosen[f] = alt
        missing = [f for f in required if f not in chosen] or ([] if chosen else wanted)
        if missing:
            why = "; ".join(f"{p.name}: {p.detail}" for p in self.probes if not p.ok)
            raise EbpfError(f"TCP health: {', '.join(missing)} unavailable ({why})")
        L = lb.lib()
        super().__init__(st := _State())
        try:
            st.obj = _open(self.path)
            progs = _select(st.obj, {h.program for alt in chosen.values() for h in alt})
            self._maps = SwapMaps.load(st.obj, LAYOUT, max_entries, coarse_now_ns, self.path)
            self._config_fd = map_fd(st.obj, "hl_config")
            self._allow_fd = map_fd(st.obj, "netns_allow")
            if netns_filter is not None:
                self.set_netns_filter(netns_filter)
            self._prog_ids: set[int] = set()
            self._feature_fds: dict[str, list[int]] = {}
            for f, alt in chosen.items():  # attach last: maps and filter are ready
                for h in alt:
                    st.links.append(_attach(progs[h.program], h))
                    fd = lb.check(L.bpf_program__fd(progs[h.program]), h.program)
                    self._feature_fds.setdefault(f, []).append(fd)
                    self._prog_ids.add(int(_prog_info(fd).id))
                self.hooks[f] = _describe(alt)
        except BaseException:
            self._finalizer()
            raise
        self._last_missed = dict.fromkeys(self.hooks, 0)

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Detach every program and unload. Idempotent."""
        super().close()

    @property
    def prog_ids(self) -> set[int]:
        """Kernel ids of the attached programs (gone from the kernel once closed)."""
        return set(self._prog_ids)

    # ---- configuration -----------------------------------------------------------------------
    def set_netns_filter(self, inodes: Iterable[int] | None) -> None:
        """Record only sockets of these network namespaces (inodes); None: every namespace."""
        st = self._need_open()
        L = lb.lib()
        new = None if inodes is None else set(inodes)
        for ino in new or ():
            if not 0 < ino < 1 << 32:
                raise ValueError(f"netns inode {ino}: out of range")
        if new is not None and len(new) > NETNS_FILTER_MAX:
            raise ValueError(f"netns filter: {len(new)} namespaces, at most {NETNS_FILTER_MAX}")
        with st.lock:
            zero = C.c_uint32(0)
            if new is None:  # off first: no event is refused while the list is emptied
                lb.check(L.bpf_map_update_elem(self._config_fd, C.byref(zero), C.byref(zero), 0), "config")
            key, nxt = C.c_uint32(0), C.c_uint32(0)
            old: list[int] = []
            first = True
            while L.bpf_map_get_next_key(self._allow_fd, None if first else C.byref(key), C.byref(nxt)) == 0:
                old.append(nxt.value)
                key.value, first = nxt.value, False
            one = C.c_uint8(1)
            for ino in sorted(new or ()):  # the new list in before the old one goes: no gap
                lb.check(
                    L.bpf_map_update_elem(self._allow_fd, C.byref(C.c_uint32(ino)), C.byref(one), 0),
                    "netns_allow update",
                )
            for ino in old:
                if new is None or ino not in new:
                    L.bpf_map_delete_elem(self._allow_fd, C.byref(C.c_uint32(ino)))
            if new is not None:
                on = C.c_uint32(CFG_NETNS_FILTER)
                lb.check(L.bpf_map_update_elem(self._config_fd, C.byref(zero), C.byref(on), 0), "config")

    # ---- reading -----------------------------------------------------------------------------
    def missed(self) -> dict[str, int]:
        """Per feature in use, since load: events the kernel did not run our program for because it
        was already running on that CPU (a tracepoint hit again from an interrupt while the
        program ran; the kernel's per-program recursion_misses). Lost events, never silent."""
        self._need_open()
        return {
            f: sum(int(_prog_info(fd).recursion_misses) for fd in fds) for f, fds in self._feature_fds.items()
        }

    def drain(self) -> HealthDrain:
        """Every socket with events since the previous drain (then forgotten), and the loss counters."""
        st = self._need_open()
        with st.lock:
            g = self._maps.take()
            sockets = parse_entries(g.keys, g.vals, g.n)
            missed = self.missed()
            d = HealthDrain(
                sockets=sockets,
                drops=g.drops,
                stats=g.stats,
                since_ns=g.since_ns,
                until_ns=g.until_ns,
                read_seconds=time.perf_counter() - g.started,
                missed={f: n - self._last_missed[f] for f, n in missed.items()},
            )
            self._last_missed = missed
            return d
