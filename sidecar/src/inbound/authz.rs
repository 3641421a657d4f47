//! Inbound authorization: allow rules from the config (peer identities and namespaces;
//! ports, methods and paths) and a default for everything else. Pure functions; the
//! callers answer 403 (HTTP) or close the connection (TCP), and count and log it.

use remora_crds::policy::{
    Authorization, AuthorizationDefault, AuthorizationFrom, AuthorizationTo,
};

/// What is being accessed: a TCP connection to `port`, or an HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    pub port: u16,
    /// `(method, path)` for HTTP; `None` for a TCP connection.
    pub http: Option<(&'a str, &'a str)>,
}

/// The namespace of a mesh SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`).
pub fn namespace_of(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segs = path.split('/');
    (segs.next()? == "ns").then_some(())?;
    segs.next()
}

fn from_matches(from: Option<&AuthorizationFrom>, peer: Option<&str>) -> bool {
    let Some(from) = from else { return true };
    if from.identities.is_empty() && from.namespaces.is_empty() {
        return true;
    }
    let Some(peer) = peer else { return false };
    from.identities.iter().any(|i| i == "*" || i == peer)
        || namespace_of(peer).is_some_and(|ns| from.namespaces.iter().any(|n| n == ns))
}

fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

fn to_matches(to: Option<&AuthorizationTo>, access: Access<'_>) -> bool {
    let Some(to) = to else { return true };
    if !to.ports.is_empty() && !to.ports.contains(&access.port) {
        return false;
    }
    match access.http {
        // A rule about methods or paths never matches a TCP connection.
        None => to.methods.is_empty() && to.paths.is_empty(),
        Some((method, path)) => {
            (to.methods.is_empty() || to.methods.iter().any(|m| m == method))
                && (to.paths.is_empty() || to.paths.iter().any(|p| path_matches(p, path)))
        }
    }
}

/// Is `peer` (the client's SPIFFE ID, `None` when unauthenticated) allowed `access`?
pub fn allowed(authz: Option<&Authorization>, peer: Option<&str>, access: Access<'_>) -> bool {
    let Some(authz) = authz else { return true };
    authz
        .rules
        .iter()
        .any(|r| from_matches(r.from.as_ref(), peer) && to_matches(r.to.as_ref(), access))
        || authz.default == AuthorizationDefault::Allow
}

#[cfg(test)]
mod tests {
    use remora_crds::policy::AuthorizationRule;

    use super::*;

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const OTHER: &str = "spiffe://cluster.local/ns/billing/sa/worker";

    fn deny_but(rules: Vec<AuthorizationRule>) -> Authorization {
        Authorization {
            default: AuthorizationDefault::Deny,
            rules,
        }
    }

    fn http<'a>(method: &'a str, path: &'a str) -> Access<'a> {
        Access {
            port: 9080,
            http: Some((method, path)),
        }
    }

    #[test]
    fn identities_namespaces_and_wildcard() {
        let by_id = deny_but(vec![AuthorizationRule {
            from: Some(AuthorizationFrom {
                identities: vec![FRONTEND.into()],
                namespaces: vec![],
            }),
            to: None,
        }]);
        assert!(allowed(Some(&by_id), Some(FRONTEND), http("GET", "/")));
        assert!(!allowed(Some(&by_id), Some(OTHER), http("GET", "/")));
        assert!(
            !allowed(Some(&by_id), None, http("GET", "/")),
            "plaintext peers have no identity"
        );
        let by_ns = deny_but(vec![AuthorizationRule {
            from: Some(AuthorizationFrom {
                identities: vec![],
                namespaces: vec!["billing".into()],
            }),
            to: None,
        }]);
        assert!(allowed(Some(&by_ns), Some(OTHER), http("GET", "/")));
        assert!(!allowed(Some(&by_ns), Some(FRONTEND), http("GET", "/")));
        let any = deny_but(vec![AuthorizationRule {
            from: Some(AuthorizationFrom {
                identities: vec!["*".into()],
                namespaces: vec![],
            }),
            to: None,
        }]);
        assert!(allowed(Some(&any), Some(OTHER), http("GET", "/")));
        assert!(
            !allowed(Some(&any), None, http("GET", "/")),
            "* means any authenticated identity"
        );
    }

    #[test]
    fn ports_methods_and_paths() {
        let rules = deny_but(vec![AuthorizationRule {
            from: None,
            to: Some(AuthorizationTo {
                ports: vec![9080],
                methods: vec!["GET".into()],
                paths: vec!["/api/*".into(), "/health".into()],
            }),
        }]);
        assert!(allowed(Some(&rules), None, http("GET", "/api/v1/items")));
        assert!(allowed(Some(&rules), None, http("GET", "/health")));
        assert!(!allowed(Some(&rules), None, http("GET", "/healthz")));
        assert!(!allowed(Some(&rules), None, http("POST", "/api/v1/items")));
        assert!(!allowed(
            Some(&rules),
            None,
            Access {
                port: 8080,
                http: Some(("GET", "/api/x"))
            }
        ));
        assert!(
            !allowed(
                Some(&rules),
                None,
                Access {
                    port: 9080,
                    http: None
                }
            ),
            "HTTP-only rules never match TCP"
        );
        let tcp = deny_but(vec![AuthorizationRule {
            from: None,
            to: Some(AuthorizationTo {
                ports: vec![5432],
                ..Default::default()
            }),
        }]);
        assert!(allowed(
            Some(&tcp),
            None,
            Access {
                port: 5432,
                http: None
            }
        ));
    }

    #[test]
    fn defaults() {
        assert!(allowed(None, None, http("GET", "/")));
        assert!(allowed(
            Some(&Authorization::default()),
            None,
            http("GET", "/")
        ));
        assert!(!allowed(
            Some(&deny_but(vec![])),
            Some(FRONTEND),
            http("GET", "/")
        ));
        assert_eq!(namespace_of(FRONTEND), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/other/path"), None);
    }
}
