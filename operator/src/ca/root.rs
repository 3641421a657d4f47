//! The trust root and issuer, kept in a Secret in the operator's namespace with
//! cert-manager's CA layout: `ca.crt` (the trust bundle: one or more root certificates,
//! PEM), `tls.crt` (the issuer certificate, optionally followed by intermediates) and
//! `tls.key` (the issuer's private key). A user or cert-manager may supply it; when it is
//! absent the first replica to start generates a self-signed ECDSA P-256 root that is its
//! own issuer, and every other replica (racing or later) reads that one.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::issuer::{CertifyError, random_serial};

pub const BUNDLE_KEY: &str = "ca.crt";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";

/// Lifetime of a generated root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The contents of the CA Secret, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// `ca.crt`: every root the mesh trusts.
    pub bundle_pem: String,
    /// `tls.crt`: the issuer certificate (first), then any intermediates.
    pub cert_pem: String,
    /// `tls.key`: the issuer's private key (PKCS #8).
    pub key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("bundle_pem", &self.bundle_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Why the CA Secret could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name}: {key:?} is not UTF-8 PEM")]
    NotUtf8 {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("generating the root: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("generating the root: {0}")]
    Serial(#[source] CertifyError),
    #[error("{action} Secret {namespace}/{name}: {source}")]
    Kube {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{name} still absent after it already existed on create")]
    Vanished { namespace: String, name: String },
}

impl CaMaterial {
    /// A new self-signed ECDSA P-256 root, valid from `now` (backdated a minute) for
    /// `validity`; it is both the trust bundle and the issuer. Path length 0: it signs
    /// workload certificates only.
    pub fn generate(now: SystemTime, validity: Duration) -> Result<Self, RootError> {
        let key = KeyPair::generate().map_err(RootError::Generate)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "remora");
        let stamp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        dn.push(DnType::CommonName, format!("remora mesh root {stamp}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + validity).into();
        p.serial_number = Some(random_serial().map_err(RootError::Serial)?);
        let cert = p.self_signed(&key).map_err(RootError::Generate)?;
        Ok(Self {
            bundle_pem: cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Reads the three keys of `secret`.
    pub fn from_secret(secret: &Secret) -> Result<Self, RootError> {
        let namespace = secret.metadata.namespace.clone().unwrap_or_default();
        let name = secret.metadata.name.clone().unwrap_or_default();
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let get = |key: &'static str| -> Result<String, RootError> {
            let bytes = data.get(key).ok_or_else(|| RootError::MissingKey {
                namespace: namespace.clone(),
                name: name.clone(),
                key,
            })?;
            String::from_utf8(bytes.0.clone()).map_err(|_| RootError::NotUtf8 {
                namespace: namespace.clone(),
                name: name.clone(),
                key,
            })
        };
        Ok(Self {
            bundle_pem: get(BUNDLE_KEY)?,
            cert_pem: get(CERT_KEY)?,
            key_pem: get(KEY_KEY)?,
        })
    }

    /// A `kubernetes.io/tls` Secret holding this material.
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let data = [
            (BUNDLE_KEY, &self.bundle_pem),
            (CERT_KEY, &self.cert_pem),
            (KEY_KEY, &self.key_pem),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "remora-operator".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        }
    }
}

/// Reads Secret `namespace/name`, or creates it with a freshly generated root when it does
/// not exist. Race-free across replicas: a create that fails with AlreadyExists (another
/// replica won) re-reads and uses the winner's root. Returns the material and whether this
/// call generated it.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
    now: SystemTime,
) -> Result<(CaMaterial, bool), RootError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let kube_err = |action: &'static str| {
        move |source| RootError::Kube {
            action,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: Box::new(source),
        }
    };
    if let Some(s) = api.get_opt(name).await.map_err(kube_err("reading"))? {
        return Ok((CaMaterial::from_secret(&s)?, false));
    }
    let generated = CaMaterial::generate(now, ROOT_VALIDITY)?;
    match api
        .create(
            &PostParams::default(),
            &generated.to_secret(namespace, name),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(%namespace, %name, "generated a new mesh root");
            Ok((generated, true))
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            match api.get_opt(name).await.map_err(kube_err("re-reading"))? {
                Some(s) => Ok((CaMaterial::from_secret(&s)?, false)),
                None => Err(RootError::Vanished {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }),
            }
        }
        Err(e) => Err(kube_err("creating")(e)),
    }
}
