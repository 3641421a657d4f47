//! Reading the original destination of a redirected connection (`SO_ORIGINAL_DST` for
//! IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6), as set by the iptables `REDIRECT` rules that
//! `remora-init` installs. This is the only module of the proxy that uses `unsafe`: one
//! `getsockopt` call per address family.
#![allow(unsafe_code)]

use std::{
    io, mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

use crate::addr::{LocalAddr, OrigDstAddr};

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>` (level `SOL_IP`).
const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` from `<linux/netfilter_ipv6/ip6_tables.h>` (level `SOL_IPV6`).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of an accepted, redirected socket. `local` is the socket's
/// local address; it selects the address family (an IPv4 peer on a dual-stack socket
/// shows as a v4-mapped IPv6 address and is asked with the IPv4 option).
///
/// A connection that has no NAT entry (it was not redirected and conntrack is not
/// tracking it) fails with `ENOENT`.
pub fn original_dst(sock: &impl AsRawFd, local: LocalAddr) -> io::Result<OrigDstAddr> {
    let fd = sock.as_raw_fd();
    let addr = match local.0 {
        SocketAddr::V4(_) => SocketAddr::V4(original_dst_v4(fd)?),
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => {
            SocketAddr::V4(original_dst_v4(fd)?)
        }
        SocketAddr::V6(_) => SocketAddr::V6(original_dst_v6(fd)?),
    };
    Ok(OrigDstAddr(addr))
}

fn original_dst_v4(fd: libc::c_int) -> io::Result<SocketAddrV4> {
    // SAFETY: `sockaddr_in` is a plain C struct of integers; all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket borrowed for the duration of the call; `addr` and
    // `len` are valid, writable and `len` holds the size of `addr`, so the kernel writes
    // at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if addr.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "SO_ORIGINAL_DST returned address family {}",
                addr.sin_family
            ),
        ));
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)))
}

fn original_dst_v6(fd: libc::c_int) -> io::Result<SocketAddrV6> {
    // SAFETY: `sockaddr_in6` is a plain C struct of integers; all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: as for IPv4: a borrowed open socket, a writable buffer and its exact size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if addr.sin6_family != libc::AF_INET6 as libc::sa_family_t {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "IP6T_SO_ORIGINAL_DST returned address family {}",
                addr.sin6_family
            ),
        ));
    }
    let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
    Ok(SocketAddrV6::new(
        ip,
        u16::from_be(addr.sin6_port),
        u32::from_be(addr.sin6_flowinfo),
        addr.sin6_scope_id,
    ))
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
