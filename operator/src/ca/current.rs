//! The issuer in use, replaced as a whole when the CA Secret changes (a root rotation
//! step) so that no restart is needed; a change that cannot issue is refused and the
//! current issuer stays.

use std::sync::{Arc, PoisonError, RwLock};

use super::{
    issuer::{Issuer, IssuerError},
    root::CaMaterial,
};

#[derive(Debug)]
struct Entry {
    material: CaMaterial,
    issuer: Arc<Issuer>,
}

/// The current issuer and the Secret contents it was built from.
#[derive(Debug)]
pub struct CurrentIssuer(RwLock<Arc<Entry>>);

impl CurrentIssuer {
    pub fn new(material: CaMaterial, issuer: Issuer) -> Self {
        Self(RwLock::new(Arc::new(Entry {
            material,
            issuer: Arc::new(issuer),
        })))
    }

    fn entry(&self) -> Arc<Entry> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The issuer to use now.
    pub fn get(&self) -> Arc<Issuer> {
        self.entry().issuer.clone()
    }

    /// The Secret contents the current issuer was built from (checked: they can issue).
    pub fn material(&self) -> CaMaterial {
        self.entry().material.clone()
    }

    /// Switches to `material` if it differs from the current one and `build` accepts it.
    /// `Ok(true)` when switched, `Ok(false)` when unchanged; on error nothing changes.
    pub fn update(
        &self,
        material: CaMaterial,
        build: impl FnOnce(&CaMaterial) -> Result<Issuer, IssuerError>,
    ) -> Result<bool, IssuerError> {
        if self.entry().material == material {
            return Ok(false);
        }
        let issuer = Arc::new(build(&material)?);
        *self.0.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Entry { material, issuer });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::ca::{issuer::tests::td, root::ROOT_VALIDITY};

    fn build(m: &CaMaterial) -> Result<Issuer, IssuerError> {
        Issuer::new(m, td(), Duration::from_secs(3600), SystemTime::now())
    }

    #[test]
    fn switches_only_to_different_usable_material() {
        let a = CaMaterial::generate(SystemTime::now(), ROOT_VALIDITY).expect("a");
        let b = CaMaterial::generate(SystemTime::now(), ROOT_VALIDITY).expect("b");
        let cur = CurrentIssuer::new(a.clone(), build(&a).expect("issuer"));
        let first = cur.get();
        assert!(!cur.update(a.clone(), build).expect("same"));
        assert!(
            Arc::ptr_eq(&first, &cur.get()),
            "unchanged material keeps the issuer"
        );

        let broken = CaMaterial {
            key_pem: b.key_pem.clone(),
            ..a.clone()
        };
        assert!(matches!(
            cur.update(broken, build),
            Err(IssuerError::KeyMismatch)
        ));
        assert!(
            Arc::ptr_eq(&first, &cur.get()),
            "a broken Secret changes nothing"
        );

        assert!(cur.update(b.clone(), build).expect("switch"));
        assert_eq!(cur.get().trust_bundle_pem(), b.bundle_pem);
    }
}
