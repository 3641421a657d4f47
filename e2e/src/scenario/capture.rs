//! A packet capture on the node tier's pod network: what travels between two pods'
//! network namespaces, seen from the node's namespace where their veths meet the bridge.
//! Node tier only (an external cluster's pod network is not reachable from the test).
//!
//! A thread joins the node's network namespace and reads every frame of every interface
//! there (the veths included) with an `AF_PACKET` socket (no tcpdump needed); TCP segments between
//! the client pod and the server pods are kept (each is seen twice, leaving one veth and
//! entering the other). [`analyse`] then says whether the bytes were TLS: a ClientHello
//! from the client, TLS records, and none of the plaintext the applications exchanged.

#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use super::ScenarioError;

/// At most this many payload bytes are kept (a few seconds of scenario traffic is far less).
const MAX_KEPT: usize = 32 * 1024 * 1024;

/// One TCP segment with payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub payload: Vec<u8>,
}

/// A capture in progress.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    kept: Arc<Mutex<Vec<Segment>>>,
}

/// Starts capturing, in the network namespace at `netns`, the TCP segments between
/// `client` and any of `servers`.
pub fn start(
    netns: &Path,
    client: Ipv4Addr,
    servers: &[Ipv4Addr],
) -> Result<Capture, ScenarioError> {
    let ns = std::fs::File::open(netns)
        .map_err(|e| ScenarioError::failed(format!("opening {}: {e}", netns.display())))?;
    let servers: BTreeSet<Ipv4Addr> = servers.iter().copied().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let kept = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (stop_t, kept_t) = (stop.clone(), kept.clone());
    let thread = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let sock = match open_in(&ns) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; 65_536];
            let mut total = 0usize;
            while !stop_t.load(Ordering::Relaxed) {
                // SAFETY: recv(2) into `buf`, whose length bounds the write; the socket
                // stays open (owned by `sock`) for the call.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else {
                    continue; // the receive timeout: check the stop flag
                };
                let Some(seg) = tcp_segment(&buf[..n]) else {
                    continue;
                };
                let between = (seg.src == client && servers.contains(&seg.dst))
                    || (seg.dst == client && servers.contains(&seg.src));
                if between && !seg.payload.is_empty() && total < MAX_KEPT {
                    total += seg.payload.len();
                    kept_t
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(seg);
                }
            }
        })
        .map_err(|e| ScenarioError::failed(format!("spawning the capture thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Capture {
            stop,
            thread: Some(thread),
            kept,
        }),
        Ok(Err(e)) => Err(ScenarioError::failed(format!(
            "packet capture in {}: {e}",
            netns.display()
        ))),
        Err(_) => Err(ScenarioError::failed("the capture thread ended early")),
    }
}

/// Joins the namespace (this thread only) and opens the packet socket.
fn open_in(ns: &std::fs::File) -> Result<OwnedFd, String> {
    // SAFETY: setns(2) with a descriptor `ns` keeps open for the call; CLONE_NEWNET
    // changes only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    // ETH_P_ALL, not ETH_P_IP: frames the bridge forwards between two veths never reach
    // the node's IP layer, and only an all-protocols tap sees them; `tcp_segment` keeps
    // the IPv4 ones (SOCK_DGRAM strips the link header).
    let proto = i32::from((libc::ETH_P_ALL as u16).to_be());
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto) };
    if fd < 0 {
        return Err(format!(
            "an AF_PACKET socket (needs root / CAP_NET_RAW): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt(2) reading a timeval that lives for the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
    }
    Ok(sock)
}

impl Capture {
    /// Stops the capture and returns the kept segments.
    pub fn stop(mut self) -> Vec<Segment> {
        self.halt();
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The TCP segment in an IPv4 packet, if it is one.
pub fn tcp_segment(packet: &[u8]) -> Option<Segment> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if *packet.get(9)? != 6 || ihl < 20 || total > packet.len() || total < ihl + 20 {
        return None;
    }
    let ip = |at: usize| {
        Some(Ipv4Addr::new(
            packet[at],
            packet[at + 1],
            packet[at + 2],
            packet[at + 3],
        ))
    };
    let tcp = &packet[ihl..total];
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return None;
    }
    Some(Segment {
        src: ip(12)?,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst: ip(16)?,
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload: tcp[data_offset..].to_vec(),
    })
}

/// What the captured bytes were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub segments: usize,
    pub payload_bytes: usize,
    /// Segments from the client opening with a TLS handshake record holding a ClientHello.
    pub client_hellos: usize,
    /// Segments opening with a TLS record header (handshake, alert, application data...).
    pub tls_records: usize,
    /// The server ports the client's segments went to.
    pub server_ports: BTreeSet<u16>,
    /// Plaintext markers found, with the direction (`request`/`answer`) they were in.
    pub plaintext: Vec<String>,
}

impl Verdict {
    /// Whether the capture shows TLS and only TLS between the pods.
    pub fn is_tls_only(&self) -> bool {
        self.client_hellos > 0 && self.tls_records > 0 && self.plaintext.is_empty()
    }
}

/// Reads `segments` sent by `client` (requests) and to it (answers) for TLS records and
/// for `markers`, bytes the applications exchanged in the clear before their proxies.
pub fn analyse(segments: &[Segment], client: Ipv4Addr, markers: &[&str]) -> Verdict {
    let mut v = Verdict::default();
    for s in segments {
        v.segments += 1;
        v.payload_bytes += s.payload.len();
        let from_client = s.src == client;
        if from_client {
            v.server_ports.insert(s.dport);
        }
        let p = &s.payload;
        let record = p.len() >= 5 && (0x14..=0x17).contains(&p[0]) && p[1] == 0x03 && p[2] <= 0x04;
        if record {
            v.tls_records += 1;
            if from_client && p[0] == 0x16 && p.get(5) == Some(&0x01) {
                v.client_hellos += 1;
            }
        }
        for m in markers {
            if contains(p, m.as_bytes()) {
                let dir = if from_client { "request" } else { "answer" };
                let found = format!(
                    "{m:?} in a {dir} segment {}:{} -> {}:{}",
                    s.src, s.sport, s.dst, s.dport
                );
                if !v.plaintext.contains(&found) {
                    v.plaintext.push(found);
                }
            }
        }
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(total).expect("small").to_be_bytes());
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 5 << 4;
        p[40..].copy_from_slice(payload);
        p
    }

    const CLIENT: [u8; 4] = [10, 244, 0, 7];
    const SERVER: [u8; 4] = [10, 244, 0, 9];

    #[test]
    fn parses_tcp_in_ipv4_and_ignores_the_rest() {
        let p = packet(CLIENT, SERVER, 40_000, 9080, b"hello");
        let s = tcp_segment(&p).expect("tcp");
        assert_eq!(
            (s.src, s.sport, s.dst, s.dport, s.payload.as_slice()),
            (
                Ipv4Addr::from(CLIENT),
                40_000,
                Ipv4Addr::from(SERVER),
                9080,
                &b"hello"[..]
            )
        );
        let mut udp = p.clone();
        udp[9] = 17;
        assert!(tcp_segment(&udp).is_none());
        assert!(tcp_segment(&p[..30]).is_none(), "truncated");
        assert!(tcp_segment(&[0x60; 60]).is_none(), "IPv6");
        assert!(tcp_segment(&[]).is_none());
    }

    #[test]
    fn tls_between_the_pods_is_recognised() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0];
        let data = [0x17, 0x03, 0x03, 0x00, 0x20, 0xaa, 0xbb];
        let segs: Vec<Segment> = [
            packet(CLIENT, SERVER, 40_000, 9080, &hello),
            packet(
                SERVER,
                CLIENT,
                9080,
                40_000,
                &[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02],
            ),
            packet(CLIENT, SERVER, 40_000, 9080, &data),
        ]
        .iter()
        .filter_map(|p| tcp_segment(p))
        .collect();
        let v = analyse(&segs, CLIENT.into(), &["GET /api/reviews", "\"pod\":"]);
        assert_eq!((v.client_hellos, v.tls_records, v.segments), (1, 3, 3));
        assert_eq!(v.server_ports, BTreeSet::from([9080]));
        assert!(v.is_tls_only(), "{v:?}");
    }

    #[test]
    fn plaintext_http_is_caught_in_either_direction() {
        let segs: Vec<Segment> = [
            packet(
                CLIENT,
                SERVER,
                40_000,
                9080,
                b"GET /api/reviews HTTP/1.1\r\n\r\n",
            ),
            packet(
                SERVER,
                CLIENT,
                9080,
                40_000,
                b"HTTP/1.1 200 OK\r\n\r\n{\"pod\":\"reviews-v1\"}",
            ),
        ]
        .iter()
        .filter_map(|p| tcp_segment(p))
        .collect();
        let v = analyse(&segs, CLIENT.into(), &["GET /api/reviews", "\"pod\":"]);
        assert!(!v.is_tls_only());
        assert_eq!(v.plaintext.len(), 2, "{:?}", v.plaintext);
        assert!(v.plaintext[0].contains("request") && v.plaintext[1].contains("answer"));
        assert_eq!(v.client_hellos, 0);
    }
}
