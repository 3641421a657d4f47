//! The instruction-count regression guard (issue 15 item 5; `make bench-instructions`, a
//! step of CI): how many instructions the proxy pair executes per request, counted by
//! `valgrind --tool=callgrind`. A count is the same on every run whatever else the machine
//! does, so unlike the timings of the pair bench it can fail CI on a 5 % regression.
//!
//! For each path of `workload.rs` (HTTP/1.1 keep-alive, h2c, a new HTTP/1.1 connection, a
//! new opaque connection with its mTLS handshake, an opaque TCP echo) this program runs
//! itself under callgrind twice: through an in-process proxy pair (client → proxy A →
//! mTLS → proxy B → app, one thread) and directly (client → app). Only the window of `N`
//! requests after a warm-up is counted. The pair's cost per request is
//! `(pair − direct) / N`: the client's and app's instructions cancel out.
//!
//! Each figure is compared with `instructions.baseline` (committed beside this file); a
//! path more than 5 % above its baseline fails. `REMORA_INSTRUCTIONS_UPDATE=1`
//! (`make bench-instructions UPDATE=1`) rewrites the baseline instead: commit it with
//! the change that moved it and say why. `REMORA_INSTRUCTIONS_RUNS=3` repeats every
//! measurement and prints the run-to-run spread. The counts depend on the compiler, the
//! build profile (`bench`: release, fat LTO), valgrind and the CPU features the code picks
//! at run time (glibc's and ring's); the baseline records the first three.

#[path = "../tests/common/pki.rs"]
mod pki;
#[path = "instructions/workload.rs"]
mod workload;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path as FsPath, PathBuf},
    process::{Command, ExitCode},
    sync::Mutex,
};

use workload::{Path, Via};

/// A path fails when it costs more than this times its baseline.
const TOLERANCE: f64 = 1.05;
const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/instructions.baseline");
/// The counted function (see `workload::instructions_window`).
const WINDOW: &str = "*instructions_window";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--measure") => measure(&args[1..]).map(|()| true),
        // `cargo bench` passes `--bench`.
        _ => guard(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("instructions: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn measure(args: &[String]) -> anyhow::Result<()> {
    let [path, via, n] = args else {
        anyhow::bail!("usage: --measure PATH pair|direct N");
    };
    workload::measure(Path::parse(path)?, Via::parse(via)?, n.parse()?)
}

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Runs every measurement, prints the table, compares with (or rewrites) the baseline.
/// `Ok(false)`: a path regressed.
fn guard() -> anyhow::Result<bool> {
    let valgrind = tool_version("valgrind", &["--version"]).map_err(|e| {
        anyhow::anyhow!(
            "{e}: the instruction guard counts with valgrind: apt-get install -y valgrind (make bench-instructions installs it)"
        )
    })?;
    let rustc = tool_version(
        &std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()),
        &["-V"],
    )
    .unwrap_or_else(|_| "rustc ?".into());
    let runs: usize = std::env::var("REMORA_INSTRUCTIONS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(1);
    let update = flag("REMORA_INSTRUCTIONS_UPDATE");
    let out_dir = tempfile::tempdir()?;
    let mut jobs = Vec::new();
    for run in 0..runs {
        for path in Path::ALL {
            for via in [Via::Pair, Via::Direct] {
                jobs.push(Job { run, path, via });
            }
        }
    }
    let started = std::time::Instant::now();
    let counts = run_all(&jobs, out_dir.path())?;
    eprintln!(
        "instructions: {} callgrind runs in {:.0} s",
        jobs.len(),
        started.elapsed().as_secs_f64()
    );

    // Per path, the pair's instructions per request in each run.
    let mut cost: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut direct: BTreeMap<&str, f64> = BTreeMap::new();
    for path in Path::ALL {
        for run in 0..runs {
            let get = |via| counts[&(run, path.name(), via)];
            let n = path.requests() as f64;
            cost.entry(path.name())
                .or_default()
                .push((get(Via::Pair.name()) - get(Via::Direct.name())) / n);
            direct.insert(path.name(), get(Via::Direct.name()) / n);
        }
    }
    let baseline = read_baseline(FsPath::new(BASELINE))?;
    println!();
    println!(
        "proxy pair instructions per request (callgrind Ir of `cargo bench` release code; {rustc}; {valgrind}; pair minus direct, counted after a warm-up)"
    );
    println!(
        "{:<10} {:>9} {:>12} {:>12} {:>12} {:>8}   runs (spread)",
        "path", "requests", "direct", "pair cost", "baseline", "ratio"
    );
    let mut ok = true;
    for path in Path::ALL {
        let figures = &cost[path.name()];
        let median = median(figures);
        let (lo, hi) = figures
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        let spread = if runs > 1 {
            let all: Vec<String> = figures.iter().map(|f| format!("{f:.0}")).collect();
            format!("{} ({:.3} %)", all.join(" "), (hi - lo) / lo * 100.0)
        } else {
            String::new()
        };
        let (base, ratio) = match baseline.entries.get(path.name()) {
            Some(&b) => (format!("{b:.0}"), Some(median / b)),
            None => ("none".to_owned(), None),
        };
        let verdict = match ratio {
            Some(r) if r > TOLERANCE => {
                ok = false;
                "  REGRESSION"
            }
            Some(r) if r < 1.0 / TOLERANCE => "  cheaper: lock it in with UPDATE=1",
            Some(_) => "",
            None => {
                ok = false;
                "  no baseline"
            }
        };
        println!(
            "{:<10} {:>9} {:>12.0} {:>12.0} {:>12} {:>8}   {spread}{verdict}",
            path.name(),
            path.requests(),
            direct[path.name()],
            median,
            base,
            ratio.map_or("-".to_owned(), |r| format!("{r:.3}x")),
        );
    }
    if baseline.rustc.as_deref().is_some_and(|b| b != rustc) {
        println!(
            "note: the baseline was written with {}, this build is {rustc}: a compiler change moves every count",
            baseline.rustc.as_deref().unwrap_or("?")
        );
    }
    if update {
        let medians: BTreeMap<&str, f64> = cost.iter().map(|(k, v)| (*k, median(v))).collect();
        write_baseline(FsPath::new(BASELINE), &medians, &rustc, &valgrind)?;
        println!("baseline rewritten: {BASELINE} (commit it with the reason for the change)");
        return Ok(true);
    }
    if !ok {
        println!(
            "FAILED: a path costs more than {:.0} % above {BASELINE} (or has none). If the cost is deliberate, `make bench-instructions UPDATE=1` and commit the baseline with the reason.",
            (TOLERANCE - 1.0) * 100.0
        );
    }
    Ok(ok)
}

fn tool_version(bin: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {bin}: {e}"))?;
    anyhow::ensure!(out.status.success(), "{bin} {} failed", args.join(" "));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[derive(Clone, Copy, Debug)]
struct Job {
    run: usize,
    path: Path,
    via: Via,
}

type Counts = BTreeMap<(usize, &'static str, &'static str), f64>;

/// Runs the jobs, as many at a time as there are CPUs (valgrind runs a process on one);
/// each job's counted instructions.
fn run_all(jobs: &[Job], dir: &FsPath) -> anyhow::Result<Counts> {
    let queue = Mutex::new(jobs.iter());
    let counts = Mutex::new(Counts::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let next = queue.lock().map_err(|_| poisoned())?.next().copied();
                        let Some(job) = next else {
                            return Ok(());
                        };
                        let ir = callgrind(job, dir)?;
                        counts
                            .lock()
                            .map_err(|_| poisoned())?
                            .insert((job.run, job.path.name(), job.via.name()), ir);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a callgrind worker panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    counts.into_inner().map_err(|_| poisoned())
}

fn poisoned() -> anyhow::Error {
    anyhow::anyhow!("a callgrind worker panicked")
}

/// One measurement under callgrind: the instructions counted in the window.
fn callgrind(job: Job, dir: &FsPath) -> anyhow::Result<f64> {
    let me = std::env::current_exe()?;
    let out: PathBuf = dir.join(format!(
        "callgrind.{}.{}.{}",
        job.path.name(),
        job.via.name(),
        job.run
    ));
    let n = job.path.requests().to_string();
    let result = Command::new("valgrind")
        .args(["--tool=callgrind", "-q", "--collect-atstart=no"])
        .arg(format!("--toggle-collect={WINDOW}"))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&me)
        .args(["--measure", job.path.name(), job.via.name(), &n])
        .output()?;
    let what = format!("{} {}", job.path.name(), job.via.name());
    anyhow::ensure!(
        result.status.success(),
        "{what} under callgrind failed: {}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    let text = std::fs::read_to_string(&out)?;
    let ir = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("{what}: no totals in {}", out.display()))?;
    anyhow::ensure!(
        ir > 0.0,
        "{what}: nothing counted: callgrind found no function matching {WINDOW} (stripped symbols?)"
    );
    Ok(ir)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Debug, Default)]
struct Baseline {
    entries: BTreeMap<String, f64>,
    rustc: Option<String>,
}

/// `instructions.baseline`: `# rustc: ...` and `PATH INSTRUCTIONS` lines; `#` comments.
fn read_baseline(path: &FsPath) -> anyhow::Result<Baseline> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Baseline::default()),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    let mut b = Baseline::default();
    for (i, line) in text.lines().enumerate() {
        if let Some(v) = line.strip_prefix("# rustc: ") {
            b.rustc = Some(v.trim().to_owned());
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
            anyhow::bail!("{}:{}: expected `PATH INSTRUCTIONS`", path.display(), i + 1);
        };
        let value: f64 = value.parse().map_err(|_| {
            anyhow::anyhow!("{}:{}: {value:?} is not a number", path.display(), i + 1)
        })?;
        b.entries.insert(name.to_owned(), value);
    }
    Ok(b)
}

fn write_baseline(
    path: &FsPath,
    medians: &BTreeMap<&str, f64>,
    rustc: &str,
    valgrind: &str,
) -> anyhow::Result<()> {
    let mut text = String::from(
        "# Instructions per request of the proxy pair (callgrind Ir, pair minus direct), checked by\n\
         # `make bench-instructions` (CI fails above 5 %); rewritten by `make bench-instructions UPDATE=1`\n\
         # in the commit that changes the cost, with the reason in its message.\n",
    );
    writeln!(text, "# rustc: {rustc}")?;
    writeln!(text, "# valgrind: {valgrind}")?;
    for path in Path::ALL {
        writeln!(text, "{} {:.0}", path.name(), medians[path.name()])?;
    }
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}
