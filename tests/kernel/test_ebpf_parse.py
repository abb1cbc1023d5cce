"""The flow counter's packet parsing and byte arithmetic, on crafted frames run inside the kernel
(BPF_PROG_TEST_RUN: the real programs, verified and JIT-compiled, on an skb the kernel builds from
bytes we choose, with the skb fields we set). Covers what lab traffic never produces: IPv6
extension-header chains, fragments, VLAN tags, Ethernet padding, truncated headers, GSO with a
missing gso_segs; plus the egress rule, a full map, and exactness while drains race two CPUs."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from otelflow.ebpf.loader import Drain, FlowCount, FlowCounter

UNSPEC = 0xFFFFFFFF  # TC_ACT_UNSPEC (-1): the program never decides a packet's fate
SRC4, DST4, SRC6, DST6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
HBH, ROUTING, FRAGMENT, ESP, AH, DSTOPTS = 0, 43, 44, 50, 51, 60


# ---- frame builders -----------------------------------------------------------------------------------
def eth(ethertype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    hdr = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    for i, tpid in enumerate(vlans):
        hdr += struct.pack("!HH", tpid, 100 + i)
    return hdr + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, l4: bytes, *, options: bytes = b"", frag: int = 0, tot_len: int | None = None) -> bytes:
    ihl = 5 + len(options) // 4
    tl = 4 * ihl + len(l4) if tot_len is None else tot_len
    src, dst = socket.inet_aton(SRC4), socket.inet_aton(DST4)
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tl, 7, frag, 64, proto, 0, src, dst) + options + l4


def ipv6(nexthdr: int, rest: bytes, *, payload_len: int | None = None) -> bytes:
    pl = len(rest) if payload_len is None else payload_len
    src, dst = socket.inet_pton(socket.AF_INET6, SRC6), socket.inet_pton(socket.AF_INET6, DST6)
    return struct.pack("!IHBB16s16s", 0x60000000, pl, nexthdr, 64, src, dst) + rest


def tcp(
    sport: int, dport: int, flags: int, payload: bytes = b"", opts: bytes = b"", ae: bool = False
) -> bytes:
    doff = (20 + len(opts)) // 4
    return (
        struct.pack("!HHIIBBHHH", sport, dport, 1, 1, (doff << 4) | int(ae), flags, 65535, 0, 0)
        + opts
        + payload
    )


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def opt_ext(nexthdr: int, units: int = 0) -> bytes:
    """Hop-by-hop / destination options / routing header: (units + 1) * 8 bytes."""
    return struct.pack("!BB", nexthdr, units) + b"\x01\x04\0\0\0\0" + b"\0" * (8 * units)


def frag6(nexthdr: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset << 3) | int(more), 0xABCD)


def ah(nexthdr: int) -> bytes:
    return struct.pack("!BBHII", nexthdr, 4, 0, 0x100, 1) + b"\0" * 12  # (4 + 2) * 4 = 24 bytes


TS_OPTS = b"\x01\x01\x08\x0a" + b"\0" * 8  # NOP NOP timestamps: a 32-byte TCP header


# ---- harness --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fc() -> Iterator[FlowCounter]:
    with FlowCounter(max_entries=1024) as c:
        yield c


def run(fc: FlowCounter, frame: bytes, **kw: int | bool) -> Drain:
    fc.drain()
    assert fc.test_run(frame, **kw) == UNSPEC  # type: ignore[arg-type]
    return fc.drain()


def only(d: Drain) -> FlowCount:
    assert len(d.flows) == 1, d.flows
    return d.flows[0]


def nonzero(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if v}


# ---- IPv4 -----------------------------------------------------------------------------------------------
def test_ipv4_tcp_with_options_flags_and_exact_bytes(fc: FlowCounter) -> None:
    pkt = ipv4(6, tcp(40000, 443, SYN | ACK, b"p" * 100, TS_OPTS, ae=True), options=b"\x01\x01\x01\x00")
    f = only(run(fc, eth(0x0800, pkt)))
    assert f.tuple5() == (SRC4, DST4, 40000, 443, 6) and f.family == 4
    assert (f.packets, f.bytes) == (1, 24 + 32 + 100)
    assert f.tcp_flags == SYN | ACK | 0x100
    assert f.ifindex == 1  # a test run's skb belongs to loopback


def test_tcp_flags_accumulate_over_packets(fc: FlowCounter) -> None:
    fc.drain()
    for flags in (SYN, ACK, PSH | ACK, FIN | ACK):
        fc.test_run(eth(0x0800, ipv4(6, tcp(1, 2, flags))))
    f = only(fc.drain())
    assert (f.packets, f.tcp_flags) == (4, SYN | ACK | PSH | FIN)
    assert f.first_seen_ns <= f.last_seen_ns


def test_ethernet_padding_is_not_counted(fc: FlowCounter) -> None:
    frame = eth(0x0800, ipv4(6, tcp(5, 6, ACK)))
    assert len(frame) == 54
    f = only(run(fc, frame + b"\0" * 6))  # a NIC delivers the 60-byte minimum frame
    assert f.bytes == 40


def test_ip_header_length_zero_falls_back_to_the_frame(fc: FlowCounter) -> None:
    # BIG TCP writes tot_len 0 when the packet exceeds 64 KiB: the frame length is the truth
    f = only(run(fc, eth(0x0800, ipv4(6, tcp(5, 6, ACK, b"z" * 60), tot_len=0))))
    assert f.bytes == 20 + 20 + 60


@pytest.mark.parametrize("vlans", [(0x8100,), (0x88A8, 0x8100)], ids=["802.1Q", "802.1ad+802.1Q"])
def test_vlan_tags_in_the_frame_are_skipped(fc: FlowCounter, vlans: tuple[int, ...]) -> None:
    f = only(run(fc, eth(0x0800, ipv4(17, udp(53, 5353, b"q" * 30)), vlans)))
    assert f.tuple5() == (SRC4, DST4, 53, 5353, 17) and f.bytes == 20 + 8 + 30


def test_ipv4_fragments(fc: FlowCounter) -> None:
    first = only(run(fc, eth(0x0800, ipv4(17, udp(7, 8, b"a" * 64), frag=0x2000))))  # MF, offset 0
    assert first.tuple5() == (SRC4, DST4, 7, 8, 17)
    d = run(fc, eth(0x0800, ipv4(17, b"b" * 64, frag=185)))  # offset 1480: no UDP header
    f = only(d)
    assert f.tuple5() == (SRC4, DST4, 0, 0, 17) and f.bytes == 84
    assert nonzero(d.stats) == {"fragment": 1}


def test_icmp_has_no_ports(fc: FlowCounter) -> None:
    f = only(run(fc, eth(0x0800, ipv4(1, b"\x08\x00\0\0\0\x01\0\x01" + b"i" * 56))))
    assert f.tuple5() == (SRC4, DST4, 0, 0, 1) and f.bytes == 84
    f6 = only(run(fc, eth(0x86DD, ipv6(58, b"\x80\x00\0\0\0\x01\0\x01" + b"i" * 56))))
    assert f6.tuple5() == (SRC6, DST6, 0, 0, 58) and f6.bytes == 104 and f6.family == 6


# ---- IPv6 extension headers -------------------------------------------------------------------------------
def test_ipv6_extension_chain_is_skipped_to_the_transport(fc: FlowCounter) -> None:
    rest = opt_ext(DSTOPTS) + opt_ext(ROUTING, 1) + opt_ext(17) + udp(1000, 2000, b"u" * 40)
    d = run(fc, eth(0x86DD, ipv6(HBH, rest)))
    f = only(d)
    assert f.tuple5() == (SRC6, DST6, 1000, 2000, 17)
    assert f.bytes == 40 + 8 + 16 + 8 + 8 + 40
    assert nonzero(d.stats) == {}


def test_ipv6_ah_then_tcp(fc: FlowCounter) -> None:
    f = only(run(fc, eth(0x86DD, ipv6(AH, ah(6) + tcp(22, 50000, ACK, b"s" * 10)))))
    assert f.tuple5() == (SRC6, DST6, 22, 50000, 6) and f.bytes == 40 + 24 + 20 + 10


def test_ipv6_fragments(fc: FlowCounter) -> None:
    first = only(run(fc, eth(0x86DD, ipv6(FRAGMENT, frag6(17, 0, True) + udp(3, 4, b"f" * 48)))))
    assert first.tuple5() == (SRC6, DST6, 3, 4, 17)
    d = run(fc, eth(0x86DD, ipv6(FRAGMENT, frag6(17, 7, False) + b"g" * 48)))
    f = only(d)
    assert f.tuple5() == (SRC6, DST6, 0, 0, 17) and f.bytes == 40 + 8 + 48
    assert nonzero(d.stats) == {"fragment": 1}


def test_ipv6_esp_counts_under_esp(fc: FlowCounter) -> None:
    f = only(run(fc, eth(0x86DD, ipv6(ESP, b"\0\0\x01\x00" + b"e" * 60))))
    assert f.tuple5() == (SRC6, DST6, 0, 0, ESP) and f.bytes == 104


def test_ipv6_chain_longer_than_the_limit_counts_under_the_last_header(fc: FlowCounter) -> None:
    rest = b"".join(opt_ext(DSTOPTS) for _ in range(8)) + opt_ext(17) + udp(1, 2, b"x")
    d = run(fc, eth(0x86DD, ipv6(DSTOPTS, rest)))
    f = only(d)
    assert f.tuple5() == (SRC6, DST6, 0, 0, DSTOPTS) and f.bytes == len(ipv6(0, rest))
    assert nonzero(d.stats) == {"v6_ext_limit": 1}


# ---- what is not counted, and how it shows ----------------------------------------------------------------
def test_non_ip_truncated_and_bad_headers(fc: FlowCounter) -> None:
    arp = eth(0x0806, b"\0\x01\x08\x00\x06\x04\0\x01" + b"\0" * 20)
    d = run(fc, arp)
    assert d.flows == [] and nonzero(d.stats) == {"not_ip": 1}
    d = run(fc, eth(0x0800, b"\x65" + b"\0" * 39))  # IPv4 ethertype, version 6
    assert d.flows == [] and nonzero(d.stats) == {"l3_bad": 1}
    d = run(fc, eth(0x0800, ipv4(6, b"", tot_len=40)))  # says TCP, the frame ends after the IP header
    f = only(d)
    assert f.tuple5() == (SRC4, DST4, 0, 0, 6) and f.bytes == 20  # what the frame holds
    assert nonzero(d.stats) == {"l4_truncated": 1}


# ---- GSO --------------------------------------------------------------------------------------------
def test_tso_packet_counts_each_segment_with_its_headers(fc: FlowCounter) -> None:
    payload = b"t" * (2 * 1448)
    d = run(fc, eth(0x0800, ipv4(6, tcp(9, 10, ACK, payload, TS_OPTS))), gso_segs=2, gso_size=1448)
    f = only(d)
    assert (f.packets, f.bytes) == (2, 2 * (1448 + 20 + 32))
    assert nonzero(d.stats) == {"gso_packets": 1}


def test_gso_without_gso_segs_derives_them_from_gso_size(fc: FlowCounter) -> None:
    payload = b"t" * 2896  # 1000 + 1000 + 896
    d = run(fc, eth(0x86DD, ipv6(6, tcp(9, 10, ACK, payload, TS_OPTS))), gso_segs=0, gso_size=1000)
    f = only(d)
    assert (f.packets, f.bytes) == (3, 2896 + 3 * (40 + 32))
    assert nonzero(d.stats) == {"gso_packets": 1, "gso_segs_derived": 1}


def test_udp_gso_counts_each_datagram(fc: FlowCounter) -> None:
    f = only(run(fc, eth(0x86DD, ipv6(17, udp(4, 5, b"d" * 3000))), gso_segs=3, gso_size=1000))
    assert (f.packets, f.bytes) == (3, 3 * (1000 + 48))


# ---- count once: the egress rule -------------------------------------------------------------------------
def test_egress_skips_packets_received_on_a_counted_interface() -> None:
    frame = eth(0x0800, ipv4(17, udp(1, 2, b"e" * 10)))
    with FlowCounter(max_entries=16) as c:
        c.cover("lo")  # ifindex 1: "packets that came in here were counted at an ingress"
        d = run(c, frame, egress=True, ingress_ifindex=1)
        assert d.flows == [] and nonzero(d.stats) == {"egress_skipped": 1}
        assert only(run(c, frame, egress=True, ingress_ifindex=0)).bytes == 38  # locally generated
        assert only(run(c, frame, egress=True, ingress_ifindex=7)).bytes == 38  # from an unwatched one
        assert only(run(c, frame, ingress_ifindex=1)).bytes == 38  # ingress always counts


# ---- a full map ---------------------------------------------------------------------------------------
def test_a_full_map_counts_what_it_could_not_insert() -> None:
    with FlowCounter(max_entries=4) as c:
        for port in range(6):
            c.test_run(eth(0x0800, ipv4(17, udp(port, 53, b"x" * 12))), repeat=3)
        d = c.drain()
        assert len(d.flows) == 4 and all(f.packets == 3 for f in d.flows)
        assert d.drops == {
            "map_full_packets": 6,
            "map_full_bytes": 6 * 40,
            "other_packets": 0,
            "other_bytes": 0,
        }
        assert c.drain().drops["map_full_packets"] == 0  # deltas: reported once


# ---- exact while drains race the datapath -----------------------------------------------------------------
def test_concurrent_updates_and_drains_lose_nothing() -> None:
    """Two CPUs add to one flow as fast as they can while a third thread drains without pause:
    the map swap waits for running programs, so the drained total is exact (a lookup_and_delete
    on the live map loses increments here: see bench/ebpf_overhead.py --race)."""
    frame = eth(0x0800, ipv4(17, udp(11, 12, b"r" * 100)))
    n = 400_000
    with FlowCounter(max_entries=64) as c:
        total = [0, 0]
        stop = threading.Event()

        def drainer() -> None:
            while not stop.is_set():
                for f in c.drain().flows:
                    total[0] += f.packets
                    total[1] += f.bytes

        workers = [threading.Thread(target=c.test_run, args=(frame,), kwargs={"repeat": n}) for _ in range(2)]
        d = threading.Thread(target=drainer)
        d.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        d.join()
        for f in c.drain().flows:
            total[0] += f.packets
            total[1] += f.bytes
    assert total == [2 * n, 2 * n * 128]
