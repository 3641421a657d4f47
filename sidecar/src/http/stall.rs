//! A bound on how long a client may leave the proxy's writes waiting. A client that never
//! reads its response (or an HTTP/2 peer that stops reading, or the far end of an upgraded
//! connection that does) fills its socket buffer; the proxy's write then waits forever,
//! holding the connection, its upstream exchange and the task. [`StallGuard`] fails the
//! write with `TimedOut` once it has made no progress for the write-stall timeout
//! (`--write-stall-timeout`), and the connection is closed. Reads are untouched: an idle
//! connection is not a stalled one.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::watchdog::Watchdog;

/// The error inside the `TimedOut` I/O error of a stalled write.
#[derive(Debug, thiserror::Error)]
#[error("the client read nothing for {0:?}")]
pub struct WriteStalled(pub Duration);

/// Did `e` (or an error it wraps) come from a stalled write?
pub fn is_write_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .is_some_and(|inner| inner.is::<WriteStalled>())
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Writes through `io`, failing any write (or flush, or shutdown) that has waited for
/// `limit` without progress.
#[derive(Debug)]
pub struct StallGuard<I> {
    io: I,
    clock: Watchdog,
}

impl<I> StallGuard<I> {
    pub fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            clock: Watchdog::new(limit),
        }
    }

    /// Passes on a finished write and stops the clock; on a waiting one, starts it (if it
    /// is not running) and fails once it has run out.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.clock.progress();
            return r;
        }
        match self.clock.poll_expired(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                WriteStalled(self.clock.limit()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallGuard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallGuard<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        time::Instant,
    };

    use super::*;

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_limit() {
        // A 4 KiB pipe the other end never reads.
        let (near, _far) = tokio::io::duplex(4096);
        let mut guarded = StallGuard::new(near, Duration::from_millis(300));
        let started = Instant::now();
        let chunk = vec![0u8; 1024];
        let err = loop {
            if let Err(e) = guarded.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(is_write_stall(&err), "{err:?}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(near, Duration::from_millis(400));
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = [0u8; 512];
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        });
        // 8 KiB through a 1 KiB pipe at 512 bytes per 100 ms: ~1.6 s, never 400 ms stuck.
        guarded
            .write_all(&[1u8; 8192])
            .await
            .expect("each wait is shorter than the limit");
        guarded.shutdown().await.expect("shutdown");
        drop(guarded);
        assert_eq!(reader.await.expect("reader"), 8192);
    }
}
