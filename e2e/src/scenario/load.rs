//! Load from inside a meshed pod: `kubectl exec` runs the demo app's `load` subcommand in
//! the pod's app container, so its requests leave through that pod's sidecar as the pod's
//! identity, on either tier. The JSON lines it prints are read as they arrive and stamped
//! with the host's clock, so a scenario can line the answers per pod up with events it
//! caused (a scale-down, a deleted pod) to within one reporting interval.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::ScenarioError;

/// What to run: `remora-demo-app load` with these flags.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub rps: u32,
    pub duration: Duration,
    /// Interval lines (per-window counts); `None` for the final summary only.
    pub interval: Option<Duration>,
    /// `name: value` request headers.
    pub headers: Vec<String>,
}

impl LoadSpec {
    pub fn new(url: impl Into<String>, rps: u32, duration: Duration) -> Self {
        Self {
            url: url.into(),
            rps,
            duration,
            interval: None,
            headers: Vec::new(),
        }
    }

    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = Some(every);
        self
    }

    pub fn header(mut self, h: &str) -> Self {
        self.headers.push(h.to_owned());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "load".to_owned(),
            format!("--url={}", self.url),
            format!("--rps={}", self.rps),
            format!("--duration={}ms", self.duration.as_millis()),
            format!(
                "--interval={}ms",
                self.interval.map_or(0, |i| i.as_millis())
            ),
        ];
        for h in &self.headers {
            a.push(format!("--header={h}"));
        }
        a
    }
}

/// The load client's summary (the fields the scenarios read).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    #[serde(default)]
    pub by_pod: BTreeMap<String, u64>,
    #[serde(default)]
    pub by_status: BTreeMap<String, u64>,
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub skipped: u64,
}

impl Summary {
    /// Answers from pods whose name starts with `prefix`.
    pub fn answers_from(&self, prefix: &str) -> u64 {
        self.by_pod
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// `n requests, ok, failed, p50/p99`: the figures every scenario prints.
    pub fn line(&self) -> String {
        format!(
            "{} requests, {} ok, {} failed (statuses {:?}, errors {:?}, skipped {}), p50 {:.1} ms, p99 {:.1} ms",
            self.requests,
            self.ok,
            self.failed,
            self.by_status,
            self.errors,
            self.skipped,
            self.p50_ms,
            self.p99_ms
        )
    }
}

/// One `--interval` window, stamped when its line reached the host.
#[derive(Debug, Clone)]
pub struct Window {
    pub seen: Instant,
    pub summary: Summary,
}

/// Everything a finished load printed.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub started: Instant,
    pub summary: Summary,
    pub windows: Vec<Window>,
}

impl LoadReport {
    /// When the last window holding an answer from `pod` reached the host.
    pub fn last_answer_from(&self, pod: &str) -> Option<Instant> {
        self.windows
            .iter()
            .filter(|w| w.summary.by_pod.get(pod).is_some_and(|n| *n > 0))
            .map(|w| w.seen)
            .max()
    }
}

#[derive(Debug, Deserialize)]
struct Line {
    kind: String,
    summary: Summary,
}

/// Parses one output line: `Some((is_summary, summary))` for the load client's JSON lines.
pub fn parse_line(line: &str) -> Option<(bool, Summary)> {
    let l: Line = serde_json::from_str(line.trim()).ok()?;
    match l.kind.as_str() {
        "summary" => Some((true, l.summary)),
        "interval" => Some((false, l.summary)),
        _ => None,
    }
}

/// A load running in a pod.
#[derive(Debug)]
pub struct RunningLoad {
    child: Child,
    started: Instant,
    what: String,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

/// Starts `spec` in `pod`'s `container` through `kubectl exec` (`kubectl` is a command
/// already pointed at the cluster).
pub fn start(
    mut kubectl: Command,
    ns: &str,
    pod: &str,
    container: &str,
    spec: &LoadSpec,
) -> Result<RunningLoad, ScenarioError> {
    let what = format!("load in {ns}/{pod} to {}", spec.url);
    kubectl
        .args([
            "-n",
            ns,
            "exec",
            pod,
            "-c",
            container,
            "--",
            "remora-demo-app",
        ])
        .args(spec.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = kubectl
        .spawn()
        .map_err(|e| ScenarioError::failed(format!("starting kubectl exec for the {what}: {e}")))?;
    let started = Instant::now();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take();
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        let Some(out) = stdout else { return };
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((Instant::now(), line));
        }
    });
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        })
    });
    Ok(RunningLoad {
        child,
        started,
        what,
        lines,
        reader: Some(reader),
        stderr,
    })
}

impl RunningLoad {
    /// When the `kubectl exec` was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits for the load to end and parses what it printed.
    pub fn finish(mut self) -> Result<LoadReport, ScenarioError> {
        let status = self
            .child
            .wait()
            .map_err(|e| ScenarioError::failed(format!("waiting for the {}: {e}", self.what)))?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(PoisonError::into_inner));
        let mut windows = Vec::new();
        let mut summary = None;
        for (seen, line) in &lines {
            match parse_line(line) {
                Some((true, s)) => summary = Some(s),
                Some((false, s)) => windows.push(Window {
                    seen: *seen,
                    summary: s,
                }),
                None => {}
            }
        }
        let Some(summary) = summary else {
            let out: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
            return Err(ScenarioError::failed(format!(
                "the {} ended ({status}) without a JSON summary; stdout:\n{}\nstderr:\n{stderr}",
                self.what,
                out.join("\n")
            )));
        };
        Ok(LoadReport {
            started: self.started,
            summary,
            windows,
        })
    }
}

impl Drop for RunningLoad {
    fn drop(&mut self) {
        // A scenario that failed half-way must not leave kubectl running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `spec` to the end.
pub fn run(
    kubectl: Command,
    ns: &str,
    pod: &str,
    container: &str,
    spec: &LoadSpec,
) -> Result<LoadReport, ScenarioError> {
    start(kubectl, ns, pod, container, spec)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_apps_json_lines_parse() {
        let interval = r#"{"kind":"interval","t":0.25,"summary":{"requests":25,"ok":25,"failed":0,"success_rate":100.0,"p50_ms":1.2,"p90_ms":2.0,"p99_ms":3.1,"max_ms":4.0,"by_pod":{"reviews-v1-a":20,"reviews-v2-b":5},"by_status":{"200":25},"errors":{},"skipped":0}}"#;
        let (is_summary, s) = parse_line(interval).expect("interval");
        assert!(!is_summary);
        assert_eq!(s.answers_from("reviews-v1-"), 20);
        assert_eq!(s.by_status["200"], 25);
        let summary = r#"{"kind":"summary","url":"http://x","seconds":1.0,"summary":{"requests":2,"ok":1,"failed":1,"success_rate":50.0,"p50_ms":1.0,"p90_ms":1.0,"p99_ms":1.0,"max_ms":1.0,"by_pod":{},"by_status":{"200":1},"errors":{"connect":1},"skipped":0}}"#;
        let (is_summary, s) = parse_line(summary).expect("summary");
        assert!(is_summary);
        assert_eq!((s.ok, s.failed), (1, 1));
        assert!(s.line().contains("1 failed"), "{}", s.line());
        assert!(parse_line("[  0.2s] 25 ok").is_none());
        assert!(parse_line(r#"{"kind":"other","summary":{}}"#).is_none());
    }

    #[test]
    fn the_last_answer_of_a_pod_is_its_last_window_with_answers() {
        let t0 = Instant::now();
        let window = |ms: u64, pod: &str, n: u64| Window {
            seen: t0 + Duration::from_millis(ms),
            summary: Summary {
                by_pod: BTreeMap::from([(pod.to_owned(), n)]),
                ..Summary::default()
            },
        };
        let report = LoadReport {
            started: t0,
            summary: Summary::default(),
            windows: vec![
                window(250, "a", 3),
                window(500, "a", 1),
                window(750, "a", 0),
                window(1000, "b", 4),
            ],
        };
        assert_eq!(
            report.last_answer_from("a"),
            Some(t0 + Duration::from_millis(500))
        );
        assert_eq!(report.last_answer_from("c"), None);
    }

    #[test]
    fn the_spec_becomes_the_load_subcommands_flags() {
        let a = LoadSpec::new(
            "http://10.96.0.5:9080/api/reviews",
            50,
            Duration::from_secs(3),
        )
        .interval(Duration::from_millis(250))
        .header("x-canary: true")
        .args();
        assert_eq!(
            a,
            [
                "load",
                "--url=http://10.96.0.5:9080/api/reviews",
                "--rps=50",
                "--duration=3000ms",
                "--interval=250ms",
                "--header=x-canary: true"
            ]
        );
    }
}
