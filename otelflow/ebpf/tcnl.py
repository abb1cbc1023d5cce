"""The few rtnetlink operations the TC loader needs that libbpf does not offer.

- :func:`list_filters`: every tc filter on one clsact hook of an interface (RTM_GETTFILTER dump),
  so the loader can tell whether anyone else's filters are there (it removes a clsact qdisc it
  created only when no filter is left) and which filters run before its own.
- :func:`link_type`: the ARPHRD type of an interface (the programs parse Ethernet frames).
- :class:`NetnsFd` / :func:`in_netns`: run netlink work inside another network namespace: netlink
  sockets and interface indexes belong to the namespace of the thread that opens them.

Everything here works in the calling thread's current network namespace unless wrapped in
:func:`in_netns`. Constants are copied from the kernel UAPI headers (linux/rtnetlink.h,
linux/pkt_sched.h, linux/pkt_cls.h, linux/if_arp.h): they are ABI.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
RTM_NEWTFILTER = 44
RTM_GETTFILTER = 46
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300

TC_H_CLSACT = 0xFFFFFFF1
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3
PARENT = {
    "ingress": (TC_H_CLSACT & 0xFFFF0000) | TC_H_MIN_INGRESS,
    "egress": (TC_H_CLSACT & 0xFFFF0000) | TC_H_MIN_EGRESS,
}

TCA_KIND = 1
TCA_OPTIONS = 2
TCA_CHAIN = 11
TCA_BPF_NAME = 7
TCA_BPF_ID = 11

ARPHRD_ETHER = 1
SIOCGIFHWADDR = 0x8927
CLONE_NEWNET = 0x40000000

_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class TcFilter:
    """One filter on a clsact hook, as `tc filter show` lists it."""

    kind: str  # "bpf", "matchall", "u32", "flower", ...
    priority: int
    handle: int
    protocol: int  # ethertype in host order (0x0003 = ETH_P_ALL)
    chain: int
    prog_id: int = 0  # bpf filters: the program's id
    name: str = ""  # bpf filters: "<prog name>:[<id>]" as libbpf and tc name them


def _attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        alen, atype = _NLATTR.unpack_from(buf, off)
        if alen < 4 or off + alen > end:
            break
        out[atype & 0x3FFF] = buf[off + 4 : off + alen]
        off += (alen + 3) & ~3
    return out


def parse_filter_dump(data: bytes) -> tuple[list[TcFilter], bool]:
    """Parse RTM_NEWTFILTER messages of a dump reply; (filters, done). Raises OSError on an error
    reply. Filters are the entries that carry a handle: the kernel also sends one handle-0 message
    per (priority, protocol) group, which is a header, not a filter."""
    out: list[TcFilter] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        mlen, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if mlen < _NLMSGHDR.size or off + mlen > len(data):
            break
        body = off + _NLMSGHDR.size
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, body)
            if err:
                raise OSError(-err, f"RTM_GETTFILTER: {os.strerror(-err)}")
            return out, True
        if mtype == RTM_NEWTFILTER and mlen >= _NLMSGHDR.size + _TCMSG.size:
            _family, _ifindex, handle, _parent, info = _TCMSG.unpack_from(data, body)
            attrs = _attrs(data, body + _TCMSG.size, off + mlen)
            if handle:
                kind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode(errors="replace")
                chain = struct.unpack("=I", attrs[TCA_CHAIN])[0] if TCA_CHAIN in attrs else 0
                prog_id, name = 0, ""
                if kind == "bpf" and TCA_OPTIONS in attrs:
                    opts = attrs[TCA_OPTIONS]
                    o = _attrs(opts, 0, len(opts))
                    if TCA_BPF_ID in o:
                        prog_id = struct.unpack("=I", o[TCA_BPF_ID][:4])[0]
                    if TCA_BPF_NAME in o:
                        name = o[TCA_BPF_NAME].rstrip(b"\0").decode(errors="replace")
                out.append(
                    TcFilter(
                        kind=kind,
                        priority=info >> 16,
                        handle=handle,
                        protocol=socket.ntohs(info & 0xFFFF),
                        chain=chain,
                        prog_id=prog_id,
                        name=name,
                    )
                )
        off += (mlen + 3) & ~3
    return out, False


def list_filters(ifindex: int, hook: str) -> list[TcFilter]:
    """Every filter on the clsact `hook` ("ingress" or "egress") of ifindex, all chains.
    An interface without a clsact qdisc has none (the kernel answers EINVAL/ENOENT: empty list)."""
    parent = PARENT[hook]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.bind((0, 0))
        tcm = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(tcm), RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.send(msg + tcm)
        out: list[TcFilter] = []
        while True:
            data = s.recv(1 << 16)
            try:
                got, done = parse_filter_dump(data)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                    return []
                raise
            out += got
            if done:
                return out


def link_type(ifname: str) -> int:
    """ARPHRD_* type of an interface in the current namespace (1 = Ethernet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16s16x", ifname.encode()[:15])
        res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)
    return struct.unpack_from("=H", res, 16)[0]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns({what}): {os.strerror(e)}")


class NetnsFd:
    """An open network namespace (a /run/netns/NAME or /proc/PID/ns/net path), kept by fd so that
    later operations (detach at close) reach the same namespace. None: the caller's namespace."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path else None
        self.inode = os.stat(path or "/proc/thread-self/ns/net").st_ino

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def in_netns(ns: NetnsFd | None) -> Iterator[None]:
    """Run the block with the calling thread in namespace ns (no-op for None or the caller's own)."""
    if ns is None or ns.fd is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(own).st_ino == ns.inode:
            yield
            return
        _setns(ns.fd, ns.path or "netns")
        try:
            yield
        finally:
            _setns(own, "back to the caller's namespace")
    finally:
        os.close(own)
