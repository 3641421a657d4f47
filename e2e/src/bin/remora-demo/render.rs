//! A frame of the live summary as text: a pure function of a [`Frame`], so what the user
//! sees is tested here, byte for byte.

use crate::summary::Frame;

/// Columns padded to their widest cell; `right` says which are numbers.
fn table(head: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..head.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if right[i] {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        format!("  {}\n", padded.join("   ").trim_end())
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `spiffe://cluster.local/ns/shop/sa/frontend` → `ns/shop/sa/frontend`.
fn short_id(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map_or(id, |(_, path)| path)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"))
}

/// `2026-12-06 13:40:02 UTC` from unix seconds (proleptic Gregorian, as `date -u`).
pub fn utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `1d 2h`, `23h 59m`, `4m 10s`, `12s`.
pub fn span(secs: i64) -> String {
    let s = secs.abs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {}h", s / 86_400, s / 3600 % 24),
    }
}

/// The whole frame. `title` names what runs, `footer` how it ends.
pub fn render(f: &Frame, title: &str, footer: &str) -> String {
    let mut out = format!(
        "{title} · {} · summary for {:.0} s{}\n",
        utc(f.now_unix),
        f.elapsed,
        f.memory_bytes
            .map(|b| format!(" · box memory {} MiB", b >> 20))
            .unwrap_or_default()
    );
    out.push_str(&format!(
        "\ntraffic, counted by the callers' proxies (rate over the last {:.1} s; success and latency over the last {:.0} s)\n",
        f.rate_span, f.window_span
    ));
    if f.callers.is_empty() {
        out.push_str("  (no request has gone out through a proxy yet)\n");
    } else {
        let rows: Vec<Vec<String>> = f
            .callers
            .iter()
            .map(|c| {
                let rate = if c.window_total == 0 {
                    "-".to_owned()
                } else {
                    format!(
                        "{:.2} % ({}/{})",
                        c.window_ok as f64 * 100.0 / c.window_total as f64,
                        c.window_ok,
                        c.window_total
                    )
                };
                vec![
                    c.pod.clone(),
                    format!("{:.1}", c.rps),
                    rate,
                    ms(c.p50_ms),
                    ms(c.p99_ms),
                    format!("{} ok of {}", c.ok_since_start, c.total_since_start),
                ]
            })
            .collect();
        out.push_str(&table(
            &["CALLER", "REQ/S", "SUCCESS", "P50", "P99", "SINCE START"],
            &rows,
            &[false, true, true, true, true, true],
        ));
    }
    out.push_str("\nrequests per backend, counted by the backends' proxies (inbound; mirrored copies included)\n");
    if f.backends.is_empty() {
        out.push_str("  (no backend has received a request yet)\n");
    } else {
        let rows: Vec<Vec<String>> = f
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.pod.clone(),
                    b.version.clone(),
                    format!("{:.1}", b.rps),
                    format!("{:.1} %", b.share),
                    b.since_start.to_string(),
                    b.failed_since_start.to_string(),
                    b.peers
                        .iter()
                        .map(|p| short_id(p))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "BACKEND",
                "VERSION",
                "REQ/S",
                "SHARE",
                "SINCE START",
                "FAILED",
                "CALLED BY",
            ],
            &rows,
            &[false, false, true, true, true, true, false],
        ));
    }
    out.push_str("\nSPIFFE identities authenticated over mTLS since the start\n");
    if f.identities.is_empty() {
        out.push_str("  (none yet)\n");
    } else {
        let rows: Vec<Vec<String>> = f
            .identities
            .iter()
            .map(|i| {
                let mut seen = Vec::new();
                if !i.inbound_at.is_empty() {
                    seen.push(format!("calling {}", i.inbound_at.join(", ")));
                }
                if !i.outbound_at.is_empty() {
                    seen.push(format!("answering {}", i.outbound_at.join(", ")));
                }
                vec![i.id.clone(), seen.join("; ")]
            })
            .collect();
        out.push_str(&table(&["IDENTITY", "SEEN"], &rows, &[false, false]));
    }
    out.push_str("\nworkload certificates (each proxy's, from its metrics)\n");
    let rows: Vec<Vec<String>> = f
        .certs
        .iter()
        .map(|c| {
            let (expiry, left) = match c.not_after {
                Some(t) if t > f.now_unix => (utc(t), format!("in {}", span(t - f.now_unix))),
                Some(t) => (utc(t), format!("EXPIRED {} ago", span(f.now_unix - t))),
                None => ("none".to_owned(), "NO CERTIFICATE".to_owned()),
            };
            vec![
                c.pod.clone(),
                format!("sa/{}", c.service_account),
                expiry,
                left,
            ]
        })
        .collect();
    out.push_str(&table(
        &["PROXY OF", "ACCOUNT", "NOT AFTER", "EXPIRES"],
        &rows,
        &[false, false, false, false],
    ));
    if let Some(l) = &f.loadgen {
        let pods: Vec<String> = l.by_pod.iter().map(|(p, n)| format!("{p}={n}")).collect();
        out.push_str(&format!(
            "\nthe load generator's own count ({}, its latest report): {} req, {:.2} % ok, p50 {:.1} ms, p99 {:.1} ms | {}\n",
            l.pod,
            l.requests,
            l.success_rate,
            l.p50_ms,
            l.p99_ms,
            pods.join(" ")
        ));
    }
    for e in f.errors.iter().take(3) {
        out.push_str(&format!("not read: {e}\n"));
    }
    out.push_str(&format!("\n{footer}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        scrape::LoadgenReport,
        summary::{Backend, Caller, Cert, Identity},
    };

    #[test]
    fn dates_and_spans() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_563_202), "2026-12-06 13:20:02 UTC");
        assert_eq!(span(12), "12s");
        assert_eq!(span(250), "4m 10s");
        assert_eq!(span(86_399), "23h 59m");
        assert_eq!(span(93_600), "1d 2h");
    }

    #[test]
    fn a_frame_renders_every_section() {
        let frame = Frame {
            now_unix: 1_796_476_802,
            elapsed: 37.2,
            rate_span: 1.0,
            window_span: 10.0,
            callers: vec![Caller {
                pod: "loadgen-7f9c".into(),
                rps: 20.0,
                window_ok: 199,
                window_total: 200,
                p50_ms: Some(1.64),
                p99_ms: Some(6.4),
                ok_since_start: 739,
                total_since_start: 740,
            }],
            backends: vec![
                Backend {
                    pod: "reviews-v1-a".into(),
                    version: "v1".into(),
                    rps: 9.0,
                    share: 45.0,
                    since_start: 333,
                    failed_since_start: 1,
                    peers: vec!["spiffe://cluster.local/ns/shop/sa/frontend".into()],
                },
                Backend {
                    pod: "reviews-v2-c".into(),
                    version: "v2".into(),
                    rps: 11.0,
                    share: 55.0,
                    since_start: 74,
                    failed_since_start: 0,
                    peers: vec!["spiffe://cluster.local/ns/shop/sa/frontend".into()],
                },
            ],
            identities: vec![
                Identity {
                    id: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
                    inbound_at: vec!["reviews-v1-a".into(), "reviews-v2-c".into()],
                    outbound_at: vec![],
                },
                Identity {
                    id: "spiffe://cluster.local/ns/shop/sa/reviews".into(),
                    inbound_at: vec![],
                    outbound_at: vec!["loadgen-7f9c".into()],
                },
            ],
            certs: vec![
                Cert {
                    pod: "loadgen-7f9c".into(),
                    service_account: "frontend".into(),
                    not_after: Some(1_796_563_202),
                },
                Cert {
                    pod: "reviews-v1-a".into(),
                    service_account: "reviews".into(),
                    not_after: None,
                },
            ],
            loadgen: Some(LoadgenReport {
                pod: "loadgen-7f9c".into(),
                requests: 100,
                success_rate: 100.0,
                p50_ms: 1.2,
                p99_ms: 3.0,
                by_pod: vec![("reviews-v1-a".into(), 90), ("reviews-v2-c".into(), 10)],
            }),
            memory_bytes: Some(946 << 20),
            errors: vec!["reviews-v1-b: metrics: no answer within 3 s".into()],
        };
        let want = "\
Remora demo · namespace shop · 2026-12-05 13:20:02 UTC · summary for 37 s · box memory 946 MiB

traffic, counted by the callers' proxies (rate over the last 1.0 s; success and latency over the last 10 s)
  CALLER         REQ/S             SUCCESS      P50      P99     SINCE START
  loadgen-7f9c    20.0   99.50 % (199/200)   1.6 ms   6.4 ms   739 ok of 740

requests per backend, counted by the backends' proxies (inbound; mirrored copies included)
  BACKEND        VERSION   REQ/S    SHARE   SINCE START   FAILED   CALLED BY
  reviews-v1-a   v1          9.0   45.0 %           333        1   ns/shop/sa/frontend
  reviews-v2-c   v2         11.0   55.0 %            74        0   ns/shop/sa/frontend

SPIFFE identities authenticated over mTLS since the start
  IDENTITY                                     SEEN
  spiffe://cluster.local/ns/shop/sa/frontend   calling reviews-v1-a, reviews-v2-c
  spiffe://cluster.local/ns/shop/sa/reviews    answering loadgen-7f9c

workload certificates (each proxy's, from its metrics)
  PROXY OF       ACCOUNT       NOT AFTER                 EXPIRES
  loadgen-7f9c   sa/frontend   2026-12-06 13:20:02 UTC   in 1d 0h
  reviews-v1-a   sa/reviews    none                      NO CERTIFICATE

the load generator's own count (loadgen-7f9c, its latest report): 100 req, 100.00 % ok, p50 1.2 ms, p99 3.0 ms | reviews-v1-a=90 reviews-v2-c=10
not read: reviews-v1-b: metrics: no answer within 3 s

Ctrl-C stops the demo
";
        let got = render(
            &frame,
            "Remora demo · namespace shop",
            "Ctrl-C stops the demo",
        );
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn an_empty_frame_says_what_is_missing() {
        let frame = Frame {
            now_unix: 0,
            elapsed: 0.0,
            rate_span: 0.0,
            window_span: 0.0,
            callers: vec![],
            backends: vec![],
            identities: vec![],
            certs: vec![],
            loadgen: None,
            memory_bytes: None,
            errors: vec![],
        };
        let got = render(&frame, "t", "f");
        for want in [
            "(no request has gone out through a proxy yet)",
            "(no backend has received a request yet)",
            "(none yet)",
        ] {
            assert!(got.contains(want), "{want} missing:\n{got}");
        }
    }
}
