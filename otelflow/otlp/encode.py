"""Hand-written protobuf encoding of OTLP metrics and logs (opentelemetry-proto v1 field numbers).

Measured in the project's field notes: building opentelemetry-proto messages per point costs 27 us;
encoding bytes directly with attribute blocks cached per series costs ~2 us. The functions here are
small and composable; callers cache what repeats (a series' attribute block, the resource).
Field numbers are from opentelemetry/proto/{common,resource,metrics,logs}/v1/*.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
DOUBLE = _DOUBLE  # a double as 8 little-endian bytes (fixed64 wire type)

TEMPORALITY_DELTA = 1
TEMPORALITY_CUMULATIVE = 2
SEVERITY_INFO = 9


def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_SMALL = tuple(_varint_slow(i) for i in range(1 << 14))  # constant table: 1- and 2-byte varints
# 14 low bits as two varint bytes that both carry the continuation bit (more bytes follow)
_CONT = tuple(bytes(((x & 0x7F) | 0x80, (x >> 7) | 0x80)) for x in range(1 << 14))
# for inline encoders: varint(n) is SMALL_VARINTS[n] for 0 <= n < 16384, and
# CONT_VARINTS[n & 0x3FFF] + SMALL_VARINTS[n >> 14] for 16384 <= n < 2**28
SMALL_VARINTS, CONT_VARINTS = _SMALL, _CONT


def varint(n: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as their 64-bit two's complement (int64 fields)."""
    if 0 <= n < 16384:
        return _SMALL[n]
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    out = _CONT[n & 0x3FFF]  # n >= 16384 here: at least one more byte follows
    n >>= 14
    while n >= 16384:
        out += _CONT[n & 0x3FFF]
        n >>= 14
    return out + _SMALL[n]


_LD_TAGS = tuple(_varint_slow(f << 3 | 2) for f in range(32))  # length-delimited field tags


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return _LD_TAGS[field] + (_SMALL[n] if n < 16384 else _varint_slow(n)) + payload


def anyvalue(v: str | int | float | bool, as_bool: bool = False) -> bytes:
    """AnyValue: string_value=1, bool_value=2, int_value=3, double_value=4."""
    if as_bool or isinstance(v, bool):
        truthy = v in (True, "true") if not isinstance(v, bool) else v
        return b"\x10" + (b"\x01" if truthy else b"\x00")
    if isinstance(v, int):
        return b"\x18" + varint(v)
    if isinstance(v, float):
        return b"\x21" + _DOUBLE(v)
    return ld(1, v.encode())


def keyvalue(k: str, v: str | int | float | bool, as_bool: bool = False) -> bytes:
    """KeyValue: key=1, value=2."""
    return ld(1, k.encode()) + ld(2, anyvalue(v, as_bool))


def attributes(
    pairs: Iterable[tuple[str, str | int | float | bool]], field: int, bools: Iterable[str] = ()
) -> bytes:
    """A repeated KeyValue field (`field` is 7 in NumberDataPoint, 6 in LogRecord, 1 in Resource)."""
    b = set(bools)
    return b"".join(ld(field, keyvalue(k, v, k in b)) for k, v in pairs)


_SHORT_STR = 256  # string values shorter than this use Key's prefix table; longer ones are framed directly
SHORT_STR = _SHORT_STR


def _framed_prefix(field: int, inner_head: bytes, n: int) -> bytes:
    """Tag and length of a length-delimited field whose payload is ``inner_head`` + n more bytes."""
    return _LD_TAGS[field] + varint(len(inner_head) + n) + inner_head


class Key:
    """One attribute key of a repeated-KeyValue field (`field`), encoded once with the framing for
    every value length, so that encoding a (key, value) pair is one value encoding and one
    concatenation: ``prefix[len(value bytes)] + value bytes``. Same bytes as ``ld(field,
    keyvalue(name, v))``."""

    __slots__ = ("_ints", "_strs", "double_prefix", "field", "int_prefixes", "name", "str_prefixes")

    def __init__(self, field: int, name: str) -> None:
        self.field = field
        self.name = name
        k = ld(1, name.encode())
        # KeyValue{key=1, value=2: AnyValue{int_value=3 (varint, 1..10 bytes)}}
        self._ints = tuple(_framed_prefix(field, k + b"\x12" + _SMALL[1 + n] + b"\x18", n) for n in range(11))
        self.int_prefixes = self._ints  # indexed by the value's varint length: prefix + varint(v)
        # KeyValue{key=1, value=2: AnyValue{double_value=4 (fixed64)}}
        self.double_prefix = _framed_prefix(field, k + b"\x12\x09\x21", 8)  # + the 8-byte double
        # KeyValue{key=1, value=2: AnyValue{string_value=1 (n bytes)}}
        self._strs = tuple(
            _framed_prefix(field, k + b"\x12" + varint(1 + len(varint(n)) + n) + b"\x0a" + varint(n), n)
            for n in range(_SHORT_STR)
        )
        self.str_prefixes = self._strs  # indexed by the UTF-8 length (< SHORT_STR): prefix + the bytes

    def of_int(self, v: int) -> bytes:
        b = _SMALL[v] if 0 <= v < 16384 else varint(v)
        return self._ints[len(b)] + b

    def of_double(self, v: float) -> bytes:
        return self.double_prefix + _DOUBLE(v)

    def of_str(self, v: str) -> bytes:
        b = v.encode()
        n = len(b)
        if n < _SHORT_STR:
            return self._strs[n] + b
        return ld(self.field, keyvalue(self.name, v))


class KvCache:
    """Encoded repeated-KeyValue fields keyed by (key, value): attribute values repeat across series
    and records (namespaces, workloads, zones), so each is encoded once. Bounded: cleared when full."""

    __slots__ = ("_d", "field", "limit")

    def __init__(self, field: int, limit: int = 200_000) -> None:
        self.field = field
        self.limit = limit
        self._d: dict[tuple[str, str | int], bytes] = {}

    def get(self, k: str, v: str | int) -> bytes:
        key = (k, v)
        b = self._d.get(key)
        if b is None:
            if len(self._d) >= self.limit:
                self._d.clear()
            b = ld(self.field, keyvalue(k, v))
            self._d[key] = b
        return b

    def block(self, pairs: Iterable[tuple[str, str | int]]) -> bytes:
        get = self.get
        return b"".join([get(k, v) for k, v in pairs])


class IntKeys:
    """Several int attributes encoded in one call (a record's counters): the same bytes as each
    ``Key.of_int``, as fragments to join into the record."""

    __slots__ = ("_tables",)

    def __init__(self, field: int, names: Sequence[str]) -> None:
        self._tables = tuple(Key(field, n)._ints for n in names)

    def fragments(self, values: Sequence[int]) -> list[bytes]:
        out: list[bytes] = []
        for table, v in zip(self._tables, values, strict=True):
            if 0 <= v < 16384:
                b = _SMALL[v]
            elif 0 < v < 268435456:  # 3 or 4 bytes
                b = _CONT[v & 0x3FFF] + _SMALL[v >> 14]
            else:
                b = varint(v)
            out.append(table[len(b)] + b)
        return out


def resource(pairs: Sequence[tuple[str, str | int]]) -> bytes:
    """Resource message (attributes=1)."""
    return attributes(pairs, 1)


def scope(name: str, version: str) -> bytes:
    """InstrumentationScope message (name=1, version=2)."""
    return ld(1, name.encode()) + ld(2, version.encode())


_POINT_TAIL = struct.Struct("<BQBQBq")  # start_time_unix_nano=2, time_unix_nano=3, as_int=6
POINT_TAIL_SIZE = _POINT_TAIL.size


def point_head(*attr_blocks: bytes) -> bytes:
    """The constant prefix of a series' NumberDataPoint as a repeated field (data_points=1): tag,
    length and the attributes (the blocks joined). A point is then ``head + point_tail(...)``."""
    n = sum(map(len, attr_blocks)) + POINT_TAIL_SIZE
    return b"".join((_LD_TAGS[1], _SMALL[n] if n < 16384 else varint(n), *attr_blocks))


def point_tail(start_ns: int, time_ns: int, value: int) -> bytes:
    return _POINT_TAIL.pack(0x11, start_ns, 0x19, time_ns, 0x31, value)


def metric_head(name: str, description: str, unit: str) -> bytes:
    """Metric name=1, description=2, unit=3."""
    return ld(1, name.encode()) + ld(2, description.encode()) + ld(3, unit.encode())


def sum_metric(
    head: bytes, points: Sequence[bytes], temporality: int, monotonic: bool, framed: bool = False
) -> bytes:
    """Metric with sum=7: Sum{data_points=1, aggregation_temporality=2, is_monotonic=3}. ``framed``:
    the points already carry their data_points tag and length (see point_head)."""
    pts = points if framed else [ld(1, p) for p in points]
    tail = b"\x10" + varint(temporality) + (b"\x18\x01" if monotonic else b"")
    n = sum(map(len, pts)) + len(tail)
    return b"".join([head, _LD_TAGS[7], varint(n), *pts, tail])


def request(resource_msg: bytes, scope_msg: bytes, framed: list[bytes], size: int) -> bytes:
    """Export{Metrics,Logs}ServiceRequest around already framed items, in one copy. Both have the same
    shape: request{resource_X=1{resource=1, scope_X=2{scope=1, items=2}}}; ``framed`` holds each item's
    tag and length and its bytes (as separate or joined fragments), ``size`` their total length."""
    res = ld(1, resource_msg)
    sc = ld(1, scope_msg)
    inner = len(sc) + size
    inner_head = b"\x12" + varint(inner)
    outer = len(res) + len(inner_head) + inner
    head = b"".join((b"\x0a", varint(outer), res, inner_head, sc))
    return b"".join([head, *framed])


def item_frame(n: int) -> bytes:
    """Tag and length of one item (metrics=2 / log_records=2) of n bytes in a scope message."""
    return b"\x12" + (_SMALL[n] if n < 16384 else varint(n))


def metrics_request(resource_msg: bytes, scope_msg: bytes, metrics: Sequence[bytes]) -> bytes:
    """ExportMetricsServiceRequest{resource_metrics=1{resource=1, scope_metrics=2{scope=1, metrics=2}}}."""
    framed = [ld(2, m) for m in metrics]
    return request(resource_msg, scope_msg, framed, sum(map(len, framed)))


# LogRecord: time_unix_nano=1 (fixed64), then the constant severity_number=2 (INFO) and severity_text=3
LOG_TIME_TAG = 0x09
LOG_SEVERITY_INFO = b"\x10" + bytes([SEVERITY_INFO]) + ld(3, b"INFO")
LOG_HEAD = struct.Struct(f"<BQ{len(LOG_SEVERITY_INFO)}s")  # pack(LOG_TIME_TAG, time, LOG_SEVERITY_INFO)


def log_tail(observed_ns: int, event_name: str) -> bytes:
    """A LogRecord's last fields: observed_time_unix_nano=11 (fixed64) and event_name=12."""
    return b"\x59" + _FIXED64(observed_ns) + ld(12, event_name.encode())


def chunks(items: Sequence[bytes], limit: int, overhead: int = 0) -> list[list[bytes]]:
    """Split encoded items into groups whose total encoded size stays under `limit` bytes."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = overhead
    for it in items:
        n = len(it) + 6  # tag + length prefix, generously
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], overhead
        cur.append(it)
        size += n
    if cur:
        out.append(cur)
    return out


# ---- histograms: Metric.histogram=9{data_points=1, aggregation_temporality=2} ----------------------
# HistogramDataPoint: start_time_unix_nano=2 (fixed64), time_unix_nano=3 (fixed64), count=4 (fixed64),
# sum=5 (double), bucket_counts=6 (packed fixed64), explicit_bounds=7 (packed double), attributes=9,
# min=11 (double), max=12 (double)
_HIST_HEAD = struct.Struct("<BQBQBQBd")  # start, time, count, sum


def histogram_bounds(bounds: Sequence[float]) -> bytes:
    """explicit_bounds=7 as a packed field (constant per metric: encode it once)."""
    return ld(7, struct.pack(f"<{len(bounds)}d", *bounds))


def histogram_point(
    attrs: bytes,
    start_ns: int,
    time_ns: int,
    count: int,
    total: float,
    bucket_counts: Sequence[int],
    bounds: bytes,
    min_max: tuple[float, float] | None = None,
) -> bytes:
    """One HistogramDataPoint framed as a data_points=1 field. ``attrs``: the attributes=9 block;
    ``bounds``: histogram_bounds(...); ``min_max``: omitted when None."""
    body = [
        attrs,
        _HIST_HEAD.pack(0x11, start_ns, 0x19, time_ns, 0x21, count, 0x29, total),
        ld(6, struct.pack(f"<{len(bucket_counts)}Q", *bucket_counts)),
        bounds,
    ]
    if min_max is not None:
        body.append(b"\x59" + _DOUBLE(min_max[0]) + b"\x61" + _DOUBLE(min_max[1]))
    n = sum(map(len, body))
    return b"".join([_LD_TAGS[1], varint(n), *body])


def histogram_metric(head: bytes, points: Sequence[bytes], temporality: int) -> bytes:
    """Metric with histogram=9: Histogram{data_points=1 (already framed), aggregation_temporality=2}."""
    tail = b"\x10" + varint(temporality)
    n = sum(map(len, points)) + len(tail)
    return b"".join([head, _LD_TAGS[9], varint(n), *points, tail])
