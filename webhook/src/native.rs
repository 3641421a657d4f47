//! Native sidecar support: decided by flag (`true`/`false`) or detected (`auto`) from the
//! API server's version — Kubernetes 1.29 and later run init containers with
//! `restartPolicy: Always` as sidecars. Detection runs at start and periodically, since
//! the control plane can be upgraded under a running webhook.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::server::Context;

/// The first minor release of Kubernetes 1.x with native sidecars enabled by default.
pub const FIRST_NATIVE_MINOR: u32 = 29;

/// The `--native-sidecar` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeSidecarMode {
    /// Detect from the server version.
    Auto,
    /// Always native.
    On,
    /// Always classic.
    Off,
}

impl FromStr for NativeSidecarMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "true" | "on" => Ok(Self::On),
            "false" | "off" => Ok(Self::Off),
            _ => Err(format!("expected auto, true or false, got {s:?}")),
        }
    }
}

fn leading_number(s: &str) -> Option<u32> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether a server reporting `major`/`minor` (e.g. `1`/`29+`) supports native sidecars;
/// `None` when the version cannot be read.
pub fn supports_native(major: &str, minor: &str) -> Option<bool> {
    let major = leading_number(major)?;
    let minor = leading_number(minor)?;
    Some(major > 1 || (major == 1 && minor >= FIRST_NATIVE_MINOR))
}

/// Asks the API server for its version.
pub async fn detect(client: &kube::Client) -> Result<bool, String> {
    let info = client
        .apiserver_version()
        .await
        .map_err(|e| e.to_string())?;
    supports_native(&info.major, &info.minor).ok_or_else(|| {
        format!(
            "unreadable server version {:?}.{:?}",
            info.major, info.minor
        )
    })
}

/// Re-detects every `interval` and updates the context. Until the first detection
/// succeeds the context keeps its default (classic sidecars, which work everywhere).
pub async fn watch(client: kube::Client, ctx: Arc<Context>, interval: Duration) {
    loop {
        match detect(&client).await {
            Ok(native) => {
                if ctx.set_native_sidecar(native) {
                    tracing::info!(
                        native_sidecar = native,
                        "native sidecar support detected from the server version"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, native_sidecar = ctx.native_sidecar(), "cannot read the server version; keeping the current sidecar mode");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(supports_native("1", "28"), Some(false));
        assert_eq!(supports_native("1", "29"), Some(true));
        assert_eq!(supports_native("1", "33+"), Some(true));
        assert_eq!(supports_native("1", "20"), Some(false));
        assert_eq!(supports_native("2", "0"), Some(true));
        assert_eq!(supports_native("", "x"), None);
        assert_eq!("auto".parse(), Ok(NativeSidecarMode::Auto));
        assert!("maybe".parse::<NativeSidecarMode>().is_err());
    }
}
