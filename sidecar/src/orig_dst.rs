//! Reading the original destination of a redirected connection (`SO_ORIGINAL_DST` for
//! IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6), as set by the iptables `REDIRECT` rules that
//! `remora-init` installs. The socket option itself lives in `remora_init::orig_dst`, the
//! workspace's one `unsafe` module; this adapter gives it the proxy's address roles.

use std::{io, os::fd::AsFd};

use crate::addr::{ClientAddr, OrigDstAddr};

/// The original destination of an accepted, redirected socket. `client` is the socket's
/// peer address; it selects the address family, which is the same at both ends of a TCP
/// socket (an IPv4 peer on a dual-stack socket shows as a v4-mapped IPv6 address at both
/// ends and is asked with the IPv4 option), so the local address (a `getsockname`) is
/// not needed.
///
/// A connection that has no NAT entry (it was not redirected and conntrack is not
/// tracking it) fails with `ENOENT`.
pub fn original_dst(sock: &impl AsFd, client: ClientAddr) -> io::Result<OrigDstAddr> {
    // `original_dst_fd` reads only the address family of the address it is given.
    remora_init::orig_dst::original_dst_fd(sock.as_fd(), client.0).map(OrigDstAddr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unredirected_socket_has_no_original_destination_or_its_own_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sock, peer) = listener.accept().await.expect("accept");
        let local = sock.local_addr().expect("local");
        // Without a NAT rule the kernel reports either no entry (ENOENT, conntrack not
        // tracking) or the tuple as it is, i.e. the socket's own address.
        match original_dst(&sock, ClientAddr(peer)) {
            Ok(dst) => assert_eq!(dst.0, local),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
    }

    /// The family is read from the peer's address: it must be the local address's, with
    /// the same IPv4 mapping, for every kind of listener and client.
    #[tokio::test]
    async fn peer_and_local_addresses_share_the_family() {
        let kind = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(_) => "v4",
            std::net::SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => "v4-mapped",
            std::net::SocketAddr::V6(_) => "v6",
        };
        let mut cases = vec![("127.0.0.1:0", "127.0.0.1")];
        // A host without IPv6 has only the IPv4 case.
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            cases.extend([("[::]:0", "127.0.0.1"), ("[::]:0", "::1")]);
        }
        for (listen, from) in cases {
            let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let to: std::net::IpAddr = from.parse().expect("ip");
            let _client = tokio::net::TcpStream::connect((to, port))
                .await
                .expect("connect");
            let (sock, peer) = listener.accept().await.expect("accept");
            let local = sock.local_addr().expect("local");
            assert_eq!(
                kind(peer),
                kind(local),
                "{listen} from {from}: {peer} / {local}"
            );
        }
    }
}
