//! Newtypes for the roles a socket address plays in a proxied connection, so a client
//! address can never be passed where the original destination is expected.

use std::{fmt, net::SocketAddr};

/// The peer that connected to one of the proxy's listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Where the client meant to connect before interception redirected it to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// The local address of an accepted connection (one of the proxy's own sockets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddr(pub SocketAddr);

macro_rules! display {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display!(ClientAddr, OrigDstAddr, LocalAddr);

/// Which side of the workload a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Traffic from other workloads to the local app (port 15006).
    Inbound,
    /// Traffic from the local app to the world (port 15001).
    Outbound,
}

impl Direction {
    /// The lower-case name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
