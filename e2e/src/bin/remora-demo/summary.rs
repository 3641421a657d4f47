//! From scrapes to the figures the live summary shows: per caller (a proxy sending
//! requests out) the request rate, success and latency; per backend (a proxy receiving
//! them) its rate and share; the SPIFFE identities the proxies authenticated; each proxy's
//! certificate expiry. Rates come from the two latest scrapes, success and latency from
//! the last [`WINDOW`] seconds, totals from the first scrape of the demo: counters that
//! were there before the summary started do not count.

use std::collections::BTreeMap;

use crate::{
    prom::{Sample, Samples, bucket_increase, increase, quantile},
    scrape::{LoadgenReport, Snapshot},
};

/// Seconds of history behind the success rate and the latency percentiles.
pub const WINDOW: f64 = 10.0;

const REQUESTS: &str = "remora_proxy_requests_total";
const LATENCY: &str = "remora_proxy_request_duration_seconds";
const CERT_EXPIRY: &str = "remora_proxy_cert_expiry_timestamp_seconds";

/// A pod whose proxy sends requests out.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub pod: String,
    pub rps: f64,
    pub window_ok: u64,
    pub window_total: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub ok_since_start: u64,
    pub total_since_start: u64,
}

/// A pod whose proxy receives requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub pod: String,
    pub version: String,
    pub rps: f64,
    /// Percent of all backends' rate.
    pub share: f64,
    pub since_start: u64,
    pub failed_since_start: u64,
    /// The peer identities of its requests since the start.
    pub peers: Vec<String>,
}

/// A SPIFFE identity some proxy authenticated since the start.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub id: String,
    /// Pods whose proxies received requests from it.
    pub inbound_at: Vec<String>,
    /// Pods whose proxies sent requests to it.
    pub outbound_at: Vec<String>,
}

/// A proxy's workload certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Cert {
    pub pod: String,
    pub service_account: String,
    /// notAfter, unix seconds (`None`: the proxy holds no certificate).
    pub not_after: Option<i64>,
}

/// Everything one frame shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub now_unix: i64,
    /// Seconds from the first scrape to this one.
    pub elapsed: f64,
    /// Seconds the rates and the window span.
    pub rate_span: f64,
    pub window_span: f64,
    pub callers: Vec<Caller>,
    pub backends: Vec<Backend>,
    pub identities: Vec<Identity>,
    pub certs: Vec<Cert>,
    pub loadgen: Option<LoadgenReport>,
    pub memory_bytes: Option<u64>,
    pub errors: Vec<String>,
}

fn direction(d: &'static str) -> impl Fn(&Sample) -> bool {
    move |s| s.label("direction") == d
}

fn ok_status(s: &Sample) -> bool {
    s.label("status")
        .parse::<u16>()
        .is_ok_and(|c| (200..300).contains(&c))
}

fn count(v: f64) -> u64 {
    // Counters are whole numbers; rounding only absorbs float noise.
    v.max(0.0).round() as u64
}

impl Frame {
    /// The frame for the newest of `recent` (oldest first, at least one), counting from
    /// `first`. `None` without any scrape.
    pub fn compute(
        first: &Snapshot,
        recent: &[Snapshot],
        memory_bytes: Option<u64>,
    ) -> Option<Self> {
        let newest = recent.last()?;
        let prev = recent.len().checked_sub(2).map(|i| &recent[i]);
        let window = recent
            .iter()
            .rev()
            .find(|s| s.t <= newest.t - WINDOW)
            .or_else(|| recent.first())?;
        let rate_span = prev.map_or(0.0, |p| newest.t - p.t);
        let older =
            |s: &Snapshot, pod: &str| -> Option<Samples> { s.pod(pod).map(|p| p.samples.clone()) };
        let per_second = |n: f64| if rate_span > 0.0 { n / rate_span } else { 0.0 };

        let mut callers = Vec::new();
        let mut backends = Vec::new();
        let mut identities: BTreeMap<String, Identity> = BTreeMap::new();
        let mut certs = Vec::new();
        for p in &newest.pods {
            let at_first = older(first, &p.pod);
            let at_prev = prev.and_then(|s| older(s, &p.pod));
            let at_window = older(window, &p.pod);
            // A pod missing from an older scrape (new, or not read then) counts from 0.
            let since = |base: Option<&Samples>, keep: &dyn Fn(&Sample) -> bool| {
                increase(&p.samples, base, REQUESTS, keep)
            };
            let out = direction("outbound");
            let inb = direction("inbound");
            let out_total = since(at_first.as_ref(), &out);
            if out_total > 0.0 {
                let window_total = since(at_window.as_ref(), &out);
                let window_ok = since(at_window.as_ref(), &|s: &Sample| out(s) && ok_status(s));
                let buckets = bucket_increase(&p.samples, at_window.as_ref(), LATENCY, &out);
                let ms = |q| quantile(&buckets, q).map(|v| v * 1000.0);
                callers.push(Caller {
                    pod: p.pod.clone(),
                    rps: prev.map_or(0.0, |_| per_second(since(at_prev.as_ref(), &out))),
                    window_ok: count(window_ok),
                    window_total: count(window_total),
                    p50_ms: ms(0.5),
                    p99_ms: ms(0.99),
                    ok_since_start: count(since(at_first.as_ref(), &|s: &Sample| {
                        out(s) && ok_status(s)
                    })),
                    total_since_start: count(out_total),
                });
            }
            let in_total = since(at_first.as_ref(), &inb);
            if in_total > 0.0 {
                let mut peers: Vec<String> = p
                    .samples
                    .series(REQUESTS, &inb)
                    .map(|s| s.label("peer_identity").to_owned())
                    .filter(|id| {
                        !id.is_empty()
                            && since(at_first.as_ref(), &|s: &Sample| {
                                inb(s) && s.label("peer_identity") == id
                            }) > 0.0
                    })
                    .collect();
                peers.sort();
                peers.dedup();
                backends.push(Backend {
                    pod: p.pod.clone(),
                    version: p.version.clone(),
                    rps: prev.map_or(0.0, |_| per_second(since(at_prev.as_ref(), &inb))),
                    share: 0.0,
                    since_start: count(in_total),
                    failed_since_start: count(since(at_first.as_ref(), &|s: &Sample| {
                        inb(s) && !ok_status(s)
                    })),
                    peers,
                });
            }
            for s in p
                .samples
                .series(REQUESTS, |s| !s.label("peer_identity").is_empty())
            {
                let id = s.label("peer_identity");
                let grew = increase(&p.samples, at_first.as_ref(), REQUESTS, |x| {
                    x.labels == s.labels
                }) > 0.0;
                if !grew {
                    continue;
                }
                let entry = identities.entry(id.to_owned()).or_insert_with(|| Identity {
                    id: id.to_owned(),
                    inbound_at: Vec::new(),
                    outbound_at: Vec::new(),
                });
                let list = if s.label("direction") == "inbound" {
                    &mut entry.inbound_at
                } else {
                    &mut entry.outbound_at
                };
                if !list.contains(&p.pod) {
                    list.push(p.pod.clone());
                }
            }
            certs.push(Cert {
                pod: p.pod.clone(),
                service_account: p.service_account.clone(),
                not_after: p
                    .samples
                    .series(CERT_EXPIRY, |_| true)
                    .next()
                    .map(|s| s.value)
                    .filter(|v| *v > 0.0)
                    .map(|v| v as i64),
            });
        }
        let all: f64 = backends.iter().map(|b| b.rps).sum();
        for b in &mut backends {
            b.share = if all > 0.0 { b.rps * 100.0 / all } else { 0.0 };
        }
        Some(Self {
            now_unix: newest.unix,
            elapsed: newest.t - first.t,
            rate_span,
            window_span: newest.t - window.t,
            callers,
            backends,
            identities: identities.into_values().collect(),
            certs,
            loadgen: newest.loadgen.clone(),
            memory_bytes,
            errors: newest.errors.clone(),
        })
    }

    /// Whether the demo showed the mesh working: successful requests went through it,
    /// at least one SPIFFE identity was authenticated, and every proxy holds an unexpired
    /// certificate. The line to print, or what was missing.
    pub fn check(&self) -> Result<String, Vec<String>> {
        let ok: u64 = self.callers.iter().map(|c| c.ok_since_start).sum();
        let total: u64 = self.callers.iter().map(|c| c.total_since_start).sum();
        let mut missing = Vec::new();
        if ok == 0 {
            missing.push(format!(
                "no successful request went through the mesh in {:.0} s of summary",
                self.elapsed
            ));
        }
        if self.identities.is_empty() {
            missing.push("no proxy authenticated a SPIFFE identity".to_owned());
        }
        if self.certs.is_empty() {
            missing.push("no proxy's metrics could be read".to_owned());
        }
        for c in &self.certs {
            match c.not_after {
                Some(t) if t > self.now_unix => {}
                Some(_) => missing.push(format!("{}: its certificate has expired", c.pod)),
                None => missing.push(format!("{}: its proxy holds no certificate", c.pod)),
            }
        }
        if !missing.is_empty() {
            return Err(missing);
        }
        Ok(format!(
            "{ok} successful requests of {total} through the mesh ({:.2} %), {} SPIFFE identities authenticated, {} proxies with valid certificates",
            ok as f64 * 100.0 / total.max(1) as f64,
            self.identities.len(),
            self.certs.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{prom::parse, scrape::PodMetrics};

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

    fn loadgen(ok: u64, failed: u64, fast: u64) -> PodMetrics {
        let text = format!(
            "remora_proxy_requests_total{{direction=\"outbound\",status=\"200\",peer_identity=\"{REVIEWS}\"}} {ok}\n\
             remora_proxy_requests_total{{direction=\"outbound\",status=\"503\",peer_identity=\"\"}} {failed}\n\
             remora_proxy_request_duration_seconds_bucket{{direction=\"outbound\",le=\"0.001\"}} {fast}\n\
             remora_proxy_request_duration_seconds_bucket{{direction=\"outbound\",le=\"0.002\"}} {total}\n\
             remora_proxy_request_duration_seconds_bucket{{direction=\"outbound\",le=\"+Inf\"}} {total}\n\
             remora_proxy_cert_expiry_timestamp_seconds 1000086400\n",
            total = ok + failed
        );
        PodMetrics {
            pod: "loadgen-1".into(),
            version: "v1".into(),
            service_account: "frontend".into(),
            samples: parse(&text).expect("metrics"),
        }
    }

    fn reviews(pod: &str, n: u64) -> PodMetrics {
        let text = format!(
            "remora_proxy_requests_total{{direction=\"inbound\",status=\"200\",peer_identity=\"{FRONTEND}\"}} {n}\n\
             remora_proxy_cert_expiry_timestamp_seconds 1000003600\n"
        );
        PodMetrics {
            pod: pod.into(),
            version: "v1".into(),
            service_account: "reviews".into(),
            samples: parse(&text).expect("metrics"),
        }
    }

    fn snap(t: f64, pods: Vec<PodMetrics>) -> Snapshot {
        Snapshot {
            t,
            unix: 1_000_000_000 + t as i64,
            pods,
            ..Snapshot::default()
        }
    }

    #[test]
    fn rates_shares_and_totals_count_from_the_first_scrape() {
        // Before the summary: 500 requests already counted; they must not show.
        let first = snap(
            0.0,
            vec![
                loadgen(500, 0, 500),
                reviews("r-a", 300),
                reviews("r-b", 200),
            ],
        );
        let mid = snap(
            10.0,
            vec![
                loadgen(690, 10, 650),
                reviews("r-a", 400),
                reviews("r-b", 290),
            ],
        );
        // r-b restarted (its counter went back to 12); r-c is new.
        let newest = snap(
            11.0,
            vec![
                loadgen(710, 10, 660),
                reviews("r-a", 410),
                reviews("r-b", 12),
                reviews("r-c", 5),
            ],
        );
        let recent = [first.clone(), mid, newest];
        let f = Frame::compute(&first, &recent, Some(5 << 20)).expect("a frame");
        assert_eq!((f.elapsed, f.rate_span, f.window_span), (11.0, 1.0, 11.0));
        let c = &f.callers[0];
        assert_eq!(c.pod, "loadgen-1");
        assert_eq!((c.rps, c.window_ok, c.window_total), (20.0, 210, 220));
        assert_eq!((c.ok_since_start, c.total_since_start), (210, 220));
        // 160 of 220 under 1 ms: p50 inside the first bucket, p99 in the second.
        assert_eq!(c.p50_ms.map(|v| (v * 1000.0).round()), Some(688.0));
        assert_eq!(c.p99_ms.map(|v| (v * 1000.0).round()), Some(1963.0));
        let rates: Vec<(&str, f64, u64)> = f
            .backends
            .iter()
            .map(|b| (b.pod.as_str(), b.rps, b.since_start))
            .collect();
        assert_eq!(
            rates,
            vec![("r-a", 10.0, 110), ("r-b", 12.0, 12), ("r-c", 5.0, 5)]
        );
        assert_eq!(f.backends[0].share.round(), 37.0);
        assert_eq!(f.backends[0].peers, vec![FRONTEND.to_owned()]);
        let ids: Vec<(&str, usize, usize)> = f
            .identities
            .iter()
            .map(|i| (i.id.as_str(), i.inbound_at.len(), i.outbound_at.len()))
            .collect();
        assert_eq!(ids, vec![(FRONTEND, 3, 0), (REVIEWS, 0, 1)]);
        assert_eq!(f.certs[0].not_after, Some(1_000_086_400));
        assert_eq!(f.memory_bytes, Some(5 << 20));
        let line = f.check().expect("the mesh worked");
        assert!(line.starts_with("210 successful requests of 220"), "{line}");
    }

    #[test]
    fn the_check_fails_without_traffic_identities_or_certificates() {
        let idle = snap(0.0, vec![loadgen(500, 0, 500)]);
        let later = snap(5.0, vec![loadgen(500, 0, 500)]);
        let f = Frame::compute(&idle, &[idle.clone(), later], None).expect("a frame");
        let missing = f.check().expect_err("no traffic");
        assert!(
            missing[0].starts_with("no successful request"),
            "{missing:?}"
        );
        assert!(missing[1].contains("SPIFFE"), "{missing:?}");
        let mut expired = f.clone();
        expired.now_unix = 2_000_000_000;
        assert!(
            expired
                .check()
                .expect_err("expired")
                .iter()
                .any(|m| m.contains("loadgen-1: its certificate has expired"))
        );
        let empty = snap(0.0, Vec::new());
        let f = Frame::compute(&empty, std::slice::from_ref(&empty), None).expect("a frame");
        assert!(
            f.check()
                .expect_err("nothing")
                .iter()
                .any(|m| m.contains("no proxy's metrics"))
        );
        assert_eq!(Frame::compute(&empty, &[], None), None);
    }
}
