//! Reading the original destination of a redirected connection (`SO_ORIGINAL_DST` for
//! IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6), as set by the iptables `REDIRECT` rules that
//! `remora-init` installs. The socket option itself lives in `remora_init::orig_dst`, the
//! workspace's one `unsafe` module; this adapter gives it the proxy's address roles.

use std::{io, os::fd::AsFd};

use crate::addr::{LocalAddr, OrigDstAddr};

/// The original destination of an accepted, redirected socket. `local` is the socket's
/// local address; it selects the address family (an IPv4 peer on a dual-stack socket
/// shows as a v4-mapped IPv6 address and is asked with the IPv4 option).
///
/// A connection that has no NAT entry (it was not redirected and conntrack is not
/// tracking it) fails with `ENOENT`.
pub fn original_dst(sock: &impl AsFd, local: LocalAddr) -> io::Result<OrigDstAddr> {
    remora_init::orig_dst::original_dst_fd(sock.as_fd(), local.0).map(OrigDstAddr)
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
        let (sock, _) = listener.accept().await.expect("accept");
        let local = LocalAddr(sock.local_addr().expect("local"));
        // Without a NAT rule the kernel reports either no entry (ENOENT, conntrack not
        // tracking) or the tuple as it is, i.e. the socket's own address.
        match original_dst(&sock, local) {
            Ok(dst) => assert_eq!(dst.0, local.0),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
    }
}
