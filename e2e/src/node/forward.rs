//! The one way in from the host: a TCP forwarder from a host loopback port to the same
//! port on the node namespace's loopback, where kube-apiserver listens.
//!
//! Why a forwarder rather than running the test client inside the namespace: kubectl, the
//! tests' `kube::Client`s and `make demo`'s live summary all stay ordinary host code, and
//! the only thing open on the host is a loopback listener of the test process itself. The
//! listener is bound on the host first; then a [`NetnsThread`] serves it, so every
//! connection it opens is made inside the node. Nothing crosses anything but the two
//! loopbacks.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use super::netthread::NetnsThread;
use crate::{HarnessError, io_err};

/// A running forwarder; dropping it closes the listener and every forwarded connection.
#[derive(Debug)]
pub struct Forwarder {
    port: u16,
    _thread: NetnsThread,
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
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let thread =
            NetnsThread::spawn(netns, "node-apiserver-forwarder", move |ready| async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        // Refused while the apiserver starts: the client sees a closed
                        // connection and retries, as it would against the real port.
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            })?;
        Ok(Self {
            port,
            _thread: thread,
        })
    }

    /// The port, the same on the host's loopback and inside the node.
    pub fn port(&self) -> u16 {
        self.port
    }
}
