//! The accelerator registration: how `remora-init` tells the node's `remora-accel` agent
//! that its pod is meshed, and exactly which outbound connections the iptables rules it
//! just installed capture, so that the agent's eBPF `connect4`/`connect6` programs take
//! over the same set and no other.
//!
//! `remora-init` runs inside the pod's network namespace, so it alone can read that
//! namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14), which is how the eBPF programs tell
//! pods apart. It writes one JSON file per pod into a directory shared with the agent (a
//! hostPath), named `<cookie>.json`, atomically (a temporary file renamed into place).
//! The agent reads each file into its pinned map of meshed pods and deletes it.
//!
//! The port and CIDR lists travel in the same grammar as `remora-init`'s own flags, and
//! are parsed back by the same parsers, so the two ends cannot read them differently.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Cidr, CidrList, Config, OutboundCapture, PortList, PortRange};

/// The registration format version this build writes and reads.
pub const REGISTRATION_VERSION: u32 = 1;

/// Where the webhook mounts the agent's registration directory in the init container.
pub const DEFAULT_REGISTRATION_DIR: &str = "/run/remora/accel";

/// What a meshed pod tells the accelerator agent (the file's JSON, camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// [`REGISTRATION_VERSION`]; a reader refuses any other.
    pub version: u32,
    /// The pod network namespace's cookie (`SO_NETNS_COOKIE`); never reused while the
    /// host runs, so a stale registration can never name another pod's namespace.
    pub netns_cookie: u64,
    /// The proxy's UID and GID: their connections are never redirected (loop guard).
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// The proxy's outbound capture port (on loopback, in the pod's namespace).
    pub outbound_port: u16,
    /// Outbound destination ports never captured (`remora-init --skip-outbound-ports`).
    pub skip_outbound_ports: String,
    /// Outbound destination networks never captured (`--skip-outbound-cidrs`).
    pub skip_outbound_cidrs: String,
    /// Outbound destinations captured: `*` or a CIDR list (`--include-outbound-cidrs`).
    pub include_outbound_cidrs: String,
    /// Whether IPv6 destinations are captured (`--ipv6`).
    pub ipv6: bool,
}

/// A registration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a registration: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: registration version {found}, this build reads {REGISTRATION_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: field {field}: {message}")]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("{path}: the file name must be the netns cookie {cookie} followed by .json")]
    Name { path: PathBuf, cookie: u64 },
}

/// A registration's lists, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<Cidr>,
    pub outbound: OutboundCapture,
}

impl Registration {
    /// The registration for a pod whose rules were built from `config`.
    pub fn new(netns_cookie: u64, config: &Config) -> Self {
        let join = |items: Vec<String>| items.join(",");
        Self {
            version: REGISTRATION_VERSION,
            netns_cookie,
            proxy_uid: config.proxy_uid,
            proxy_gid: config.proxy_gid,
            outbound_port: config.outbound_port,
            skip_outbound_ports: join(
                config
                    .skip_outbound_ports
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            skip_outbound_cidrs: join(
                config
                    .skip_outbound_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            include_outbound_cidrs: match &config.outbound {
                OutboundCapture::All => "*".to_owned(),
                OutboundCapture::Cidrs(c) => join(c.iter().map(ToString::to_string).collect()),
            },
            ipv6: config.ipv6,
        }
    }

    /// The file name of this registration in the shared directory.
    pub fn file_name(&self) -> String {
        format!("{}.json", self.netns_cookie)
    }

    /// Writes the registration into `dir` atomically (temporary file, then rename), so
    /// that the agent never reads half a file. Returns the file's path.
    pub fn write_into(&self, dir: &Path) -> Result<PathBuf, RegistrationError> {
        let path = dir.join(self.file_name());
        let tmp = dir.join(format!(".{}.tmp", self.file_name()));
        let werr = |source| RegistrationError::Write {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|source| RegistrationError::Json {
            path: path.clone(),
            source,
        })?;
        let mut f = fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&json).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        fs::rename(&tmp, &path).map_err(werr)?;
        Ok(path)
    }

    /// Reads and checks a registration file: version, name and every list.
    pub fn read(path: &Path) -> Result<(Self, Capture), RegistrationError> {
        let bytes = fs::read(path).map_err(|source| RegistrationError::Read {
            path: path.to_owned(),
            source,
        })?;
        let reg: Registration =
            serde_json::from_slice(&bytes).map_err(|source| RegistrationError::Json {
                path: path.to_owned(),
                source,
            })?;
        if reg.version != REGISTRATION_VERSION {
            return Err(RegistrationError::Version {
                path: path.to_owned(),
                found: reg.version,
            });
        }
        if path.file_name().and_then(|n| n.to_str()) != Some(reg.file_name().as_str()) {
            return Err(RegistrationError::Name {
                path: path.to_owned(),
                cookie: reg.netns_cookie,
            });
        }
        let capture = reg
            .capture()
            .map_err(|(field, message)| RegistrationError::Field {
                path: path.to_owned(),
                field,
                message,
            })?;
        Ok((reg, capture))
    }

    /// The lists, parsed by the same parsers as `remora-init`'s flags.
    pub fn capture(&self) -> Result<Capture, (&'static str, String)> {
        if self.outbound_port == 0 {
            return Err(("outboundPort", "must be 1 to 65535".to_owned()));
        }
        let ports: PortList = self
            .skip_outbound_ports
            .parse()
            .map_err(|e| ("skipOutboundPorts", e))?;
        let cidrs: CidrList = self
            .skip_outbound_cidrs
            .parse()
            .map_err(|e| ("skipOutboundCidrs", e))?;
        let outbound: OutboundCapture = self
            .include_outbound_cidrs
            .parse()
            .map_err(|e| ("includeOutboundCidrs", e))?;
        Ok(Capture {
            skip_outbound_ports: ports.0,
            skip_outbound_cidrs: cidrs.0,
            outbound,
        })
    }
}

/// The cookie of the network namespace this process runs in (`SO_NETNS_COOKIE`).
pub fn current_netns_cookie() -> std::io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    netns_cookie_of(&sock)
}

/// The network-namespace cookie of the namespace `sock` lives in.
pub fn netns_cookie_of(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<u64> {
    // Linux's SOL_SOCKET option number; libc 0.2 does not export it for every target.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and the fd is
    // owned by `sock` for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            skip_outbound_ports: "3306,9000-9100"
                .parse::<PortList>()
                .map(|l| l.0)
                .unwrap_or_default(),
            skip_outbound_cidrs: "169.254.169.254/32,fd00::/8"
                .parse::<CidrList>()
                .map(|l| l.0)
                .unwrap_or_default(),
            ..Config::default()
        }
    }

    #[test]
    fn a_registration_round_trips_through_its_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let reg = Registration::new(4242, &config());
        let path = reg.write_into(dir.path())?;
        assert_eq!(path.file_name().and_then(|n| n.to_str()), Some("4242.json"));
        let (back, capture) = Registration::read(&path)?;
        assert_eq!(back, reg);
        assert_eq!(capture.skip_outbound_ports, config().skip_outbound_ports);
        assert_eq!(capture.skip_outbound_cidrs, config().skip_outbound_cidrs);
        assert_eq!(capture.outbound, OutboundCapture::All);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn bad_registrations_are_refused_with_the_field_named() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| -> std::io::Result<PathBuf> {
            let p = dir.path().join(name);
            fs::write(&p, text)?;
            Ok(p)
        };
        let good = serde_json::to_value(Registration::new(7, &config()))?;
        let with = |k: &str, v: serde_json::Value| {
            let mut g = good.clone();
            g[k] = v;
            g.to_string()
        };
        let cases = [
            ("7.json", "{".to_owned(), "not a registration"),
            ("7.json", with("version", 2.into()), "version 2"),
            ("8.json", good.to_string(), "netns cookie 7"),
            (
                "7.json",
                with("skipOutboundPorts", "70000".into()),
                "skipOutboundPorts",
            ),
            (
                "7.json",
                with("includeOutboundCidrs", "".into()),
                "includeOutboundCidrs",
            ),
            ("7.json", with("outboundPort", 0.into()), "outboundPort"),
            ("7.json", with("extra", 1.into()), "unknown field"),
        ];
        for (name, text, want) in cases {
            let path = write(name, &text)?;
            let err = match Registration::read(&path) {
                Ok(r) => return Err(format!("accepted {r:?}, wanted an error with {want}").into()),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{err:?} does not mention {want:?}");
        }
        Ok(())
    }

    #[test]
    fn the_netns_cookie_is_readable_and_stable() -> std::io::Result<()> {
        let a = current_netns_cookie()?;
        assert_ne!(a, 0);
        assert_eq!(current_netns_cookie()?, a);
        Ok(())
    }
}
