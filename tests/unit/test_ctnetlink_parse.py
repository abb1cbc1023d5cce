"""Unit tests for otelflow.conntrack.netlink: parsing, request bytes, socket logic (fake sockets)."""

from __future__ import annotations

import errno
import random
import socket
import struct
from typing import Any

import pytest

from otelflow.conntrack import netlink as nl
from otelflow.conntrack.netlink import CtEntry, CtNetlinkError, CtTuple, ParseStats, parse_messages
from tests.unit.ctnl_encode import (
    be32,
    ct_type,
    done,
    encode_entry,
    encode_tuple,
    error,
    nest,
    nfgen,
    nla,
    nlmsg,
    sample_entries,
    v4,
)


def parse_all(buf: bytes) -> tuple[list[tuple[int, CtEntry]], ParseStats]:
    st = ParseStats()
    return parse_messages(buf, st), st


def parse_both_paths(buf: bytes) -> list[tuple[int, CtEntry]]:
    """Parse with the slow walk, then twice with the fast path (learn, then use); all must agree."""
    slow_st, fast_st1, fast_st2 = ParseStats(), ParseStats(), ParseStats()
    slow = parse_messages(buf, slow_st, fast_path=False)
    cache = nl.LayoutCache()
    fast1 = parse_messages(buf, fast_st1, cache=cache)  # learns
    fast2 = parse_messages(buf, fast_st2, cache=cache)  # uses what it learned
    assert slow == fast1 == fast2
    assert slow_st == fast_st1 == fast_st2
    return slow


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", sample_entries(), ids=lambda e: f"{e.family}-{e.orig.proto}-{e.id}")
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bo": True},
        {"nested_flag": False},
        {"extras": True},
        {"always_mark": False},
    ],
    ids=["kernel", "byteorder-flag", "no-nested-flag", "extras", "no-mark"],
)
def test_round_trip_every_field(entry: CtEntry, options: dict[str, bool]) -> None:
    buf = encode_entry(entry, **options) + done()
    out = parse_both_paths(buf)
    assert out == [(nl.IPCTNL_MSG_CT_NEW, entry)]


def test_field_details_of_dnat_tcp_entry() -> None:
    e = sample_entries()[0]
    [(mtype, got)] = parse_both_paths(encode_entry(e))
    assert mtype == nl.IPCTNL_MSG_CT_NEW
    assert got.family == socket.AF_INET
    assert got.orig.src_str == "10.244.1.5" and got.orig.dst_str == "10.96.0.10"
    assert str(got.reply.src_ip) == "10.244.2.7"
    assert (got.orig.sport, got.orig.dport, got.reply.sport, got.reply.dport) == (43512, 80, 8080, 43512)
    assert got.orig.icmp_id is None
    assert got.dnat and not got.snat and got.assured and got.confirmed
    assert got.tcp_state == 3 and got.tcp_state_name == "ESTABLISHED"
    assert (got.orig_packets, got.orig_bytes, got.reply_packets, got.reply_bytes) == (12, 1732, 10, 98123)
    assert (got.id, got.mark, got.zone, got.timeout, got.use) == (0xDEADBEEF, 0x4000, 0, 431999, 1)
    assert got.start is None and got.stop is None


def test_udp_without_counters_and_snat() -> None:
    [(_, got)] = parse_both_paths(encode_entry(sample_entries()[1]))
    assert got.orig_packets is None and got.orig_bytes is None
    assert got.reply_packets is None and got.reply_bytes is None
    assert got.snat and not got.dnat and not got.assured
    assert got.tcp_state is None and got.tcp_state_name is None


def test_ipv6_zone_timestamp_and_big_counters() -> None:
    [(_, got)] = parse_both_paths(encode_entry(sample_entries()[2]))
    assert got.family == socket.AF_INET6 and got.orig.family == socket.AF_INET6
    assert got.orig.src_str == "fd00:250::1" and len(got.orig.src) == 16
    assert got.zone == 7 and got.tcp_state_name == "TIME_WAIT"
    assert got.orig_packets == 2**33 + 5 and got.orig_bytes == 2**40 + 3
    assert got.start == 1_700_000_000_123_456_789 and got.stop is None


def test_icmp_fields() -> None:
    icmp4, icmp6 = sample_entries()[4], sample_entries()[5]
    [(_, g4)] = parse_both_paths(encode_entry(icmp4))
    assert (g4.orig.icmp_id, g4.orig.icmp_type, g4.orig.icmp_code) == (0x1234, 8, 0)
    assert (g4.reply.icmp_type, g4.orig.sport, g4.orig.dport) == (0, 0, 0)
    [(mtype, g6)] = parse_both_paths(encode_entry(icmp6, msg=nl.IPCTNL_MSG_CT_DELETE, flags=0))
    assert mtype == nl.IPCTNL_MSG_CT_DELETE
    assert (g6.orig.icmp_id, g6.orig.icmp_type, g6.reply.icmp_type) == (77, 128, 129)
    assert g6.timeout is None and g6.use is None and g6.stop == 1_700_000_030_000_000_000


def test_attribute_order_does_not_matter() -> None:
    rnd = random.Random(5)
    for e in sample_entries():
        for _ in range(5):
            assert parse_both_paths(encode_entry(e, shuffle=rnd, extras=True)) == [(0, e)]


# --- message-level handling ------------------------------------------------------------------------


def test_multi_message_buffer_stops_at_done() -> None:
    entries = sample_entries()
    buf = b"".join(encode_entry(e, seq=9) for e in entries) + done(seq=9) + encode_entry(entries[0])
    out, st = parse_all(buf)
    assert [e for _, e in out] == entries  # the message after DONE is not read
    assert st.entries == len(entries) and st.messages == len(entries) + 1 and st.malformed == 0


def test_done_without_payload_and_no_done() -> None:
    e = sample_entries()[0]
    out, st = parse_all(encode_entry(e) + nlmsg(nl.NLMSG_DONE, nl.NLM_F_MULTI, b""))
    assert out == [(0, e)] and st.malformed == 0
    out, st = parse_all(encode_entry(e))  # a middle part of a dump
    assert out == [(0, e)]


def test_long_runs_of_one_shape_with_interruptions() -> None:
    """The bulk template check must find exactly where a run of identical layouts breaks."""
    base = sample_entries()[0]
    other = sample_entries()[1]
    seq: list[CtEntry] = []
    for i in range(300):
        e = CtEntry(
            base.family,
            CtTuple(base.orig.src, base.orig.dst, 6, 1000 + i, 80),
            CtTuple(base.reply.src, base.reply.dst, 6, 80, 1000 + i),
            id=i,
            status=base.status,
            timeout=i * 3,
            tcp_state=i % 10,
            orig_packets=i,
            orig_bytes=i * 100,
            reply_packets=i * 2,
            reply_bytes=i * 200,
            mark=i,
            use=1,
        )
        seq.append(other if i in (37, 38, 100, 101, 102, 229) else e)
    buf = b"".join(encode_entry(e) for e in seq) + done()
    assert [e for _, e in parse_both_paths(buf)] == seq


def test_error_reply_raises() -> None:
    with pytest.raises(CtNetlinkError) as ei:
        parse_all(error(-errno.EPERM))
    assert ei.value.errno == errno.EPERM
    assert isinstance(ei.value, OSError)


def test_error_after_entries_raises_and_ack_is_skipped() -> None:
    e = sample_entries()[0]
    out, st = parse_all(error(0) + encode_entry(e))
    assert out == [(0, e)] and st.skipped == 1
    with pytest.raises(CtNetlinkError) as ei:
        parse_all(encode_entry(e) + error(-errno.ENOBUFS))
    assert ei.value.errno == errno.ENOBUFS


def test_done_with_negative_status_raises() -> None:
    with pytest.raises(CtNetlinkError) as ei:
        parse_all(done(status=-errno.EINTR))
    assert ei.value.errno == errno.EINTR


def test_extreme_error_codes_do_not_break_the_exception() -> None:
    with pytest.raises(CtNetlinkError) as ei:
        parse_all(error(-(2**31)))
    assert ei.value.errno == 2**31


def test_positive_error_code_and_short_error_are_malformed() -> None:
    _, st = parse_all(error(5))
    assert st.malformed == 1
    _, st = parse_all(nlmsg(nl.NLMSG_ERROR, 0, b"\x01\x02"))
    assert st.malformed == 1


def test_overrun_noop_and_other_subsystems_are_skipped() -> None:
    e = sample_entries()[3]
    buf = (
        nlmsg(nl.NLMSG_OVERRUN, 0, b"")
        + nlmsg(nl.NLMSG_NOOP, 0, b"")
        + nlmsg((2 << 8) | 0, 0, nfgen(2) + nla(1, b"x"))  # CTNETLINK_EXP message
        + nlmsg(ct_type(nl.IPCTNL_MSG_CT_GET), 0, nfgen(2))
        + encode_entry(e)
    )
    out, st = parse_all(buf)
    assert out == [(0, e)]
    assert st.overruns == 1 and st.skipped == 3 and st.malformed == 0


def test_dump_interrupted_flag_is_counted() -> None:
    e = sample_entries()[0]
    buf = b"".join(encode_entry(e, flags=nl.NLM_F_MULTI | nl.NLM_F_DUMP_INTR) for _ in range(5))
    parse_both_paths(buf)
    _, st = parse_all(buf)
    assert st.dump_interrupted == 5 and st.entries == 5


# --- malformed input -------------------------------------------------------------------------------


def _ct(payload_attrs: bytes, family: int = socket.AF_INET) -> bytes:
    return nlmsg(ct_type(0), 2, nfgen(family) + payload_attrs)


def _good_tuples() -> bytes:
    e = sample_entries()[0]
    return nest(nl.CTA_TUPLE_ORIG, encode_tuple(e.orig, 2)) + nest(
        nl.CTA_TUPLE_REPLY, encode_tuple(e.reply, 2)
    )


def test_missing_tuple_drops_message() -> None:
    out, st = parse_all(_ct(be32(nl.CTA_STATUS, 8) + be32(nl.CTA_ID, 1)))
    assert out == [] and st.malformed == 1 and st.messages == 1


def test_wrong_payload_size_is_skipped_and_counted() -> None:
    buf = _ct(_good_tuples() + nla(nl.CTA_STATUS, b"\0\0\0\x08\0") + be32(nl.CTA_ID, 3))
    [(_, e)], st = parse_all(buf)
    assert e.status == 0 and e.id == 3 and st.malformed == 1


def test_attribute_shorter_than_header_stops_level() -> None:
    buf = _ct(_good_tuples() + be32(nl.CTA_ID, 3) + struct.pack("=HH", 2, nl.CTA_MARK) + be32(nl.CTA_USE, 1))
    [(_, e)], st = parse_all(buf)
    assert e.id == 3 and e.use is None and st.malformed == 1


def test_attribute_longer_than_container() -> None:
    inner = struct.pack("=HH", 200, nl.CTA_IP_V4_SRC) + v4("1.2.3.4")
    buf = _ct(nest(nl.CTA_TUPLE_ORIG, [nest(nl.CTA_TUPLE_IP, [inner])]))
    out, st = parse_all(buf)
    assert out == [] and st.malformed == 2  # the bad attribute + the missing tuples


def test_unknown_family_is_malformed() -> None:
    out, st = parse_all(_ct(_good_tuples(), family=7))
    assert out == [] and st.malformed == 1


def test_v6_addresses_in_v4_message_are_rejected() -> None:
    e = sample_entries()[2]  # v6 entry
    raw = bytearray(encode_entry(e))
    raw[16] = socket.AF_INET
    out, st = parse_all(bytes(raw))
    assert out == [] and st.malformed >= 1


def test_truncated_message_and_bad_lengths() -> None:
    good = encode_entry(sample_entries()[0])
    out, st = parse_all(good + good[:-10])
    assert len(out) == 1 and st.malformed == 1
    out, st = parse_all(struct.pack("=IHHII", 8, 0x100, 0, 0, 0) + good)
    assert out == [] and st.malformed == 1  # nlmsg_len < 16: nothing after it can be found
    out, st = parse_all(good + b"\x01\x02\x03")
    assert len(out) == 1 and st.malformed == 1
    out, st = parse_all(nlmsg(ct_type(0), 0, b"\x02\x00"))  # no room for nfgenmsg
    assert out == [] and st.malformed == 1


def test_stray_bytes_inside_container() -> None:
    buf = _ct(_good_tuples() + be32(nl.CTA_ID, 5) + b"\x00\x00")
    # nlmsg_len covers the two stray bytes: they cannot hold an attribute header
    [(_, e)], st = parse_all(buf)
    assert e.id == 5 and st.malformed == 1


def test_parse_accepts_bytearray_and_memoryview() -> None:
    buf = b"".join(encode_entry(e) for e in sample_entries())
    a = parse_messages(buf, ParseStats())
    assert parse_messages(bytearray(buf), ParseStats()) == a
    assert parse_messages(memoryview(buf), ParseStats()) == a


# --- requests: never CTRZERO -----------------------------------------------------------------------


def _msg_types(req: bytes) -> list[int]:
    types, off = [], 0
    while off + 16 <= len(req):
        ln, ty = struct.unpack_from("=IH", req, off)
        types.append(ty)
        off += max(16, (ln + 3) & ~3)
    return types


@pytest.mark.parametrize("family", [socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6])
def test_dump_request_bytes(family: int) -> None:
    req = nl.build_dump_request(1234, family)
    ln, ty, flags, seq, pid, fam, ver, res = struct.unpack("=IHHIIBBH", req)
    assert (ln, len(req)) == (20, 20)
    assert ty == (nl.NFNL_SUBSYS_CTNETLINK << 8) | nl.IPCTNL_MSG_CT_GET
    assert ty & 0xFF != nl.IPCTNL_MSG_CT_GET_CTRZERO
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP
    assert (seq, pid, fam, ver, res) == (1234, 0, family, 0, 0)


def test_no_request_builder_emits_ctrzero() -> None:
    builders = [getattr(nl, n) for n in dir(nl) if n.startswith("build_") and n.endswith("_request")]
    assert builders, "request builders are expected to be named build_*_request"
    for b in builders:
        for fam in (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6):
            for ty in _msg_types(b(1, fam)):
                assert ty & 0xFF != nl.IPCTNL_MSG_CT_GET_CTRZERO, b.__name__


def test_ctrzero_request_is_refused() -> None:
    bad = struct.pack("=IHHII", 20, ct_type(nl.IPCTNL_MSG_CT_GET_CTRZERO), 0x301, 1, 0) + nfgen(0)
    with pytest.raises(ValueError, match="CTRZERO"):
        nl._check_request(bad)
    ok = nl.build_dump_request(1)
    with pytest.raises(ValueError):
        nl._check_request(ok + bad)  # hidden as the second message of a batch
    assert nl._check_request(ok) == ok


# --- sockets, faked --------------------------------------------------------------------------------


class FakeSock:
    """Stands in for a netlink socket: replays scripted recv results, records sends."""

    def __init__(self, script: list[bytes | BaseException]) -> None:
        self.script = list(script)
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        buf[: len(item)] = item
        return len(item)

    def fileno(self) -> int:
        return 99

    def getsockopt(self, *a: Any) -> int:
        return 1 << 20

    def close(self) -> None:
        self.closed = True


def _patch_sockets(
    monkeypatch: pytest.MonkeyPatch, scripts: list[list[bytes | BaseException]]
) -> list[FakeSock]:
    made: list[FakeSock] = []

    def fake_open(groups: int, rcvbuf: int, nonblocking: bool, force: bool) -> FakeSock:
        s = FakeSock(scripts[len(made)])
        made.append(s)
        return s

    monkeypatch.setattr(nl, "_open_socket", fake_open)
    return made


def test_dump_sends_only_a_plain_get_and_collects_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = sample_entries()
    part1 = b"".join(encode_entry(e) for e in entries[:3])
    part2 = b"".join(encode_entry(e) for e in entries[3:]) + done()
    socks = _patch_sockets(monkeypatch, [[part1, InterruptedError(), part2]])
    st = ParseStats()
    assert nl.dump(stats=st) == entries
    [sock] = socks
    assert sock.closed
    [req] = sock.sent
    assert _msg_types(req) == [ct_type(nl.IPCTNL_MSG_CT_GET)]
    assert st.entries == len(entries)


def test_dump_retries_once_on_enobufs(monkeypatch: pytest.MonkeyPatch) -> None:
    e = sample_entries()[0]
    enobufs = OSError(errno.ENOBUFS, "No buffer space available")
    socks = _patch_sockets(monkeypatch, [[encode_entry(e), enobufs], [encode_entry(e) + done()]])
    st = ParseStats()
    assert nl.dump(stats=st) == [e]
    assert st.dump_retries == 1 and len(socks) == 2 and all(s.closed for s in socks)


def test_dump_gives_up_after_second_enobufs(monkeypatch: pytest.MonkeyPatch) -> None:
    enobufs = OSError(errno.ENOBUFS, "No buffer space available")
    _patch_sockets(monkeypatch, [[enobufs], [enobufs]])
    with pytest.raises(CtNetlinkError) as ei:
        nl.dump()
    assert ei.value.errno == errno.ENOBUFS and "twice" in str(ei.value)


def test_dump_propagates_kernel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_sockets(monkeypatch, [[error(-errno.EPERM)]])
    with pytest.raises(CtNetlinkError) as ei:
        nl.dump()
    assert ei.value.errno == errno.EPERM


def test_event_socket_kinds_and_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    e = sample_entries()
    new = encode_entry(e[0], flags=nl.NLM_F_CREATE | nl.NLM_F_EXCL, seq=0)
    upd = encode_entry(e[0], flags=0, seq=0)
    destroy = encode_entry(e[5], msg=nl.IPCTNL_MSG_CT_DELETE, flags=0, seq=0)
    enobufs = OSError(errno.ENOBUFS, "No buffer space available")
    _patch_sockets(monkeypatch, [[new, upd, enobufs, destroy, new]])
    with nl.EventSocket() as es:
        assert es.fileno() == 99
        first = es.read_events()
        assert [(ev.kind, ev.entry) for ev in first] == [("new", e[0]), ("update", e[0])]
        assert es.overflows == 1 and es.needs_resync
        es.needs_resync = False
        rest = es.read_events(max_msgs=1)
        assert [(ev.kind, ev.entry) for ev in rest] == [("destroy", e[5])]
        assert [ev.kind for ev in es.read_events()] == ["new"]
        assert es.read_events() == []
        assert es.overflows == 1 and not es.needs_resync
    with pytest.raises(ValueError):
        es.fileno()


def test_event_socket_other_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_sockets(monkeypatch, [[OSError(errno.EBADF, "bad fd")]])
    es = nl.EventSocket()
    with pytest.raises(OSError):
        es.read_events()
    es.close()
    es.close()


def test_open_socket_does_not_set_no_enobufs() -> None:
    """A real (unbound-to-groups) netlink socket: NETLINK_NO_ENOBUFS stays off."""
    try:
        s = nl._open_socket(0, 1 << 16, nonblocking=True, force=False)
    except OSError as exc:  # pragma: no cover - sandboxes without netlink
        pytest.skip(f"no NETLINK_NETFILTER socket here: {exc}")
    with s:
        assert s.getsockopt(nl.SOL_NETLINK, nl.NETLINK_NO_ENOBUFS) == 0
