//! Write coalescing under an HTTP/2 connection: the frames of all the streams a
//! connection serves in one turn leave in one write (one TLS record, one syscall)
//! instead of one each.
//!
//! `h2` copies small frames into its own buffer, but it writes a DATA frame of 256 bytes
//! or more without copying it (vectored) and must flush before it can buffer the next
//! frame. With 16 streams of 1 KiB bodies on a connection that was a write, a TLS record
//! and a syscall per frame, for every hop of the pair: about six `writev` and two
//! records per request (callgrind of the `h2c` guard path). HAProxy's h2 mux writes once
//! per turn of its event loop; [`Coalesce`] does the same for a Tokio task:
//! - writes are copied into a buffer of up to [`CAP`] bytes (larger ones go straight
//!   through, after what is buffered);
//! - once a turn flushes twice (several streams are writing), a flush with bytes
//!   buffered is acknowledged at once and the task is woken, so it is polled again after
//!   the other ready tasks ran (and queued their frames);
//! - the buffered bytes are then written at the connection's next read (`h2` reads first
//!   each time the connection is polled), when the buffer is full, and before a
//!   shutdown;
//! - a turn that flushes once (one stream at a time) writes at once, as without the
//!   buffer: deferring would only cost a poll (+3.6 % instructions per request on a
//!   one-stream h2c connection through the pair, measured).
//!
//! Once a write could not finish (the peer is not reading), flushes wait for it again, so
//! backpressure, and the write-stall guard beneath, work as without the buffer. HTTP/1
//! connections never need this (hyper writes each message once) and go without.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held back: a TLS record's worth of plaintext.
pub const CAP: usize = 16 * 1024;

/// `io` with its writes coalesced (see the module docs), or passed through.
#[derive(Debug)]
pub struct Coalesce<I> {
    io: I,
    buf: Vec<u8>,
    /// How much of `buf` is written already.
    written: usize,
    /// The last write of the buffer could not finish: flushes are honest until it does.
    blocked: bool,
    /// Flushes are deferred: the connection's turns have been writing several flushes.
    defer: bool,
    /// Flushes of buffered bytes since the last read (since the turn began).
    flushes: u32,
}

impl<I> Coalesce<I> {
    pub fn new(io: I) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            blocked: false,
            defer: false,
            flushes: 0,
        }
    }

    fn pending(&self) -> bool {
        self.written < self.buf.len()
    }
}

impl<I: AsyncWrite + Unpin> Coalesce<I> {
    /// Writes out what is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.blocked = true;
                    return Poll::Pending;
                }
            }
        }
        self.buf.clear();
        self.written = 0;
        self.blocked = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: `Ready(true)` when they fit in the buffer,
    /// `Ready(false)` when they are too large to copy (the buffer is empty then).
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.blocked || self.buf.len() + len > CAP {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(len < CAP))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A turn that flushed once had nothing to coalesce: the next writes at once.
        if this.flushes <= 1 {
            this.defer = false;
        }
        this.flushes = 0;
        if this.pending() {
            // The deferred write. Not done yet (the peer's window is full): reading goes
            // on, and the write waits for the next flush or read.
            if let Poll::Ready(r) = this.poll_drain(cx) {
                r?;
                if let Poll::Ready(Err(e)) = Pin::new(&mut this.io).poll_flush(cx) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Coalesce<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if ready!(this.poll_room(cx, data.len()))? {
            this.buf.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        } else {
            Pin::new(&mut this.io).poll_write(cx, data)
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if ready!(this.poll_room(cx, len))? {
            for b in bufs {
                this.buf.extend_from_slice(b);
            }
            Poll::Ready(Ok(len))
        } else {
            Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        // Vectored writes are copied whole; `h2` then leaves DATA payloads uncopied.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending() {
            this.flushes = this.flushes.saturating_add(1);
            // A second flush in one turn: more streams are writing; coalesce from now on.
            this.defer |= this.flushes > 1;
            if this.defer && !this.blocked {
                // Deferred to the task's next poll, which reads first (and writes).
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Counts the writes that reach the stream beneath.
    struct Counted {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if r.is_ready() {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    fn counted(capacity: usize) -> (Coalesce<Counted>, DuplexStream, Arc<AtomicUsize>) {
        let (near, far) = tokio::io::duplex(capacity);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = Counted {
            io: near,
            writes: writes.clone(),
        };
        (Coalesce::new(io), far, writes)
    }

    #[tokio::test]
    async fn flushed_frames_of_one_turn_leave_in_one_write_at_the_next_read() {
        let (mut c, mut far, writes) = counted(1 << 20);
        for i in 0..16u8 {
            c.write_all(&[i; 1024]).await.expect("write");
            c.flush().await.expect("flush");
        }
        assert_eq!(
            writes.load(Ordering::Relaxed),
            1,
            "the turn's first flush writes; the 15 after it are held until the next read"
        );
        // The connection's next turn reads first: the rest goes out in one write.
        far.write_all(b"x").await.expect("peer writes");
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.expect("read");
        assert_eq!(writes.load(Ordering::Relaxed), 2);
        let mut got = vec![0u8; 16 * 1024];
        far.read_exact(&mut got).await.expect("peer reads");
        for (i, chunk) in got.chunks(1024).enumerate() {
            assert!(chunk.iter().all(|&b| usize::from(b) == i), "order kept");
        }
    }

    /// The start of a connection's turn: the peer sent a byte, the connection reads it.
    async fn turn(c: &mut Coalesce<Counted>, far: &mut DuplexStream) {
        far.write_all(b"x").await.expect("peer writes");
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.expect("read");
    }

    /// A 100-byte frame of `byte`s, and its flush.
    async fn frame(c: &mut Coalesce<Counted>, byte: u8) {
        c.write_all(&[byte; 100]).await.expect("write");
        c.flush().await.expect("flush");
    }

    #[tokio::test]
    async fn turns_that_flush_once_write_at_once() {
        let (mut c, mut far, writes) = counted(1 << 20);
        let writes = move || writes.load(Ordering::Relaxed);
        for n in 1..=3 {
            turn(&mut c, &mut far).await;
            frame(&mut c, n).await;
            assert_eq!(writes(), usize::from(n));
        }
        frame(&mut c, 4).await;
        assert_eq!(
            writes(),
            3,
            "a second flush in one turn is held: coalescing starts"
        );
        turn(&mut c, &mut far).await;
        assert_eq!(writes(), 4, "the next turn's read writes it");
        frame(&mut c, 5).await;
        assert_eq!(writes(), 4, "held: the turn before coalesced");
        turn(&mut c, &mut far).await;
        assert_eq!(writes(), 5);
        frame(&mut c, 6).await;
        assert_eq!(writes(), 6, "one flush a turn behind it: written at once");
        let mut got = vec![0u8; 600];
        far.read_exact(&mut got).await.expect("peer reads");
        for (i, chunk) in got.chunks(100).enumerate() {
            assert!(chunk.iter().all(|&b| usize::from(b) == i + 1), "order kept");
        }
    }

    #[tokio::test]
    async fn a_full_buffer_is_written_before_more_is_taken_and_large_writes_go_through() {
        let (mut c, mut far, writes) = counted(1 << 20);
        c.write_all(&[1; CAP - 10]).await.expect("write");
        assert_eq!(writes.load(Ordering::Relaxed), 0);
        c.write_all(&[2; 100]).await.expect("write");
        assert_eq!(
            writes.load(Ordering::Relaxed),
            1,
            "the full buffer went first"
        );
        c.write_all(&[3; 2 * CAP]).await.expect("write");
        assert!(
            writes.load(Ordering::Relaxed) >= 3,
            "buffered, then the large one"
        );
        c.shutdown().await.expect("shutdown writes the rest");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), CAP - 10 + 100 + 2 * CAP);
        assert!(got[..CAP - 10].iter().all(|&b| b == 1));
        assert!(got[CAP - 10..CAP + 90].iter().all(|&b| b == 2));
        assert!(got[CAP + 90..].iter().all(|&b| b == 3));
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_makes_flush_wait() {
        // 4 KiB of pipe that nobody reads: the buffered 8 KiB cannot all be written.
        let (mut c, mut far, _writes) = counted(4096);
        c.write_all(&[9; 8192]).await.expect("buffered");
        let wait = std::time::Duration::from_millis(200);
        let flushed = tokio::time::timeout(wait, c.flush()).await;
        assert!(flushed.is_err(), "flush waits for the reader");
        // Two flushes in a turn would defer; not while the writes are blocked.
        let flushed = tokio::time::timeout(wait, c.flush()).await;
        assert!(flushed.is_err(), "flush still waits for the reader");
        let mut byte = [0u8; 1];
        far.write_all(b"r").await.expect("peer writes");
        c.read_exact(&mut byte)
            .await
            .expect("reads go on while the write waits");
        let mut got = vec![0u8; 8192];
        let (r, f) = tokio::join!(far.read_exact(&mut got), c.flush());
        r.expect("peer reads");
        f.expect("flush completes once the peer reads");
        assert!(got.iter().all(|&b| b == 9));
    }
}
