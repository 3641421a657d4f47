//! Hand-rolled HTTP/2 frames for the attackers of `attacks_h2` (RFC 9113 §4, §6): the
//! floods need frames no well-behaved client library sends. HPACK is the plain subset:
//! static-table indices and literals without indexing or Huffman coding (RFC 7541 §6.2.2).
//! A reader task tallies what the server sends back.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const CANCEL: u32 = 0x8;

/// One frame: the 9-byte header and `payload`.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// An HPACK integer with an `n`-bit prefix, the prefix byte's high bits set to `high`.
fn hpack_int(out: &mut Vec<u8>, n: u32, high: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(high | u8::try_from(v).expect("fits"));
        return;
    }
    out.push(high | u8::try_from(max).expect("fits"));
    v -= max;
    while v >= 128 {
        out.push(u8::try_from(v % 128).expect("fits") | 0x80);
        v /= 128;
    }
    out.push(u8::try_from(v).expect("fits"));
}

/// A literal header field without indexing, new name (RFC 7541 §6.2.2).
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, 0, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// The header block of `GET path` on `app.test`, plus `extra` fields.
pub fn get_block(path: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    // Static table: 2 = :method GET, 6 = :scheme http.
    let mut b = vec![0x82, 0x86];
    literal(&mut b, ":path", path.as_bytes());
    literal(&mut b, ":authority", b"app.test");
    for (n, v) in extra {
        literal(&mut b, n, v);
    }
    b
}

/// A complete `GET path` request on `stream` (HEADERS with END_STREAM and END_HEADERS).
pub fn get(stream: u32, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        stream,
        &get_block(path, &[]),
    )
}

/// What the server sent on an attacked connection.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub frames: u64,
    pub headers: u64,
    pub data_bytes: u64,
    pub rst_streams: u64,
    pub settings: u64,
    /// The error code of a GOAWAY, if one came.
    pub goaway: Option<u32>,
    /// The server closed the connection (EOF or reset).
    pub closed: bool,
}

/// An HTTP/2 connection whose server frames are tallied by a task.
pub struct RawH2 {
    pub w: OwnedWriteHalf,
    pub tally: Arc<Mutex<Tally>>,
}

impl RawH2 {
    /// Connects and sends the preface and `initial` SETTINGS; a task reads and tallies what the server sends.
    pub async fn connect(addr: SocketAddr, initial: &[(u16, u32)]) -> Self {
        let (r, w) = Self::open(addr, initial).await;
        let tally: Arc<Mutex<Tally>> = Arc::default();
        tokio::spawn(read_frames(r, tally.clone()));
        Self { w, tally }
    }

    /// As [`Self::connect`], but nothing ever reads what the server sends.
    pub async fn connect_unread(addr: SocketAddr, initial: &[(u16, u32)]) -> (Self, OwnedReadHalf) {
        let (r, w) = Self::open(addr, initial).await;
        (
            Self {
                w,
                tally: Arc::default(),
            },
            r,
        )
    }

    async fn open(addr: SocketAddr, initial: &[(u16, u32)]) -> (OwnedReadHalf, OwnedWriteHalf) {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (r, mut w) = s.into_split();
        w.write_all(PREFACE).await.expect("preface");
        // The server's SETTINGS are never acknowledged: nothing in RFC 9113 bounds how
        // long a peer may take, and an ACK sent before they arrive would be an error.
        w.write_all(&settings(initial)).await.expect("settings");
        (r, w)
    }

    pub fn tally(&self) -> Tally {
        self.tally.lock().expect("tally").clone()
    }

    /// The server said GOAWAY or closed.
    pub fn ended(&self) -> bool {
        let t = self.tally.lock().expect("tally");
        t.goaway.is_some() || t.closed
    }
}

async fn read_frames(mut r: OwnedReadHalf, tally: Arc<Mutex<Tally>>) {
    let mut head = [0u8; 9];
    let mut payload = vec![0u8; 1 << 16];
    loop {
        if r.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        if payload.len() < len {
            payload.resize(len, 0);
        }
        if r.read_exact(&mut payload[..len]).await.is_err() {
            break;
        }
        let mut t = tally.lock().expect("tally");
        t.frames += 1;
        match head[3] {
            HEADERS => t.headers += 1,
            DATA => t.data_bytes += len as u64,
            RST_STREAM => t.rst_streams += 1,
            SETTINGS => t.settings += 1,
            GOAWAY if len >= 8 => {
                t.goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
            _ => {}
        }
    }
    tally.lock().expect("tally").closed = true;
}
