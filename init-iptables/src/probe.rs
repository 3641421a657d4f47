//! A tiny TCP listener and client that say where connections really arrive.
//!
//! The listener answers every connection with one line,
//! `served_by=<local addr> peer=<peer addr> orig_dst=<SO_ORIGINAL_DST or none>`, and
//! closes it; the client connects, prints that line and exits. Run in network
//! namespaces, they show whether a connection was redirected and where it was headed.
//! Used by the `remora-probe` debugging tool and by the namespace tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use crate::orig_dst::{canonical, original_dst};

/// The listener's report on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The local address the connection arrived at.
    pub served_by: SocketAddr,
    /// The client's address.
    pub peer: SocketAddr,
    /// The original destination, when the kernel knows one.
    pub orig_dst: Option<SocketAddr>,
}

impl Report {
    /// The report line (without newline).
    pub fn line(&self) -> String {
        let orig = self
            .orig_dst
            .map_or_else(|| "none".to_string(), |a| a.to_string());
        format!(
            "served_by={} peer={} orig_dst={orig}",
            self.served_by, self.peer
        )
    }

    /// Parses a report line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut served_by = None;
        let mut peer = None;
        let mut orig_dst = None;
        for field in line.split_whitespace() {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("bad field '{field}' in '{line}'"))?;
            let addr = || {
                v.parse::<SocketAddr>()
                    .map_err(|e| format!("bad address '{v}' in '{line}': {e}"))
            };
            match k {
                "served_by" => served_by = Some(addr()?),
                "peer" => peer = Some(addr()?),
                "orig_dst" if v == "none" => {}
                "orig_dst" => orig_dst = Some(addr()?),
                _ => return Err(format!("unknown field '{k}' in '{line}'")),
            }
        }
        Ok(Report {
            served_by: served_by.ok_or_else(|| format!("no served_by in '{line}'"))?,
            peer: peer.ok_or_else(|| format!("no peer in '{line}'"))?,
            orig_dst,
        })
    }
}

/// Serves one listener forever, answering each connection with its [`Report`].
pub fn serve(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let (Ok(local), Ok(peer)) = (conn.local_addr(), conn.peer_addr()) else {
            continue;
        };
        let report = Report {
            served_by: canonical(local),
            peer: canonical(peer),
            orig_dst: original_dst(&conn).ok().map(canonical),
        };
        let _ = conn.write_all(format!("{}\n", report.line()).as_bytes());
    }
}

/// Connects to `addr` and returns the listener's report.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Report, String> {
    let conn = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| format!("set timeout: {e}"))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Report::parse(line.trim_end())
}

/// Answers every UDP datagram with `tag`, forever (UDP has no original destination to
/// report; the tag says which listener answered).
pub fn serve_udp(socket: UdpSocket, tag: &str) {
    let mut buf = [0u8; 512];
    loop {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(tag.as_bytes(), from);
        }
    }
}

/// Sends one UDP datagram to `addr` and returns the answering listener's tag.
pub fn send_udp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set timeout: {e}"))?;
    socket
        .send_to(b"ping", addr)
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("no answer from {addr}: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trip() {
        let r = Report {
            served_by: "127.0.0.1:15001".parse().expect("addr"),
            peer: "[fd00::1]:4000".parse().expect("addr"),
            orig_dst: Some("10.0.0.2:8080".parse().expect("addr")),
        };
        assert_eq!(Report::parse(&r.line()), Ok(r.clone()));
        let none = Report {
            orig_dst: None,
            ..r
        };
        assert_eq!(Report::parse(&none.line()), Ok(none));
    }

    #[test]
    fn loopback_listener_reports() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || serve(listener));
        let report = connect(addr, Duration::from_secs(5)).expect("report");
        assert_eq!(report.served_by, addr);
    }
}
