"""Load the TC flow counter (flow.bpf.o), attach it to interfaces, drain its flow map.

    with FlowCounter(max_entries=65536) as fc:      # open, size the maps, load
        fc.attach("vp0")                           # ingress + egress of one interface (tcx or tc)
        fc.cover("cbr0")                           # a bridge whose ports are all attached
        ...
        d = fc.drain()                             # per-flow counters since the previous drain
        for f in d.flows: print(f.src_ip, f.sport, f.dst_ip, f.dport, f.proto, f.packets, f.bytes)
        d.drops["map_full_packets"]                # packets not counted: the flow map was full

One FlowCounter counts one network namespace (a node): the flow key has no interface, and the
egress program recognises packets already counted at an ingress by the receiving interface's index,
which is only unique within a namespace. ``netns=`` names the namespace to attach in (a path such as
/run/netns/NAME); the counter keeps it open so that detaching at close reaches the same namespace.

Two attach backends, chosen per counter (``attach_mode``): "tcx" (Linux >= 6.6), "tc" (cls_bpf on
clsact) or "auto" (the default: tcx when a real tcx probe on lo works, see
features.probe_tcx_attach; else tc). ``attach_mode`` tells which one the counter uses.

tcx: one BPF link per hook (bpf_link_create(prog, ifindex, BPF_TCX_INGRESS/EGRESS); libbpf 1.1
predates bpf_program__attach_tcx, its generic bpf_link_create passes the flags on), placed
**first** in the interface's tcx chain (BPF_F_BEFORE with no relative program): tcx programs run
before every cls_bpf filter, so no CNI program, tcx or legacy, can redirect or drop a packet before
we count it (one attached later with BPF_F_BEFORE would go before ours: nothing can prevent that).
Our programs return TC_ACT_UNSPEC (TCX_NEXT): the rest of the chain, then the clsact filters, run
as if we were absent. No qdisc is created. A link detaches when its fd closes, and the kernel
closes every fd of a process that dies, so even SIGKILL leaves nothing attached (the links are
never pinned). detach()/close() close the link fds; a link whose device went away stays an empty
link until forget() closes its fd.

tc (cls_bpf): attaching never disturbs anyone else: clsact is created only when missing (and
remembered); our filters go in at one priority/handle (``priority``, ``handle``, default 1 and
0xf10) and never replace a foreign one (a foreign filter of another kind at our priority is an
error naming it; a foreign cls_bpf filter there shares the priority, and cls_bpf runs the newest
first, i.e. ours); our programs return TC_ACT_UNSPEC so the filters after ours still run; a filter
at a lower priority runs before ours and, if it ends classification, hides packets from us:
attach() reports those (``Hook.preceding`` and a warning); so do tcx programs, which all run
before cls_bpf and cannot be seen from here. Detaching removes only our filters (checked by
program id), and the clsact qdisc only if we created it and no filter is left.
A filter outlives its process, so close() runs on exceptions (context manager), at interpreter exit
and on garbage collection, and :func:`close_on_signals` extends that to SIGTERM/SIGINT/SIGHUP.
An agent killed with SIGKILL leaves its filters behind; the next attach at the same priority/handle
replaces a filter whose program is named ``otelflow_*`` (a stale one of ours) instead of failing.

Draining: the program counts into one of two hash maps, chosen through a one-slot ARRAY_OF_MAPS.
drain() points the slot at the other (empty) map; the kernel's map-in-map update waits for every
running program (synchronize_rcu), so the old map is then quiescent and is read and emptied with
bpf_map_lookup_and_delete_batch. No increment can land between the read and the delete (which a
lookup_and_delete_batch on a live map cannot promise: programs add through a pointer, outside the
bucket lock), so per-interval deltas add up exactly. (maps.py: the machinery, shared with the TCP
health loader.)
"""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
import functools
import gc
import logging
import os
import signal
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, Self, TypeVar

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf import tcnl
from otelflow.ebpf.maps import Layout, SwapMaps, map_fd

log = logging.getLogger(__name__)

DEFAULT_OBJECT = Path(__file__).with_name("flow.bpf.o")
DEFAULT_MAX_ENTRIES = 65536
DEFAULT_PRIORITY = 1  # run first: a filter before ours that ends classification hides packets
DEFAULT_HANDLE = 0x0F10  # "flo"
PROG_INGRESS = "otelflow_in"  # BPF object names are at most 15 characters
PROG_EGRESS = "otelflow_out"
ATTACH_MODES = ("auto", "tcx", "tc")  # source.ebpf.attach
_TCX = {"ingress": lb.BPF_TCX_INGRESS, "egress": lb.BPF_TCX_EGRESS}

# struct flow_key / struct flow_val of bpf/flow.bpf.c (tests check them against the object's BTF)
KEY = struct.Struct("=16s16sHHBB2x")  # saddr, daddr, sport, dport, family, proto, pad
VAL = struct.Struct("=QQQQII")  # packets, bytes, first_seen_ns, last_seen_ns, tcp_flags, ifindex
assert KEY.size == 40 and VAL.size == 40  # multiples of 8: parse_entries interleaves 8-byte words

# enum fl_drop / enum fl_stat of bpf/flow.bpf.c, in index order
DROP_NAMES = ("map_full_packets", "map_full_bytes", "other_packets", "other_bytes")
STAT_NAMES = (
    "not_ip",
    "l3_bad",
    "l4_truncated",
    "fragment",
    "v6_ext_limit",
    "egress_skipped",
    "no_map",
    "insert_race",
    "gso_packets",
    "gso_segs_derived",
)

CLOCK_MONOTONIC_COARSE = 6  # linux/time.h (the time module does not name it)

IFACE_INGRESS = 1  # FL_IFACE_INGRESS: our ingress program counts on this interface
IFACE_COVERED = 2  # FL_IFACE_COVERED: a bridge whose ports all count at ingress

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = (1 << i for i in range(8))
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"

# the drain maps (maps.py); flows_a: the object's static initialisation of flow_maps[0]
LAYOUT = Layout("flow", ("flows_a", "flows_b"), "flow_maps", KEY, VAL, DROP_NAMES, STAT_NAMES)


class FlowCount(NamedTuple):
    """One flow's counters for one drain interval (fields of flow_key then flow_val)."""

    saddr: bytes  # 16 bytes, IPv4 as ::ffff:a.b.c.d
    daddr: bytes
    sport: int
    dport: int
    family: int  # 4 | 6
    proto: int  # IPPROTO_*
    packets: int  # wire packets (GSO segments counted one by one)
    bytes: int  # wire L3 bytes (see bpf/flow.bpf.c)
    first_seen_ns: int  # CLOCK_MONOTONIC_COARSE ns, a tick's resolution (see mono_to_unix_ns)
    last_seen_ns: int
    tcp_flags: int  # OR of the TCP flags seen (TCP_* bits; bit 8 = AE/NS)
    ifindex: int  # interface where this entry's first packet was counted

    @property
    def src_ip(self) -> str:
        return ip_str(self.family, self.saddr)

    @property
    def dst_ip(self) -> str:
        return ip_str(self.family, self.daddr)

    def tuple5(self) -> tuple[str, str, int, int, int]:
        """(src ip, dst ip, sport, dport, proto) with addresses as strings."""
        return (self.src_ip, self.dst_ip, self.sport, self.dport, self.proto)


def ip_str(family: int, addr: bytes) -> str:
    """A 16-byte key address (IPv4 as ::ffff:a.b.c.d) as a string of its family (4 | 6)."""
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, addr[12:])
    return socket.inet_ntop(socket.AF_INET6, addr)


def pack_addr(ip: str) -> tuple[int, bytes]:
    """(family, 16-byte key address) for an address string, as the program stores it."""
    if ":" in ip:
        return 6, socket.inet_pton(socket.AF_INET6, ip)
    return 4, _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)


def pack_key(src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    """A flow_key as the program builds it (for tests, benchmarks and map seeding)."""
    fam, s = pack_addr(src)
    fam2, d = pack_addr(dst)
    if fam != fam2:
        raise ValueError("source and destination must be of one family")
    return KEY.pack(s, d, sport, dport, fam, proto)


def wire_bytes(l3_len: int, header_len: int, gso_segs: int = 1) -> tuple[int, int]:
    """(packets, bytes) on the wire for one skb of L3 length l3_len whose IP + transport headers
    take header_len bytes, split into gso_segs segments each carrying its own headers.
    The same arithmetic as the BPF program: bytes = l3_len + (segs - 1) * header_len."""
    segs = max(gso_segs, 1)
    return segs, l3_len + (segs - 1) * header_len


def gso_segments(l3_len: int, header_len: int, gso_size: int) -> int:
    """Segments of a GSO skb whose gso_segs is unknown (0): ceil(payload / gso_size)."""
    payload = l3_len - header_len
    if gso_size <= 0 or payload <= 0:
        return 1
    return -(-payload // gso_size)


RECORD = struct.Struct("=" + KEY.format.lstrip("=") + VAL.format.lstrip("="))  # a key then its value
_make_flow = functools.partial(tuple.__new__, FlowCount)


def parse_entries(keys: memoryview | bytes, values: memoryview | bytes, n: int) -> list[FlowCount]:
    """FlowCounts from n packed keys and n packed values (the two arrays a batch lookup fills).

    Fast path for 100k-entry maps: the two arrays are interleaved into key+value records with
    strided 8-byte copies (C speed), unpacked by one struct, and wrapped without Python-level calls
    per entry, with the cyclic GC paused (it would rescan the growing list again and again)."""
    if n == 0:
        return []
    kq = memoryview(keys).cast("B")[: n * KEY.size].cast("Q")
    vq = memoryview(values).cast("B")[: n * VAL.size].cast("Q")
    rec = bytearray(n * RECORD.size)
    rq = memoryview(rec).cast("Q")
    kw, vw = KEY.size // 8, VAL.size // 8
    for j in range(kw):
        rq[j :: kw + vw] = kq[j::kw]
    for j in range(vw):
        rq[kw + j :: kw + vw] = vq[j::vw]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return list(map(_make_flow, RECORD.iter_unpack(rec)))
    finally:
        if was_enabled:
            gc.enable()


def mono_to_unix_ns(mono_ns: int) -> int:
    """Convert a CLOCK_MONOTONIC(_COARSE) timestamp (the programs' clock) to Unix time in ns."""
    return mono_ns + (time.time_ns() - time.monotonic_ns())


def coarse_now_ns() -> int:
    """CLOCK_MONOTONIC_COARSE now: the clock the programs stamp packets with."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


@dataclass(slots=True)
class Drain:
    """What one drain read: every flow counted since the previous drain, and the loss counters."""

    flows: list[FlowCount]
    drops: dict[str, int]  # since the previous drain: DROP_NAMES
    stats: dict[str, int]  # since the previous drain: STAT_NAMES
    since_ns: int  # CLOCK_MONOTONIC_COARSE: this generation of the map became active
    until_ns: int  # CLOCK_MONOTONIC_COARSE: it was swapped out (no packet stamped later is in it)
    swap_seconds: float  # how long the swap waited for running programs
    read_seconds: float  # reading + deleting + parsing


@dataclass(slots=True)
class Hook:
    direction: str  # "ingress" | "egress"
    priority: int  # tc: the filter's priority; tcx: 0
    handle: int  # tc: the filter's handle; tcx: 0
    prog_id: int
    preceding: list[tcnl.TcFilter]  # tc: first filter of each lower priority: they run before ours
    backend: str = "tc"  # "tc" (cls_bpf filter) | "tcx" (link)
    link_fd: int = -1  # tcx: the link's fd (closing it detaches)


@dataclass(slots=True)
class Attachment:
    ifname: str
    ifindex: int
    created_clsact: bool  # we created the clsact qdisc (and may remove it); tcx: never
    hooks: dict[str, Hook] = field(default_factory=dict)
    covered: bool = False  # registered with cover(): no program attached
    backend: str = "tc"  # "tc" | "tcx"; covered interfaces: the counter's backend, unused


class _Closable(Protocol):
    def close(self) -> None: ...


class EbpfError(RuntimeError):
    """The flow counter cannot be set up or used; the message says what and why."""


S = TypeVar("S", bound=_Closable)


class Loaded(Generic[S]):
    """The lifecycle of a loaded BPF object (FlowCounter, health.TcpHealth): its kernel resources
    are in a state object that close() releases, also on exceptions (context manager), at
    interpreter exit and on garbage collection (a finalizer holds the state, not the object).
    Its drain maps (maps.py) are in ``_maps``."""

    what = "BPF object"  # the subject of "... is closed"
    _maps: SwapMaps

    def __init__(self, state: S) -> None:
        self._s = state
        self._finalizer = weakref.finalize(self, state.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release everything. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _need_open(self) -> S:
        if self.closed:
            raise EbpfError(f"{self.what} is closed")
        return self._s

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(drops, stats) since load, summed over CPUs."""
        self._need_open()
        return self._maps.counters()


class _State:
    """Everything close() needs, kept apart from FlowCounter so a finalizer can hold it."""

    def __init__(self) -> None:
        self.obj: int | None = None
        self.ns: tcnl.NetnsFd | None = None
        self.attachments: dict[int, Attachment] = {}
        self.prog_fds: dict[str, int] = {}
        self.prog_ids: set[int] = set()
        self.loaded_ids: dict[str, int] = {}  # program name -> id (tcx hooks report these)
        self.ifaces_fd = -1
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            errors: list[str] = []
            for ifindex in list(self.attachments):
                try:
                    _detach(self, ifindex)
                except Exception as e:  # keep going: detach everything we can
                    errors.append(f"ifindex {ifindex}: {e}")
            if self.obj is not None:
                lb.lib().bpf_object__close(self.obj)
                self.obj = None
            if self.ns is not None:
                self.ns.close()
                self.ns = None
            if errors:
                raise EbpfError("flow counter: could not detach everything: " + "; ".join(errors))


def _hook_struct(ifindex: int, point: int) -> lb.bpf_tc_hook:
    return lb.bpf_tc_hook(sz=C.sizeof(lb.bpf_tc_hook), ifindex=ifindex, attach_point=point)


_POINT = {"ingress": lb.BPF_TC_INGRESS, "egress": lb.BPF_TC_EGRESS}


def _query_prog_id(ifindex: int, direction: str, priority: int, handle: int) -> int:
    """Program id of the bpf filter at (priority, handle) on a hook; 0 when there is none."""
    L = lb.lib()
    h = _hook_struct(ifindex, _POINT[direction])
    o = lb.bpf_tc_opts(sz=C.sizeof(lb.bpf_tc_opts), handle=handle, priority=priority)
    r = L.bpf_tc_query(C.byref(h), C.byref(o))
    return o.prog_id if r == 0 else 0


def _close_links(att: Attachment) -> None:
    """Close the tcx link fds of an attachment (the kernel detaches each link as its fd closes)."""
    for direction, hk in list(att.hooks.items()):
        if hk.link_fd >= 0:
            os.close(hk.link_fd)
            hk.link_fd = -1
        del att.hooks[direction]


def _detach(st: _State, ifindex: int) -> None:
    """Remove our filters (tc) or links (tcx) from one interface, then our clsact if it is empty.
    Caller holds st.lock."""
    att = st.attachments[ifindex]
    L = lb.lib()
    if att.backend == "tcx":
        _close_links(att)
        if st.ifaces_fd >= 0:
            L.bpf_map_delete_elem(st.ifaces_fd, C.byref(C.c_uint32(ifindex)))
        del st.attachments[ifindex]
        return
    with tcnl.in_netns(st.ns):
        # remove a clsact we created only where we just removed our own filters (proof that the
        # ifindex still names the same interface), or when none were attached yet (a rollback)
        ours_found = not att.hooks
        for direction, hk in list(att.hooks.items()):
            pid = _query_prog_id(ifindex, direction, hk.priority, hk.handle)
            if pid == 0:  # gone already (interface deleted, or someone removed it)
                del att.hooks[direction]
                continue
            if pid not in st.prog_ids:
                log.warning(
                    "%s %s: the filter at priority %d handle %#x is not ours any more (prog %d): left alone",
                    att.ifname,
                    direction,
                    hk.priority,
                    hk.handle,
                    pid,
                )
                del att.hooks[direction]
                continue
            ours_found = True
            h = _hook_struct(ifindex, _POINT[direction])
            o = lb.bpf_tc_opts(sz=C.sizeof(lb.bpf_tc_opts), handle=hk.handle, priority=hk.priority)
            r = L.bpf_tc_detach(C.byref(h), C.byref(o))
            if r < 0 and r not in (-errno.ENOENT, -errno.ENODEV):
                lb.check(r, f"bpf_tc_detach({att.ifname} {direction})")
            del att.hooks[direction]
        if st.ifaces_fd >= 0:
            L.bpf_map_delete_elem(st.ifaces_fd, C.byref(C.c_uint32(ifindex)))
        if att.created_clsact and ours_found:
            others = tcnl.list_filters(ifindex, "ingress") + tcnl.list_filters(ifindex, "egress")
            if others:
                log.info(
                    "%s: keeping the clsact qdisc we created: %d other filter(s) on it",
                    att.ifname,
                    len(others),
                )
            else:
                h = _hook_struct(ifindex, lb.BPF_TC_INGRESS | lb.BPF_TC_EGRESS)
                r = L.bpf_tc_hook_destroy(C.byref(h))
                if r < 0 and r not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
                    lb.check(r, f"bpf_tc_hook_destroy({att.ifname})")
    del st.attachments[ifindex]


class FlowCounter(Loaded[_State]):
    """The loaded TC flow counter of one network namespace. See the module docstring."""

    what = "flow counter"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        netns: str | None = None,
        attach_mode: str = "auto",
    ) -> None:
        if not 1 <= max_entries <= (1 << 24):
            raise ValueError(f"max_entries {max_entries}: must be 1..16777216")
        if attach_mode not in ATTACH_MODES:
            raise ValueError(f"attach_mode {attach_mode!r}: must be one of {', '.join(ATTACH_MODES)}")
        L = lb.lib()
        self.path = str(path or DEFAULT_OBJECT)
        self.max_entries = max_entries
        super().__init__(st := _State())
        try:
            st.ns = tcnl.NetnsFd(netns)
            obj = L.bpf_object__open_file(self.path.encode(), None)
            st.obj = lb.check(obj, f"bpf_object__open_file({self.path})")
            self._maps = SwapMaps.load(st.obj, LAYOUT, max_entries, coarse_now_ns, self.path)
            st.ifaces_fd = map_fd(st.obj, "ifaces")
            for prog in (PROG_INGRESS, PROG_EGRESS):
                p = lb.check(L.bpf_object__find_program_by_name(st.obj, prog.encode()), f"program {prog}")
                st.prog_fds[prog] = lb.check(L.bpf_program__fd(p), f"bpf_program__fd({prog})")
                st.loaded_ids[prog] = lb.prog_id(st.prog_fds[prog])
            self.attach_mode, self.attach_reason = _choose_backend(attach_mode, netns)
        except BaseException:
            self._finalizer()
            raise

    # ---- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach everything (our links; or only our filters and our clsact if empty) and unload.
        Idempotent."""
        super().close()

    @property
    def attachments(self) -> dict[int, Attachment]:
        return dict(self._s.attachments)

    @property
    def prog_ids(self) -> set[int]:
        return set(self._s.prog_ids)

    # ---- attach ------------------------------------------------------------------------------------
    def _resolve(self, interface: str | int) -> tuple[int, str]:
        if isinstance(interface, int):
            return interface, socket.if_indextoname(interface)
        return socket.if_nametoindex(interface), interface

    def attach(
        self,
        interface: str | int,
        *,
        ingress: bool = True,
        egress: bool = True,
        priority: int = DEFAULT_PRIORITY,
        handle: int = DEFAULT_HANDLE,
    ) -> Attachment:
        """Attach to the ingress and/or egress hook of an Ethernet interface (name or index) in this
        counter's namespace, with this counter's backend (``attach_mode``: tcx links first in the
        chain, or cls_bpf filters at ``priority``/``handle``, which tcx ignores). Packets received
        on an interface whose ingress is attached are not counted again when they leave through
        another attached interface's egress."""
        st = self._need_open()
        if not (ingress or egress):
            raise ValueError("attach: choose ingress, egress or both")
        if not (1 <= priority <= 0xFFFF and 1 <= handle <= 0xFFFFFFFF):
            raise ValueError("attach: priority must be 1..65535 and handle non-zero")
        L = lb.lib()
        with st.lock, tcnl.in_netns(st.ns):
            try:
                ifindex, ifname = self._resolve(interface)
            except OSError as e:
                raise EbpfError(f"attach: no interface {interface!r} in this namespace ({e})") from None
            if ifindex in st.attachments:
                raise EbpfError(f"attach: {ifname} is already attached (detach it first)")
            kind = tcnl.link_type(ifname)
            if kind != tcnl.ARPHRD_ETHER:
                raise EbpfError(f"attach: {ifname} is not an Ethernet interface (ARPHRD {kind}): unsupported")
            if self.attach_mode == "tcx":
                att = Attachment(ifname, ifindex, created_clsact=False, backend="tcx")
            else:
                hook = _hook_struct(ifindex, lb.BPF_TC_INGRESS | lb.BPF_TC_EGRESS)
                r = L.bpf_tc_hook_create(C.byref(hook))
                if r < 0 and r != -errno.EEXIST:
                    lb.check(r, f"bpf_tc_hook_create({ifname}): creating the clsact qdisc")
                att = Attachment(ifname, ifindex, created_clsact=(r == 0))
            st.attachments[ifindex] = att
            try:
                for direction, wanted in (("ingress", ingress), ("egress", egress)):
                    if not wanted:
                        continue
                    if att.backend == "tcx":
                        att.hooks[direction] = self._attach_tcx(att, direction)
                    else:
                        att.hooks[direction] = self._attach_one(att, direction, priority, handle)
                if ingress:
                    flags = C.c_uint32(IFACE_INGRESS)
                    lb.check(
                        L.bpf_map_update_elem(st.ifaces_fd, C.byref(C.c_uint32(ifindex)), C.byref(flags), 0),
                        "ifaces update",
                    )
            except BaseException:
                with contextlib.suppress(Exception):
                    _detach(st, ifindex)
                st.attachments.pop(ifindex, None)
                raise
        return att

    def _attach_tcx(self, att: Attachment, direction: str) -> Hook:
        """A tcx link of our program on one hook, first in the chain. Caller is in the namespace."""
        st = self._s
        prog = PROG_INGRESS if direction == "ingress" else PROG_EGRESS
        o = lb.bpf_link_create_opts(sz=C.sizeof(lb.bpf_link_create_opts), flags=lb.BPF_F_BEFORE)
        r = lb.lib().bpf_link_create(st.prog_fds[prog], att.ifindex, _TCX[direction], C.byref(o))
        lb.check(r, f"bpf_link_create({att.ifname} tcx {direction}, first in chain)")
        pid = st.loaded_ids[prog]
        st.prog_ids.add(pid)
        return Hook(direction, 0, 0, pid, [], backend="tcx", link_fd=r)

    def _attach_one(self, att: Attachment, direction: str, priority: int, handle: int) -> Hook:
        st = self._s
        L = lb.lib()
        prog = PROG_INGRESS if direction == "ingress" else PROG_EGRESS
        h = _hook_struct(att.ifindex, _POINT[direction])
        o = lb.bpf_tc_opts(
            sz=C.sizeof(lb.bpf_tc_opts), prog_fd=st.prog_fds[prog], handle=handle, priority=priority
        )
        r = L.bpf_tc_attach(C.byref(h), C.byref(o))
        if r < 0:
            existing = [f for f in tcnl.list_filters(att.ifindex, direction) if f.priority == priority]
            stale = [
                f
                for f in existing
                if f.kind == "bpf" and f.handle == handle and f.name.startswith("otelflow_")
            ]
            if r == -errno.EEXIST and stale:
                log.warning(
                    "%s %s: replacing a stale otelflow filter (%s) at priority %d handle %#x",
                    att.ifname,
                    direction,
                    stale[0].name,
                    priority,
                    handle,
                )
                o.flags = lb.BPF_TC_F_REPLACE
                o.prog_id = 0
                r = L.bpf_tc_attach(C.byref(h), C.byref(o))
            elif existing:
                f = existing[0]
                raise EbpfError(
                    f"attach {att.ifname} {direction}: priority {priority} is taken by a {f.kind} filter "
                    f"(handle {f.handle:#x}{', ' + f.name if f.name else ''}): choose another priority; "
                    "otelflow never replaces a foreign filter"
                )
        lb.check(r, f"bpf_tc_attach({att.ifname} {direction} priority {priority} handle {handle:#x})")
        st.prog_ids.add(o.prog_id)
        preceding: list[tcnl.TcFilter] = []
        for f in tcnl.list_filters(att.ifindex, direction):  # one per priority (u32 lists its tables too)
            if f.priority < priority and all(p.priority != f.priority for p in preceding):
                preceding.append(f)
        for f in preceding:
            log.warning(
                "%s %s: %s filter at priority %d runs before otelflow's (priority %d): packets it "
                "accepts, redirects or drops are not counted here",
                att.ifname,
                direction,
                f.kind,
                f.priority,
                priority,
            )
        return Hook(direction, priority, handle, o.prog_id, preceding)

    def cover(self, interface: str | int) -> Attachment:
        """Declare an interface (typically the pod bridge) whose received packets were all counted
        at the ingress of attached interfaces (its ports): the egress program then skips packets
        that entered the stack through it. No program is attached to it."""
        st = self._need_open()
        L = lb.lib()
        with st.lock, tcnl.in_netns(st.ns):
            ifindex, ifname = self._resolve(interface)
            if ifindex in st.attachments:
                raise EbpfError(f"cover: {ifname} is already registered")
            att = Attachment(ifname, ifindex, created_clsact=False, covered=True, backend=self.attach_mode)
            flags = C.c_uint32(IFACE_COVERED)
            lb.check(
                L.bpf_map_update_elem(st.ifaces_fd, C.byref(C.c_uint32(ifindex)), C.byref(flags), 0),
                "ifaces update",
            )
            st.attachments[ifindex] = att
        return att

    def detach(self, interface: str | int) -> None:
        """Remove our links (tcx), or our filters and our empty clsact (tc), from one interface, or
        forget a covered one."""
        st = self._need_open()
        with st.lock:
            with tcnl.in_netns(st.ns):
                if isinstance(interface, int):
                    ifindex = interface
                else:
                    found = [i for i, a in st.attachments.items() if a.ifname == interface]
                    if not found:
                        raise EbpfError(f"detach: {interface} is not attached")
                    ifindex = found[0]
            if ifindex not in st.attachments:
                raise EbpfError(f"detach: ifindex {ifindex} is not attached")
            _detach(st, ifindex)

    def forget(self, ifindex: int) -> bool:
        """An interface is gone (its filters and qdisc went with it; the kernel detached our tcx
        links from it): drop it from our state and from the ifaces map, with no tc call (the index
        may already name a new device), closing its link fds. Returns whether it was known."""
        st = self._need_open()
        L = lb.lib()
        with st.lock:
            att = st.attachments.pop(ifindex, None)
            if att is None:
                return False
            _close_links(att)
            L.bpf_map_delete_elem(st.ifaces_fd, C.byref(C.c_uint32(ifindex)))
            return True

    # ---- reading -----------------------------------------------------------------------------------
    def drain(self) -> Drain:
        """Every flow counted since the previous drain (then forgotten), and the loss counters."""
        st = self._need_open()
        with st.lock:
            g = self._maps.take()
            return Drain(
                flows=parse_entries(g.keys, g.vals, g.n),
                drops=g.drops,
                stats=g.stats,
                since_ns=g.since_ns,
                until_ns=g.until_ns,
                swap_seconds=g.swap_seconds,
                read_seconds=time.perf_counter() - g.swapped,
            )

    # ---- benchmarks and tests ------------------------------------------------------------------------
    def test_run(
        self,
        frame: bytes,
        *,
        egress: bool = False,
        repeat: int = 1,
        ingress_ifindex: int = 0,
        gso_segs: int = 0,
        gso_size: int = 0,
    ) -> int:
        """Run the ingress (or egress) program `repeat` times on one Ethernet frame inside the
        kernel (BPF_PROG_TEST_RUN: no interface, no traffic), with the given skb fields; the skb's
        device is this namespace's loopback. Returns the program's return value (as unsigned)."""
        st = self._need_open()
        L = lb.lib()
        ctx = lb.sk_buff_ctx(ingress_ifindex=ingress_ifindex, gso_segs=gso_segs, gso_size=gso_size)
        data = C.create_string_buffer(frame, len(frame))
        opts = lb.bpf_test_run_opts(
            sz=C.sizeof(lb.bpf_test_run_opts),
            data_in=C.cast(data, C.c_void_p),
            data_size_in=len(frame),
            ctx_in=C.cast(C.pointer(ctx), C.c_void_p),
            ctx_size_in=C.sizeof(ctx),
            repeat=repeat,
        )
        prog = PROG_EGRESS if egress else PROG_INGRESS
        lb.check(L.bpf_prog_test_run_opts(st.prog_fds[prog], C.byref(opts)), f"test run of {prog}")
        return int(opts.retval)

    def fill(self, keys: bytes, values: bytes) -> int:
        """Insert flow entries into the active map with one bpf_map_update_batch (benchmarks)."""
        self._need_open()
        return self._maps.fill(keys, values)

    # bench/ebpf_overhead.py times the read without the parse, and a read of the live map, with these
    def _swap(self) -> int:
        return self._maps.swap()

    def _read_delete(self, fd: int) -> int:
        return self._maps.read_delete(fd)

    @property
    def _inner_fds(self) -> list[int]:
        return self._maps.inner_fds

    @property
    def _active(self) -> int:
        return self._maps.active

    @property
    def _keys(self) -> C.Array[C.c_char] | None:
        return self._maps.keys

    @property
    def _vals(self) -> C.Array[C.c_char] | None:
        return self._maps.vals


def _choose_backend(requested: str, netns: str | None) -> tuple[str, str]:
    """("tcx" | "tc", why) for an attach mode: "auto" is tcx when a real tcx attach on lo works
    (features.probe_tcx_attach), else tc; "tcx" forced where the probe fails is an EbpfError."""
    if requested == "tc":
        return "tc", "requested (source.ebpf.attach=tc)"
    from otelflow.ebpf.features import probe_tcx_attach

    p = probe_tcx_attach(netns)
    if requested == "tcx":
        if not p.ok:
            raise EbpfError(f"attach mode tcx: unavailable here ({p.detail})")
        return "tcx", "requested (source.ebpf.attach=tcx)"
    if p.ok:
        return "tcx", "auto: the kernel has tcx"
    return "tc", f"auto: no tcx ({p.detail})"


def close_on_signals(
    *objs: _Closable,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> Callable[[], None]:
    """Close objs (FlowCounters: detach their filters) when one of `signals` arrives, then let the
    signal do what it did before (the default action re-delivers it: the process ends with that
    signal). Call from the main thread. Returns a function that restores the previous handlers."""
    sigs = list(signals)
    previous: dict[int, Any] = {}

    def handler(signo: int, frame: Any) -> None:
        for o in objs:
            try:
                o.close()
            except Exception as e:  # the others still get their chance
                log.error("cleanup on signal %d: %s", signo, e)
        prev = previous.get(signo, signal.SIG_DFL)
        restore()
        if callable(prev):
            prev(signo, frame)
        elif prev == signal.SIG_DFL:
            signal.raise_signal(signo)

    def restore() -> None:
        for s, h in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, h)

    for s in sigs:
        previous[s] = signal.getsignal(s)
        signal.signal(s, handler)
    return restore
