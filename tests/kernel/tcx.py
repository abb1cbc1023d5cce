"""Kernel-tier helpers for the tcx attach backend: who is on an interface's tcx chain (BPF_PROG_QUERY:
Debian 12's bpftool 7.1 does not list tcx links), and a foreign tcx program standing in for a CNI's.

The foreign program is hand-assembled (a few instructions, no compiler): for every IPv4 packet
(skb->protocol == ETH_P_IP) it adds 1 and skb->len to its own one-slot ARRAY map, then returns its
verdict: TCX_NEXT (-1, pass to the rest of the chain) or TCX_DROP (2); every other packet (ARP,
IPv6) gets TCX_NEXT uncounted, so neighbour discovery keeps working under a dropping program. It is
attached like a CNI attaches (bpf_link_create, appended to the chain) and held by its link fd.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf import tcnl
from otelflow.ebpf.features import tcx_prog_ids

TCX_NEXT = -1
TCX_DROP = 2
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PSEUDO_MAP_FD = 1
ETH_HLEN = 14
_ETH_P_IP_BE = 0x0008  # htons(0x0800) as the u32 skb->protocol reads on a little-endian machine


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _counting_prog(map_fd: int, verdict: int) -> bytes:
    body = [
        _insn(0xBF, 6, 1),  # r6 = r1 (ctx)
        _insn(0x61, 2, 6, 16),  # r2 = skb->protocol
        _insn(0x55, 2, 0, 13, _ETH_P_IP_BE),  # if r2 != ETH_P_IP goto pass
        _insn(0x62, 10, 0, -4, 0),  # *(u32 *)(r10 - 4) = 0  (the key)
        _insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),  # r1 = map (ld_imm64: two slots)
        _insn(0x00),
        _insn(0xBF, 2, 10),  # r2 = r10
        _insn(0x07, 2, 0, 0, -4),  # r2 += -4
        _insn(0x85, 0, 0, 0, 1),  # call bpf_map_lookup_elem
        _insn(0x15, 0, 0, 4, 0),  # if r0 == 0 goto out
        _insn(0xB7, 1, 0, 0, 1),  # r1 = 1
        _insn(0xDB, 0, 1, 0, 0),  # lock *(u64 *)(r0 + 0) += r1   (packets)
        _insn(0x61, 1, 6, 0),  # r1 = skb->len
        _insn(0xDB, 0, 1, 8, 0),  # lock *(u64 *)(r0 + 8) += r1   (bytes)
        _insn(0xB7, 0, 0, 0, verdict),  # out: r0 = verdict
        _insn(0x95),  # exit
        _insn(0xB7, 0, 0, 0, TCX_NEXT),  # pass: r0 = TCX_NEXT
        _insn(0x95),  # exit
    ]
    return b"".join(body)


def _fn(name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
    return C.CFUNCTYPE(restype, *argtypes, use_errno=True)((name, lb.lib()))


@dataclass
class ForeignProg:
    """A loaded foreign counting program and its map; ``link_fd`` while it is attached."""

    prog_fd: int
    map_fd: int
    prog_id: int
    link_fd: int = -1

    def counts(self) -> tuple[int, int]:
        """(IPv4 packets, bytes of skb->len: L2 header included) it has seen."""
        val = (C.c_uint64 * 2)()
        lb.check(lb.lib().bpf_map_lookup_elem(self.map_fd, C.byref(C.c_uint32(0)), C.byref(val)), "lookup")
        return int(val[0]), int(val[1])

    def detach(self) -> None:
        if self.link_fd >= 0:
            os.close(self.link_fd)
            self.link_fd = -1

    def close(self) -> None:
        self.detach()
        for fd in (self.prog_fd, self.map_fd):
            os.close(fd)


@contextlib.contextmanager
def foreign_tcx(netns: str, dev: str, direction: str, verdict: int) -> Iterator[ForeignProg]:
    """A foreign program linked to ``dev``'s tcx hook in ``netns`` (appended to the chain, as a
    CNI's would be); detached and unloaded on exit."""
    map_create = _fn(
        "bpf_map_create", C.c_int, C.c_int, C.c_char_p, C.c_uint32, C.c_uint32, C.c_uint32, C.c_void_p
    )
    prog_load = _fn(
        "bpf_prog_load", C.c_int, C.c_int, C.c_char_p, C.c_char_p, C.c_char_p, C.c_size_t, C.c_void_p
    )
    map_fd = lb.check(map_create(BPF_MAP_TYPE_ARRAY, b"foreign_cnt", 4, 16, 1, None), "bpf_map_create")
    insns = _counting_prog(map_fd, verdict)
    prog_fd = prog_load(BPF_PROG_TYPE_SCHED_CLS, b"foreign_cni", b"GPL", insns, len(insns) // 8, None)
    if prog_fd < 0:
        os.close(map_fd)
        lb.check(prog_fd, "loading the foreign program")
    fp = ForeignProg(prog_fd, map_fd, lb.prog_id(prog_fd))
    try:
        ns = tcnl.NetnsFd(netns)
        try:
            with tcnl.in_netns(ns):
                ifindex = socket.if_nametoindex(dev)
                hook = lb.BPF_TCX_INGRESS if direction == "ingress" else lb.BPF_TCX_EGRESS
                fp.link_fd = lb.check(lb.lib().bpf_link_create(prog_fd, ifindex, hook, None), "link_create")
        finally:
            ns.close()
        yield fp
    finally:
        fp.close()


def tcx_chain(netns: str, dev: str, direction: str) -> list[int]:
    """Program ids on dev's tcx hook in netns, in the order they run."""
    ns = tcnl.NetnsFd(netns)
    try:
        with tcnl.in_netns(ns):
            return tcx_prog_ids(socket.if_nametoindex(dev), direction)
    finally:
        ns.close()


def prog_name(prog_id: int) -> str:
    """A program's name by id (bpf_prog_info.name, at byte 64); "" once it is gone."""
    fd = lb.lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = (C.c_uint8 * 80)()
        n = C.c_uint32(80)
        lb.check(lb.lib().bpf_obj_get_info_by_fd(fd, C.cast(info, C.c_void_p), C.byref(n)), "prog info")
        return bytes(info[64:80]).split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)


def tcx_left(netns: str, devs: list[str]) -> list[str]:
    """Every tcx program on the given interfaces of a namespace, as "dev hook: id name"."""
    out = []
    for dev in devs:
        for d in ("ingress", "egress"):
            out += [f"{dev} {d}: {i} {prog_name(i)}" for i in tcx_chain(netns, dev, d)]
    return out
