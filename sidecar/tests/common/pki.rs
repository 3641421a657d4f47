//! Test PKI: a CA and SPIFFE workload certificates (rcgen), written to files the proxy
//! loads as its identity.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd, string::Ia5String,
};

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe_id`; `expired` makes one that ended in 2021.
    pub fn issue(&self, spiffe_id: &str, expired: bool) -> (String, String) {
        let until = if expired { (2021, 1, 1) } else { (2099, 1, 1) };
        self.issue_until(spiffe_id, until)
    }

    /// A workload certificate for `spiffe_id` valid from 2020 until `(year, month, day)`
    /// (midnight UTC), so that a rotated certificate is told apart by its expiry.
    pub fn issue_until(&self, spiffe_id: &str, until: (i32, u8, u8)) -> (String, String) {
        let san = SanType::URI(Ia5String::try_from(spiffe_id).expect("ia5"));
        self.leaf(san, until)
    }

    /// A plain TLS server certificate for the DNS name `host` (not a mesh identity).
    #[allow(dead_code)] // benches/pair.rs includes this file and issues none
    pub fn issue_dns(&self, host: &str) -> (String, String) {
        let san = SanType::DnsName(Ia5String::try_from(host).expect("ia5"));
        self.leaf(san, (2099, 1, 1))
    }

    fn leaf(&self, san: SanType, (y, m, d): (i32, u8, u8)) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(y, m, d);
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }
}

/// Files of one workload identity.
pub struct IdentityPaths {
    pub spiffe_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl IdentityPaths {
    /// Issues a certificate from `ca` and writes cert, key and `bundle_ca`'s bundle under `dir`.
    pub fn write(dir: &Path, name: &str, spiffe_id: &str, ca: &Ca, bundle_ca: &Ca) -> Self {
        let (cert, key) = ca.issue(spiffe_id, false);
        let paths = Self {
            spiffe_id: spiffe_id.to_owned(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            bundle: dir.join(format!("{name}-bundle.pem")),
        };
        paths.replace(&cert, &key);
        std::fs::write(&paths.bundle, &bundle_ca.pem).expect("write bundle");
        paths
    }

    /// Atomically replaces cert and key (write aside, rename over), key first.
    pub fn replace(&self, cert: &str, key: &str) {
        for (path, text) in [(&self.key, key), (&self.cert, cert)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, path).expect("rename");
        }
    }

    /// The `identity:` block of a proxy config.
    pub fn yaml(&self) -> String {
        format!(
            "identity:\n  spiffeId: {}\n  certChain: {}\n  privateKey: {}\n  trustBundle: {}\n",
            self.spiffe_id,
            self.cert.display(),
            self.key.display(),
            self.bundle.display()
        )
    }
}
