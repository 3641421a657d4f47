/* remora-accel: the types and maps shared by the programs and by the agent.
 *
 * Every layout here has a #[repr(C)] twin in accel/src/maps.rs (checked by its unit
 * tests): change both together.
 *
 * Byte orders: IP addresses are kept as the kernel gives them (network order); an IPv4
 * address is stored as its IPv4-mapped IPv6 form (::ffff:a.b.c.d), so that an IPv4
 * socket and a dual-stack IPv6 socket of the same connection produce the same key. Ports
 * in keys are in host order; ports inside struct orig_dst are in network order (they are
 * copied into a sockaddr as they are).
 */
#ifndef REMORA_ACCEL_H
#define REMORA_ACCEL_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Not from <sys/socket.h>/<netinet/in.h>: those are libc headers, not for the bpf target. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
/* SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST have the same number. */
#define SO_ORIGINAL_DST 80
#define TCP_LISTEN 10

#define MAX_PORT_RANGES 8
#define MAX_CIDRS 8

/* pod_config.flags */
#define POD_IPV6 1          /* IPv6 destinations are captured (remora-init --ipv6) */
#define POD_INCLUDE_LIST 2  /* only the include CIDRs are captured (not "*") */

struct port_range {
	__u16 first; /* host order, inclusive */
	__u16 last;
};

struct cidr4 {
	__u32 addr; /* network order, host bits clear */
	__u32 mask; /* network order */
};

struct cidr6 {
	__u32 addr[4];
	__u32 mask[4];
};

/* meshed_pods value: one registration (remora_init::accel::Registration). */
struct pod_config {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port; /* host order */
	__u8 flags;
	__u8 n_skip_ports;
	__u8 n_skip4;
	__u8 n_skip6;
	__u8 n_include4;
	__u8 n_include6;
	struct port_range skip_ports[MAX_PORT_RANGES];
	struct cidr4 skip4[MAX_CIDRS];
	struct cidr6 skip6[MAX_CIDRS];
	struct cidr4 include4[MAX_CIDRS];
	struct cidr6 include6[MAX_CIDRS];
};

/* sock_pairs key: one established TCP socket, seen from its own side. */
struct pair_key {
	__u64 netns;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
};

/* orig_dst key: the app's end of a redirected connection. */
struct endpoint_key {
	__u64 netns;
	__u32 ip[4];
	__u32 port; /* host order */
	__u32 pad;
};

/* What the app asked connect() for. */
struct orig_dst {
	__u32 ip[4];  /* IPv4 in the mapped form */
	__u16 port;   /* network order */
	__u16 family; /* AF_INET or AF_INET6: the getsockopt level it is served on */
};

/* settings[0].flags (written by the agent at each start). */
#define SETTING_REDIRECT_TO_APP 1 /* also hand the proxy's sends to app sockets */

struct settings {
	__u32 flags;
};

/* Indexes into `stats` (accel/src/maps.rs: Stat). */
enum stat {
	STAT_CONNECT_REDIRECTED = 0,
	STAT_CONNECT_NO_LISTENER = 1,
	STAT_CONNECT_NOT_CAPTURED = 2,
	STAT_SOCKET_ADDED = 3,
	STAT_SOCKET_ADD_FAILED = 4,
	STAT_MSG_REDIRECTED = 5,
	STAT_MSG_FALLBACK = 6,
	STAT_ORIG_DST_SERVED = 7,
	STAT_UNREAD_LIMIT = 8,
	STAT_COUNT = 9,
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct pod_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshed_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sock_pairs SEC(".maps");

/* Sockets whose sends once went through TCP (their peer was not in sock_pairs yet):
 * they never redirect again, or their peer could read later bytes before earlier ones. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} msg_passthrough SEC(".maps");

/* A redirected send is queued on the peer socket whatever the peer's receive buffer: the
 * kernel applies no backpressure (measured on 6.18: 400 MiB queued in one second to a
 * socket that never read). So each socket may have at most UNREAD_LIMIT bytes handed
 * over since its peer last sent anything (the peer answering is the sign it reads);
 * past that its sends go through TCP for good, and TCP's flow control applies. */
#define UNREAD_LIMIT (4 << 20)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} unread SEC(".maps");

/* The proxy's own sockets on loopback (keyed like sock_pairs): the only ones sends are
 * handed to, unless SETTING_REDIRECT_TO_APP. A socket in a SOCKHASH reads through
 * tcp_bpf_recvmsg, whose blocking wait can return EAGAIN on a wakeup without data
 * (Linux 6.18: a state change such as the socket's own FIN being acked). The proxy's
 * sockets are non-blocking; an app's may not be, so app sockets only send through the
 * map and leave it when they half-close (sockops STATE_CB). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} proxy_side SEC(".maps");

/* Sockets the proxy created (connect4/6 saw the proxy's uid or gid), by socket cookie,
 * until sockops sees them established. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} proxy_connects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} connect_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint_key);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

static __always_inline int redirect_to_app(void)
{
	__u32 zero = 0;
	struct settings *s = bpf_map_lookup_elem(&settings, &zero);

	return s && (s->flags & SETTING_REDIRECT_TO_APP);
}

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &stat);

	if (v)
		*v += 1;
}

/* ::ffff:a.b.c.d from a network-order IPv4 address. */
static __always_inline void mapped(__u32 out[4], __u32 ip4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = ip4;
}

static __always_inline int is_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int is_loopback4(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

/* 127.0.0.0/8 in either form, or ::1. */
static __always_inline int is_loopback(const __u32 ip[4])
{
	if (is_mapped(ip))
		return is_loopback4(ip[3]);
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/* Copies an IPv6 address field by field (context fields allow 4-byte loads only). */
#define copy4(dst, src)                                                                  \
	do {                                                                             \
		(dst)[0] = (src)[0];                                                     \
		(dst)[1] = (src)[1];                                                     \
		(dst)[2] = (src)[2];                                                     \
		(dst)[3] = (src)[3];                                                     \
	} while (0)

static __always_inline int same_ip(const __u32 a[4], const __u32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

#endif
