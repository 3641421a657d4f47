//! The one way in from the host: a TCP forwarder from a host loopback port to the same
//! port on the node namespace's loopback, where kube-apiserver listens.
//!
//! Why a forwarder rather than running the test client inside the namespace: kubectl, the
//! tests' `kube::Client`s and `make demo`'s live summary all stay ordinary host code, and
//! the only thing open on the host is a loopback listener of the test process itself. A
//! socket belongs to the network namespace of the thread that creates it, so the forwarder
//! is a thread that binds its listener first (host) and then joins the node's namespace
//! with `setns(2)`: every connection it opens from then on is made inside the node.
//! Nothing crosses anything but the two loopbacks.

#![allow(unsafe_code)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    thread::JoinHandle,
};

use tokio::sync::oneshot;

use crate::{HarnessError, io_err};

/// A running forwarder; dropping it closes the listener and every forwarded connection.
#[derive(Debug)]
pub struct Forwarder {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on a free host port `127.0.0.1:P` and forwards each connection to
    /// `127.0.0.1:P` inside the network namespace at `netns` (e.g. `/run/netns/<name>`).
    pub fn start(netns: &Path) -> Result<Self, HarnessError> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("binding the apiserver forwarder"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the apiserver forwarder"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading the forwarder's port"))?
            .port();
        let ns =
            std::fs::File::open(netns).map_err(io_err(format!("opening {}", netns.display())))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), std::io::Error>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let thread = std::thread::Builder::new()
            .name("node-apiserver-forwarder".to_owned())
            .spawn(move || {
                // SAFETY: setns(2) with a descriptor we own (kept open by `ns` for the call)
                // and CLONE_NEWNET; it changes only this thread's network namespace, which is
                // allowed in a multi-threaded process.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let _ = ready_tx.send(Err(std::io::Error::last_os_error()));
                    return;
                }
                drop(ns);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // A current-thread runtime: every task, so every socket, stays on this
                // thread and therefore in the node's namespace.
                runtime.block_on(serve(listener, target, stop_rx, ready_tx));
            })
            .map_err(io_err("spawning the forwarder thread"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io_err("starting the forwarder in the node's namespace")(e)),
            Err(_) => {
                return Err(HarnessError::Kubeconfig(
                    "the forwarder thread ended before it was ready".to_owned(),
                ));
            }
        }
        Ok(Self {
            port,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The port, the same on the host's loopback and inside the node.
    pub fn port(&self) -> u16 {
        self.port
    }
}

async fn serve(
    listener: std::net::TcpListener,
    target: SocketAddr,
    mut stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), std::io::Error>>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                tokio::spawn(async move {
                    // Refused while the apiserver starts: the client sees a closed
                    // connection and retries, as it would against the real port.
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
