//! Inputs the fuzz targets (`fuzz/`) found wrong, kept as plain tests.

use remora_crds::proxy::is_spiffe_id;
use remora_operator::ca::{ServiceAccountId, TrustDomain};

/// `fuzz/corpus/spiffe`: the CA accepted the trust domain `td_x` and would have issued
/// `spiffe://td_x/ns/a/sa/b.c`, an identity the proxy's config refuses.
#[test]
fn every_trust_domain_the_ca_accepts_gives_identities_the_proxy_accepts() {
    assert!(TrustDomain::new("td_x").is_err());
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let id = ServiceAccountId::new("a", "b.c").expect("service account");
    assert!(is_spiffe_id(&id.spiffe_id(&td)));
}
