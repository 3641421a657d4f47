//! The operator↔proxy contract, defined once for both ends: the messages of the config
//! stream (`GET /v1/watch/*`, [`stream`]) and the certificate exchange
//! (`POST /v1/certify`, [`certify`]). The operator serializes these types and the proxy
//! deserializes the very same ones, so the two cannot drift; docs/stream.md and
//! docs/ca.md describe the JSON.
//!
//! No kube here: the proxy builds this module with the crate's `kube` feature off.

pub mod certify;
pub mod stream;

pub use self::certify::{CertifyRequest, CertifyResponse, ErrorBody};
pub use self::stream::{Message, Received, ReceivedMessage};
