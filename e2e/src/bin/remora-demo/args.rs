//! The command line: `remora-demo [--keep] [--duration=20s]`, `remora-demo --stop [DIR]`,
//! and the internal `--daemon=DIR` a kept demo runs as.

use std::{path::PathBuf, time::Duration};

pub const USAGE: &str = "\
usage: remora-demo [--keep] [--duration=DURATION]
       remora-demo --stop [DIR]

Brings up a single-node Kubernetes in a network namespace, installs Remora with
`kubectl apply -k config/default`, applies config/samples and shows the mesh's traffic
live, once a second, until Ctrl-C; then tears everything down.

  --keep               leave the cluster running when the summary stops (Ctrl-C or
                       --duration); prints its KUBECONFIG and the command that stops it
  --duration=DURATION  show the summary this long (e.g. 20s, 2m), then stop; the exit
                       status says whether traffic went through the mesh
  --stop [DIR]         stop a kept demo (DIR as printed by --keep; without DIR, the only
                       one running)";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Everything in this process; torn down on exit.
    Run,
    /// The cluster in a background process of its own; this one shows the summary.
    Keep,
    /// The background process of a kept demo, with its state directory.
    Daemon(PathBuf),
    /// Stop a kept demo.
    Stop(Option<PathBuf>),
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// How long to show the summary; `None`: until Ctrl-C.
    pub duration: Option<Duration>,
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, String> {
    let mut keep = false;
    let mut duration = None;
    let mut stop: Option<Option<PathBuf>> = None;
    let mut daemon = None;
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => {
                return Ok(Options {
                    mode: Mode::Help,
                    duration: None,
                });
            }
            "--keep" if inline.is_none() => keep = true,
            "--duration" => {
                let value = inline
                    .or_else(|| args.next())
                    .ok_or("--duration needs a value, e.g. --duration=20s")?;
                let d = parse_duration(&value)?;
                if d.is_zero() {
                    return Err("--duration must be longer than 0s".to_owned());
                }
                duration = Some(d);
            }
            "--stop" => {
                let dir = inline.or_else(|| args.next_if(|a| !a.starts_with('-')));
                stop = Some(dir.map(PathBuf::from));
            }
            "--daemon" => {
                let dir = inline.ok_or("--daemon needs a directory")?;
                daemon = Some(PathBuf::from(dir));
            }
            _ => return Err(format!("unknown argument '{arg}'")),
        }
    }
    let mode = match (stop, daemon, keep) {
        (Some(dir), None, false) if duration.is_none() => Mode::Stop(dir),
        (Some(_), _, _) => return Err("--stop takes no other option".to_owned()),
        (None, Some(dir), false) => Mode::Daemon(dir),
        (None, Some(_), true) => return Err("--daemon is internal to --keep".to_owned()),
        (None, None, true) => Mode::Keep,
        (None, None, false) => Mode::Run,
    };
    Ok(Options { mode, duration })
}

/// `250ms`, `20s`, `2m`, `1m30s`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration '{s}': expected e.g. 20s, 2m, 1m30s");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 9 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Result<Options, String> {
        parse(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn modes_and_durations() {
        assert_eq!(
            opts(&[]),
            Ok(Options {
                mode: Mode::Run,
                duration: None
            })
        );
        assert_eq!(
            opts(&["--duration=20s"]),
            Ok(Options {
                mode: Mode::Run,
                duration: Some(Duration::from_secs(20))
            })
        );
        assert_eq!(
            opts(&["--keep", "--duration", "1m30s"]),
            Ok(Options {
                mode: Mode::Keep,
                duration: Some(Duration::from_secs(90))
            })
        );
        assert_eq!(opts(&["--stop"]).map(|o| o.mode), Ok(Mode::Stop(None)));
        assert_eq!(
            opts(&["--stop", "/tmp/remora-demo-x"]).map(|o| o.mode),
            Ok(Mode::Stop(Some("/tmp/remora-demo-x".into())))
        );
        assert_eq!(
            opts(&["--stop=/tmp/d"]).map(|o| o.mode),
            Ok(Mode::Stop(Some("/tmp/d".into())))
        );
        assert_eq!(
            opts(&["--daemon=/tmp/d"]).map(|o| o.mode),
            Ok(Mode::Daemon("/tmp/d".into()))
        );
        assert_eq!(opts(&["-h"]).map(|o| o.mode), Ok(Mode::Help));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        for (args, want) in [
            (&["--frobnicate"][..], "unknown argument '--frobnicate'"),
            (&["--duration"][..], "--duration needs a value"),
            (&["--duration=5"][..], "invalid duration '5'"),
            (&["--duration=0s"][..], "longer than 0s"),
            (&["--stop", "--keep"][..], "--stop takes no other option"),
            (&["--keep=yes"][..], "unknown argument"),
            (&["--keep", "--daemon=/d"][..], "internal"),
        ] {
            let err = opts(args).expect_err(&format!("{args:?} accepted"));
            assert!(err.contains(want), "{args:?}: {err}");
        }
        for bad in ["", "s", "5x", "-1s", "1.5s", "1234567890s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }
}
