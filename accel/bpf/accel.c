/* remora-accel: the eBPF programs (loaded and attached by accel/src/programs.rs).
 *
 * - cgroup/connect4, cgroup/connect6: an app's outbound connect() in a meshed pod goes
 *   straight to its proxy's outbound port on loopback (what the iptables REDIRECT would
 *   have done), with the original destination kept for the proxy's SO_ORIGINAL_DST.
 * - sockops: loopback TCP sockets of meshed pods go into sock_pairs once established.
 * - sk_msg: a send on such a socket is handed to its peer socket's receive queue.
 * - cgroup/getsockopt: SO_ORIGINAL_DST of a connection redirected by connect4/6.
 * - cgroup/getpeername4, cgroup/getpeername6: the app sees the peer it connected to.
 *
 * Every program leaves what it does not handle to the kernel: an unknown pod, a missing
 * proxy listener or a missing peer socket means plain TCP (and the pod's iptables rules),
 * never a refused connection or a dropped message.
 */
#include "accel.h"

/* Apache-2.0 is the project's licence; no GPL-only helper is used. */
char LICENSE[] SEC("license") = "Apache-2.0";

static __always_inline int from_proxy(const struct pod_config *cfg)
{
	__u64 ids = bpf_get_current_uid_gid();

	return (__u32)ids == cfg->proxy_uid || (__u32)(ids >> 32) == cfg->proxy_gid;
}

static __always_inline int port_skipped(const struct pod_config *cfg, __u16 port)
{
	for (int i = 0; i < MAX_PORT_RANGES; i++) {
		if (i >= cfg->n_skip_ports)
			break;
		if (port >= cfg->skip_ports[i].first && port <= cfg->skip_ports[i].last)
			return 1;
	}
	return 0;
}

static __always_inline int in_cidrs4(const struct cidr4 *list, __u8 n, __u32 ip)
{
	for (int i = 0; i < MAX_CIDRS; i++) {
		if (i >= n)
			break;
		if ((ip & list[i].mask) == list[i].addr)
			return 1;
	}
	return 0;
}

static __always_inline int in_cidrs6(const struct cidr6 *list, __u8 n, const __u32 ip[4])
{
	for (int i = 0; i < MAX_CIDRS; i++) {
		if (i >= n)
			break;
		if ((ip[0] & list[i].mask[0]) == list[i].addr[0] &&
		    (ip[1] & list[i].mask[1]) == list[i].addr[1] &&
		    (ip[2] & list[i].mask[2]) == list[i].addr[2] &&
		    (ip[3] & list[i].mask[3]) == list[i].addr[3])
			return 1;
	}
	return 0;
}

/* remora_init::config::Config::captures_outbound, loopback already excluded. */
static __always_inline int captured4(const struct pod_config *cfg, __u32 ip, __u16 port)
{
	if (port_skipped(cfg, port) || in_cidrs4(cfg->skip4, cfg->n_skip4, ip))
		return 0;
	if (cfg->flags & POD_INCLUDE_LIST)
		return in_cidrs4(cfg->include4, cfg->n_include4, ip);
	return 1;
}

static __always_inline int captured6(const struct pod_config *cfg, const __u32 ip[4], __u16 port)
{
	if (!(cfg->flags & POD_IPV6))
		return 0;
	if (port_skipped(cfg, port) || in_cidrs6(cfg->skip6, cfg->n_skip6, ip))
		return 0;
	if (cfg->flags & POD_INCLUDE_LIST)
		return in_cidrs6(cfg->include6, cfg->n_include6, ip);
	return 1;
}

/* Whether a TCP listener serves 127.0.0.1:port (or ::1:port) in the caller's netns: a
 * pod whose proxy is not listening keeps its connections to their real destination. */
static __always_inline int listening(struct bpf_sock_addr *ctx, int v6, __u16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;
	int ok;

	if (v6) {
		t.ipv6.daddr[3] = bpf_htonl(1);
		t.ipv6.dport = bpf_htons(port);
		size = sizeof(t.ipv6);
	} else {
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = bpf_htons(port);
		size = sizeof(t.ipv4);
	}
	sk = bpf_sk_lookup_tcp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	ok = sk->state == TCP_LISTEN;
	bpf_sk_release(sk);
	return ok;
}

/* The part of connect4/6 after the destination is known to be captured: remember it
 * under the socket's cookie and point the socket at the proxy. Returns whether the
 * caller must rewrite the destination. */
static __always_inline int redirect_connect(struct bpf_sock_addr *ctx, const struct pod_config *cfg,
					    int listen_v6, const struct orig_dst *orig)
{
	__u64 cookie;

	if (!listening(ctx, listen_v6, cfg->outbound_port)) {
		count(STAT_CONNECT_NO_LISTENER);
		return 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&connect_orig, &cookie, orig, BPF_ANY)) {
		count(STAT_CONNECT_NO_LISTENER);
		return 0;
	}
	count(STAT_CONNECT_REDIRECTED);
	return 1;
}

static __always_inline const struct pod_config *meshed_stream(struct bpf_sock_addr *ctx)
{
	__u64 netns;
	const struct pod_config *cfg;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	netns = bpf_get_netns_cookie(ctx);
	cfg = bpf_map_lookup_elem(&meshed_pods, &netns);
	if (!cfg)
		return 0;
	if (from_proxy(cfg)) {
		/* Loop guard; and sockops learns that this socket is the proxy's. */
		__u64 cookie = bpf_get_socket_cookie(ctx);
		__u8 one = 1;

		bpf_map_update_elem(&proxy_connects, &cookie, &one, BPF_ANY);
		return 0;
	}
	return cfg;
}

SEC("cgroup/connect4")
int remora_connect4(struct bpf_sock_addr *ctx)
{
	const struct pod_config *cfg = meshed_stream(ctx);
	struct orig_dst orig = {};
	__u32 ip;
	__u16 port;

	if (!cfg)
		return 1;
	ip = ctx->user_ip4;
	port = bpf_ntohs((__u16)ctx->user_port);
	if (is_loopback4(ip))
		return 1;
	if (!captured4(cfg, ip, port)) {
		count(STAT_CONNECT_NOT_CAPTURED);
		return 1;
	}
	mapped(orig.ip, ip);
	orig.port = bpf_htons(port);
	orig.family = AF_INET;
	if (redirect_connect(ctx, cfg, 0, &orig)) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(cfg->outbound_port);
	}
	return 1;
}

SEC("cgroup/connect6")
int remora_connect6(struct bpf_sock_addr *ctx)
{
	const struct pod_config *cfg = meshed_stream(ctx);
	struct orig_dst orig = {};
	__u16 port;
	int v4;

	if (!cfg)
		return 1;
	copy4(orig.ip, ctx->user_ip6);
	port = bpf_ntohs((__u16)ctx->user_port);
	/* A v4-mapped destination is an IPv4 connection for iptables and for the proxy's
	 * SO_ORIGINAL_DST (asked on SOL_IP): treat it as one. */
	v4 = is_mapped(orig.ip);
	if (is_loopback(orig.ip))
		return 1;
	if (v4 ? !captured4(cfg, orig.ip[3], port) : !captured6(cfg, orig.ip, port)) {
		count(STAT_CONNECT_NOT_CAPTURED);
		return 1;
	}
	orig.port = bpf_htons(port);
	orig.family = v4 ? AF_INET : AF_INET6;
	if (!redirect_connect(ctx, cfg, !v4, &orig))
		return 1;
	if (v4) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(cfg->outbound_port);
	return 1;
}

/* getpeername() of an app socket redirected by connect4/6 answers what the app connected
 * to, as it does behind the iptables REDIRECT (the NAT is invisible to the app there). */
static __always_inline const struct orig_dst *redirected_peer(struct bpf_sock_addr *ctx, __u16 family)
{
	struct bpf_sock *sk = ctx->sk;
	const struct pod_config *cfg;
	const struct orig_dst *orig;
	struct endpoint_key ep = {};

	if (!sk)
		return 0;
	ep.netns = bpf_get_netns_cookie(ctx);
	cfg = bpf_map_lookup_elem(&meshed_pods, &ep.netns);
	/* Only a peer that is the proxy's outbound port can be one connect4/6 chose. */
	if (!cfg || bpf_ntohs((__u16)ctx->user_port) != cfg->outbound_port)
		return 0;
	if (sk->family == AF_INET) {
		mapped(ep.ip, sk->src_ip4);
	} else if (sk->family == AF_INET6) {
		copy4(ep.ip, sk->src_ip6);
	} else {
		return 0;
	}
	ep.port = sk->src_port;
	orig = bpf_map_lookup_elem(&orig_dst, &ep);
	if (!orig || orig->family != family)
		return 0;
	return orig;
}

SEC("cgroup/getpeername4")
int remora_getpeername4(struct bpf_sock_addr *ctx)
{
	const struct orig_dst *orig;

	if (!is_loopback4(ctx->user_ip4))
		return 1;
	orig = redirected_peer(ctx, AF_INET);
	if (orig) {
		ctx->user_ip4 = orig->ip[3];
		ctx->user_port = orig->port;
	}
	return 1;
}

SEC("cgroup/getpeername6")
int remora_getpeername6(struct bpf_sock_addr *ctx)
{
	const struct orig_dst *orig;
	__u32 peer[4];

	copy4(peer, ctx->user_ip6);
	if (!is_loopback(peer))
		return 1;
	/* A v4-mapped peer is an IPv4 connection: its original destination is IPv4 too and
	 * is answered in the mapped form the socket uses. */
	orig = redirected_peer(ctx, is_mapped(peer) ? AF_INET : AF_INET6);
	if (orig) {
		ctx->user_ip6[0] = orig->ip[0];
		ctx->user_ip6[1] = orig->ip[1];
		ctx->user_ip6[2] = orig->ip[2];
		ctx->user_ip6[3] = orig->ip[3];
		ctx->user_port = orig->port;
	}
	return 1;
}

/* The key of the socket a sockops callback is about, from its own side. */
static __always_inline int own_key(struct bpf_sock_ops *skops, __u64 netns, struct pair_key *key)
{
	key->netns = netns;
	if (skops->family == AF_INET) {
		mapped(key->local_ip, skops->local_ip4);
		mapped(key->remote_ip, skops->remote_ip4);
	} else if (skops->family == AF_INET6) {
		copy4(key->local_ip, skops->local_ip6);
		copy4(key->remote_ip, skops->remote_ip6);
	} else {
		return 0;
	}
	/* local_port is in host order; remote_port holds the network-order port in its upper
	 * 16 bits on little-endian hosts (UAPI: "stored in network byte order" as a __u32). */
	key->local_port = skops->local_port;
	key->remote_port = bpf_ntohl(skops->remote_port);
	return 1;
}

SEC("sockops")
int remora_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	const struct pod_config *cfg;
	struct pair_key key = {};
	__u64 netns, cookie;
	int proxy;

	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	netns = bpf_get_netns_cookie(skops);
	cfg = bpf_map_lookup_elem(&meshed_pods, &netns);
	if (!cfg || !own_key(skops, netns, &key))
		return 1;

	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* An app socket half-closing (or closing) leaves sock_pairs now: its wait for
		 * the rest of the stream would wake up without data when its FIN is acked, and
		 * tcp_bpf_recvmsg would return EAGAIN to a blocking reader. Nothing is ever
		 * queued for it in the map (only the proxy's sockets receive), so nothing is
		 * lost; tcp_recvmsg serves it from here on. */
		if (skops->args[1] == BPF_TCP_FIN_WAIT1)
			bpf_map_delete_elem(&sock_pairs, &key);
		return 1;
	}

	cookie = bpf_get_socket_cookie(skops);
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		proxy = bpf_map_lookup_elem(&proxy_connects, &cookie) != 0;
		if (proxy)
			bpf_map_delete_elem(&proxy_connects, &cookie);
	} else {
		proxy = key.local_port == cfg->outbound_port;
	}

	/* Only these connections can have their peer socket in this netns: the app and its
	 * proxy over loopback, or a pod calling its own address. */
	if (is_loopback(key.remote_ip) || same_ip(key.remote_ip, key.local_ip)) {
		__u8 one = 1;

		/* Set or cleared: a 4-tuple of a closed proxy socket can come back as an app's. */
		if (proxy)
			bpf_map_update_elem(&proxy_side, &key, &one, BPF_ANY);
		else
			bpf_map_delete_elem(&proxy_side, &key);
		if (bpf_sock_hash_update(skops, &sock_pairs, &key, BPF_ANY)) {
			count(STAT_SOCKET_ADD_FAILED);
		} else {
			count(STAT_SOCKET_ADDED);
			if (!proxy && !redirect_to_app())
				bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
									 BPF_SOCK_OPS_STATE_CB_FLAG);
		}
	}

	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		struct orig_dst *orig = bpf_map_lookup_elem(&connect_orig, &cookie);

		if (orig) {
			struct endpoint_key ep = {};

			ep.netns = netns;
			copy4(ep.ip, key.local_ip);
			ep.port = key.local_port;
			bpf_map_update_elem(&orig_dst, &ep, orig, BPF_ANY);
			bpf_map_delete_elem(&connect_orig, &cookie);
		}
	}
	return 1;
}

/* From now on this socket's sends go through TCP. */
static __always_inline void passthrough(const struct pair_key *self)
{
	__u8 one = 1;

	bpf_map_update_elem(&msg_passthrough, self, &one, BPF_ANY);
}

SEC("sk_msg")
int remora_sk_msg(struct sk_msg_md *msg)
{
	struct pair_key self = {};
	struct pair_key peer = {};
	__u64 size, *queued;

	self.netns = bpf_get_netns_cookie(msg);
	if (msg->family == AF_INET) {
		mapped(self.local_ip, msg->local_ip4);
		mapped(self.remote_ip, msg->remote_ip4);
	} else if (msg->family == AF_INET6) {
		copy4(self.local_ip, msg->local_ip6);
		copy4(self.remote_ip, msg->remote_ip6);
	} else {
		return SK_PASS;
	}
	/* Same layout as in sockops: local_port host order, remote_port network order in
	 * the upper half. */
	self.local_port = msg->local_port;
	self.remote_port = bpf_ntohl(msg->remote_port);

	/* The peer's key, in the same netns: never another pod's socket. */
	peer.netns = self.netns;
	copy4(peer.local_ip, self.remote_ip);
	copy4(peer.remote_ip, self.local_ip);
	peer.local_port = self.remote_port;
	peer.remote_port = self.local_port;

	/* This socket sending means it reads what its peer hands it: the peer's budget of
	 * unread bytes starts again. */
	bpf_map_delete_elem(&unread, &peer);

	if (bpf_map_lookup_elem(&msg_passthrough, &self))
		return SK_PASS;

	/* Sends to an app socket go through TCP (see proxy_side in accel.h); always, so
	 * there is no ordering to keep. */
	if (!bpf_map_lookup_elem(&proxy_side, &peer) && !redirect_to_app())
		return SK_PASS;

	size = msg->size;
	queued = bpf_map_lookup_elem(&unread, &self);
	if (queued && *queued + size > UNREAD_LIMIT) {
		passthrough(&self);
		count(STAT_UNREAD_LIMIT);
		return SK_PASS;
	}

	if (bpf_msg_redirect_hash(msg, &sock_pairs, &peer, BPF_F_INGRESS) == SK_PASS) {
		if (queued)
			__sync_fetch_and_add(queued, size);
		else
			bpf_map_update_elem(&unread, &self, &size, BPF_ANY);
		count(STAT_MSG_REDIRECTED);
	} else {
		/* Sent through TCP: the peer may read these bytes from its TCP queue after
		 * redirected ones, so this socket's later sends go through TCP too. */
		passthrough(&self);
		count(STAT_MSG_FALLBACK);
	}
	return SK_PASS;
}

SEC("cgroup/getsockopt")
int remora_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct endpoint_key ep = {};
	struct orig_dst *orig;
	void *end = (void *)(long)ctx->optval_end;

	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	if (!sk)
		return 1;
	ep.netns = bpf_get_netns_cookie(ctx);
	if (sk->family == AF_INET) {
		mapped(ep.ip, sk->dst_ip4);
	} else if (sk->family == AF_INET6) {
		copy4(ep.ip, sk->dst_ip6);
	} else {
		return 1;
	}
	ep.port = bpf_ntohs(sk->dst_port);
	orig = bpf_map_lookup_elem(&orig_dst, &ep);
	if (!orig)
		return 1;

	if (ctx->level == SOL_IP && orig->family == AF_INET) {
		struct sockaddr_in4 {
			__u16 family;
			__u16 port;
			__u32 addr;
			__u8 zero[8];
		} *sin = (void *)(long)ctx->optval;

		if ((void *)(sin + 1) > end)
			return 1;
		sin->family = AF_INET;
		sin->port = orig->port;
		sin->addr = orig->ip[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else if (ctx->level == SOL_IPV6 && orig->family == AF_INET6) {
		struct sockaddr_in6_ {
			__u16 family;
			__u16 port;
			__u32 flowinfo;
			__u32 addr[4];
			__u32 scope_id;
		} *sin6 = (void *)(long)ctx->optval;

		if ((void *)(sin6 + 1) > end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = orig->port;
		sin6->flowinfo = 0;
		copy4(sin6->addr, orig->ip);
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	} else {
		return 1;
	}
	ctx->retval = 0;
	count(STAT_ORIG_DST_SERVED);
	return 1;
}
