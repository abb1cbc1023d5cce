"""ctypes bindings to libbpf.so.1: only what otelflow uses (written against libbpf 1.1).

Conventions of libbpf >= 1.0 that these bindings rely on:
- functions returning a pointer get ``restype = c_void_p`` (the default c_int would truncate it)
  and return NULL with errno set on failure;
- functions returning int return ``-errno`` on failure (``check`` turns both into ``BPFError``);
- option structs start with ``size_t sz`` and must be passed with ``sz = sizeof``; their sizes
  are asserted below against libbpf 1.1's layouts.

The library is loaded lazily (``lib()``), so importing this module never needs libbpf: the unit
tier can check struct layouts on any machine. libbpf's own log lines go to the ``otelflow.libbpf``
logger instead of stderr, and the last warnings are kept to explain a failure.
"""

from __future__ import annotations

import collections
import ctypes as C
import errno
import logging
import os
import threading
from typing import Any

log = logging.getLogger("otelflow.libbpf")

# ---- option structs (libbpf.h / bpf.h, v1.1) ---------------------------------------------------


class bpf_tc_hook(C.Structure):
    # size_t sz; int ifindex; enum bpf_tc_attach_point attach_point; __u32 parent; size_t :0;
    _fields_ = [
        ("sz", C.c_size_t),
        ("ifindex", C.c_int),
        ("attach_point", C.c_int),
        ("parent", C.c_uint32),
    ]


class bpf_tc_opts(C.Structure):
    # size_t sz; int prog_fd; __u32 flags; __u32 prog_id; __u32 handle; __u32 priority; size_t :0;
    _fields_ = [
        ("sz", C.c_size_t),
        ("prog_fd", C.c_int),
        ("flags", C.c_uint32),
        ("prog_id", C.c_uint32),
        ("handle", C.c_uint32),
        ("priority", C.c_uint32),
    ]


class bpf_map_batch_opts(C.Structure):
    # size_t sz; __u64 elem_flags; __u64 flags;
    _fields_ = [("sz", C.c_size_t), ("elem_flags", C.c_uint64), ("flags", C.c_uint64)]


class bpf_link_create_opts(C.Structure):
    # size_t sz; __u32 flags; union bpf_iter_link_info *iter_info; __u32 iter_info_len;
    # __u32 target_btf_id; union { perf_event, kprobe_multi {__u32 flags, cnt; 3 pointers}, tracing };
    # size_t :0. libbpf 1.1 passes ``flags`` on for an attach type it does not know (tcx) and
    # requires every later field to be zero.
    _fields_ = [
        ("sz", C.c_size_t),
        ("flags", C.c_uint32),
        ("iter_info", C.c_void_p),
        ("iter_info_len", C.c_uint32),
        ("target_btf_id", C.c_uint32),
        ("_union", C.c_uint64 * 4),  # the largest member, kprobe_multi: 4 + 4 + 3 * 8 bytes
    ]


class bpf_prog_query_opts(C.Structure):
    # size_t sz; __u32 query_flags; __u32 attach_flags; __u32 *prog_ids; __u32 prog_cnt;
    # __u32 *prog_attach_flags;
    _fields_ = [
        ("sz", C.c_size_t),
        ("query_flags", C.c_uint32),
        ("attach_flags", C.c_uint32),
        ("prog_ids", C.c_void_p),
        ("prog_cnt", C.c_uint32),
        ("prog_attach_flags", C.c_void_p),
    ]


class bpf_test_run_opts(C.Structure):
    _fields_ = [
        ("sz", C.c_size_t),
        ("data_in", C.c_void_p),
        ("data_out", C.c_void_p),
        ("data_size_in", C.c_uint32),
        ("data_size_out", C.c_uint32),
        ("ctx_in", C.c_void_p),
        ("ctx_out", C.c_void_p),
        ("ctx_size_in", C.c_uint32),
        ("ctx_size_out", C.c_uint32),
        ("retval", C.c_uint32),
        ("repeat", C.c_int),
        ("duration", C.c_uint32),
        ("flags", C.c_uint32),
        ("cpu", C.c_uint32),
        ("batch_size", C.c_uint32),
    ]


class sk_buff_ctx(C.Structure):
    """struct __sk_buff (UAPI, append-only): the context a tc program sees; BPF_PROG_TEST_RUN
    accepts mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and
    hwtstamp in it and requires the rest to be zero."""

    _u32 = C.c_uint32
    _fields_ = [
        ("len", _u32),
        ("pkt_type", _u32),
        ("mark", _u32),
        ("queue_mapping", _u32),
        ("protocol", _u32),
        ("vlan_present", _u32),
        ("vlan_tci", _u32),
        ("vlan_proto", _u32),
        ("priority", _u32),
        ("ingress_ifindex", _u32),
        ("ifindex", _u32),
        ("tc_index", _u32),
        ("cb", _u32 * 5),
        ("hash", _u32),
        ("tc_classid", _u32),
        ("data", _u32),
        ("data_end", _u32),
        ("napi_id", _u32),
        ("family", _u32),
        ("remote_ip4", _u32),
        ("local_ip4", _u32),
        ("remote_ip6", _u32 * 4),
        ("local_ip6", _u32 * 4),
        ("remote_port", _u32),
        ("local_port", _u32),
        ("data_meta", _u32),
        ("flow_keys", C.c_uint64),  # __bpf_md_ptr: a pointer in an 8-byte union
        ("tstamp", C.c_uint64),
        ("wire_len", _u32),
        ("gso_segs", _u32),
        ("sk", C.c_uint64),
        ("gso_size", _u32),
        ("tstamp_type", C.c_uint8),
        ("hwtstamp", C.c_uint64),
    ]


# The trailing `size_t :0` in the C structs pads them to a multiple of 8: ctypes pads the same way.
assert C.sizeof(bpf_tc_hook) == 24, C.sizeof(bpf_tc_hook)
assert C.sizeof(bpf_tc_opts) == 32, C.sizeof(bpf_tc_opts)
assert C.sizeof(bpf_map_batch_opts) == 24, C.sizeof(bpf_map_batch_opts)
assert C.sizeof(bpf_link_create_opts) == 64, C.sizeof(bpf_link_create_opts)
assert C.sizeof(bpf_prog_query_opts) == 40, C.sizeof(bpf_prog_query_opts)
assert C.sizeof(bpf_test_run_opts) == 80, C.sizeof(bpf_test_run_opts)
assert C.sizeof(sk_buff_ctx) == 192, C.sizeof(sk_buff_ctx)

BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_CUSTOM = 4
BPF_TC_F_REPLACE = 1

# enum bpf_attach_type (linux/bpf.h, ABI): the tcx hooks of Linux >= 6.6, which libbpf 1.1 predates
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3  # link_create flag: before the relative program; none given = first in chain

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
BPF_STATS_RUN_TIME = 0  # bpf_enable_stats(): per-program run time and count while the fd is open


class BPFError(OSError):
    """A libbpf call failed: errno plus what was being done (and libbpf's last warnings)."""


# ---- signatures -------------------------------------------------------------------------------
_vp, _int, _u32, _u64 = C.c_void_p, C.c_int, C.c_uint32, C.c_uint64
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_version_string": (C.c_char_p, []),
    "libbpf_major_version": (_u32, []),
    "libbpf_minor_version": (_u32, []),
    "libbpf_num_possible_cpus": (_int, []),
    "bpf_object__open_file": (_vp, [C.c_char_p, _vp]),
    "bpf_object__load": (_int, [_vp]),
    "bpf_object__close": (None, [_vp]),
    "bpf_object__find_program_by_name": (_vp, [_vp, C.c_char_p]),
    "bpf_object__find_map_by_name": (_vp, [_vp, C.c_char_p]),
    "bpf_program__fd": (_int, [_vp]),
    "bpf_program__set_autoload": (_int, [_vp, C.c_bool]),
    "bpf_program__attach": (_vp, [_vp]),
    "bpf_link__destroy": (_int, [_vp]),
    "bpf_obj_get_info_by_fd": (_int, [_int, _vp, C.POINTER(_u32)]),
    "bpf_map__fd": (_int, [_vp]),
    "bpf_map__set_max_entries": (_int, [_vp, _u32]),
    "bpf_map__max_entries": (_u32, [_vp]),
    "bpf_map__key_size": (_u32, [_vp]),
    "bpf_map__value_size": (_u32, [_vp]),
    "bpf_tc_hook_create": (_int, [C.POINTER(bpf_tc_hook)]),
    "bpf_tc_hook_destroy": (_int, [C.POINTER(bpf_tc_hook)]),
    "bpf_tc_attach": (_int, [C.POINTER(bpf_tc_hook), C.POINTER(bpf_tc_opts)]),
    "bpf_tc_detach": (_int, [C.POINTER(bpf_tc_hook), C.POINTER(bpf_tc_opts)]),
    "bpf_tc_query": (_int, [C.POINTER(bpf_tc_hook), C.POINTER(bpf_tc_opts)]),
    "bpf_map_lookup_elem": (_int, [_int, _vp, _vp]),
    "bpf_map_update_elem": (_int, [_int, _vp, _vp, _u64]),
    "bpf_map_delete_elem": (_int, [_int, _vp]),
    "bpf_map_get_next_key": (_int, [_int, _vp, _vp]),
    "bpf_map_lookup_batch": (
        _int,
        [_int, _vp, _vp, _vp, _vp, C.POINTER(_u32), C.POINTER(bpf_map_batch_opts)],
    ),
    "bpf_map_lookup_and_delete_batch": (
        _int,
        [_int, _vp, _vp, _vp, _vp, C.POINTER(_u32), C.POINTER(bpf_map_batch_opts)],
    ),
    "bpf_map_update_batch": (_int, [_int, _vp, _vp, C.POINTER(_u32), C.POINTER(bpf_map_batch_opts)]),
    "bpf_prog_test_run_opts": (_int, [_int, C.POINTER(bpf_test_run_opts)]),
    "bpf_link_create": (_int, [_int, _int, _int, C.POINTER(bpf_link_create_opts)]),
    "bpf_prog_query_opts": (_int, [_int, _int, C.POINTER(bpf_prog_query_opts)]),
    "bpf_enable_stats": (_int, [_int]),
    "bpf_prog_get_fd_by_id": (_int, [_u32]),
    "libbpf_set_print": (_vp, [_vp]),
}

# int (*libbpf_print_fn_t)(enum libbpf_print_level level, const char *fmt, va_list args)
PRINT_FN = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)

_lock = threading.Lock()
_lib: C.CDLL | None = None
_print_cb: Any = None  # keep the callback alive as long as libbpf may call it
_recent: collections.deque[str] = collections.deque(maxlen=8)


def _libc() -> C.CDLL:
    libc = C.CDLL(None, use_errno=True)
    libc.vsnprintf.restype = C.c_int
    libc.vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]
    return libc


def _install_print(lib_: C.CDLL) -> None:
    global _print_cb
    libc = _libc()
    buf = C.create_string_buffer(2048)
    buf_lock = threading.Lock()

    def on_print(level: int, fmt: bytes, args: int) -> int:
        # On x86-64 (and arm64's AAPCS64 too) va_list is passed by reference: hand it on as is.
        with buf_lock:
            libc.vsnprintf(buf, len(buf), fmt, args)
            msg = buf.value.decode(errors="replace").rstrip()
        if level == LIBBPF_WARN:
            _recent.append(msg)
            log.info("%s", msg)
        else:
            log.debug("%s", msg)
        return 0

    _print_cb = PRINT_FN(on_print)
    lib_.libbpf_set_print(C.cast(_print_cb, C.c_void_p))


def lib() -> C.CDLL:
    """The loaded libbpf.so.1 with typed signatures (loaded once; raises BPFError if missing)."""
    global _lib
    with _lock:
        if _lib is None:
            try:
                handle = C.CDLL("libbpf.so.1", use_errno=True)
            except OSError as e:
                raise BPFError(errno.ENOENT, f"libbpf.so.1 not found ({e}): install libbpf1") from None
            for name, (res, args) in _SIGNATURES.items():
                f = getattr(handle, name)
                f.restype = res
                f.argtypes = args
            _install_print(handle)
            _lib = handle
        return _lib


def version() -> str:
    return lib().libbpf_version_string().decode()


def recent_warnings() -> list[str]:
    """libbpf's last warning lines (most recent last)."""
    return list(_recent)


def check(ret: int | None, what: str) -> int:
    """Raise BPFError for a failed libbpf call: a negative int (-errno) or a NULL pointer (errno)."""
    if ret is None:
        e = C.get_errno() or errno.EINVAL
    elif ret < 0:
        e = -ret
    else:
        return ret
    hint = ""
    if _recent:
        hint = f" (libbpf: {_recent[-1]})"
    raise BPFError(e, f"{what}: {os.strerror(e)}{hint}")


def num_possible_cpus() -> int:
    return check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (bpf_prog_info.id, the second __u32 of the struct)."""
    info = (C.c_uint32 * 2)()
    n = C.c_uint32(C.sizeof(info))
    check(
        lib().bpf_obj_get_info_by_fd(prog_fd, C.cast(info, C.c_void_p), C.byref(n)), "bpf_obj_get_info_by_fd"
    )
    return int(info[1])


def prog_query(target: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached at one hook, in the order they run (BPF_PROG_QUERY). For the
    tcx hooks ``target`` is an interface index of the calling thread's network namespace.
    Raises BPFError (EINVAL on a kernel without that attach type)."""
    ids = (C.c_uint32 * max_progs)()
    o = bpf_prog_query_opts(
        sz=C.sizeof(bpf_prog_query_opts), prog_ids=C.cast(ids, C.c_void_p), prog_cnt=max_progs
    )
    check(
        lib().bpf_prog_query_opts(target, attach_type, C.byref(o)),
        f"BPF_PROG_QUERY(attach type {attach_type})",
    )
    return [int(i) for i in ids[: o.prog_cnt]]
