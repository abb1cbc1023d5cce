"""The Python side of TCP health agrees with bpf/health.bpf.c, without root or a kernel: struct
layouts against the compiled object's BTF, enum indexes and program sections against the source,
record parsing."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from otelflow.ebpf import health as hl
from tests.unit.test_ebpf_layout import _python_layout, _size

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "bpf" / "health.bpf.c"
OBJECT = ROOT / "otelflow" / "ebpf" / "health.bpf.o"

needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")


def _struct_layout(name: str) -> tuple[int, list[tuple[str, int, int]]]:
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(OBJECT)], capture_output=True, text=True, check=True
    ).stdout
    types: dict[int, tuple[str, str, dict[str, str], list[tuple[str, dict[str, str]]]]] = {}
    cur: list[tuple[str, dict[str, str]]] | None = None
    for line in out.splitlines():
        m = re.match(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$", line)
        if m:
            cur = []
            types[int(m.group(1))] = (
                m.group(2),
                m.group(3),
                dict(re.findall(r"(\w+)=(\S+)", m.group(4))),
                cur,
            )
            continue
        m = re.match(r"^\s+'([^']*)'(.*)$", line)
        if m and cur is not None:
            cur.append((m.group(1), dict(re.findall(r"(\w+)=(\S+)", m.group(2)))))
    [(_k, _n, attrs, members)] = [t for t in types.values() if t[0] == "STRUCT" and t[1] == name]
    fields = [(m, int(a["bits_offset"]) // 8, _size(types, int(a["type_id"]))) for m, a in members]
    return int(attrs["size"]), fields


KEY_NAMES = ["laddr", "raddr", "netns", "lport", "rport", "family", "pad"]
VAL_NAMES = [
    "retrans_segs",
    "retrans_failed",
    "resets_sent",
    "resets_received",
    "rtt_sum_us",
    "rtt_samples",
    "srtt_us",
    "rtt_min_us",
    "opened",
    "closed",
    "failed",
    "last_state",
    "last_seen_ns",
]


@needs_bpftool
def test_key_layout_matches_the_objects_btf() -> None:
    assert _struct_layout("hl_key") == _python_layout(hl.KEY, KEY_NAMES)


@needs_bpftool
def test_value_layout_matches_the_objects_btf() -> None:
    assert _struct_layout("hl_val") == _python_layout(hl.VAL, VAL_NAMES)
    # SocketHealth's fields: the key's (without pad), then the value's, in order
    assert list(hl.SocketHealth._fields) == [*KEY_NAMES[:-1], *VAL_NAMES]


def _c_enum(name: str, prefix: str) -> list[tuple[str, int]]:
    body = re.search(rf"enum {name} \{{(.*?)\}};", SOURCE.read_text(), re.S)
    assert body, name
    return [
        (k.removeprefix(prefix).lower(), int(v))
        for k, v in re.findall(rf"({prefix}\w+)\s*=\s*(\d+)", body.group(1))
    ]


@pytest.mark.parametrize(
    ("enum", "prefix", "names"),
    [("hl_drop", "HL_DROP_", hl.DROP_NAMES), ("hl_stat", "HL_STAT_", hl.STAT_NAMES)],
)
def test_drop_and_stat_indexes_match_the_source(enum: str, prefix: str, names: tuple[str, ...]) -> None:
    values = _c_enum(enum, prefix)
    assert values[-1] == ("max", len(names))
    assert values[:-1] == [(n, i) for i, n in enumerate(names)]


def test_event_kinds_follow_the_drop_order() -> None:
    # the program indexes drops by enum hl_ev: both enums must list the same kinds in one order
    body = re.search(r"enum hl_ev \{(.*?)\};", SOURCE.read_text(), re.S)
    assert body
    evs = [e.removeprefix("HL_EV_").lower() for e in re.findall(r"HL_EV_\w+", body.group(1))]
    expected = [
        "retrans",
        "retrans_failed",
        "reset_sent",
        "reset_received",
        "rtt",
        "opened",
        "closed",
        "failed",
    ]
    assert evs == expected and len(evs) == len(hl.DROP_NAMES)


def test_programs_and_sections_match_the_source() -> None:
    src = SOURCE.read_text()
    found = dict(
        (prog, sec) for sec, prog in re.findall(r'SEC\("([a-z_]+/[a-z_]+)"\)\nint BPF_PROG\((\w+),', src)
    )
    assert set(found) == set(hl.PROGRAMS)
    for alts in hl.FEATURES.values():
        for alt in alts:
            for h in alt:
                assert len(h.program) <= 15  # BPF_OBJ_NAME_LEN - 1
                assert h.section.split(" ")[0] == found[h.program]
    assert re.search(rf"#define HL_CFG_NETNS_FILTER {hl.CFG_NETNS_FILTER}\b", src)
    for m in hl.MAPS:
        assert re.search(rf"\}} {m} SEC\(\"\.maps\"\)", src) or re.search(rf"struct hl_map {m} SEC", src), m


def test_parse_entries_round_trip() -> None:
    v4 = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("10.244.1.2")
    v4b = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("203.0.113.10")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00:244:0:1::2")
    rows = [
        (
            (v4, v4b, 4026532384, 40000 + i, 443, 4),
            (i, 0, 1, 0, 20_000 * i, i, 20_000, 19_000, 1, 1, 0, 7, 99),
        )
        for i in range(100)
    ] + [((v6, v6, 1, 1, 2, 6), (0, 2, 0, 3, 0, 0, 0, 0, 0, 0, 1, 7, 5))]
    keys = b"".join(hl.KEY.pack(*k) for k, _ in rows)
    vals = b"".join(hl.VAL.pack(*v) for _, v in rows)
    got = hl.parse_entries(keys + bytes(480), vals + bytes(800), len(rows))
    assert [(tuple(g)[:6], tuple(g)[6:]) for g in got] == rows
    assert got[3].tuple4() == ("10.244.1.2", 40003, "203.0.113.10", 443)
    assert got[3].rtt_mean_us == 20_000.0 and got[0].rtt_mean_us == 0.0
    assert got[-1].local_ip == "fd00:244:0:1::2" and got[-1].family == 6
    assert hl.parse_entries(b"", b"", 0) == []


def test_unknown_feature_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="feature 'rtts': must be one of retransmits, rtt, resets, state"):
        hl.probe_hooks(features=["rtts"])


def test_a_missing_object_is_a_failed_probe_per_feature_not_an_exception(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bpf.o"
    probes = hl.probe_hooks(missing)
    assert [p.name for p in probes] == [f"TCP health: {f}" for f in hl.FEATURES]
    for p in probes:
        assert not p.ok and p.remedy
        assert p.detail.startswith("no hook works: ") and str(missing) in p.detail


def test_bad_hook_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="hook kind 'kprobe': must be one of tp_btf, raw_tp, fentry"):
        hl.probe_hooks(avoid=["kprobe"])


def test_prog_info_mirror_follows_the_uapi_struct() -> None:
    # struct bpf_prog_info as bpf/vmlinux.h declares it, up to recursion_misses (the loader reads
    # run statistics and recursion misses from it)
    text = (ROOT / "bpf" / "vmlinux.h").read_text()
    body = re.search(r"^struct bpf_prog_info \{\n(.*?)^\};", text, re.S | re.M)
    assert body
    decl = [re.match(r"\s*(.+?)\s+(\w+)(\[\d+\])?(: 1)?;", ln) for ln in body.group(1).splitlines()]
    ctype = {"__u32": "c_uint", "__u64": "c_ulong", "__u8": "c_ubyte", "char": "c_char"}
    c_fields = [(m.group(2), ctype[m.group(1)], m.group(3) or "") for m in decl if m]
    mirror = hl.bpf_prog_info_head._fields_
    assert [f[0] for f in c_fields[: len(mirror)]] == [f[0] for f in mirror]
    for (name, ct, arr), f in zip(c_fields, mirror, strict=False):
        t = f[1]
        if arr:
            assert t._length_ == int(arr[1:-1]) and t._type_.__name__ == ct, name
        else:
            assert t.__name__ == ct, name
    assert hl.bpf_prog_info_head.recursion_misses.offset == 208
