"""The lossless two-map drain shared by the eBPF loaders (loader.FlowCounter, health.TcpHealth).

A program records into one of two hash maps (the inner maps), chosen through a one-slot
ARRAY_OF_MAPS (the outer map), and counts what it could not record into two per-CPU ARRAY maps
(drops and stats, one slot per reason). swap() points the slot at the other (empty) map; the
kernel's map-in-map update waits for every running program (synchronize_rcu), so the old map is
then quiescent and read_delete() reads and empties it with bpf_map_lookup_and_delete_batch. No
increment can land between the read and the delete (which a lookup_and_delete_batch on a live map
cannot promise: programs add through a pointer, outside the bucket lock), so per-interval deltas
add up exactly.

    LAYOUT = Layout("flow", ("flows_a", "flows_b"), "flow_maps", KEY, VAL, DROP_NAMES, STAT_NAMES)
    m = SwapMaps.load(obj, LAYOUT, max_entries, now_ns, path)  # size the inner maps, load
    g = m.take()                # swap, read the old map, and the loss counters since the last take
    parse(g.keys, g.vals, g.n); g.drops; g.stats

The caller serialises calls (its lock): one SwapMaps is not thread-safe on its own.
"""

from __future__ import annotations

import ctypes as C
import errno
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from otelflow.ebpf import libbpf as lb


def map_handle(obj: int, name: str) -> int:
    """libbpf's handle of one map of an opened object (an error names a missing map)."""
    return lb.check(lb.lib().bpf_object__find_map_by_name(obj, name.encode()), f"map {name}")


def map_fd(obj: int, name: str) -> int:
    """The file descriptor of one map of a loaded object."""
    return lb.check(lb.lib().bpf_map__fd(map_handle(obj, name)), name)


def size_inner(obj: int, names: Sequence[str], max_entries: int) -> None:
    """Set the size of the inner maps of an opened, not yet loaded object."""
    for name in names:
        lb.check(
            lb.lib().bpf_map__set_max_entries(map_handle(obj, name), max_entries), f"set_max_entries({name})"
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """The drain maps of one BPF object and their entries, as the object's C source declares them."""

    label: str  # names the maps in errors ("flow": "flow map swap")
    inner: tuple[str, str]  # the first: the one the outer map points at initially (its static init)
    outer: str  # the one-slot ARRAY_OF_MAPS
    key: struct.Struct  # one entry's key
    val: struct.Struct  # one entry's value
    drop_names: tuple[str, ...]  # slots of the per-CPU "drops" array, in index order
    stat_names: tuple[str, ...]  # slots of the per-CPU "stats" array
    drops: str = "drops"
    stats: str = "stats"


@dataclass(frozen=True, slots=True)
class Taken:
    """One generation of the inner maps, swapped out and read (into SwapMaps.keys / .vals)."""

    keys: memoryview  # bytes, the packed keys read (n of them), then unused room
    vals: memoryview  # bytes, the packed values read
    n: int  # entries read
    drops: dict[str, int]  # since the previous take() (the first: since load)
    stats: dict[str, int]
    since_ns: int  # the programs' clock: this generation became active
    until_ns: int  # the programs' clock: it was swapped out (no event stamped later is in it)
    started: float  # time.perf_counter() before the swap
    swapped: float  # time.perf_counter() after the swap (it waited for running programs)

    @property
    def swap_seconds(self) -> float:
        return self.swapped - self.started


class SwapMaps:
    """The drain maps of one loaded object (see the module docstring): max_entries is the size of
    each inner map; now_ns the clock the programs stamp events with."""

    def __init__(self, obj: int, layout: Layout, max_entries: int, now_ns: Callable[[], int]) -> None:
        self.label = layout.label
        self.inner_fds = [map_fd(obj, n) for n in layout.inner]
        self.outer_fd = map_fd(obj, layout.outer)
        self.drops_fd = map_fd(obj, layout.drops)
        self.stats_fd = map_fd(obj, layout.stats)
        self.drop_names, self.stat_names = layout.drop_names, layout.stat_names
        self.key_size, self.val_size = layout.key.size, layout.val.size
        self.max_entries = max_entries
        self._now_ns = now_ns
        self.ncpus = lb.num_possible_cpus()
        self.active = 0  # the object's static initialisation of outer[0]: the first inner map
        self.since_ns = now_ns()
        self.keys: C.Array[C.c_char] | None = None  # allocated by the first read_delete()
        self.vals: C.Array[C.c_char] | None = None
        self._last_drops = [0] * len(self.drop_names)
        self._last_stats = [0] * len(self.stat_names)

    @classmethod
    def load(
        cls, obj: int, layout: Layout, max_entries: int, now_ns: Callable[[], int], path: str
    ) -> SwapMaps:
        """Size the inner maps of an opened object (at path), load it, and take its drain maps."""
        size_inner(obj, layout.inner, max_entries)
        lb.check(lb.lib().bpf_object__load(obj), f"bpf_object__load({path})")
        return cls(obj, layout, max_entries, now_ns)

    # ---- the per-CPU loss counters -----------------------------------------------------------
    def percpu(self, fd: int, n: int) -> list[int]:
        """Slots 0..n-1 of a per-CPU ARRAY map, each summed over CPUs."""
        L = lb.lib()
        buf = C.create_string_buffer(8 * self.ncpus)
        fmt = struct.Struct(f"={self.ncpus}Q")
        out = []
        for i in range(n):
            lb.check(L.bpf_map_lookup_elem(fd, C.byref(C.c_uint32(i)), buf), "per-CPU counter lookup")
            out.append(sum(fmt.unpack(buf.raw)))
        return out

    def _totals(self) -> tuple[list[int], list[int]]:
        return (
            self.percpu(self.drops_fd, len(self.drop_names)),
            self.percpu(self.stats_fd, len(self.stat_names)),
        )

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(drops, stats) since load, summed over CPUs."""
        drops, stats = self._totals()
        return dict(zip(self.drop_names, drops, strict=True)), dict(zip(self.stat_names, stats, strict=True))

    def deltas(self) -> tuple[dict[str, int], dict[str, int]]:
        """(drops, stats) since the previous deltas() (the first: since load)."""
        drops, stats = self._totals()
        out = (
            {k: a - b for k, a, b in zip(self.drop_names, drops, self._last_drops, strict=True)},
            {k: a - b for k, a, b in zip(self.stat_names, stats, self._last_stats, strict=True)},
        )
        self._last_drops, self._last_stats = drops, stats
        return out

    # ---- the inner maps ----------------------------------------------------------------------
    def swap(self) -> int:
        """Point the programs at the other inner map; return the index of the one to read. The
        outer-map update returns only after every running program finished (synchronize_rcu)."""
        L = lb.lib()
        new = 1 - self.active
        lb.check(
            L.bpf_map_update_elem(
                self.outer_fd, C.byref(C.c_uint32(0)), C.byref(C.c_uint32(self.inner_fds[new])), 0
            ),
            f"{self.label} map swap",
        )
        old, self.active = self.active, new
        return old

    def read_delete(self, fd: int) -> int:
        """Read and empty one (quiescent) inner map into keys / vals; return the count."""
        L = lb.lib()
        cap, ks, vs = self.max_entries, self.key_size, self.val_size
        if self.keys is None or self.vals is None:
            self.keys = C.create_string_buffer(cap * ks)
            self.vals = C.create_string_buffer(cap * vs)
        kbase, vbase = C.addressof(self.keys), C.addressof(self.vals)
        in_b, out_b = C.c_uint64(0), C.c_uint64(0)
        opts = lb.bpf_map_batch_opts(sz=C.sizeof(lb.bpf_map_batch_opts))
        total, first = 0, True
        while total < cap:
            cnt = C.c_uint32(cap - total)
            r = L.bpf_map_lookup_and_delete_batch(
                fd,
                None if first else C.byref(in_b),
                C.byref(out_b),
                kbase + total * ks,
                vbase + total * vs,
                C.byref(cnt),
                C.byref(opts),
            )
            if r < 0 and r != -errno.ENOENT:
                lb.check(r, "bpf_map_lookup_and_delete_batch")
            total += cnt.value
            if r == -errno.ENOENT:  # the last batch: its entries (count may be > 0) are valid
                break
            in_b.value, first = out_b.value, False
        return total

    def take(self) -> Taken:
        """Swap, then read and empty the map swapped out: every entry since the previous take(),
        and the loss counters' deltas."""
        started = time.perf_counter()
        old = self.swap()
        until = self._now_ns()
        swapped = time.perf_counter()
        n = self.read_delete(self.inner_fds[old])
        assert self.keys is not None and self.vals is not None
        since, self.since_ns = self.since_ns, until
        keys, vals = memoryview(self.keys).cast("B"), memoryview(self.vals).cast("B")
        return Taken(keys, vals, n, *self.deltas(), since, until, started, swapped)

    def fill(self, keys: bytes, values: bytes) -> int:
        """Insert entries into the active inner map with one bpf_map_update_batch (benchmarks)."""
        n = len(keys) // self.key_size
        if len(values) != n * self.val_size:
            raise ValueError("fill: keys and values differ in count")
        cnt = C.c_uint32(n)
        opts = lb.bpf_map_batch_opts(sz=C.sizeof(lb.bpf_map_batch_opts))
        lb.check(
            lb.lib().bpf_map_update_batch(
                self.inner_fds[self.active], keys, values, C.byref(cnt), C.byref(opts)
            ),
            "bpf_map_update_batch",
        )
        return cnt.value
