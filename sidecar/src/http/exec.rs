//! The executor hyper spawns its HTTP/2 tasks on: Tokio's, with large futures boxed.
//!
//! hyper spawns a task per HTTP/2 stream (the server's `H2Stream`, holding the proxy's
//! whole request future) and per client request (`H2ClientFuture`, an enum whose size is
//! that of its largest variant: the connection task with its codec and buffers, several
//! KiB). A task's future lives in Tokio's task cell and is copied whole each time it is
//! moved (through `spawn`'s layers into the cell) and each time the task's stage is
//! written (finished, consumed). With futures of several KiB those copies were the
//! largest single cost of an HTTP/2 request through the pair (callgrind: `memcpy` under
//! `Core::set_stage` and the task poll, about half the pair's instructions per h2c
//! request). Boxed, a future is copied once, into its box, and the task moves a pointer.

use std::{future::Future, pin::Pin};

/// Futures larger than this are boxed before they are spawned: a copy of this size costs
/// about what an allocation and its free do.
const INLINE_MAX: usize = 512;

/// Spawns on the current Tokio runtime, boxing futures larger than [`INLINE_MAX`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Exec;

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        // `size_of` is a constant for each `F`: one of the two branches is compiled.
        if size_of::<F>() > INLINE_MAX {
            let boxed: Pin<Box<F>> = Box::pin(fut);
            tokio::spawn(boxed);
        } else {
            tokio::spawn(fut);
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::rt::Executor;

    use super::*;

    #[tokio::test]
    async fn runs_small_and_large_futures() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        Exec.execute(async move {
            let _ = tx.send(1u8);
        });
        assert_eq!(rx.await.expect("small future ran"), 1);

        let (tx, rx) = tokio::sync::oneshot::channel();
        let big = [7u8; 4 * INLINE_MAX];
        Exec.execute(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(big.iter().map(|&b| u32::from(b)).sum::<u32>());
        });
        assert_eq!(rx.await.expect("large future ran"), 7 * 4 * 512);
    }
}
