//! Durations as users write them in CRDs and config files: `250ms`, `5s`, `1m30s`, `1h`.
//!
//! The schema pattern and the parser accept the same language, so anything the API server
//! admits also parses here, and the proxy can trust a `Duration` it deserialized.

use std::{borrow::Cow, fmt, str::FromStr, time};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern enforced by the CRD schema. One or more `<digits><unit>` groups, units
/// `ms`, `s`, `m`, `h`, largest first is not required (`90s` is as good as `1m30s`).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,9}(ms|s|m|h))+$";

/// A non-negative duration parsed from a string such as `250ms` or `1h30m`.
///
/// Keeps the user's spelling so that round trips (status, `config_dump`) print what was
/// written.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Duration {
    text: String,
    value: time::Duration,
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; expected something like 250ms, 5s, 1m or 1h")]
    Empty,
    #[error(
        "invalid duration {0:?}: expected digits followed by a unit (ms, s, m, h), e.g. 250ms or 1m30s"
    )]
    Syntax(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl Duration {
    /// The parsed value.
    pub fn get(&self) -> time::Duration {
        self.value
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration from milliseconds, spelled `<n>ms`.
    pub fn from_millis(ms: u64) -> Self {
        Self {
            text: format!("{ms}ms"),
            value: time::Duration::from_millis(ms),
        }
    }

    /// A duration from whole seconds, spelled `<n>s`.
    pub fn from_secs(secs: u64) -> Self {
        Self {
            text: format!("{secs}s"),
            value: time::Duration::from_secs(secs),
        }
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(DurationError::Empty);
        }
        let syntax = || DurationError::Syntax(s.to_owned());
        let overflow = || DurationError::Overflow(s.to_owned());
        let mut total = time::Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 9 {
                return Err(syntax());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| syntax())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (time::Duration::from_millis(1), 2)
            } else if rest.starts_with('s') {
                (time::Duration::from_secs(1), 1)
            } else if rest.starts_with('m') {
                (time::Duration::from_secs(60), 1)
            } else if rest.starts_with('h') {
                (time::Duration::from_secs(3600), 1)
            } else {
                return Err(syntax());
            };
            rest = &rest[len..];
            let n = u32::try_from(n).map_err(|_| overflow())?;
            let part = unit.checked_mul(n).ok_or_else(overflow)?;
            total = total.checked_add(part).ok_or_else(overflow)?;
        }
        Ok(Self {
            text: s.to_owned(),
            value: total,
        })
    }
}

impl TryFrom<String> for Duration {
    type Error = DurationError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> Self {
        d.text
    }
}

impl From<Duration> for time::Duration {
    fn from(d: Duration) -> Self {
        d.value
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({})", self.text)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 250ms, 5s, 1m30s or 1h."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u128 {
        s.parse::<Duration>()
            .map(|d| d.get().as_millis())
            .unwrap_or(u128::MAX)
    }

    #[test]
    fn parses_each_unit_and_compounds() {
        assert_eq!(ms("250ms"), 250);
        assert_eq!(ms("5s"), 5_000);
        assert_eq!(ms("2m"), 120_000);
        assert_eq!(ms("1h"), 3_600_000);
        assert_eq!(ms("1m30s"), 90_000);
        assert_eq!(ms("1h1m1s1ms"), 3_661_001);
        assert_eq!(ms("0s"), 0);
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "-1s",
            "1.5s",
            "5sec",
            "1d",
            "10us",
            "1234567890s",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn serde_keeps_the_spelling_and_validates() {
        let d: Duration = serde_json::from_str("\"90s\"").expect("valid");
        assert_eq!(d.get(), time::Duration::from_secs(90));
        assert_eq!(serde_json::to_string(&d).expect("serializes"), "\"90s\"");
        let err = serde_json::from_str::<Duration>("\"ninety\"").expect_err("invalid");
        assert!(err.to_string().contains("invalid duration"), "{err}");
    }
}
