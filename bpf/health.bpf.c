// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * otelflow TCP health (CO-RE, libbpf).
 *
 * Tracing programs count, per TCP socket, what the kernel's TCP stack does: retransmitted
 * segments, resets sent and received, smoothed RTT samples and connection state changes, into a
 * hash map keyed by the socket's addresses as the socket sees them plus its network namespace.
 * Userspace (otelflow/ebpf/health.py) picks, per feature, the first alternative the kernel lets it
 * load and attach, drains the map each interval, and the agent joins the records onto flows by
 * tuple.
 *
 * Requires Linux >= 5.12 (BPF atomics beyond add: compare-and-swap) with kernel BTF. One body serves
 * every program type: tp_btf and fentry programs get BTF pointers and read struct sock's own fields
 * with plain (CO-RE relocated) loads; raw_tp programs read everything with BPF_CORE_READ
 * (bpf_probe_read_kernel); fields beyond struct sock (inet_sock, tcp_sock) are probe-read by all.
 * Cost measured on the test VM (bench/tcp_health_overhead.py): ~520 ns per tcp_probe run with plain
 * loads, ~730 ns with probe reads only, as the kernel's run-time statistics report it.
 *
 * ---- Programs: one or more alternatives per feature (the loader loads only the chosen ones) ----
 *   retransmits   tp_btf/tcp_retransmit_skb (sk, skb, err)   hl_retx_btf   Linux >= 6.17 (err arg)
 *                 tp_btf/tcp_retransmit_skb (sk, skb)        hl_retx_btf2  older: fires on success only
 *                 raw_tp/tcp_retransmit_skb, same two        hl_retx_raw, hl_retx_raw2
 *   rtt           tp_btf/tcp_probe (sk, skb)                 hl_rtt_btf
 *                 fentry/tcp_rcv_established (sk, skb)       hl_rtt_fentry (the same hook point:
 *                                                            tcp_probe fires first thing in it)
 *                 raw_tp/tcp_probe                           hl_rtt_raw
 *   resets        tp_btf/tcp_send_reset + tp_btf/tcp_receive_reset    hl_rstx_btf + hl_rsrx_btf
 *                 raw_tp/ the same two                               hl_rstx_raw + hl_rsrx_raw
 *   state         tp_btf/inet_sock_set_state (sk, old, new)  hl_state_btf
 *                 raw_tp/inet_sock_set_state                 hl_state_raw
 *   A raw_tp program that reads an argument the running kernel's tracepoint lacks fails at attach
 *   (the 3-argument tcp_retransmit_skb before 6.17): the loader then falls back to the next one.
 *
 * Tracing programs see every network namespace of the machine: one agent per node sees the TCP
 * sockets of every pod on it (and of the host). The namespace inode in the key tells them apart;
 * an optional allow-list (`netns_allow`, enabled by hl_config bit HL_CFG_NETNS_FILTER) restricts
 * recording to listed namespaces (events from others are counted in stats, never recorded).
 *
 * ---- Key (struct hl_key, 48 bytes): one socket direction, as the socket sees it ----------------
 *   laddr[16], raddr[16]  local and remote address: IPv6, or IPv4 as IPv4-mapped IPv6
 *                         (::ffff:a.b.c.d), network byte order. An AF_INET6 socket talking to a
 *                         v4-mapped peer is recorded as IPv4 (family 4), as its packets are.
 *   netns                 the socket's network namespace inode (stat -L /proc/PID/ns/net)
 *   lport, rport          local and remote TCP port, HOST byte order
 *   family                4 or 6
 *   pad[7]                always 0
 *   The local port comes from inet_sock.inet_sport, not sock_common.skc_num: tcp_set_state(CLOSE)
 *   releases the port (inet_put_port sets skc_num to 0) before the state-change tracepoint fires,
 *   so skc_num would key a closing socket under port 0. Sockets that are not full sockets
 *   (TIME_WAIT, request sockets: only seen by tcp_send_reset) use skc_num, which they keep.
 *
 * ---- Value (struct hl_val, 80 bytes) -----------------------------------------------------------
 *   retrans_segs     segments retransmitted: tcp_skb_pcount of each retransmission that was sent
 *                    (err == 0); the same segments the kernel adds to tcpi_total_retrans
 *   retrans_failed   retransmission attempts that failed (err != 0: still queued in the host,
 *                    no route, no memory, window closed...; kernels >= 6.17 report these)
 *   resets_sent      RSTs this socket (or, without a socket, this address pair) sent
 *   resets_received  RSTs this socket accepted (tcp_reset: the connection was reset by the peer)
 *   rtt_sum_us       sum of the srtt samples below, microseconds
 *   rtt_samples      srtt samples: one per segment received in ESTABLISHED (tcp_rcv_established)
 *   srtt_us          the latest sample: the socket's smoothed RTT (tcp_sock.srtt_us >> 3, the
 *                    kernel's tcpi_rtt), microseconds, read before that segment is processed
 *   rtt_min_us       the smallest sample this interval (0: none)
 *   opened           SYN_SENT -> ESTABLISHED (active) or SYN_RECV -> ESTABLISHED (passive)
 *   closed           -> CLOSE from a state an opened connection can be in (ESTABLISHED, FIN_WAIT1,
 *                    FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT)
 *   failed           SYN_SENT or SYN_RECV -> CLOSE: a connection attempt that never opened
 *   last_state       the new state of the latest counted state change (0: none this interval)
 *   last_seen_ns     bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the latest event
 *
 * ---- Never lose silently -----------------------------------------------------------------------
 *   The maps are BPF_MAP_TYPE_HASH (never LRU). An event that cannot be recorded (map full, any
 *   other insert error, no active map, a reset with neither socket nor readable packet) adds its
 *   amount to drops[HL_DROP_<what it would have added>] (per CPU): recorded + dropped = what
 *   happened, per kind. Reasons are counted in `stats`. An event the kernel does not run a program
 *   for (the tracepoint hit again on a CPU where the program is running: an interrupt) is counted
 *   by the kernel in the program's recursion_misses, which the loader reports per feature.
 *
 * ---- Draining without losing increments --------------------------------------------------------
 *   As in flow.bpf.c: two maps behind a one-slot ARRAY_OF_MAPS; userspace swaps the slot (the
 *   kernel waits for running programs), then reads and empties the quiet map. Every event lands in
 *   exactly one generation: a program looks the active map up once and uses only that pointer.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define HL_E2BIG 7
#define HL_EEXIST 17

#define HL_AF_INET 2
#define HL_AF_INET6 10
#define HL_IPPROTO_TCP 6

/* include/net/tcp_states.h */
#define HL_TCP_ESTABLISHED 1
#define HL_TCP_SYN_SENT 2
#define HL_TCP_SYN_RECV 3
#define HL_TCP_FIN_WAIT1 4
#define HL_TCP_FIN_WAIT2 5
#define HL_TCP_TIME_WAIT 6
#define HL_TCP_CLOSE 7
#define HL_TCP_CLOSE_WAIT 8
#define HL_TCP_LAST_ACK 9
#define HL_TCP_LISTEN 10
#define HL_TCP_CLOSING 11
#define HL_TCP_NEW_SYN_RECV 12

#define HL_CFG_NETNS_FILTER 1 /* hl_config[0] bit: record only namespaces listed in netns_allow */

enum hl_drop {
	HL_DROP_RETRANS_SEGS = 0,
	HL_DROP_RETRANS_FAILED = 1,
	HL_DROP_RESETS_SENT = 2,
	HL_DROP_RESETS_RECEIVED = 3,
	HL_DROP_RTT_SAMPLES = 4,
	HL_DROP_OPENED = 5,
	HL_DROP_CLOSED = 6,
	HL_DROP_FAILED = 7,
	HL_DROP_MAX = 8,
};

enum hl_stat {
	HL_STAT_NO_MAP = 0,          /* no active map (internal error): event dropped */
	HL_STAT_INSERT_RACE = 1,     /* another CPU inserted the same key first: added to it */
	HL_STAT_INSERT_ERROR = 2,    /* insert failed for another reason than a full map: dropped */
	HL_STAT_NETNS_FILTERED = 3,  /* events of namespaces outside the allow-list: not recorded */
	HL_STAT_NOT_INET = 4,        /* sockets of another family: not recorded */
	HL_STAT_RESET_FROM_SKB = 5,  /* resets sent without a connected socket: tuple from the packet */
	HL_STAT_RESET_NO_TUPLE = 6,  /* resets with neither socket nor packet: dropped */
	HL_STAT_RTT_UNSET = 7,       /* segments received before the socket had an RTT: no sample */
	HL_STAT_MAX = 8,
};

struct hl_key {
	__u8 laddr[16];
	__u8 raddr[16];
	__u32 netns;
	__u16 lport;
	__u16 rport;
	__u8 family;
	__u8 pad[7];
};

struct hl_val {
	__u64 retrans_segs;
	__u64 retrans_failed;
	__u64 resets_sent;
	__u64 resets_received;
	__u64 rtt_sum_us;
	__u64 rtt_samples;
	__u32 srtt_us;
	__u32 rtt_min_us;
	__u32 opened;
	__u32 closed;
	__u32 failed;
	__u32 last_state;
	__u64 last_seen_ns;
};

struct hl_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384); /* the loader sets the real size before load */
	__type(key, struct hl_key);
	__type(value, struct hl_val);
};

struct hl_map health_a SEC(".maps");
struct hl_map health_b SEC(".maps");

/* inner-map template of health_maps (see flow.bpf.c: kept tiny, never resized) */
struct hl_map_template {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct hl_key);
	__type(value, struct hl_val);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct hl_map_template);
} health_maps SEC(".maps") = {
	.values = { [0] = (void *)&health_a }, /* health_a starts active */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* HL_CFG_* */
} hl_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);  /* network namespace inode */
	__type(value, __u8); /* any: present means recorded */
} netns_allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HL_DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void add_counter(void *map, __u32 idx, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(map, &idx);

	if (c)
		*c += n; /* per-CPU slot: no other writer */
}

static __always_inline void v4_mapped(__u8 *dst, __be32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr, 4);
}

static __always_inline bool is_v4_mapped(const __u8 *a)
{
	return !(a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9]) && a[10] == 0xff &&
	       a[11] == 0xff;
}

static __always_inline bool netns_wanted(__u32 netns)
{
	__u32 zero = 0;
	__u32 *cfg = bpf_map_lookup_elem(&hl_config, &zero);

	if (!cfg || !(*cfg & HL_CFG_NETNS_FILTER))
		return true;
	if (bpf_map_lookup_elem(&netns_allow, &netns))
		return true;
	add_counter(&stats, HL_STAT_NETNS_FILTERED, 1);
	return false;
}

/* The key of a socket. full: a full socket (not TIME_WAIT, not a request socket), whose local port
 * is read from inet_sport (see the header). direct: sk is a BTF pointer (tp_btf, fentry), whose
 * sock_common fields are read with plain loads; raw_tp passes false and everything goes through
 * bpf_probe_read_kernel (both CO-RE relocated). inet_sock lies beyond struct sock, which a BTF
 * pointer to a sock may not reach: inet_sport is always probe-read. Returns false (counted) for
 * non-inet sockets. */
static __always_inline bool key_from_sock(struct hl_key *k, const struct sock *sk, bool full,
					  const bool direct)
{
	__u16 family;

	if (direct) {
		family = sk->__sk_common.skc_family;
		k->netns = sk->__sk_common.skc_net.net->ns.inum;
		k->rport = bpf_ntohs(sk->__sk_common.skc_dport);
	} else {
		family = BPF_CORE_READ(sk, __sk_common.skc_family);
		k->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
		k->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	}
	if (full)
		k->lport = bpf_ntohs(BPF_CORE_READ((const struct inet_sock *)sk, inet_sport));
	else if (direct)
		k->lport = sk->__sk_common.skc_num;
	else
		k->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (family == HL_AF_INET) {
		k->family = 4;
		if (direct) {
			v4_mapped(k->laddr, sk->__sk_common.skc_rcv_saddr);
			v4_mapped(k->raddr, sk->__sk_common.skc_daddr);
		} else {
			v4_mapped(k->laddr, BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr));
			v4_mapped(k->raddr, BPF_CORE_READ(sk, __sk_common.skc_daddr));
		}
	} else if (family == HL_AF_INET6) {
		if (direct) {
			__builtin_memcpy(k->laddr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
			__builtin_memcpy(k->raddr, &sk->__sk_common.skc_v6_daddr, 16);
		} else {
			bpf_core_read(k->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
			bpf_core_read(k->raddr, 16, &sk->__sk_common.skc_v6_daddr);
		}
		k->family = is_v4_mapped(k->raddr) ? 4 : 6;
	} else {
		add_counter(&stats, HL_STAT_NOT_INET, 1);
		return false;
	}
	return true;
}

/* The key of the socket a received packet was meant for: the packet's tuple reversed (its
 * destination is local). skb->data points at the TCP header (tcp_v4_rcv/tcp_v6_rcv, as the
 * kernel's own tcp_send_reset tracepoint assumes), the IP header is at head + network_header. */
static __always_inline bool key_from_skb(struct hl_key *k, const struct sk_buff *skb)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	unsigned char *data = BPF_CORE_READ(skb, data);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__be16 ports[2];
	__u8 ver;

	if (!head || !data || bpf_probe_read_kernel(&ver, 1, head + nh) < 0)
		return false;
	ver >>= 4;
	if (ver == 4) {
		__be32 a[2]; /* saddr, daddr at offset 12 */

		if (bpf_probe_read_kernel(a, sizeof(a), head + nh + 12) < 0)
			return false;
		k->family = 4;
		v4_mapped(k->raddr, a[0]);
		v4_mapped(k->laddr, a[1]);
	} else if (ver == 6) {
		if (bpf_probe_read_kernel(k->raddr, 16, head + nh + 8) < 0 ||
		    bpf_probe_read_kernel(k->laddr, 16, head + nh + 24) < 0)
			return false;
		k->family = is_v4_mapped(k->raddr) ? 4 : 6;
	} else {
		return false;
	}
	if (bpf_probe_read_kernel(ports, sizeof(ports), data) < 0)
		return false;
	k->rport = bpf_ntohs(ports[0]);
	k->lport = bpf_ntohs(ports[1]);
	k->netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	return true;
}

/* What one event adds. */
enum hl_ev {
	HL_EV_RETRANS,
	HL_EV_RETRANS_FAILED,
	HL_EV_RESET_SENT,
	HL_EV_RESET_RECEIVED,
	HL_EV_RTT,
	HL_EV_OPENED,
	HL_EV_CLOSED,
	HL_EV_FAILED,
};

static __always_inline void drop_event(enum hl_ev ev, __u64 n)
{
	/* enum hl_ev and enum hl_drop list the same kinds in the same order */
	add_counter(&drops, (__u32)ev, n);
}

static __always_inline void apply(struct hl_val *v, enum hl_ev ev, __u64 n, __u32 arg)
{
	switch (ev) {
	case HL_EV_RETRANS:
		__sync_fetch_and_add(&v->retrans_segs, n);
		break;
	case HL_EV_RETRANS_FAILED:
		__sync_fetch_and_add(&v->retrans_failed, n);
		break;
	case HL_EV_RESET_SENT:
		__sync_fetch_and_add(&v->resets_sent, n);
		break;
	case HL_EV_RESET_RECEIVED:
		__sync_fetch_and_add(&v->resets_received, n);
		break;
	case HL_EV_RTT: {
		__u32 m;

		__sync_fetch_and_add(&v->rtt_sum_us, arg);
		__sync_fetch_and_add(&v->rtt_samples, 1);
		v->srtt_us = arg;
		/* a socket's segments are processed under its lock: contention here is between the
		 * rare sockets sharing a key; a few compare-and-swap rounds settle it */
		for (int i = 0; i < 4; i++) {
			m = v->rtt_min_us;
			if (m && m <= arg)
				break;
			if (__sync_val_compare_and_swap(&v->rtt_min_us, m, arg) == m)
				break;
		}
		break;
	}
	case HL_EV_OPENED:
		__sync_fetch_and_add(&v->opened, 1);
		v->last_state = arg;
		break;
	case HL_EV_CLOSED:
		__sync_fetch_and_add(&v->closed, 1);
		v->last_state = arg;
		break;
	case HL_EV_FAILED:
		__sync_fetch_and_add(&v->failed, 1);
		v->last_state = arg;
		break;
	}
	v->last_seen_ns = bpf_ktime_get_ns(); /* the coarse clock is not offered to tracing programs */
}

/* Record one event (n: its amount; arg: the RTT sample or the new state) under key k. */
static __always_inline void record(const struct hl_key *k, enum hl_ev ev, __u64 n, __u32 arg)
{
	__u32 zero = 0;
	void *m;
	struct hl_val *v;
	long err;

	if (!netns_wanted(k->netns))
		return;
	m = bpf_map_lookup_elem(&health_maps, &zero);
	if (!m) {
		add_counter(&stats, HL_STAT_NO_MAP, 1);
		drop_event(ev, n);
		return;
	}
	v = bpf_map_lookup_elem(m, k);
	if (!v) {
		struct hl_val nv = {};

		err = bpf_map_update_elem(m, k, &nv, BPF_NOEXIST);
		if (err == -HL_EEXIST)
			add_counter(&stats, HL_STAT_INSERT_RACE, 1);
		if (err == 0 || err == -HL_EEXIST)
			v = bpf_map_lookup_elem(m, k);
		if (!v) {
			if (err != -HL_E2BIG)
				add_counter(&stats, HL_STAT_INSERT_ERROR, 1);
			drop_event(ev, n);
			return;
		}
	}
	apply(v, ev, n, arg);
}

/* ---- retransmits ------------------------------------------------------------------------------ */
static __always_inline int on_retransmit(const struct sock *sk, const struct sk_buff *skb, int err,
					 const bool direct)
{
	struct hl_key k = {};
	__u16 segs;

	if (!sk || !key_from_sock(&k, sk, true, direct))
		return 0;
	if (err) {
		record(&k, HL_EV_RETRANS_FAILED, 1, 0);
		return 0;
	}
	/* tcp_skb_pcount(skb): the segments this retransmission sent (TSO: more than one) */
	segs = skb ? BPF_CORE_READ((struct tcp_skb_cb *)&skb->cb[0], tcp_gso_segs) : 1;
	record(&k, HL_EV_RETRANS, segs ? segs : 1, 0);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(hl_retx_btf, const struct sock *sk, const struct sk_buff *skb, int err)
{
	return on_retransmit(sk, skb, err, true);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(hl_retx_btf2, const struct sock *sk, const struct sk_buff *skb)
{
	return on_retransmit(sk, skb, 0, true);
}

SEC("raw_tp/tcp_retransmit_skb")
int BPF_PROG(hl_retx_raw, const struct sock *sk, const struct sk_buff *skb, int err)
{
	return on_retransmit(sk, skb, err, false);
}

SEC("raw_tp/tcp_retransmit_skb")
int BPF_PROG(hl_retx_raw2, const struct sock *sk, const struct sk_buff *skb)
{
	return on_retransmit(sk, skb, 0, false);
}

/* ---- RTT -------------------------------------------------------------------------------------- */
static __always_inline int on_established_rcv(const struct sock *sk, const bool direct)
{
	struct hl_key k = {};
	__u32 srtt;

	if (!sk)
		return 0;
	srtt = BPF_CORE_READ((const struct tcp_sock *)sk, srtt_us) >> 3;
	if (!srtt) {
		add_counter(&stats, HL_STAT_RTT_UNSET, 1);
		return 0;
	}
	if (!key_from_sock(&k, sk, true, direct))
		return 0;
	record(&k, HL_EV_RTT, 1, srtt);
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(hl_rtt_btf, const struct sock *sk, const struct sk_buff *skb)
{
	return on_established_rcv(sk, true);
}

SEC("fentry/tcp_rcv_established")
int BPF_PROG(hl_rtt_fentry, const struct sock *sk, const struct sk_buff *skb)
{
	return on_established_rcv(sk, true);
}

SEC("raw_tp/tcp_probe")
int BPF_PROG(hl_rtt_raw, const struct sock *sk, const struct sk_buff *skb)
{
	return on_established_rcv(sk, false);
}

/* ---- resets ----------------------------------------------------------------------------------- */
static __always_inline int on_send_reset(const struct sock *sk, const struct sk_buff *skb,
					 const bool direct)
{
	struct hl_key k = {};
	__u8 state = 0;
	bool full;

	if (sk)
		state = direct ? sk->__sk_common.skc_state : BPF_CORE_READ(sk, __sk_common.skc_state);
	full = state != HL_TCP_TIME_WAIT && state != HL_TCP_NEW_SYN_RECV;
	/* a connected socket: its own tuple; a listener or no socket at all (a closed port): the
	 * tuple of the packet that caused the reset, reversed */
	if (sk && state != HL_TCP_LISTEN) {
		if (!key_from_sock(&k, sk, full, direct))
			return 0;
	} else if (skb && key_from_skb(&k, skb)) {
		add_counter(&stats, HL_STAT_RESET_FROM_SKB, 1);
		if (sk)
			k.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	} else {
		add_counter(&stats, HL_STAT_RESET_NO_TUPLE, 1);
		drop_event(HL_EV_RESET_SENT, 1);
		return 0;
	}
	record(&k, HL_EV_RESET_SENT, 1, 0);
	return 0;
}

static __always_inline int on_receive_reset(const struct sock *sk, const bool direct)
{
	struct hl_key k = {};

	if (!sk || !key_from_sock(&k, sk, true, direct))
		return 0;
	record(&k, HL_EV_RESET_RECEIVED, 1, 0);
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(hl_rstx_btf, const struct sock *sk, const struct sk_buff *skb)
{
	return on_send_reset(sk, skb, true);
}

SEC("raw_tp/tcp_send_reset")
int BPF_PROG(hl_rstx_raw, const struct sock *sk, const struct sk_buff *skb)
{
	return on_send_reset(sk, skb, false);
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(hl_rsrx_btf, const struct sock *sk)
{
	return on_receive_reset(sk, true);
}

SEC("raw_tp/tcp_receive_reset")
int BPF_PROG(hl_rsrx_raw, const struct sock *sk)
{
	return on_receive_reset(sk, false);
}

/* ---- connection state ------------------------------------------------------------------------- */
static __always_inline int on_set_state(const struct sock *sk, int old, int new, const bool direct)
{
	struct hl_key k = {};
	enum hl_ev ev;

	if (!sk)
		return 0;
	if ((direct ? sk->sk_protocol : BPF_CORE_READ(sk, sk_protocol)) != HL_IPPROTO_TCP)
		return 0;
	if (new == HL_TCP_ESTABLISHED && (old == HL_TCP_SYN_SENT || old == HL_TCP_SYN_RECV))
		ev = HL_EV_OPENED;
	else if (new == HL_TCP_CLOSE && (old == HL_TCP_SYN_SENT || old == HL_TCP_SYN_RECV))
		ev = HL_EV_FAILED;
	else if (new == HL_TCP_CLOSE && old != HL_TCP_LISTEN && old != HL_TCP_CLOSE &&
		 old != HL_TCP_NEW_SYN_RECV)
		ev = HL_EV_CLOSED;
	else
		return 0;
	if (!key_from_sock(&k, sk, true, direct))
		return 0;
	record(&k, ev, 1, (__u32)new);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(hl_state_btf, const struct sock *sk, const int old, const int new)
{
	return on_set_state(sk, old, new, true);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(hl_state_raw, const struct sock *sk, const int old, const int new)
{
	return on_set_state(sk, old, new, false);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
