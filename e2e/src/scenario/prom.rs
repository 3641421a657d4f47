//! Reading a proxy's `/metrics` (Prometheus text exposition): the scenarios check
//! counters by name and labels, and compare them before and after an event.

use std::collections::BTreeMap;

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The parsed exposition of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: BTreeMap<String, Vec<Sample>>,
    text: String,
}

impl Metrics {
    /// Parses the text format; lines it cannot read (there should be none) are skipped,
    /// since a scenario asserts on the samples it needs and prints the text when missing.
    pub fn parse(text: &str) -> Self {
        let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((name, sample)) = parse_line(line) {
                samples.entry(name).or_default().push(sample);
            }
        }
        Self {
            samples,
            text: text.to_owned(),
        }
    }

    /// The raw text, for failure messages.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every sample of `name`.
    pub fn samples(&self, name: &str) -> &[Sample] {
        self.samples.get(name).map_or(&[], Vec::as_slice)
    }

    /// The sum of `name`'s samples whose labels include every `(key, value)` of `having`.
    pub fn sum(&self, name: &str, having: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .iter()
            .filter(|s| {
                having
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|l| l == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The value of an unlabelled gauge or counter.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.samples(name).first().map(|s| s.value)
    }
}

fn parse_line(line: &str) -> Option<(String, Sample)> {
    let (name, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                (parse_labels(&line[open + 1..close])?, &line[close + 1..]),
            )
        }
        None => {
            let (n, v) = line.split_once(' ')?;
            (n, (BTreeMap::new(), v))
        }
    };
    let (labels, value) = rest;
    // A timestamp may follow the value.
    let value = value.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name.to_owned(), Sample { labels, value }))
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, other) => value.push(other),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP remora_proxy_requests HTTP requests by status and peer identity.
# TYPE remora_proxy_requests counter
remora_proxy_requests_total{direction="inbound",status="200",peer_identity="spiffe://cluster.local/ns/shop/sa/frontend"} 57
remora_proxy_requests_total{direction="inbound",status="403",peer_identity="spiffe://cluster.local/ns/shop/sa/default"} 3
remora_proxy_requests_total{direction="outbound",status="200",peer_identity="a \"quoted\", b"} 4
remora_proxy_config_version 1732233600123456
remora_proxy_cert_expiry_timestamp_seconds 1.7e9 1700000000000
# EOF
"#;

    #[test]
    fn sums_by_label_and_reads_gauges() {
        let m = Metrics::parse(TEXT);
        assert_eq!(
            m.sum("remora_proxy_requests_total", &[("direction", "inbound")]),
            60.0
        );
        assert_eq!(
            m.sum(
                "remora_proxy_requests_total",
                &[
                    ("status", "200"),
                    (
                        "peer_identity",
                        "spiffe://cluster.local/ns/shop/sa/frontend"
                    )
                ]
            ),
            57.0
        );
        assert_eq!(
            m.value("remora_proxy_config_version"),
            Some(1_732_233_600_123_456.0)
        );
        assert_eq!(
            m.value("remora_proxy_cert_expiry_timestamp_seconds"),
            Some(1.7e9)
        );
        assert_eq!(m.sum("remora_proxy_absent", &[]), 0.0);
    }

    #[test]
    fn quoted_label_values_keep_commas_and_escapes() {
        let m = Metrics::parse(TEXT);
        let s = m.samples("remora_proxy_requests_total");
        assert_eq!(s[2].labels["peer_identity"], r#"a "quoted", b"#);
        assert_eq!(s[2].labels["status"], "200");
    }

    #[test]
    fn unreadable_lines_are_skipped() {
        let m = Metrics::parse("good 1\nbad{x=\"1\" 2\nworse\n");
        assert_eq!(m.value("good"), Some(1.0));
        assert!(m.samples("bad").is_empty());
    }
}
