"""Test-only ctnetlink encoder: builds the messages the kernel sends, from a CtEntry.

Independent of the parser under test: it only shares the numeric constants (which are ABI, from
linux/netfilter/nfnetlink_conntrack.h). Attribute order follows the kernel's ctnetlink_fill_info()
unless the caller reorders; options add the flag bits, unknown attributes and pad attributes the
parser must tolerate.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterable

from otelflow.conntrack import netlink as nl
from otelflow.conntrack.netlink import CtEntry, CtTuple


def nla(atype: int, payload: bytes) -> bytes:
    """One attribute: header (len, type; host order) + payload + padding to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nest(atype: int, children: Iterable[bytes], *, flag: bool = True) -> bytes:
    """A nested attribute (NLA_F_NESTED set as the kernel does, unless ``flag`` is False)."""
    return nla(atype | (nl.NLA_F_NESTED if flag else 0), b"".join(children))


def u8(atype: int, v: int, bo: bool = False) -> bytes:
    return nla(atype | (nl.NLA_F_NET_BYTEORDER if bo else 0), struct.pack(">B", v))


def be16(atype: int, v: int, bo: bool = False) -> bytes:
    return nla(atype | (nl.NLA_F_NET_BYTEORDER if bo else 0), struct.pack(">H", v))


def be32(atype: int, v: int, bo: bool = False) -> bytes:
    return nla(atype | (nl.NLA_F_NET_BYTEORDER if bo else 0), struct.pack(">I", v))


def be64(atype: int, v: int, bo: bool = False) -> bytes:
    return nla(atype | (nl.NLA_F_NET_BYTEORDER if bo else 0), struct.pack(">Q", v))


def nlmsg(mtype: int, flags: int, payload: bytes, seq: int = 1, pid: int = 0) -> bytes:
    """nlmsghdr + payload, padded to 4 bytes (nlmsg_len excludes the padding, as the kernel does)."""
    raw = struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, pid) + payload
    return raw + b"\0" * (-len(raw) % 4)


def ct_type(msg: int) -> int:
    return (nl.NFNL_SUBSYS_CTNETLINK << 8) | msg


def nfgen(family: int) -> bytes:
    return struct.pack("=BBH", family, 0, 0)


def encode_tuple(t: CtTuple, family: int, bo: bool = False, nested_flag: bool = True) -> list[bytes]:
    """Children of a CTA_TUPLE_* nest: CTA_TUPLE_IP and CTA_TUPLE_PROTO."""
    if family == socket.AF_INET:
        ip = [nla(nl.CTA_IP_V4_SRC, t.src), nla(nl.CTA_IP_V4_DST, t.dst)]
    else:
        ip = [nla(nl.CTA_IP_V6_SRC, t.src), nla(nl.CTA_IP_V6_DST, t.dst)]
    proto = [u8(nl.CTA_PROTO_NUM, t.proto, bo)]
    if t.proto in (nl.IPPROTO_ICMP, nl.IPPROTO_ICMPV6):
        v6 = t.proto == nl.IPPROTO_ICMPV6
        if t.icmp_id is not None:
            proto.append(be16(nl.CTA_PROTO_ICMPV6_ID if v6 else nl.CTA_PROTO_ICMP_ID, t.icmp_id, bo))
        if t.icmp_type is not None:
            proto.append(u8(nl.CTA_PROTO_ICMPV6_TYPE if v6 else nl.CTA_PROTO_ICMP_TYPE, t.icmp_type, bo))
        if t.icmp_code is not None:
            proto.append(u8(nl.CTA_PROTO_ICMPV6_CODE if v6 else nl.CTA_PROTO_ICMP_CODE, t.icmp_code, bo))
    else:
        proto += [be16(nl.CTA_PROTO_SRC_PORT, t.sport, bo), be16(nl.CTA_PROTO_DST_PORT, t.dport, bo)]
    return [
        nest(nl.CTA_TUPLE_IP, ip, flag=nested_flag),
        nest(nl.CTA_TUPLE_PROTO, proto, flag=nested_flag),
    ]


def encode_attrs(
    e: CtEntry,
    *,
    bo: bool = False,
    nested_flag: bool = True,
    extras: bool = False,
    always_mark: bool = True,
) -> list[bytes]:
    """Top-level attributes of a conntrack message for ``e``, in the kernel's order.

    ``bo`` sets NLA_F_NET_BYTEORDER on integer leaves, ``nested_flag`` NLA_F_NESTED on nests,
    ``extras`` adds attributes the parser does not read (CTA_LABELS, CTA_SECCTX, CTA_COUNTERS_PAD, a
    TCP wscale/flags tail, a future attribute type) which it must skip.
    """
    fam = e.family
    a = [
        nest(nl.CTA_TUPLE_ORIG, encode_tuple(e.orig, fam, bo, nested_flag), flag=nested_flag),
        nest(nl.CTA_TUPLE_REPLY, encode_tuple(e.reply, fam, bo, nested_flag), flag=nested_flag),
    ]
    if e.zone:
        a.append(be16(nl.CTA_ZONE, e.zone, bo))
    a.append(be32(nl.CTA_STATUS, e.status, bo))
    if e.timeout is not None:
        a.append(be32(nl.CTA_TIMEOUT, e.timeout, bo))
    if e.tcp_state is not None:
        tcp = [u8(nl.CTA_PROTOINFO_TCP_STATE, e.tcp_state)]
        if extras:
            tcp += [u8(2, 7), u8(3, 7), nla(4, b"\x03\x00"), nla(5, b"\x03\x00")]
        a.append(
            nest(nl.CTA_PROTOINFO, [nest(nl.CTA_PROTOINFO_TCP, tcp, flag=nested_flag)], flag=nested_flag)
        )
    if e.mark or always_mark:
        a.append(be32(nl.CTA_MARK, e.mark, bo))
    if extras:
        a.append(nest(nl.CTA_SECCTX, [nla(1, b"system_u:object_r:unlabeled_t:s0\0")]))
        a.append(nla(nl.CTA_LABELS, b"\x01" + b"\0" * 15))
    if e.orig_packets is not None or e.orig_bytes is not None:
        pad = [nla(5, b"")] if extras else []  # CTA_COUNTERS_PAD
        a.append(
            nest(
                nl.CTA_COUNTERS_ORIG,
                [
                    *pad,
                    be64(nl.CTA_COUNTERS_PACKETS, e.orig_packets or 0, bo),
                    *pad,
                    be64(nl.CTA_COUNTERS_BYTES, e.orig_bytes or 0, bo),
                ],
                flag=nested_flag,
            )
        )
        a.append(
            nest(
                nl.CTA_COUNTERS_REPLY,
                [
                    be64(nl.CTA_COUNTERS_PACKETS, e.reply_packets or 0, bo),
                    be64(nl.CTA_COUNTERS_BYTES, e.reply_bytes or 0, bo),
                ],
                flag=nested_flag,
            )
        )
    if e.start is not None or e.stop is not None:
        ts = []
        if e.start is not None:
            ts.append(be64(nl.CTA_TIMESTAMP_START, e.start, bo))
        if e.stop is not None:
            ts.append(be64(nl.CTA_TIMESTAMP_STOP, e.stop, bo))
        a.append(nest(nl.CTA_TIMESTAMP, ts, flag=nested_flag))
    a.append(be32(nl.CTA_ID, e.id, bo))
    if e.use is not None:
        a.append(be32(nl.CTA_USE, e.use, bo))
    if extras:
        a.append(nla(200, b"future attribute"))
    return a


def encode_entry(
    e: CtEntry,
    *,
    msg: int = nl.IPCTNL_MSG_CT_NEW,
    flags: int = nl.NLM_F_MULTI,
    seq: int = 1,
    shuffle: random.Random | None = None,
    **kw: bool,
) -> bytes:
    """A complete netlink message carrying ``e`` (a dump reply by default)."""
    attrs = encode_attrs(e, **kw)
    if shuffle is not None:
        shuffle.shuffle(attrs)
    return nlmsg(ct_type(msg), flags, nfgen(e.family) + b"".join(attrs), seq=seq)


def done(status: int = 0, seq: int = 1) -> bytes:
    return nlmsg(nl.NLMSG_DONE, nl.NLM_F_MULTI, struct.pack("=i", status), seq=seq)


def error(err: int, seq: int = 1) -> bytes:
    """An NLMSG_ERROR reply: negative errno (0 = ACK) followed by the offending request header."""
    return nlmsg(nl.NLMSG_ERROR, 0, struct.pack("=i", err) + struct.pack("=IHHII", 20, 0x101, 0x301, seq, 0))


# --- sample entries -------------------------------------------------------------------------------


def v4(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, a)


def v6(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def sample_entries() -> list[CtEntry]:
    """Realistic entries: v4/v6, TCP with protoinfo, UDP, ICMP/ICMPv6, with/without counters, NAT."""
    return [
        # TCP v4 to a Service ClusterIP, DNATed to a pod: reply tuple comes from the pod.
        CtEntry(
            socket.AF_INET,
            CtTuple(v4("10.244.1.5"), v4("10.96.0.10"), 6, 43512, 80),
            CtTuple(v4("10.244.2.7"), v4("10.244.1.5"), 6, 8080, 43512),
            id=0xDEADBEEF,
            mark=0x4000,
            status=nl.IPS_SEEN_REPLY
            | nl.IPS_ASSURED
            | nl.IPS_CONFIRMED
            | nl.IPS_DST_NAT
            | nl.IPS_DST_NAT_DONE,
            timeout=431999,
            tcp_state=3,
            orig_packets=12,
            orig_bytes=1732,
            reply_packets=10,
            reply_bytes=98123,
            use=1,
        ),
        # UDP v4, masqueraded to the outside (SNAT), no counters (nf_conntrack_acct=0).
        CtEntry(
            socket.AF_INET,
            CtTuple(v4("10.244.1.5"), v4("8.8.8.8"), 17, 53000, 53),
            CtTuple(v4("8.8.8.8"), v4("192.168.1.10"), 17, 53, 61000),
            id=7,
            status=nl.IPS_SEEN_REPLY | nl.IPS_CONFIRMED | nl.IPS_SRC_NAT | nl.IPS_SRC_NAT_DONE,
            timeout=29,
            use=1,
        ),
        # TCP v6 in a non-default zone, with timestamps and 64-bit counters beyond 2**32.
        CtEntry(
            socket.AF_INET6,
            CtTuple(v6("fd00:250::1"), v6("fd00:250::2"), 6, 40000, 443),
            CtTuple(v6("fd00:250::2"), v6("fd00:250::1"), 6, 443, 40000),
            id=0xFFFFFFFF,
            zone=7,
            status=nl.IPS_CONFIRMED | nl.IPS_ASSURED | nl.IPS_SEEN_REPLY,
            timeout=120,
            tcp_state=7,
            orig_packets=2**33 + 5,
            orig_bytes=2**40 + 3,
            reply_packets=1,
            reply_bytes=60,
            start=1_700_000_000_123_456_789,
            use=2,
        ),
        # UDP v6, counters present.
        CtEntry(
            socket.AF_INET6,
            CtTuple(v6("fd00:250::1"), v6("fd00:250::2"), 17, 5353, 5353),
            CtTuple(v6("fd00:250::2"), v6("fd00:250::1"), 17, 5353, 5353),
            id=42,
            mark=1,
            status=nl.IPS_CONFIRMED,
            timeout=30,
            orig_packets=1,
            orig_bytes=100,
            reply_packets=0,
            reply_bytes=0,
            use=1,
        ),
        # ICMP echo v4.
        CtEntry(
            socket.AF_INET,
            CtTuple(v4("10.250.0.1"), v4("10.250.0.2"), 1, icmp_id=0x1234, icmp_type=8, icmp_code=0),
            CtTuple(v4("10.250.0.2"), v4("10.250.0.1"), 1, icmp_id=0x1234, icmp_type=0, icmp_code=0),
            id=99,
            status=nl.IPS_CONFIRMED | nl.IPS_SEEN_REPLY,
            timeout=29,
            orig_packets=3,
            orig_bytes=252,
            reply_packets=3,
            reply_bytes=252,
            use=1,
        ),
        # ICMPv6 echo, destroyed: DESTROY carries counters and a stop timestamp, no timeout/use.
        CtEntry(
            socket.AF_INET6,
            CtTuple(v6("fd00:250::1"), v6("fd00:250::2"), 58, icmp_id=77, icmp_type=128, icmp_code=0),
            CtTuple(v6("fd00:250::2"), v6("fd00:250::1"), 58, icmp_id=77, icmp_type=129, icmp_code=0),
            id=100,
            status=nl.IPS_CONFIRMED | nl.IPS_SEEN_REPLY | nl.IPS_DYING,
            orig_packets=1,
            orig_bytes=104,
            reply_packets=1,
            reply_bytes=104,
            start=1_700_000_000_000_000_000,
            stop=1_700_000_030_000_000_000,
        ),
    ]
