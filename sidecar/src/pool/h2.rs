//! The HTTP/2 connection of one upstream endpoint: one multiplexed connection that every
//! request to the endpoint shares, dialed on first use and again once it has closed.
//!
//! hyper-util's pooled client did this before, at a price paid on every request: it
//! cloned the URI, built and hashed a pool key (scheme and authority, SipHash) to find the
//! one connection of a pool that only ever holds one destination, wrapped it in a pooled
//! handle, and boxed the response future. Here a request clones the connection's sender
//! under a mutex held for that clone only.
//!
//! As hyper-util's client does, a request that a reused connection closed under before it
//! went out (the server's GOAWAY, an idle timeout) is sent again on a new connection; a
//! request that went out is never sent twice from here. While a connection is being
//! dialed, the requests that arrive wait for it instead of dialing their own.

use std::{
    sync::{Mutex, MutexGuard},
    time::Instant,
};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::{
    body::{Body, Incoming},
    client::conn::http2::{self, SendRequest},
};
use hyper_util::rt::TokioTimer;
use tower::Service;

use super::{BoxError, PoolError};
use crate::{http::exec::Exec, outbound::dial::Connector};

/// The shared connection, if one is open, and whether it was used since the last sweep.
struct Slot<B> {
    send: Option<SendRequest<B>>,
    used: bool,
    /// When a sweep last found it unused since the previous one.
    idle_since: Option<Instant>,
}

/// The HTTP/2 connection of one endpoint; `B` is the request body.
pub struct H2Pool<B> {
    /// Also says how long the connection may go unused (the policy's `timeouts.idle`).
    connector: Connector,
    slot: Mutex<Slot<B>>,
    /// Held while a connection is dialed: one dial at a time.
    dialing: tokio::sync::Mutex<()>,
}

impl<B> std::fmt::Debug for H2Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool")
            .field("connector", &self.connector)
            .field("open", &self.lock().send.is_some())
            .finish()
    }
}

impl<B> H2Pool<B> {
    fn lock(&self) -> MutexGuard<'_, Slot<B>> {
        // Each holder only reads or replaces fields: a panic leaves nothing half-done.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops a connection that is closed, or that no request used for the idle timeout
    /// (measured from sweep to sweep): hyper closes it once its last stream ends.
    pub fn evict_idle(&self) {
        let mut slot = self.lock();
        let Some(send) = &slot.send else {
            return;
        };
        if send.is_closed() {
            slot.send = None;
            return;
        }
        if std::mem::take(&mut slot.used) {
            slot.idle_since = None;
            return;
        }
        let since = *slot.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.connector.idle_timeout() {
            slot.send = None;
            slot.idle_since = None;
        }
    }
}

impl<B> H2Pool<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// No connection until the first request; one left unused for the connector's idle
    /// timeout is closed.
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            slot: Mutex::new(Slot {
                send: None,
                used: false,
                idle_since: None,
            }),
            dialing: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `req` (its URI with scheme and authority: HTTP/2's `:scheme` and
    /// `:authority`) on the endpoint's connection.
    pub async fn send(&self, mut req: Request<B>) -> Result<Response<Incoming>, PoolError> {
        let mut resent = false;
        loop {
            let (mut send, reused) = match self.current() {
                Some(send) => (send, true),
                None => self.connect().await?,
            };
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request went out: once more, on
                    // the connection open now (a new one, unless another request has
                    // dialed it already).
                    Some(unsent) if reused && !resent => {
                        self.forget_closed();
                        tracing::debug!(
                            "an upstream HTTP/2 connection closed before a request went out; sending it on a new one"
                        );
                        req = unsent;
                        resent = true;
                    }
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    /// The open connection's sender, marked used.
    fn current(&self) -> Option<SendRequest<B>> {
        let mut slot = self.lock();
        match &slot.send {
            Some(send) if !send.is_closed() => {
                let send = send.clone();
                slot.used = true;
                Some(send)
            }
            Some(_) => {
                slot.send = None;
                None
            }
            None => None,
        }
    }

    /// Drops the shared connection if it has closed.
    fn forget_closed(&self) {
        let mut slot = self.lock();
        if slot.send.as_ref().is_some_and(SendRequest::is_closed) {
            slot.send = None;
        }
    }

    /// The connection another request dialed meanwhile (reused), or a new one.
    async fn connect(&self) -> Result<(SendRequest<B>, bool), PoolError> {
        let _dialing = self.dialing.lock().await;
        if let Some(send) = self.current() {
            return Ok((send, true));
        }
        let io = self
            .connector
            .clone()
            .call(Uri::default())
            .await
            .map_err(PoolError::Connect)?;
        let (send, conn) = http2::Builder::new(Exec)
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        let mut slot = self.lock();
        slot.send = Some(send.clone());
        slot.used = true;
        slot.idle_since = None;
        Ok((send, false))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        metrics::Metrics,
        outbound::dial::{DialTarget, Dialer},
    };

    /// An h2c server on loopback answering 200; counts the connections it accepted and
    /// holds the open ones in `open` (dropping a handle there closes nothing: the server
    /// closes a connection when told through `close`).
    struct Server {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        close: tokio::sync::broadcast::Sender<()>,
    }

    async fn server() -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (close, _) = tokio::sync::broadcast::channel(4);
        let (count, closing) = (accepted.clone(), close.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut closed = closing.subscribe();
                tokio::spawn(async move {
                    let answer = service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                    });
                    let conn = hyper::server::conn::http2::Builder::new(Exec)
                        .serve_connection(TokioIo::new(tcp), answer);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = closed.recv() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        Server {
            addr,
            accepted,
            close,
        }
    }

    fn pool(addr: SocketAddr, idle: Duration) -> H2Pool<Empty<Bytes>> {
        let dialer = Dialer::new(Arc::default(), Arc::new(Metrics::new()));
        let target = Arc::new(DialTarget::new(addr, None, Duration::from_secs(1)));
        target.set_idle_timeout(idle);
        H2Pool::new(Connector::new(dialer, target).http2())
    }

    fn request(addr: SocketAddr) -> Request<Empty<Bytes>> {
        Request::builder()
            .uri(format!("http://{addr}/"))
            .body(Empty::new())
            .expect("request")
    }

    async fn ok(pool: &H2Pool<Empty<Bytes>>, addr: SocketAddr) {
        let resp = pool.send(request(addr)).await.expect("response");
        assert_eq!(resp.status(), http::StatusCode::OK);
        resp.into_body().collect().await.expect("body");
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_connection_dialed_once() {
        let s = server().await;
        let pool = Arc::new(pool(s.addr, Duration::from_secs(60)));
        let sends = (0..32).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { ok(&pool, s.addr).await })
        });
        for send in sends.collect::<Vec<_>>() {
            send.await.expect("request task");
        }
        ok(&pool, s.addr).await;
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        let s = server().await;
        let pool = pool(s.addr, Duration::from_secs(60));
        ok(&pool, s.addr).await;
        s.close.send(()).expect("server listening");
        // The GOAWAY reaches the client's connection task; it closes.
        for _ in 0..200 {
            if pool.lock().send.as_ref().is_none_or(SendRequest::is_closed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ok(&pool, s.addr).await;
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unused_connection_is_closed_after_the_idle_timeout() {
        let s = server().await;
        let pool = pool(s.addr, Duration::ZERO);
        ok(&pool, s.addr).await;
        // First sweep: used since the last one. Second: unused, past the timeout.
        pool.evict_idle();
        assert!(pool.lock().send.is_some(), "kept: it was just used");
        pool.evict_idle();
        assert!(
            pool.lock().send.is_none(),
            "dropped: unused for the timeout"
        );
        ok(&pool, s.addr).await;
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_dial_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let err = pool(addr, Duration::from_secs(60))
            .send(request(addr))
            .await
            .expect_err("nothing listens");
        assert!(err.is_connect(), "{err:?}");
    }
}
