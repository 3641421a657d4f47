//! `remora-probe`: a debugging tool for Remora's interception rules (and the helper of
//! the namespace tests). `listen` answers every connection with where it arrived and its
//! original destination; `connect` prints that answer.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use remora_init::probe;

/// Shows where TCP connections really arrive, and their SO_ORIGINAL_DST.
#[derive(Debug, Parser)]
#[command(name = "remora-probe", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Listen on each address; prints "ready" once all are bound.
    Listen {
        /// TCP addresses to listen on, e.g. 0.0.0.0:15001 or [::]:15006 (dual-stack).
        #[arg(long = "addr")]
        addrs: Vec<SocketAddr>,
        /// UDP addresses to answer on with the --tag (UDP must never be redirected).
        #[arg(long = "udp")]
        udp: Vec<SocketAddr>,
        /// What the UDP listeners answer.
        #[arg(long, default_value = "udp")]
        tag: String,
        /// Exit after this many seconds (so a forgotten listener cannot linger).
        #[arg(long, default_value_t = 300)]
        exit_after_secs: u64,
    },
    /// Send one UDP datagram and print the tag of the listener that answers.
    SendUdp {
        /// Where to send.
        addr: SocketAddr,
        /// Read timeout in milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Connect and print the listener's report line.
    Connect {
        /// Where to connect.
        addr: SocketAddr,
        /// Connect and read timeout in milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Run the connection as this UID (re-executes the probe with it).
        #[arg(long)]
        uid: Option<u32>,
        /// Run the connection as this GID (re-executes the probe with it).
        #[arg(long)]
        gid: Option<u32>,
    },
}

fn main() -> ExitCode {
    match Args::parse().cmd {
        Cmd::Listen {
            addrs,
            udp,
            tag,
            exit_after_secs,
        } => {
            for addr in udp {
                match UdpSocket::bind(addr) {
                    Ok(s) => {
                        let tag = tag.clone();
                        std::thread::spawn(move || probe::serve_udp(s, &tag));
                    }
                    Err(e) => {
                        eprintln!("remora-probe: listen on udp {addr}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            for addr in addrs {
                match TcpListener::bind(addr) {
                    Ok(l) => {
                        std::thread::spawn(move || probe::serve(l));
                    }
                    Err(e) => {
                        eprintln!("remora-probe: listen on {addr}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            println!("ready");
            std::thread::sleep(Duration::from_secs(exit_after_secs));
            ExitCode::SUCCESS
        }
        Cmd::Connect {
            addr,
            timeout_ms,
            uid,
            gid,
        } if uid.is_some() || gid.is_some() => {
            let exe = match std::env::current_exe() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("remora-probe: cannot find myself: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut cmd = Command::new(exe);
            cmd.args([
                "connect",
                &addr.to_string(),
                "--timeout-ms",
                &timeout_ms.to_string(),
            ]);
            if let Some(gid) = gid {
                cmd.gid(gid);
            }
            if let Some(uid) = uid {
                cmd.uid(uid);
            }
            match cmd.status() {
                Ok(s) if s.success() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("remora-probe: running as uid {uid:?} gid {gid:?}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::SendUdp { addr, timeout_ms } => {
            match probe::send_udp(addr, Duration::from_millis(timeout_ms)) {
                Ok(tag) => {
                    println!("{tag}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("remora-probe: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Connect {
            addr, timeout_ms, ..
        } => match probe::connect(addr, Duration::from_millis(timeout_ms)) {
            Ok(report) => {
                println!("{}", report.line());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("remora-probe: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
