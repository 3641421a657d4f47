//! Where a phase's CPU goes (`/proc`, clock ticks): the sidecars (`/proc/<pid>/stat`
//! utime+stime, the "pair CPU" rows), everything in the two pods (the sidecars, the server
//! app, and the load generator, a child this process waits for, read from its cutime +
//! cstime), and the whole machine (`/proc/stat`: busy ticks of every CPU, and the softirq
//! ticks among them).
//!
//! Why three measures: with an accelerator, the work it removes (a loopback hop's TCP
//! transmit and receive) is done by whoever *sends*, and a sender is as often an app as a
//! sidecar, so the sidecars' CPU alone can miss the saving. Softirq work that runs in
//! ksoftirqd, or that interrupts an idle CPU, is charged to no pod at all: only the
//! machine's counters see it (on a shared machine they also see everything else running).

use std::{fs, process::Command};

/// utime + stime of `pid` in clock ticks.
pub fn ticks(pid: u32) -> anyhow::Result<u64> {
    stat_fields(pid.to_string(), &[14, 15])
}

/// cutime + cstime of this process: the CPU of the children it has waited for.
fn children() -> anyhow::Result<u64> {
    stat_fields("self".into(), &[16, 17])
}

/// The sum of `/proc/<pid>/stat` fields `idx` (1-based, as in proc(5)).
fn stat_fields(pid: String, idx: &[usize]) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state).
    idx.iter()
        .map(|&i| {
            f.get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| anyhow::anyhow!("bad /proc/{pid}/stat field {i}"))
        })
        .sum()
}

/// The machine's (busy, softirq) ticks over all CPUs, from `/proc/stat`'s `cpu` line:
/// busy = user + nice + system + irq + softirq + steal (guest time is inside user).
fn machine() -> anyhow::Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    Ok((get(0) + get(1) + get(2) + get(5) + get(6) + get(7), get(6)))
}

/// One reading of every counter; a phase's figures are the difference of two.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// The sidecars (A + B).
    pub pair: u64,
    /// The sidecars, the server app and the load generators waited for so far.
    pub pods: u64,
    pub machine: u64,
    pub softirq: u64,
}

impl Sample {
    /// `sidecars` and `apps` are PIDs of running processes; the load generator is counted
    /// once it has been waited for (so read this after `load_in` returns).
    pub fn take(sidecars: &[u32], apps: &[u32]) -> anyhow::Result<Self> {
        let pair = sidecars
            .iter()
            .map(|p| ticks(*p))
            .sum::<anyhow::Result<u64>>()?;
        let apps = apps
            .iter()
            .map(|p| ticks(*p))
            .sum::<anyhow::Result<u64>>()?;
        let (machine, softirq) = machine()?;
        Ok(Self {
            pair,
            pods: pair + apps + children()?,
            machine,
            softirq,
        })
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            pair: self.pair - earlier.pair,
            pods: self.pods - earlier.pods,
            machine: self.machine - earlier.machine,
            softirq: self.softirq - earlier.softirq,
        }
    }
}

pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
