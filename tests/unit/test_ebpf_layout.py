"""The Python side of the eBPF flow counter agrees with the C side, without root or a kernel:
struct layouts against the compiled object's BTF, enum indexes against the source, the byte
arithmetic, entry parsing and the tc filter dump parser."""

from __future__ import annotations

import ctypes
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf import loader as ld
from otelflow.ebpf import tcnl

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "bpf" / "flow.bpf.c"
OBJECT = ROOT / "otelflow" / "ebpf" / "flow.bpf.o"


# ---- BTF of the shipped object ---------------------------------------------------------------------
def _btf_types() -> dict[int, tuple[str, str, dict[str, str], list[tuple[str, dict[str, str]]]]]:
    """bpftool's raw BTF dump: id -> (kind, name, attributes, members)."""
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(OBJECT)], capture_output=True, text=True, check=True
    ).stdout
    types: dict[int, tuple[str, str, dict[str, str], list[tuple[str, dict[str, str]]]]] = {}
    cur: list[tuple[str, dict[str, str]]] | None = None
    for line in out.splitlines():
        m = re.match(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$", line)
        if m:
            attrs = dict(re.findall(r"(\w+)=(\S+)", m.group(4)))
            cur = []
            types[int(m.group(1))] = (m.group(2), m.group(3), attrs, cur)
            continue
        m = re.match(r"^\s+'([^']*)'(.*)$", line)
        if m and cur is not None:
            cur.append((m.group(1), dict(re.findall(r"(\w+)=(\S+)", m.group(2)))))
    return types


def _size(types: dict, tid: int) -> int:
    kind, _name, attrs, _ = types[tid]
    if kind in ("INT", "STRUCT", "UNION", "ENUM"):
        return int(attrs["size"])
    if kind in ("TYPEDEF", "CONST", "VOLATILE"):
        return _size(types, int(attrs["type_id"]))
    if kind == "ARRAY":
        return int(attrs["nr_elems"]) * _size(types, int(attrs["type_id"]))
    raise AssertionError(f"unexpected BTF kind {kind}")


def _struct_layout(name: str) -> tuple[int, list[tuple[str, int, int]]]:
    types = _btf_types()
    [(_kind, _n, attrs, members)] = [t for t in types.values() if t[0] == "STRUCT" and t[1] == name]
    fields = [(m, int(a["bits_offset"]) // 8, _size(types, int(a["type_id"]))) for m, a in members]
    return int(attrs["size"]), fields


def _python_layout(s: struct.Struct, names: list[str]) -> tuple[int, list[tuple[str, int, int]]]:
    """(size, [(name, offset, size)]) of a '='-packed struct format, pad bytes named by the caller."""
    out, off = [], 0
    codes = re.findall(r"(\d*)([a-zA-Z])", s.format.lstrip("="))
    it = iter(names)
    for count, code in codes:
        n = int(count or 1)
        size = n if code in "sx" else struct.calcsize("=" + code) * n
        out.append((next(it), off, size))
        off += size
    return s.size, out


needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")


@needs_bpftool
def test_key_layout_matches_the_objects_btf() -> None:
    names = ["saddr", "daddr", "sport", "dport", "family", "proto", "pad"]
    assert _struct_layout("flow_key") == _python_layout(ld.KEY, names)


@needs_bpftool
def test_value_layout_matches_the_objects_btf() -> None:
    names = ["packets", "bytes", "first_seen_ns", "last_seen_ns", "tcp_flags", "ifindex"]
    assert _struct_layout("flow_val") == _python_layout(ld.VAL, names)
    # FlowCount's fields are the key's (without pad) then the value's, in order
    assert list(ld.FlowCount._fields) == ["saddr", "daddr", "sport", "dport", "family", "proto", *names]


def _c_enum(name: str) -> list[tuple[str, int]]:
    src = SOURCE.read_text()
    body = re.search(rf"enum {name} \{{(.*?)\}};", src, re.S)
    assert body, name
    return [(k, int(v)) for k, v in re.findall(r"(FL_\w+)\s*=\s*(\d+)", body.group(1))]


def _py_name(c_name: str, prefix: str) -> str:
    """FL_DROP_FULL_PKTS -> map_full_packets, FL_STAT_L4_TRUNC -> l4_truncated, ..."""
    n = c_name.removeprefix(prefix).lower()
    n = re.sub(r"\bpkts\b|(?<=_)pkts$", "packets", n).replace("trunc", "truncated")
    return "map_" + n if n.startswith("full_") else n


@pytest.mark.parametrize(
    ("enum", "prefix", "names"),
    [("fl_drop", "FL_DROP_", ld.DROP_NAMES), ("fl_stat", "FL_STAT_", ld.STAT_NAMES)],
)
def test_drop_and_stat_indexes_match_the_source(enum: str, prefix: str, names: tuple[str, ...]) -> None:
    values = _c_enum(enum)
    assert values[-1] == (prefix + "MAX", len(names))
    assert [v for _, v in values[:-1]] == list(range(len(names)))
    assert [_py_name(k, prefix) for k, _ in values[:-1]] == list(names)
    assert ld.DROP_NAMES[0] == "map_full_packets"  # drops index 0: map full


def test_iface_flags_and_program_names_match_the_source() -> None:
    src = SOURCE.read_text()
    assert re.search(rf"#define FL_IFACE_INGRESS {ld.IFACE_INGRESS}\b", src)
    assert re.search(rf"#define FL_IFACE_COVERED {ld.IFACE_COVERED}\b", src)
    for prog in (ld.PROG_INGRESS, ld.PROG_EGRESS):
        assert len(prog) <= 15  # BPF_OBJ_NAME_LEN - 1: longer names are truncated by the kernel
        assert re.search(rf"int {prog}\(struct __sk_buff \*skb\)", src)


@needs_bpftool
def test_test_run_context_matches_the_kernels_sk_buff() -> None:
    # the object's BTF carries struct __sk_buff (from vmlinux.h); the anonymous unions hold
    # flow_keys and sk, which the ctypes mirror names directly
    size, fields = _struct_layout("__sk_buff")
    assert size == ctypes.sizeof(lb.sk_buff_ctx)
    names = iter(["flow_keys", "sk"])
    got = [(next(names) if n == "(anon)" else n, off, sz) for n, off, sz in fields]
    mirror = [
        (n, getattr(lb.sk_buff_ctx, n).offset, getattr(lb.sk_buff_ctx, n).size)
        for n, _ in lb.sk_buff_ctx._fields_
    ]
    assert got == mirror


def test_libbpf_option_struct_sizes() -> None:
    assert ctypes.sizeof(lb.bpf_tc_hook) == 24
    assert ctypes.sizeof(lb.bpf_tc_opts) == 32
    assert ctypes.sizeof(lb.bpf_map_batch_opts) == 24
    assert ctypes.sizeof(lb.bpf_test_run_opts) == 80
    assert lb.bpf_tc_opts.priority.offset == 24 and lb.bpf_tc_hook.parent.offset == 16


# ---- the byte definition ----------------------------------------------------------------------------
def test_wire_bytes_plain_packet_is_its_l3_length() -> None:
    assert ld.wire_bytes(1500, 52) == (1, 1500)
    assert ld.wire_bytes(1500, 52, 0) == (1, 1500)  # gso_segs 0 on a non-GSO skb


def test_wire_bytes_gso_udp_equals_the_sum_of_its_datagrams() -> None:
    # 10 UDP segments of 1200 payload bytes: one skb of 20 + 8 + 12000 at the hook
    segs, nbytes = ld.wire_bytes(20 + 8 + 12_000, 28, 10)
    assert (segs, nbytes) == (10, 10 * (1200 + 28))
    segs6, nbytes6 = ld.wire_bytes(40 + 8 + 12_000, 48, 10)
    assert (segs6, nbytes6) == (10, 10 * (1200 + 48))


def test_wire_bytes_tso_with_a_short_last_segment() -> None:
    # TCP, timestamps: 52-byte headers, MSS 1448, 64000 payload bytes -> 44 full + one of 288
    payload, hdr, mss = 64_000, 52, 1448
    segs = -(-payload // mss)
    assert ld.gso_segments(payload + hdr, hdr, mss) == segs == 45
    wire = sum(min(mss, payload - i * mss) + hdr for i in range(segs))
    assert ld.wire_bytes(payload + hdr, hdr, segs) == (segs, wire)


def test_gso_segments_degenerate_inputs() -> None:
    assert ld.gso_segments(100, 100, 1448) == 1
    assert ld.gso_segments(2000, 52, 0) == 1


# ---- keys and parsing -------------------------------------------------------------------------------
def test_pack_key_v4_mapped_and_v6() -> None:
    k = ld.pack_key("10.244.1.2", "203.0.113.10", 40000, 443, 6)
    saddr, _daddr, sport, dport, fam, proto = ld.KEY.unpack(k)
    assert saddr == bytes(10) + b"\xff\xff" + socket.inet_aton("10.244.1.2")
    assert (sport, dport, fam, proto) == (40000, 443, 4, 6)
    k6 = ld.pack_key("fd00:244:0:1::2", "2001:db8:113::10", 1, 2, 17)
    assert ld.KEY.unpack(k6)[4] == 6
    with pytest.raises(ValueError):
        ld.pack_key("10.0.0.1", "::1", 1, 2, 6)


def test_parse_entries_round_trip() -> None:
    flows = [
        ("10.244.1.2", "10.244.2.3", 20001 + i, 8080, 6, 10 + i, 15_000 + i, 5, 9, ld.TCP_SYN | ld.TCP_ACK, 4)
        for i in range(1000)
    ] + [("fd00:244:0:1::2", "2001:db8:113::10", 0, 0, 58, 1, 104, 1, 1, 0, 7)]
    keys = b"".join(ld.pack_key(*f[:5]) for f in flows)
    vals = b"".join(ld.VAL.pack(*f[5:]) for f in flows)
    got = ld.parse_entries(keys, vals, len(flows))
    assert [
        (g.tuple5(), g.packets, g.bytes, g.first_seen_ns, g.last_seen_ns, g.tcp_flags, g.ifindex) for g in got
    ] == [(f[:5], *f[5:]) for f in flows]
    assert got[0].family == 4 and got[-1].family == 6
    assert isinstance(got[0], ld.FlowCount)
    assert ld.parse_entries(b"", b"", 0) == []
    # only the first n entries of larger buffers are read
    assert len(ld.parse_entries(keys + bytes(400), vals + bytes(400), len(flows))) == len(flows)


def test_mono_to_unix_is_close_to_now() -> None:
    import time

    assert abs(ld.mono_to_unix_ns(time.monotonic_ns()) - time.time_ns()) < 50_000_000


# ---- tc filter dump parsing -------------------------------------------------------------------------
def _nlattr(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((4 - n % 4) % 4)


def _filter_msg(handle: int, prio: int, kind: str, opts: bytes = b"") -> bytes:
    tcm = struct.pack("=BxxxiIII", 0, 7, handle, tcnl.PARENT["ingress"], (prio << 16) | socket.htons(3))
    body = tcm + _nlattr(tcnl.TCA_KIND, kind.encode() + b"\0") + _nlattr(tcnl.TCA_CHAIN, struct.pack("=I", 0))
    if opts:
        body += _nlattr(tcnl.TCA_OPTIONS | 0x8000, opts)
    return struct.pack("=IHHII", 16 + len(body), tcnl.RTM_NEWTFILTER, 2, 1, 0) + body


def test_parse_filter_dump() -> None:
    bpf_opts = _nlattr(tcnl.TCA_BPF_ID, struct.pack("=I", 42)) + _nlattr(
        tcnl.TCA_BPF_NAME, b"otelflow_in:[42]\0"
    )
    data = (
        _filter_msg(0, 1, "matchall")  # the per-priority header message: not a filter
        + _filter_msg(1, 1, "matchall")
        + _filter_msg(0x0F10, 2, "bpf", bpf_opts)
        + struct.pack("=IHHII", 20, tcnl.NLMSG_DONE, 2, 1, 0)
        + b"\0\0\0\0"
    )
    filters, done = tcnl.parse_filter_dump(data)
    assert done
    assert filters == [
        tcnl.TcFilter("matchall", 1, 1, 3, 0),
        tcnl.TcFilter("bpf", 2, 0x0F10, 3, 0, 42, "otelflow_in:[42]"),
    ]


def test_parse_filter_dump_error_reply() -> None:
    err = struct.pack("=IHHII", 36, tcnl.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -22) + bytes(16)
    with pytest.raises(OSError) as e:
        tcnl.parse_filter_dump(err)
    assert e.value.errno == 22
