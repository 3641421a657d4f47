//! Request bodies that stop moving. A client that sends a head and then its body slowly,
//! or not at all, holds a request slot, an upstream connection and a task; the body idle
//! timeout (`--body-idle-timeout`) fails such a body once no frame has arrived for that
//! long while the proxy was waiting for one. Time the upstream spends not reading (its
//! backpressure) does not count: the clock starts only when the proxy asks for the next
//! frame and the client has none.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};

use super::watchdog::Watchdog;

/// The error type of a guarded body (hyper's clients take any boxed error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client sent no body bytes for the whole idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body for {0:?}")]
pub struct BodyIdle(pub Duration);

/// The `BodyIdle` in `e`'s chain of sources, if any.
pub fn find_body_idle<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyIdle> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(idle) = err.downcast_ref::<BodyIdle>() {
            return Some(idle);
        }
        next = err.source();
    }
    None
}

/// A body that fails with [`BodyIdle`] when its inner body has nothing for `timeout`.
#[derive(Debug)]
pub struct IdleBody<B> {
    inner: B,
    clock: Watchdog,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            clock: Watchdog::new(timeout),
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.clock.progress();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.clock.poll_expired(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(this.clock.limit()))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use tokio::time::Instant;

    use super::*;

    /// A body fed by a channel: one data frame per message, the end when it closes.
    struct ChanBody(mpsc::Receiver<Bytes>);

    impl Body for ChanBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_body_that_stops_fails_after_the_idle_timeout() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = IdleBody::new(ChanBody(rx), Duration::from_millis(300));
        tx.send(Bytes::from_static(b"a")).await.expect("send");
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "a");
        let started = Instant::now();
        let err = body.frame().await.expect("an error").expect_err("idle");
        assert!(find_body_idle(err.as_ref()).is_some(), "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(tx);
    }

    #[tokio::test]
    async fn frames_within_the_timeout_keep_it_alive() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = IdleBody::new(ChanBody(rx), Duration::from_millis(600));
        tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let _ = tx.send(Bytes::from_static(b"x")).await;
            }
        });
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("no idle error: each gap is 150 ms of 600");
            n += 1;
        }
        assert_eq!(n, 4);
    }
}
