"""TCP health in flow-log records (issue #6): retransmits and resets per direction as ints, RTT per
direction as a double in seconds, present only when the source has them (None: absent; 0: present),
only on TCP flows; and every attribute a record can carry is declared in otelflow/schema.py with the
type it is encoded as. Records are decoded with the official opentelemetry-proto messages."""

from __future__ import annotations

from typing import Any

from otelflow.decorate import DecoratedFlow
from otelflow.otlp.logs import LogsEncoder, record_attributes
from otelflow.schema import LOG_ATTRIBUTES, LOG_END_ATTRIBUTES
from tests.unit.flows import BE, EXT, FE, SVC, delta
from tests.unit.test_otlp_content import (
    NODE,
    NOW,
    RESOURCE,
    _varied,
    attrs,
    check_record_fields,
    dec,
    decode_logs,
    i,
    reference,
)

HEALTH = dict(
    source="ebpf", retransmits_c2s=3, retransmits_s2c=0, resets_c2s=0, resets_s2c=1,
    rtt_us_c2s=1250, rtt_us_s2c=None,
)  # fmt: skip


def d(v: float) -> tuple[str, float]:
    return ("double_value", v)


def encode(*flows: DecoratedFlow) -> list[dict[str, tuple[str, Any]]]:
    recs = decode_logs(LogsEncoder(RESOURCE, "otelflow", "9.9").encode(list(flows), now_ns=NOW))
    for rec, f in zip(recs, flows, strict=True):
        check_record_fields(rec, f)
    return [attrs(r.attributes) for r in recs]


def test_tcp_health_attributes_per_direction_exact() -> None:
    tcp = dec(delta(**HEALTH))
    [got] = encode(tcp)
    health = {k: v for k, v in got.items() if k.startswith("otelflow.tcp.")}
    assert health == {
        "otelflow.tcp.retransmits.c2s": i(3),
        "otelflow.tcp.retransmits.s2c": i(0),  # the hook ran, nothing was retransmitted: present as 0
        "otelflow.tcp.resets.c2s": i(0),
        "otelflow.tcp.resets.s2c": i(1),
        "otelflow.tcp.rtt.c2s": d(0.00125),  # 1250 us as seconds
    }  # rtt s2c: no sample this interval -> absent
    assert got == reference(tcp)
    # the same flow's record without health is the conntrack-shaped record: health is only appended
    [plain] = encode(dec(delta(source="ebpf")))
    assert {k: v for k, v in got.items() if not k.startswith("otelflow.tcp.")} == plain


def test_health_absent_without_a_hook_and_on_udp() -> None:
    no_hook = dec(delta(flow_id="2", source="ebpf"))  # every health field None (conntrack too)
    udp = dec(delta(flow_id="3", transport="udp", state=None, **HEALTH))  # UDP has no TCP health
    rtt_only = dec(delta(flow_id="4", source="ebpf", rtt_us_s2c=70_000_000))  # a 70 s RTT, only s2c
    partial = dec(delta(flow_id="5", source="ebpf", resets_c2s=2, rtt_us_c2s=0))
    recs = encode(no_hook, udp, rtt_only, partial)
    assert [{k: v for k, v in r.items() if k.startswith("otelflow.tcp.")} for r in recs] == [
        {},
        {},
        {"otelflow.tcp.rtt.s2c": d(70.0)},
        {"otelflow.tcp.resets.c2s": i(2), "otelflow.tcp.rtt.c2s": d(0.0)},
    ]
    assert recs == [reference(x) for x in (no_hook, udp, rtt_only, partial)]


def test_health_with_varied_flows_matches_the_reference() -> None:
    """Health values (large, zero, missing) on varied flows: byte-level agreement with the reference,
    record by record."""
    flows = _varied(900, seed=11)
    for k, x in enumerate(flows):
        if k % 3:
            f = x.flow
            f.retransmits_c2s, f.retransmits_s2c = k * 1_000_003, (None if k % 5 == 0 else 0)
            f.resets_c2s, f.resets_s2c = k % 2, 16384 + k
            f.rtt_us_c2s, f.rtt_us_s2c = (None if k % 7 == 0 else k * 37), 2**40 + k
    logged = [x for x in flows if x.count_c2s]
    assert encode(*logged) == [reference(x) for x in logged]


def test_every_record_attribute_is_declared_in_the_schema_with_its_type() -> None:
    own = {a.name: a.type for a in LOG_ATTRIBUTES}
    ends = {f"{p}.{a.name}": a.type for a in LOG_END_ATTRIBUTES for p in ("client", "server")}
    assert not set(own) & set(ends)
    declared = {**own, **ends}
    types = {int: "int", float: "double", str: "string"}
    flows = [
        dec(delta(**{**HEALTH, "rtt_us_s2c": 9})),
        dec(delta(flow_id="2", snat=True, client_nat_ip="192.0.2.1", client_nat_port=1), server=EXT),
        dec(delta(flow_id="3"), client=NODE, server=FE, svc=None),
        dec(delta(flow_id="4"), client=BE, svc=SVC),
        *_varied(300),
    ]
    seen: dict[str, str] = {}
    for x in flows:
        for k, v in record_attributes(x):
            assert k in declared, f"{k} is not declared in otelflow/schema.py"
            assert types[type(v)] == declared[k], k
            seen[k] = declared[k]
    assert set(own) <= set(seen)  # every declared flow attribute occurs in these records


def test_long_values_and_large_numbers_take_the_generic_path_with_the_same_result() -> None:
    """The encoder inlines short strings and small numbers; anything else is framed generically."""
    odd = [
        dec(delta(flow_id="f" * 300, client_port=70_000)),  # a 300-byte id; a port beyond 16 bits
        dec(delta(flow_id="2", client_ip="ü" * 200, bytes_c2s=2**40, packets_s2c=2**29)),
        dec(delta(flow_id="3", first_seen=5.0, last_seen=4.0)),  # a negative duration (clock step)
        dec(delta(flow_id="4", **{**HEALTH, "retransmits_c2s": 300, "resets_s2c": -1})),
    ]
    assert encode(*odd) == [reference(x) for x in odd]
