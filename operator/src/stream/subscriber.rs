//! One subscriber: waits on the index's latest version (a `tokio::sync::watch`, not a
//! queue), reads its piece when the version moved and yields a line when the piece is
//! newer than what it last sent; a heartbeat after each quiet interval. Lines are
//! produced only when the body is polled, i.e. when the connection can take them, so a
//! slow client skips intermediate versions and costs at most one message of memory.

use std::{convert::Infallible, time::Duration};

use axum::body::Bytes;
use futures::Stream;
use remora_crds::wire::Message;
use tokio::{sync::watch, time::Instant};

use super::{
    metrics::{StreamMetrics, SubscriberGuard},
    piece::{self, Reading, Sent},
    request::Target,
};
use crate::index::{model::ObjKey, watch::IndexHandle};

/// What is watched.
#[derive(Debug, Clone)]
pub enum Watched {
    Inbound(ObjKey),
    Outbound {
        target: Target,
        /// The target as the client wrote it, echoed in messages.
        text: String,
    },
}

impl Watched {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Inbound(_) => "inbound",
            Self::Outbound { .. } => "outbound",
        }
    }

    fn read(&self, index: &IndexHandle) -> Reading {
        let index = index.read();
        match self {
            Self::Inbound(pod) => piece::inbound(&index, pod),
            Self::Outbound { target, text } => piece::outbound(&index, target, text),
        }
    }
}

/// A subscription's state between two lines.
#[derive(Debug)]
pub struct Subscriber {
    index: IndexHandle,
    watched: Watched,
    since: Option<u64>,
    last: Option<Sent>,
    versions: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    heartbeat: Duration,
    next_heartbeat: Instant,
    metrics: StreamMetrics,
    _open: SubscriberGuard,
}

impl Subscriber {
    pub fn new(
        index: IndexHandle,
        watched: Watched,
        since: Option<u64>,
        heartbeat: Duration,
        stop: watch::Receiver<bool>,
        metrics: StreamMetrics,
    ) -> Self {
        let open = metrics.subscribed(watched.kind());
        Self {
            versions: index.versions(),
            index,
            watched,
            since,
            last: None,
            stop,
            heartbeat,
            next_heartbeat: Instant::now(),
            metrics,
            _open: open,
        }
    }

    fn emit(&mut self, message: &Message, present: bool) -> Option<Bytes> {
        let line = match message.line() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("serializing a stream message: {e}");
                return None;
            }
        };
        self.last = Some(Sent {
            version: message.version(),
            present,
        });
        self.next_heartbeat = Instant::now() + self.heartbeat;
        self.metrics.sent(message.kind());
        Some(Bytes::from(line))
    }

    fn heartbeat(&mut self) -> Option<Bytes> {
        let (version, present) = match self.last {
            Some(s) => (s.version, s.present),
            None => (self.since.unwrap_or_default(), true),
        };
        self.emit(&Message::Heartbeat { version }, present)
    }

    /// The next line: the current state at once (or a heartbeat when the client is up to
    /// date), then a line per newer piece or quiet interval; `None` ends the stream
    /// (shutdown, or the index is gone).
    pub async fn next_line(&mut self) -> Option<Bytes> {
        if self.last.is_none() {
            // Mark the version seen *before* reading, so no change falls in between.
            self.versions.borrow_and_update();
            let now = self.watched.read(&self.index);
            if piece::worth_sending(None, self.since, &now) {
                return self.emit(&now.message, now.present);
            }
            let line = self.heartbeat();
            if let Some(last) = self.last.as_mut() {
                last.present = now.present;
            }
            return line;
        }
        enum Wake {
            Stop,
            Version(bool),
            Quiet,
        }
        loop {
            let wake = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => Wake::Stop,
                changed = self.versions.changed() => Wake::Version(changed.is_ok()),
                _ = tokio::time::sleep_until(self.next_heartbeat) => Wake::Quiet,
            };
            match wake {
                Wake::Stop | Wake::Version(false) => return None,
                Wake::Quiet => return self.heartbeat(),
                Wake::Version(true) => {
                    self.versions.borrow_and_update();
                    let now = self.watched.read(&self.index);
                    if piece::worth_sending(self.last, self.since, &now) {
                        return self.emit(&now.message, now.present);
                    }
                }
            }
        }
    }

    /// The subscription as a body stream of ndjson lines.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut sub| async move {
            let line = sub.next_line().await?;
            Some((Ok(line), sub))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{
        derive::tests::{shop, slice},
        watch::{IndexConfig, channel},
    };

    fn target() -> Watched {
        Watched::Outbound {
            target: Target::Addr("10.96.0.12:9080".parse().expect("addr")),
            text: "10.96.0.12:9080".to_owned(),
        }
    }

    fn decode(line: &Bytes) -> Message {
        serde_json::from_slice(line).expect("a message line")
    }

    fn endpoints(m: &Message) -> usize {
        match m {
            Message::Outbound { services, .. } => services[0].endpoints.len(),
            other => panic!("not outbound: {other:?}"),
        }
    }

    #[tokio::test]
    async fn current_state_then_newer_versions_only_latest_wins_and_heartbeats() {
        let (writer, handle) = channel(IndexConfig {
            trust_domain: "cluster.local".to_owned(),
            quiet: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        });
        let v1 = writer.apply(|s| *s = shop(), 1_000).version.expect("v1");
        let (stop_tx, stop) = watch::channel(false);
        let metrics = StreamMetrics::unregistered();
        let heartbeat = Duration::from_millis(100);
        let mut sub = Subscriber::new(
            handle.clone(),
            target(),
            None,
            heartbeat,
            stop.clone(),
            metrics.clone(),
        );
        let first = decode(&sub.next_line().await.expect("line"));
        assert_eq!(first.version(), v1);
        assert_eq!(endpoints(&first), 2, "reviews-1 and reviews-2");
        assert_eq!(metrics.subscribers("outbound"), 1);

        // Up to date: a heartbeat at once, carrying `since`.
        let mut fresh = Subscriber::new(
            handle.clone(),
            target(),
            Some(v1),
            heartbeat,
            stop.clone(),
            metrics.clone(),
        );
        assert_eq!(
            decode(&fresh.next_line().await.expect("line")),
            Message::Heartbeat { version: v1 }
        );
        drop(fresh);
        assert_eq!(metrics.subscribers("outbound"), 1);

        // Five versions while the subscriber is not polled: it then sees the latest only.
        let mut last = v1;
        for i in 0..5u8 {
            let ips: Vec<String> = (0..=i).map(|j| format!("10.244.9.{j}")).collect();
            let eps: Vec<(&str, &str, bool)> =
                ips.iter().map(|ip| (ip.as_str(), "", true)).collect();
            last = writer
                .apply(
                    |s| {
                        s.slices.insert(
                            ObjKey::new("shop", "reviews-abc"),
                            slice("reviews", &[("http", 8080)], &eps),
                        );
                    },
                    2_000 + u64::from(i),
                )
                .version
                .expect("a new version");
        }
        let latest = decode(&sub.next_line().await.expect("line"));
        assert_eq!(latest.version(), last);
        assert_eq!(endpoints(&latest), 5);

        // Quiet: a heartbeat with the last version after the interval.
        let t = Instant::now();
        assert_eq!(
            decode(&sub.next_line().await.expect("line")),
            Message::Heartbeat { version: last }
        );
        assert!(t.elapsed() >= heartbeat - Duration::from_millis(5));

        // Shutdown ends the stream.
        drop(stop_tx);
        assert!(sub.next_line().await.is_none());
    }
}
