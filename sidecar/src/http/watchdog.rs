//! The clock shared by the idle and stall guards: it runs only while something waits
//! (from the first `Pending` after the last progress) and tells when the wait has lasted
//! its limit. The timer is created on the first wait, so what never waits costs nothing.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

#[derive(Debug)]
pub struct Watchdog {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The clock runs: something has been waiting since it was last reset.
    waiting: bool,
}

impl Watchdog {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            sleep: None,
            waiting: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Progress was made: the next wait starts a fresh clock.
    pub fn progress(&mut self) {
        self.waiting = false;
    }

    /// Called when the guarded operation is `Pending`: starts the clock if it is not
    /// running, and is `Ready` once the wait has lasted the limit (`cx` is woken then).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = Instant::now() + self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            sleep.as_mut().reset(deadline);
            self.waiting = true;
        }
        sleep.as_mut().poll(cx)
    }
}
