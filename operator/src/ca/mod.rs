//! The mesh certificate authority.
//!
//! A proxy proves who it is with a projected service-account token (audience
//! [`token::AUDIENCE`]), which the apiserver checks in a TokenReview; the CA then signs the
//! public key of the proxy's CSR into a short-lived certificate whose only name is the
//! SPIFFE ID of that service account. The pieces:
//!
//! - [`identity`]: service account ↔ SPIFFE ID (pure);
//! - [`issuer`]: CSR + identity → certificate, and the trust bundle (pure);
//! - [`root`]: the trust root and issuer kept in a Secret, generated on first start;
//!   [`current`]: the issuer in use, switched when that Secret changes;
//! - [`token`]: the TokenReview;
//! - [`metrics`]: certificates issued and refused, by reason;
//! - [`server`]: `POST /v1/certify`; [`tls`]: its TLS 1.3 listener (shared with the
//!   config stream, `crate::stream`); [`client_auth`]: its optional client certificates.
//!
//! The procedure for rotating the root is in `docs/ca.md`.

pub mod client_auth;
pub mod current;
pub mod identity;
pub mod issuer;
pub mod metrics;
pub mod root;
pub mod server;
pub mod tls;
pub mod token;

pub use identity::{ServiceAccountId, TrustDomain};
pub use issuer::{CertifyError, Issued, Issuer};
pub use root::CaMaterial;
pub use server::{Ca, CaError, CaOptions};
