//! A thread of the test process that lives in the node's network namespace.
//!
//! A socket belongs to the network namespace of the thread that creates it, so a thread
//! that joins the node's namespace with `setns(2)` and runs a current-thread tokio runtime
//! (every task, hence every socket, stays on it) serves inside the node while the rest of
//! the process stays on the host. The apiserver forwarder and the node's DNS responder are
//! such threads.

#![allow(unsafe_code)]

use std::{future::Future, io, os::fd::AsRawFd, path::Path, sync::mpsc, thread::JoinHandle};

use tokio::sync::oneshot;

use crate::{HarnessError, io_err};

/// Tells [`NetnsThread::spawn`] that the body is serving (or why it cannot).
pub type Ready = mpsc::Sender<io::Result<()>>;

/// The running thread; dropping it stops the body and joins the thread.
#[derive(Debug)]
pub struct NetnsThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NetnsThread {
    /// Runs `body` on a new thread inside the namespace at `netns` (`/run/netns/<name>`)
    /// and waits until it reports ready.
    pub fn spawn<F, Fut>(netns: &Path, name: &str, body: F) -> Result<Self, HarnessError>
    where
        F: FnOnce(Ready) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let ns =
            std::fs::File::open(netns).map_err(io_err(format!("opening {}", netns.display())))?;
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // SAFETY: setns(2) with a descriptor that `ns` keeps open for the call and
                // CLONE_NEWNET; it changes only this thread's network namespace, which is
                // allowed in a multi-threaded process.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let _ = ready_tx.send(Err(io::Error::last_os_error()));
                    return;
                }
                drop(ns);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        () = body(ready_tx) => {}
                    }
                });
            })
            .map_err(io_err(format!("spawning the {name} thread")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(io_err(format!("starting {name} in the node's namespace"))(
                e,
            )),
            Err(_) => Err(HarnessError::Kubeconfig(format!(
                "the {name} thread ended before it was ready"
            ))),
        }
    }
}

impl Drop for NetnsThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
