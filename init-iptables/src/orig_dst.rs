//! The original destination of a redirected TCP connection (`SO_ORIGINAL_DST`).
//!
//! When the `nat` table REDIRECTs a connection to the proxy, the accepted socket's local
//! address is the proxy's port; the address the client really dialled is kept by
//! conntrack and read with `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 or
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6. An IPv4 connection accepted
//! on a dual-stack IPv6 socket (local address `::ffff:a.b.c.d`) is an IPv4 connection
//! for conntrack and is asked with the IPv4 option; its answer is a plain IPv4 address.
//!
//! For a connection that was *not* redirected the kernel answers with the socket's own
//! local address (or `ENOENT` when conntrack does not track it), so a proxy compares
//! the answer with the listener's address to refuse connections that would loop.
//!
//! This is the only module of the workspace that needs `unsafe`: two `getsockopt` calls.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

/// The destination the client of a redirected connection originally connected to.
///
/// IPv4 connections (including ones accepted on a dual-stack IPv6 socket) give a
/// [`SocketAddr::V4`], IPv6 connections a [`SocketAddr::V6`].
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    original_dst_fd(stream.as_fd(), stream.local_addr()?)
}

/// Like [`original_dst`] for any accepted TCP socket (for example a tokio `TcpStream`,
/// which is `AsFd`), given the socket's local address:
/// `original_dst_fd(stream.as_fd(), stream.local_addr()?)`.
pub fn original_dst_fd(fd: BorrowedFd<'_>, local: SocketAddr) -> io::Result<SocketAddr> {
    let fd = fd.as_raw_fd();
    match local {
        SocketAddr::V4(_) => ipv4(fd).map(SocketAddr::V4),
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => ipv4(fd).map(SocketAddr::V4),
        SocketAddr::V6(_) => ipv6(fd).map(SocketAddr::V6),
    }
}

fn ipv4(fd: RawFd) -> io::Result<SocketAddrV4> {
    let mut addr = libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, writable `sockaddr_in` that outlives the call and `len`
    // holds its exact size, so the kernel writes at most `len` bytes into it; `fd` is
    // borrowed from a live socket for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(addr.sin_family) != libc::AF_INET {
        return Err(io::Error::other(format!(
            "SO_ORIGINAL_DST returned address family {}",
            addr.sin_family
        )));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

fn ipv6(fd: RawFd) -> io::Result<SocketAddrV6> {
    let mut addr = libc::sockaddr_in6 {
        sin6_family: 0,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
        sin6_scope_id: 0,
    };
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, writable `sockaddr_in6` that outlives the call and `len`
    // holds its exact size, so the kernel writes at most `len` bytes into it; `fd` is
    // borrowed from a live socket for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            libc::IP6T_SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(addr.sin6_family) != libc::AF_INET6 {
        return Err(io::Error::other(format!(
            "IP6T_SO_ORIGINAL_DST returned address family {}",
            addr.sin6_family
        )));
    }
    Ok(SocketAddrV6::new(
        Ipv6Addr::from(addr.sin6_addr.s6_addr),
        u16::from_be(addr.sin6_port),
        addr.sin6_flowinfo,
        addr.sin6_scope_id,
    ))
}

/// A socket address with an IPv4-mapped IPv6 address turned into the IPv4 address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Without any NAT, the kernel answers with the socket's own address or ENOENT;
    /// either way the call itself must be well-formed (no EINVAL/EFAULT).
    #[test]
    fn unredirected_loopback_connection() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let listener = match TcpListener::bind(bind) {
                Ok(l) => l,
                Err(e) if bind.starts_with('[') => {
                    panic!("IPv6 loopback unavailable ({e}); remora-init tests need IPv6 enabled")
                }
                Err(e) => panic!("bind {bind}: {e}"),
            };
            let addr = listener.local_addr().expect("local addr");
            let _client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            match original_dst(&server) {
                Ok(dst) => assert_eq!(dst, addr),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
            }
        }
    }

    #[test]
    fn canonicalises_mapped_addresses() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().expect("addr");
        assert_eq!(
            canonical(mapped),
            "10.0.0.1:80".parse::<SocketAddr>().expect("addr")
        );
        let v6: SocketAddr = "[fd00::1]:80".parse().expect("addr");
        assert_eq!(canonical(v6), v6);
    }
}
