//! Graceful shutdown: one signal that listeners and connections watch (stop accepting,
//! send HTTP/2 GOAWAY, close idle HTTP/1 keep-alives), and a count of connections still
//! in flight that the process waits on, up to a grace period.

use std::time::Duration;

use tokio::sync::watch;

/// The shutdown signal and the in-flight connection count.
#[derive(Debug)]
pub struct Shutdown {
    signal: watch::Sender<bool>,
    active: watch::Sender<usize>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            signal: watch::Sender::new(false),
            active: watch::Sender::new(0),
        }
    }

    /// Starts the shutdown (idempotent).
    pub fn trigger(&self) {
        self.signal.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once the shutdown has started.
    pub fn signaled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.signal.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    /// Marks a connection in flight until the returned guard drops.
    pub fn track(&self) -> InFlight {
        self.active.send_modify(|n| *n += 1);
        InFlight {
            active: self.active.clone(),
        }
    }

    /// Connections in flight now.
    pub fn in_flight(&self) -> usize {
        *self.active.borrow()
    }

    /// Waits until no connection is in flight or `grace` has passed; true when drained.
    pub async fn drained(&self, grace: Duration) -> bool {
        let mut rx = self.active.subscribe();
        tokio::time::timeout(grace, rx.wait_for(|n| *n == 0))
            .await
            .is_ok()
    }
}

/// A connection in flight; dropping it decrements the count.
#[derive(Debug)]
pub struct InFlight {
    active: watch::Sender<usize>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_in_flight_connections() {
        let s = Shutdown::new();
        assert!(
            s.drained(Duration::from_millis(1)).await,
            "nothing in flight"
        );
        let guard = s.track();
        let signaled = s.signaled();
        s.trigger();
        signaled.await;
        assert!(
            !s.drained(Duration::from_millis(20)).await,
            "one connection still open"
        );
        drop(guard);
        assert!(s.drained(Duration::from_millis(20)).await);
        assert_eq!(s.in_flight(), 0);
    }
}
