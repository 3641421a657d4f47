//! Just enough of the Prometheus text exposition format to read a proxy's `/metrics`:
//! samples with their labels, counter deltas between two scrapes (a counter that went down
//! was reset: its new value is the delta), and quantiles of a histogram's bucket deltas,
//! interpolated within a bucket as Prometheus' `histogram_quantile` does.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("metrics line {line}: {message}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub message: &'static str,
    pub text: String,
}

/// Parses exposition text; `#` lines (HELP, TYPE, EOF) are skipped.
pub fn parse(text: &str) -> Result<Samples, ParseError> {
    let mut samples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message| ParseError {
            line: i + 1,
            message,
            text: raw.to_owned(),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() {
            return Err(err("no metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let (parsed, tail) = parse_labels(after).ok_or_else(|| err("bad label set"))?;
            labels = parsed;
            rest = tail;
        }
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = parse_value(value).ok_or_else(|| err("bad value"))?;
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(Samples(samples))
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

/// `a="x",b="y"}` → the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(tail) = s.strip_prefix('}') {
            return Some((labels, tail));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

impl Samples {
    /// The samples named `name` that `keep` accepts.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        keep: impl Fn(&Sample) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.name == name && keep(s))
    }
}

/// How much each counter series accepted by `keep` grew from `old` to `new`, summed. A
/// series missing from `old` (a new pod, a first request) grew from 0; one that went down
/// was reset (the container restarted) and grew by its new value.
pub fn increase(
    new: &Samples,
    old: Option<&Samples>,
    name: &str,
    keep: impl Fn(&Sample) -> bool,
) -> f64 {
    new.series(name, &keep)
        .map(|s| {
            let before = old
                .and_then(|o| o.series(name, |x| x.labels == s.labels).next())
                .map_or(0.0, |x| x.value);
            if s.value >= before {
                s.value - before
            } else {
                s.value
            }
        })
        .sum()
}

/// A histogram's cumulative bucket counts `(le, count)` that grew from `old` to `new`,
/// summed over the series `keep` accepts, sorted by `le`.
pub fn bucket_increase(
    new: &Samples,
    old: Option<&Samples>,
    histogram: &str,
    keep: impl Fn(&Sample) -> bool,
) -> Vec<(f64, f64)> {
    let name = format!("{histogram}_bucket");
    let mut bounds: Vec<f64> = new
        .series(&name, &keep)
        .filter_map(|s| parse_value(s.label("le")))
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    bounds
        .into_iter()
        .map(|le| {
            let count = increase(new, old, &name, |s| {
                keep(s) && parse_value(s.label("le")) == Some(le)
            });
            (le, count)
        })
        .collect()
}

/// The `q` quantile (0..=1) of cumulative buckets, interpolated linearly within the bucket
/// it falls in (from 0 for the first); in the `+Inf` bucket, the largest finite bound.
/// `None` without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank && count > below {
            if le.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below));
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP remora_proxy_requests HTTP requests by status and peer identity.
# TYPE remora_proxy_requests counter
remora_proxy_requests_total{direction="inbound",status="200",peer_identity="spiffe://cluster.local/ns/shop/sa/frontend"} 120
remora_proxy_requests_total{direction="inbound",status="503",peer_identity=""} 3
remora_proxy_cert_expiry_timestamp_seconds 1796563202
odd{a="quote \" and \\ and \n",b=""} +Inf
# EOF
"#;

    #[test]
    fn samples_and_labels_parse() {
        let s = parse(TEXT).expect("parses");
        assert_eq!(s.0.len(), 4);
        assert_eq!(s.0[0].label("status"), "200");
        assert_eq!(
            s.0[0].label("peer_identity"),
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
        assert_eq!(s.0[2].value, 1_796_563_202.0);
        assert_eq!(s.0[3].label("a"), "quote \" and \\ and \n");
        assert!(s.0[3].value.is_infinite());
        assert_eq!(
            increase(&s, None, "remora_proxy_requests_total", |x| x
                .label("direction")
                == "inbound"),
            123.0
        );
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        for (text, message) in [
            ("metric", "no value"),
            ("m{a=\"x\" 1", "bad label set"),
            ("m{a=x} 1", "bad label set"),
            ("m 1.2.3", "bad value"),
        ] {
            let err = parse(&format!("# ok\n{text}\n")).expect_err(text);
            assert_eq!((err.line, err.message), (2, message), "{text}");
        }
    }

    #[test]
    fn increases_survive_new_series_and_resets() {
        let old = parse("c{k=\"a\"} 10\nc{k=\"b\"} 50\n").expect("old");
        // a grew by 5, b was reset to 7, c is new with 2.
        let new = parse("c{k=\"a\"} 15\nc{k=\"b\"} 7\nc{k=\"c\"} 2\n").expect("new");
        assert_eq!(increase(&new, Some(&old), "c", |_| true), 14.0);
        assert_eq!(increase(&new, None, "c", |_| true), 24.0);
        assert_eq!(
            increase(&new, Some(&old), "c", |s| s.label("k") == "a"),
            5.0
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let old = parse(
            "h_bucket{d=\"o\",le=\"0.001\"} 0\nh_bucket{d=\"o\",le=\"0.002\"} 0\nh_bucket{d=\"o\",le=\"0.004\"} 0\nh_bucket{d=\"o\",le=\"+Inf\"} 0\n",
        )
        .expect("old");
        // 100 observations: 50 ≤ 1 ms, 40 in (1, 2] ms, 9 in (2, 4] ms, 1 above.
        let new = parse(
            "h_bucket{d=\"o\",le=\"0.001\"} 50\nh_bucket{d=\"o\",le=\"0.002\"} 90\nh_bucket{d=\"o\",le=\"0.004\"} 99\nh_bucket{d=\"o\",le=\"+Inf\"} 100\nh_bucket{d=\"i\",le=\"+Inf\"} 7\n",
        )
        .expect("new");
        let b = bucket_increase(&new, Some(&old), "h", |s| s.label("d") == "o");
        assert_eq!(
            b,
            vec![
                (0.001, 50.0),
                (0.002, 90.0),
                (0.004, 99.0),
                (f64::INFINITY, 100.0)
            ]
        );
        let ms = |q| quantile(&b, q).map(|v| (v * 1e6).round() / 1e3);
        assert_eq!(ms(0.5), Some(1.0));
        assert_eq!(ms(0.7), Some(1.5));
        assert_eq!(ms(0.99), Some(4.0));
        // The top 1 % is above every finite bound: the largest finite bound.
        assert_eq!(ms(1.0), Some(4.0));
        assert_eq!(quantile(&[(0.001, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
    }
}
