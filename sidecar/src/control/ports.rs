//! Port lists as the webhook writes them into `REMORA_PROXY_INBOUND_PORTS` and
//! `REMORA_PROXY_OPAQUE_PORTS`: comma-separated ports and inclusive ranges, spaces allowed
//! (`80, 443,8000-8080`). Parsing is strict: a list the proxy cannot read is a start-up
//! error, not a silently ignored annotation.

use std::{collections::BTreeSet, fmt, str::FromStr};

/// Why a port list does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortListError {
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
    #[error("range {0:?} ends before it starts")]
    EmptyRange(String),
}

/// A set of TCP ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(BTreeSet<u16>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(&port)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().copied()
    }
}

fn port(s: &str) -> Result<u16, PortListError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(PortListError::NotAPort(s.trim().to_owned())),
    }
}

impl FromStr for PortSet {
    type Err = PortListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (port(a)?, port(b)?);
                    if a > b {
                        return Err(PortListError::EmptyRange(part.to_owned()));
                    }
                    out.extend(a..=b);
                }
                None => {
                    out.insert(port(part)?);
                }
            }
        }
        Ok(Self(out))
    }
}

impl fmt::Display for PortSet {
    /// Compact form: consecutive ports as ranges (`80,8000-8002`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ports = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = ports.next() {
            let mut end = start;
            while let Some(&next) = ports.peek()
                && end.checked_add(1) == Some(next)
            {
                end = next;
                ports.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_webhook_format() {
        let set: PortSet = "80, 443,8000-8002".parse().expect("valid");
        assert_eq!(set.iter().collect::<Vec<_>>(), [80, 443, 8000, 8001, 8002]);
        assert_eq!(set.to_string(), "80,443,8000-8002");
        assert!("".parse::<PortSet>().expect("empty is valid").is_empty());
        assert_eq!(
            "65535".parse::<PortSet>().expect("max").to_string(),
            "65535"
        );
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert_eq!(
            "80,http".parse::<PortSet>(),
            Err(PortListError::NotAPort("http".into()))
        );
        assert_eq!(
            "0".parse::<PortSet>(),
            Err(PortListError::NotAPort("0".into()))
        );
        assert_eq!(
            "70000".parse::<PortSet>(),
            Err(PortListError::NotAPort("70000".into()))
        );
        assert_eq!(
            "90-80".parse::<PortSet>(),
            Err(PortListError::EmptyRange("90-80".into()))
        );
    }
}
