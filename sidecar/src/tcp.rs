//! Opaque TCP proxying: bytes copied both ways, half-close propagated (a FIN from one
//! side shuts down the write half towards the other, and the other direction keeps
//! flowing until it ends too), and an idle timeout so a connection on which nobody ever
//! speaks does not live forever.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::{
    addr::Direction,
    metrics::{BytesLabels, Metrics, Static},
};

/// When either side last moved bytes, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// An I/O half that records activity.
struct Tracked<'a, T: ?Sized> {
    inner: &'a mut T,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Tracked<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Tracked<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies between `client` and `upstream` until both directions are done, or nothing moved
/// either way for `idle` (then the connection is cut with a `TimedOut` error). `prefix`
/// (bytes read from the client during detection) is sent upstream first. Byte counts go
/// to the metrics even when the copy ends with an error.
pub async fn proxy<C, U>(
    metrics: &Metrics,
    direction: Direction,
    client: &mut C,
    prefix: Bytes,
    upstream: &mut U,
    idle: Duration,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !prefix.is_empty() {
        upstream.write_all(&prefix).await?;
    }
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let mut c = Tracked {
        inner: client,
        activity: &activity,
    };
    let mut u = Tracked {
        inner: upstream,
        activity: &activity,
    };
    let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
    tokio::pin!(copy);
    let result = loop {
        let remaining = idle.saturating_sub(activity.idle_for());
        if remaining.is_zero() {
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no traffic for {idle:?}"),
            ));
        }
        tokio::select! {
            r = &mut copy => break r,
            () = tokio::time::sleep(remaining) => {}
        }
    };
    let (from_client, to_client) = match &result {
        Ok((a, b)) => (*a + prefix.len() as u64, *b),
        Err(_) => (prefix.len() as u64, 0),
    };
    metrics
        .tcp_bytes
        .get_or_create(&BytesLabels {
            direction,
            flow: Static("from_client"),
        })
        .inc_by(from_client);
    metrics
        .tcp_bytes
        .get_or_create(&BytesLabels {
            direction,
            flow: Static("to_client"),
        })
        .inc_by(to_client);
    result.map(|_| (from_client, to_client))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        let metrics = Metrics::new();
        let (mut app, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut server) = tokio::io::duplex(1024);
        let proxy_task = tokio::spawn(async move {
            proxy(
                &metrics,
                Direction::Outbound,
                &mut client_side,
                Bytes::from_static(b"pre:"),
                &mut upstream_side,
                Duration::from_secs(60),
            )
            .await
            .expect("proxy")
        });
        app.write_all(b"request").await.expect("write");
        app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"pre:request");
        // The server answers after the client's FIN: the reply still arrives.
        server.write_all(b"reply").await.expect("reply");
        server.shutdown().await.expect("close");
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.expect("read reply");
        assert_eq!(reply, b"reply");
        assert_eq!(proxy_task.await.expect("join"), (11, 5));
    }

    #[tokio::test]
    async fn silent_connections_are_cut_after_the_idle_timeout() {
        let metrics = Metrics::new();
        let (_app, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, _server) = tokio::io::duplex(1024);
        let err = proxy(
            &metrics,
            Direction::Inbound,
            &mut client_side,
            Bytes::new(),
            &mut upstream_side,
            Duration::from_millis(50),
        )
        .await
        .expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
