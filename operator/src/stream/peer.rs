//! The caller of a request on the TLS listener: its address and, when it presented a
//! client certificate (verified against the trust bundle during the handshake), the
//! certificate's SPIFFE ID. Served with `into_make_service_with_connect_info::<Peer>()`.

use std::net::SocketAddr;

use axum::{extract::connect_info::Connected, serve::IncomingStream};

use super::auth;
use crate::ca::tls::TlsListener;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The verified client certificate's SPIFFE ID, if any.
    pub spiffe_id: Option<String>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let spiffe_id = stream
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| auth::spiffe_id(leaf));
        Self {
            addr: *stream.remote_addr(),
            spiffe_id,
        }
    }
}
