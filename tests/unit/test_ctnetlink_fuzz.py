"""Property tests: the ctnetlink parser never raises on hostile bytes (except CtNetlinkError for a
well-formed error reply), counts what it skips, and its fast path always agrees with the slow walk."""

from __future__ import annotations

import socket
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otelflow.conntrack import netlink as nl
from otelflow.conntrack.netlink import CtNetlinkError, ParseStats, parse_messages
from tests.unit.ctnl_encode import ct_type, done, encode_entry, nfgen, nla, nlmsg, sample_entries

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def expected_error(buf: bytes) -> int | None:
    """Independent reference: the errno parse_messages must raise for ``buf``, or None.

    Walks message headers the way the netlink spec defines them; an error is due only for a
    well-formed NLMSG_ERROR (errno < 0) or NLMSG_DONE (status < 0) reached before the walk stops.
    """
    off = 0
    while off + 16 <= len(buf):
        ln, ty = struct.unpack_from("=IH", buf, off)
        if ln < 16 or off + ln > len(buf):
            return None
        if ty in (nl.NLMSG_ERROR, nl.NLMSG_DONE) and ln >= 20:
            (code,) = struct.unpack_from("=i", buf, off + 16)
            if code < 0:
                return -code
        if ty == nl.NLMSG_DONE:
            return None
        off += (ln + 3) & ~3
    return None


def parse_checked(
    buf: bytes, fast: bool, cache: nl.LayoutCache | None = None
) -> tuple[list[Any], ParseStats]:
    """parse_messages, asserting it raised exactly when (and what) the reference says."""
    stats = ParseStats()
    want = expected_error(buf)
    try:
        out = parse_messages(buf, stats, fast_path=fast, cache=cache)
    except CtNetlinkError as exc:
        assert want is not None, f"unexpected CtNetlinkError {exc}"
        assert exc.errno == want
        return [], stats
    assert want is None, "a well-formed error reply must raise"
    assert stats.internal_errors == 0
    return out, stats


def check_all_paths(buf: bytes) -> tuple[list[Any], ParseStats]:
    """Slow walk, fast path while learning, fast path with templates: identical results and stats."""
    slow = parse_checked(buf, fast=False)
    cache = nl.LayoutCache()
    assert parse_checked(buf, fast=True, cache=cache) == slow  # learning
    assert parse_checked(buf, fast=True, cache=cache) == slow  # with learned layouts
    return slow


VALID = b"".join(encode_entry(e, seq=3) for e in sample_entries())
VALID_EXTRAS = b"".join(encode_entry(e, seq=4, extras=True) for e in sample_entries())
BOUNDARIES = set()
_o = 0
for _e in sample_entries():
    _o += len(encode_entry(_e, seq=3))
    BOUNDARIES.add(_o)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    check_all_paths(data)


@FUZZ
@given(st.binary(max_size=300))
def test_random_payload_of_ct_message(payload: bytes) -> None:
    """Random bytes behind a valid ctnetlink header: every path through the attribute walk."""
    for fam in (socket.AF_INET, socket.AF_INET6):
        check_all_paths(nlmsg(ct_type(nl.IPCTNL_MSG_CT_NEW), 2, nfgen(fam) + payload))


def test_every_truncation_of_a_valid_buffer() -> None:
    """Cut a valid multi-message buffer at every offset: complete messages before the cut still
    parse, and a cut inside a message is counted as malformed."""
    full = VALID + done()
    n_before = 0
    for cut in range(len(full) + 1):
        out, stats = check_all_paths(full[:cut])
        n_before = sum(1 for b in BOUNDARIES if b <= cut)
        assert len(out) == n_before, cut
        assert [e for _, e in out] == sample_entries()[:n_before]
        at_boundary = cut in BOUNDARIES or cut == 0 or cut == len(full)
        assert (stats.malformed == 0) == at_boundary, cut


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_EXTRAS) - 1), st.integers(0, 7)), min_size=1, max_size=6))
def test_bit_flips(flips: list[tuple[int, int]]) -> None:
    buf = bytearray(VALID_EXTRAS + done())
    for pos, bit in flips:
        buf[pos] ^= 1 << bit
    check_all_paths(bytes(buf))


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8))
def test_overwrites_inside_valid_buffer(pos: int, junk: bytes) -> None:
    buf = bytearray(VALID)
    buf[pos : pos + len(junk)] = junk
    check_all_paths(bytes(buf))


# Random attribute trees: types drawn near the real ones so known attributes are hit often.
_attr_type = st.one_of(st.integers(0, 30), st.integers(0, 0xFFFF))


def _leaf() -> st.SearchStrategy[bytes]:
    return st.builds(nla, _attr_type, st.binary(max_size=20))


def _tree(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda t, kids, flag: nla(t | (nl.NLA_F_NESTED if flag else 0), b"".join(kids)),
        _attr_type,
        st.lists(children, max_size=5),
        st.booleans(),
    )


ATTRS = st.recursive(_leaf(), _tree, max_leaves=25)


@FUZZ
@given(st.lists(ATTRS, max_size=8), st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 7]), st.booleans())
def test_random_attribute_trees(attrs: list[bytes], family: int, delete: bool) -> None:
    msg = nl.IPCTNL_MSG_CT_DELETE if delete else nl.IPCTNL_MSG_CT_NEW
    one = nlmsg(ct_type(msg), 0, nfgen(family) + b"".join(attrs))
    # repeated, so templates learned from the first copy are applied to the others (bulk path)
    check_all_paths(one * 5 + done())


@FUZZ
@given(
    st.lists(ATTRS, max_size=4),
    st.sampled_from(sample_entries()),
    st.integers(0, 10),
)
def test_valid_entries_mixed_with_junk_attributes(junk: list[bytes], entry: Any, where: int) -> None:
    """Unknown/garbage attributes added to a valid entry never stop it from parsing."""
    base = encode_entry(entry)
    body = base[20:]
    # insert junk attributes at the end of the top level (always attribute-aligned)
    attrs = body + b"".join(junk)
    buf = nlmsg(ct_type(0), 2, nfgen(entry.family) + attrs)
    out, _ = check_all_paths(buf * (1 + where % 3))
    for _, got in out:
        # junk may overwrite fields it names (e.g. a second CTA_ID), never the tuples' presence
        assert got.family == entry.family


@FUZZ
@given(st.lists(st.sampled_from(range(len(sample_entries()))), min_size=1, max_size=40))
def test_any_sequence_of_valid_entries_round_trips(order: list[int]) -> None:
    es = sample_entries()
    buf = b"".join(encode_entry(es[i]) for i in order) + done()
    out, stats = check_all_paths(buf)
    assert [e for _, e in out] == [es[i] for i in order]
    assert stats.malformed == 0
