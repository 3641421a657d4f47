//! Fresh PKI for one test cluster: a CA, the apiserver's serving certificate (IP SAN
//! 127.0.0.1, plus the advertise address of a node), an admin client certificate in
//! `system:masters`, the service-account signing key pair, and client certificates for
//! further identities (kubelet, kube-proxy) on demand. ECDSA P-256 throughout, generated in
//! memory with rcgen.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{HarnessError, io_err};

/// Paths of the PEM files written for one cluster.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    /// PEM text, for kubeconfigs and clients that want it inline.
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn write(path: &Path, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(path, contents).map_err(io_err(format!("writing {}", path.display())))
}

/// Generates the cluster's PKI into `dir`.
pub fn generate(dir: &Path) -> Result<Pki, HarnessError> {
    generate_with(dir, &[])
}

/// Generates the cluster's PKI into `dir`; the apiserver's certificate also names
/// `extra_ips` (a node's address, which pods reach it at).
pub fn generate_with(dir: &Path, extra_ips: &[IpAddr]) -> Result<Pki, HarnessError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("remora-e2e-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    serving
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    serving
        .subject_alt_names
        .push(SanType::IpAddress([10, 96, 0, 1].into()));
    for ip in extra_ips {
        serving.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    serving.distinguished_name = name("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = name("remora-e2e-admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    let sa_key = KeyPair::generate()?;

    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
        ca_pem: ca_cert.pem(),
        admin_cert_pem: admin_cert.pem(),
        admin_key_pem: admin_key.serialize_pem(),
    };
    write(&pki.ca_cert, &pki.ca_pem)?;
    write(&pki.ca_key, &ca_key.serialize_pem())?;
    write(&pki.serving_cert, &serving_cert.pem())?;
    write(&pki.serving_key, &serving_key.serialize_pem())?;
    write(&pki.admin_cert, &pki.admin_cert_pem)?;
    write(&pki.admin_key, &pki.admin_key_pem)?;
    write(&pki.sa_key, &sa_key.serialize_pem())?;
    write(&pki.sa_pub, &sa_key.public_key_pem())?;
    Ok(pki)
}

impl Pki {
    /// Issues a client certificate for user `cn` in groups `orgs`, signed by the cluster CA,
    /// written to `dir/<file>.crt` and `dir/<file>.key`; returns (cert, key) paths.
    pub fn issue_client(
        &self,
        dir: &Path,
        file: &str,
        cn: &str,
        org: Option<&str>,
    ) -> Result<(PathBuf, PathBuf), HarnessError> {
        let ca_key_pem = std::fs::read_to_string(&self.ca_key)
            .map_err(io_err(format!("reading {}", self.ca_key.display())))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(cn, org);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer)?;
        let (crt, pem_key) = (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        );
        write(&crt, &cert.pem())?;
        write(&pem_key, &key.serialize_pem())?;
        Ok((crt, pem_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_client_certificates_chain_to_the_ca_and_name_the_user_and_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_with(dir.path(), &["10.244.0.1".parse().expect("ip")]).expect("pki");
        let (crt, _) = pki
            .issue_client(
                dir.path(),
                "kubelet",
                "system:node:n1",
                Some("system:nodes"),
            )
            .expect("issued");
        let pem = std::fs::read_to_string(crt).expect("read");
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        let cert = der.parse_x509().expect("x509");
        let subject = cert.subject().to_string();
        assert!(subject.contains("CN=system:node:n1"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
        assert_eq!(cert.issuer().to_string(), "CN=remora-e2e-ca");

        let serving = std::fs::read_to_string(&pki.serving_cert).expect("read");
        let (_, der) = x509_parser::pem::parse_x509_pem(serving.as_bytes()).expect("pem");
        let cert = der.parse_x509().expect("x509");
        let sans = cert
            .subject_alternative_name()
            .expect("parsed")
            .expect("has SANs");
        assert!(
            sans.value.general_names.iter().any(|n| matches!(
                n,
                x509_parser::extensions::GeneralName::IPAddress(ip) if *ip == [10, 244, 0, 1]
            )),
            "{:?}",
            sans.value
        );
    }
}
