// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * otelflow TC flow counter (CO-RE, libbpf).
 *
 * Two SEC("tc") programs, one for clsact ingress and one for clsact egress, count every IPv4 and
 * IPv6 packet of an Ethernet interface into a hash map keyed by flow. Userspace (otelflow/ebpf/
 * loader.py) attaches them, drains the map each interval and turns the counters into flow deltas.
 *
 * Requires Linux >= 5.12 (BPF atomics beyond add, bpf_ktime_get_coarse_ns, hash inner maps of any
 * size) with kernel BTF (/sys/kernel/btf/vmlinux, for the CO-RE relocations). Headers are read
 * straight from the linear packet data when they are there, else with bpf_skb_load_bytes.
 *
 * ---- Flow key (struct flow_key, 40 bytes) -----------------------------------------------------
 *   saddr[16], daddr[16]  IPv6 address, or an IPv4 address as IPv4-mapped IPv6 (::ffff:a.b.c.d),
 *                         network byte order
 *   sport, dport          transport ports in HOST byte order: TCP, UDP, UDP-Lite and SCTP;
 *                         0 for ICMP/ICMPv6, other protocols, non-first fragments and headers that
 *                         could not be read
 *   family                4 or 6
 *   proto                 IP protocol of the last header parsed: the transport protocol, or, when
 *                         the IPv6 extension-header chain cannot be followed (ESP, an unknown
 *                         header, more than FL_V6_MAX_EXT headers), the last next-header value seen
 *   pad                   always 0
 * The key has no interface and no direction: one map counts one network namespace (one node),
 * and a packet is counted once per namespace (see "count once" below), so two hooks that see the
 * same packet never add it twice.
 *
 * IPv6 extension headers: hop-by-hop, routing, destination options, mobility, HIP, shim6
 * ((len + 1) * 8 bytes), AH ((len + 2) * 4 bytes) and fragment (8 bytes) are skipped, up to
 * FL_V6_MAX_EXT of them. A non-first fragment (IPv4 or IPv6) has no transport header: it is
 * counted under its protocol with ports 0 (stat FL_STAT_FRAGMENT).
 *
 * ---- Value (struct flow_val, 40 bytes) --------------------------------------------------------
 *   packets        packets as they are (or would be) on the wire: a GSO packet counts gso_segs
 *   bytes          IP-layer bytes on the wire (definition below)
 *   first_seen_ns  bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC at the last
 *                  scheduler tick, so 1 to 10 ms resolution) of the first packet in this map
 *                  generation
 *   last_seen_ns   the same for the latest packet (a plain store: concurrent CPUs may leave a
 *                  value a tick older than the very last packet)
 *   tcp_flags      OR of the TCP flags of every packet: bits 0-7 = header byte 13
 *                  (FIN SYN RST PSH ACK URG ECE CWR), bit 8 = AE/NS
 *   ifindex        the interface where this entry's first packet was counted
 *
 * ---- Bytes: IP-layer bytes that would be on the wire -----------------------------------------
 *   For every IP packet: IP header (with options or IPv6 extension headers) + transport header +
 *   payload. No link-layer header, no Ethernet padding, no FCS.
 *   L3 length of an skb = the IP header's own length (IPv4 tot_len; IPv6 40 + payload_len), or
 *   skb->len minus the link-layer header when that field is 0 (BIG TCP, jumbograms) or larger
 *   than what the frame holds. Using the header's length rather than skb->len alone drops the
 *   Ethernet minimum-frame padding that real NICs leave on short frames at ingress.
 *   A GSO/TSO/GRO super-packet (gso_size > 0) becomes segs = gso_segs packets on the wire, each
 *   with its own copy of the headers:
 *       bytes = L3 length + (segs - 1) * (IP header length incl. options/extensions
 *                                          + transport header length (TCP doff * 4, UDP 8))
 *   When gso_segs is 0 (untrusted GSO from virtio/tap, computed only at segmentation) segs is
 *   derived from gso_size: ceil(payload / gso_size). Limits: encapsulated GSO (tunnel offloads)
 *   replicates the inner headers too, which this arithmetic (outer headers only) does not see;
 *   UFO-style IP-fragment GSO (only injected through virtio/tap) replicates only the IP header.
 *
 * ---- Count once per network namespace ---------------------------------------------------------
 *   ingress program: counts every packet (the first hook on this node that sees it).
 *   egress program:  counts a packet unless the interface it entered this namespace through
 *                    (skb->ingress_ifindex) is listed in the `ifaces` map: a packet received on an
 *                    interface whose ingress we count, or on a bridge whose ports all count at
 *                    ingress ("covered"), was counted already. Locally generated packets
 *                    (ingress_ifindex 0) and packets from unwatched interfaces count here.
 *   So with the host side of every pod veth watched (and the pod bridge covered), a pod-to-pod
 *   packet on one node counts once, at the sender's veth ingress, with pre-NAT addresses.
 *
 * ---- Never lose silently ----------------------------------------------------------------------
 *   The flow maps are BPF_MAP_TYPE_HASH (never LRU: an LRU evicts live flows without a trace).
 *   An insert that fails because the map is full adds the packet to drops[FL_DROP_FULL_PKTS] and
 *   its wire bytes to drops[FL_DROP_FULL_BYTES]; any other insert failure goes to
 *   FL_DROP_OTHER_PKTS/BYTES. Parse outcomes are counted in `stats`.
 *
 * ---- Draining without losing increments -------------------------------------------------------
 *   Programs update values in place (atomic adds through the pointer bpf_map_lookup_elem
 *   returned), which no map syscall can serialise against: a lookup_and_delete_batch copies an
 *   element under the bucket lock, but an add already holding the pointer can land after the copy
 *   (lost), or, with a preallocated map, after the element was recycled for another flow.
 *   So there are two flow maps and an outer ARRAY_OF_MAPS `flow_maps` whose single slot names the
 *   active one. Userspace swaps the slot; the kernel's map-in-map update waits for every running
 *   program (synchronize_rcu), after which the old map is quiescent and is read and emptied with
 *   bpf_map_lookup_and_delete_batch. Every increment lands in exactly one generation.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define TC_ACT_UNSPEC (-1) /* continue with the next filter: never decide for others */

#define FL_E2BIG 7
#define FL_EEXIST 17

#define FL_ETH_HLEN 14
#define FL_ETH_P_IP 0x0800
#define FL_ETH_P_IPV6 0x86DD
#define FL_ETH_P_8021Q 0x8100
#define FL_ETH_P_8021AD 0x88A8

#define FL_IPPROTO_HOPOPTS 0
#define FL_IPPROTO_ICMP 1
#define FL_IPPROTO_TCP 6
#define FL_IPPROTO_UDP 17
#define FL_IPPROTO_ROUTING 43
#define FL_IPPROTO_FRAGMENT 44
#define FL_IPPROTO_AH 51
#define FL_IPPROTO_ICMPV6 58
#define FL_IPPROTO_DSTOPTS 60
#define FL_IPPROTO_SCTP 132
#define FL_IPPROTO_MH 135
#define FL_IPPROTO_UDPLITE 136
#define FL_IPPROTO_HIP 139
#define FL_IPPROTO_SHIM6 140

#define FL_V6_MAX_EXT 8
#define FL_MAX_VLAN 2
#define FL_MAX_DIRECT_OFF 256 /* bound for the verifier: headers beyond this are loaded */

/* ifaces map values (flags): any non-zero value means "packets received here were counted" */
#define FL_IFACE_INGRESS 1 /* our ingress program counts on this interface */
#define FL_IFACE_COVERED 2 /* a bridge whose ports all count at ingress */

enum fl_drop {
	FL_DROP_FULL_PKTS = 0,
	FL_DROP_FULL_BYTES = 1,
	FL_DROP_OTHER_PKTS = 2,
	FL_DROP_OTHER_BYTES = 3,
	FL_DROP_MAX = 4,
};

enum fl_stat {
	FL_STAT_NOT_IP = 0,          /* frames that are not IPv4/IPv6 (ARP, LLDP, ...): not counted */
	FL_STAT_L3_BAD = 1,          /* IP header unreadable or invalid: not counted */
	FL_STAT_L4_TRUNC = 2,        /* transport header unreadable: counted with ports 0 */
	FL_STAT_FRAGMENT = 3,        /* non-first fragments: counted with ports 0 */
	FL_STAT_V6_EXT_LIMIT = 4,    /* IPv6 header chain not followed to the end: ports 0 */
	FL_STAT_EGRESS_SKIPPED = 5,  /* egress packets already counted at an ingress on this node */
	FL_STAT_NO_MAP = 6,          /* no active flow map (internal error): not counted */
	FL_STAT_INSERT_RACE = 7,     /* another CPU inserted the same flow first: added to it */
	FL_STAT_GSO_PKTS = 8,        /* GSO/GRO super-packets seen */
	FL_STAT_GSO_SEGS_DERIVED = 9, /* GSO packets whose gso_segs was 0 (derived from gso_size) */
	FL_STAT_MAX = 10,
};

struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u16 pad;
};

struct flow_val {
	__u64 packets;
	__u64 bytes;
	__u64 first_seen_ns;
	__u64 last_seen_ns;
	__u32 tcp_flags;
	__u32 ifindex;
};

/* Wire formats: plain structs (no CO-RE relocation: the wire does not change with the kernel). */
struct fl_vlan {
	__be16 tci;
	__be16 proto;
};

struct fl_ip4 {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct fl_ip6 {
	__be32 ver_tc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct fl_ports_tcp {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack;
	__u8 doff_ae; /* data offset (high nibble), AE/NS flag (bit 0) */
	__u8 flags;
	__be16 window;
	__u16 check;
	__u16 urg;
};

struct flow_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the loader sets the real size before load */
	__type(key, struct flow_key);
	__type(value, struct flow_val);
};

struct flow_map flows_a SEC(".maps");
struct flow_map flows_b SEC(".maps");

/* The inner-map template of flow_maps: libbpf creates a throwaway map from it to build the outer
 * map. Since Linux 5.10 a hash inner map's max_entries need not match the template's, so the
 * template stays tiny (libbpf 1.1 crashes on bpf_map__set_max_entries of an inner template). */
struct flow_map_template {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct flow_map_template);
} flow_maps SEC(".maps") = {
	.values = { [0] = (void *)&flows_a }, /* flows_a starts active */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* ifindex in this network namespace */
	__type(value, __u32); /* FL_IFACE_* */
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FL_DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void add_counter(void *map, __u32 idx, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(map, &idx);

	if (c)
		*c += n; /* per-CPU slot: no other writer */
}

static __always_inline void v4_mapped(__u8 *dst, const __u8 *src)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, src, 4);
}

/* Headers beyond the linear packet data (rare): a separate subprogram keeps the hot path short. */
static __noinline long load_slow(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	if (len > 40)
		return -1;
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* Read len bytes at off: straight from the linear packet data when they are there (the common
 * case: no helper call), else through bpf_skb_load_bytes. */
static __always_inline long load(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= FL_MAX_DIRECT_OFF && data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return load_slow(skb, off, to, len);
}

struct v6_walk {
	__u32 l4_off; /* in: offset of the first extension header; out: of the transport header */
	__u8 proto;   /* in: first next-header value; out: the last one seen */
	__u8 l4;      /* out: 1 when proto's header starts at l4_off (0: fragment, chain cut short) */
};

static __always_inline bool v6_is_ext(__u8 proto)
{
	return proto == FL_IPPROTO_HOPOPTS || proto == FL_IPPROTO_ROUTING || proto == FL_IPPROTO_DSTOPTS ||
	       proto == FL_IPPROTO_MH || proto == FL_IPPROTO_HIP || proto == FL_IPPROTO_SHIM6 ||
	       proto == FL_IPPROTO_AH || proto == FL_IPPROTO_FRAGMENT;
}

/* Follow an IPv6 extension-header chain (only called when there is one). */
static __noinline int v6_skip_ext(struct __sk_buff *skb, struct v6_walk *w)
{
	__u32 l4_off = w->l4_off;
	__u8 proto = w->proto;
	bool cut = false;

	for (int i = 0; i < FL_V6_MAX_EXT && v6_is_ext(proto); i++) {
		__u8 ext[4];
		__u32 len;

		if (bpf_skb_load_bytes(skb, l4_off, ext, sizeof(ext)) < 0) {
			cut = true;
			break;
		}
		if (proto == FL_IPPROTO_FRAGMENT) {
			len = 8;
			if (((ext[2] << 8) | ext[3]) & 0xfff8) { /* offset != 0: non-first fragment */
				add_counter(&stats, FL_STAT_FRAGMENT, 1);
				w->l4_off = l4_off + len;
				w->proto = ext[0];
				w->l4 = 0;
				return 0;
			}
		} else if (proto == FL_IPPROTO_AH) {
			len = ((__u32)ext[1] + 2) * 4;
		} else {
			len = ((__u32)ext[1] + 1) * 8;
		}
		proto = ext[0];
		l4_off += len;
	}
	if (cut || v6_is_ext(proto)) { /* unreadable or too long: count under the last header seen */
		add_counter(&stats, FL_STAT_V6_EXT_LIMIT, 1);
		w->l4 = 0;
	} else {
		w->l4 = 1;
	}
	w->l4_off = l4_off;
	w->proto = proto;
	return 0;
}

static __always_inline int count_packet(struct __sk_buff *skb, const bool egress)
{
	struct flow_key key = {};
	__u32 skb_len = skb->len;
	__u32 off = FL_ETH_HLEN;
	__u32 l4_off, l3_declared, l3_len, hdr_len, l4_hdr = 0, tcp_flags = 0;
	__u64 segs, bytes, now;
	__u16 eth_proto;
	__u8 proto;
	bool l4 = true;
	long err;

	if (egress) {
		__u32 iif = skb->ingress_ifindex;

		if (iif) {
			__u32 *f = bpf_map_lookup_elem(&ifaces, &iif);

			if (f && *f) {
				add_counter(&stats, FL_STAT_EGRESS_SKIPPED, 1);
				return TC_ACT_UNSPEC;
			}
		}
	}

	/* link layer: Ethernet, up to two VLAN tags still in the frame (offloaded tags are not) */
	if (load(skb, 12, &eth_proto, sizeof(eth_proto)) < 0) {
		add_counter(&stats, FL_STAT_NOT_IP, 1);
		return TC_ACT_UNSPEC;
	}
#pragma unroll
	for (int i = 0; i < FL_MAX_VLAN; i++) {
		if (eth_proto != bpf_htons(FL_ETH_P_8021Q) && eth_proto != bpf_htons(FL_ETH_P_8021AD))
			break;
		struct fl_vlan vh;

		if (load(skb, off, &vh, sizeof(vh)) < 0) {
			add_counter(&stats, FL_STAT_NOT_IP, 1);
			return TC_ACT_UNSPEC;
		}
		eth_proto = vh.proto;
		off += sizeof(vh);
	}

	if (eth_proto == bpf_htons(FL_ETH_P_IP)) {
		struct fl_ip4 ip;
		__u32 ihl;

		if (load(skb, off, &ip, sizeof(ip)) < 0 || (ip.ver_ihl >> 4) != 4) {
			add_counter(&stats, FL_STAT_L3_BAD, 1);
			return TC_ACT_UNSPEC;
		}
		ihl = (ip.ver_ihl & 0x0f) * 4;
		if (ihl < sizeof(ip)) {
			add_counter(&stats, FL_STAT_L3_BAD, 1);
			return TC_ACT_UNSPEC;
		}
		key.family = 4;
		v4_mapped(key.saddr, ip.saddr);
		v4_mapped(key.daddr, ip.daddr);
		proto = ip.protocol;
		l3_declared = bpf_ntohs(ip.tot_len);
		l4_off = off + ihl;
		if (bpf_ntohs(ip.frag_off) & 0x1fff) { /* non-first fragment: no transport header */
			add_counter(&stats, FL_STAT_FRAGMENT, 1);
			l4 = false;
		}
	} else if (eth_proto == bpf_htons(FL_ETH_P_IPV6)) {
		struct fl_ip6 ip6;
		__u32 payload;

		if (load(skb, off, &ip6, sizeof(ip6)) < 0 ||
		    (bpf_ntohl(ip6.ver_tc_flow) >> 28) != 6) {
			add_counter(&stats, FL_STAT_L3_BAD, 1);
			return TC_ACT_UNSPEC;
		}
		key.family = 6;
		__builtin_memcpy(key.saddr, ip6.saddr, 16);
		__builtin_memcpy(key.daddr, ip6.daddr, 16);
		proto = ip6.nexthdr;
		payload = bpf_ntohs(ip6.payload_len);
		l3_declared = payload ? payload + sizeof(ip6) : 0;
		l4_off = off + sizeof(ip6);
		if (v6_is_ext(proto)) {
			struct v6_walk w = { .l4_off = l4_off, .proto = proto };

			v6_skip_ext(skb, &w);
			l4_off = w.l4_off;
			proto = w.proto;
			l4 = w.l4;
		}
	} else {
		add_counter(&stats, FL_STAT_NOT_IP, 1);
		return TC_ACT_UNSPEC;
	}
	key.proto = proto;

	if (l4) {
		if (proto == FL_IPPROTO_TCP) {
			struct fl_ports_tcp th;

			if (load(skb, l4_off, &th, sizeof(th)) == 0) {
				key.sport = bpf_ntohs(th.source);
				key.dport = bpf_ntohs(th.dest);
				l4_hdr = (th.doff_ae >> 4) * 4;
				tcp_flags = th.flags | ((__u32)(th.doff_ae & 1) << 8);
			} else {
				add_counter(&stats, FL_STAT_L4_TRUNC, 1);
			}
		} else if (proto == FL_IPPROTO_UDP || proto == FL_IPPROTO_UDPLITE ||
			   proto == FL_IPPROTO_SCTP) {
			__be16 ports[2];

			if (load(skb, l4_off, ports, sizeof(ports)) == 0) {
				key.sport = bpf_ntohs(ports[0]);
				key.dport = bpf_ntohs(ports[1]);
				l4_hdr = proto == FL_IPPROTO_SCTP ? 12 : 8;
			} else {
				add_counter(&stats, FL_STAT_L4_TRUNC, 1);
			}
		} else if (proto == FL_IPPROTO_ICMP || proto == FL_IPPROTO_ICMPV6) {
			l4_hdr = 8;
		}
	}

	/* L3 length: the IP header's own length unless absent (BIG TCP, jumbo) or beyond the frame */
	l3_len = skb_len > off ? skb_len - off : 0;
	if (l3_declared && l3_declared <= l3_len)
		l3_len = l3_declared;
	hdr_len = l4_off - off + l4_hdr;

	/* GSO: one skb, gso_segs packets on the wire, each with its own headers */
	segs = 1;
	{
		__u32 gso_size = 0;
		__u32 gso_segs = skb->gso_segs;

		if (bpf_core_field_exists(skb->gso_size))
			gso_size = skb->gso_size;
		if (gso_size || gso_segs > 1) {
			add_counter(&stats, FL_STAT_GSO_PKTS, 1);
			if (gso_segs) {
				segs = gso_segs;
			} else if (gso_size && l3_len > hdr_len) {
				segs = (l3_len - hdr_len + gso_size - 1) / gso_size;
				add_counter(&stats, FL_STAT_GSO_SEGS_DERIVED, 1);
			}
			if (!segs)
				segs = 1;
		}
	}
	bytes = (__u64)l3_len + (segs - 1) * (__u64)hdr_len;
	now = bpf_ktime_get_coarse_ns(); /* a tick's resolution, ~30 ns cheaper per packet */

	__u32 zero = 0;
	void *flows = bpf_map_lookup_elem(&flow_maps, &zero);

	if (!flows) {
		add_counter(&stats, FL_STAT_NO_MAP, 1);
		return TC_ACT_UNSPEC;
	}

	struct flow_val *v = bpf_map_lookup_elem(flows, &key);

	if (!v) {
		struct flow_val nv = {
			.packets = segs,
			.bytes = bytes,
			.first_seen_ns = now,
			.last_seen_ns = now,
			.tcp_flags = tcp_flags,
			.ifindex = skb->ifindex,
		};

		err = bpf_map_update_elem(flows, &key, &nv, BPF_NOEXIST);
		if (err == 0)
			return TC_ACT_UNSPEC;
		if (err == -FL_EEXIST) { /* another CPU inserted it first: add to theirs */
			add_counter(&stats, FL_STAT_INSERT_RACE, 1);
			v = bpf_map_lookup_elem(flows, &key);
		}
		if (!v) {
			if (err == -FL_E2BIG) {
				add_counter(&drops, FL_DROP_FULL_PKTS, segs);
				add_counter(&drops, FL_DROP_FULL_BYTES, bytes);
			} else {
				add_counter(&drops, FL_DROP_OTHER_PKTS, segs);
				add_counter(&drops, FL_DROP_OTHER_BYTES, bytes);
			}
			return TC_ACT_UNSPEC;
		}
	}
	__sync_fetch_and_add(&v->packets, segs);
	__sync_fetch_and_add(&v->bytes, bytes);
	v->last_seen_ns = now;
	if (tcp_flags && (v->tcp_flags & tcp_flags) != tcp_flags)
		__sync_fetch_and_or(&v->tcp_flags, tcp_flags);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int otelflow_in(struct __sk_buff *skb)
{
	return count_packet(skb, false);
}

SEC("tc")
int otelflow_out(struct __sk_buff *skb)
{
	return count_packet(skb, true);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
