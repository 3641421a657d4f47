//! The live summary: a scrape every second, a frame rendered from it, until a signal or
//! the end of `--duration`; then the last frame's check.

use std::{
    collections::VecDeque,
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use kube::Client;

use crate::{
    DemoError,
    render::render,
    scrape::{Snapshot, scrape},
    signals::Shutdown,
    summary::{Frame, WINDOW},
};

const PERIOD: Duration = Duration::from_secs(1);

/// What the summary shows and how it ends.
#[allow(missing_debug_implementations)] // kube::Client is not Debug
pub struct Live<'a> {
    pub client: Client,
    pub namespace: &'a str,
    pub title: String,
    pub footer: String,
    pub duration: Option<Duration>,
}

/// Shows frames until a signal or the duration's end; the last frame's check line, or
/// what it found missing.
pub async fn run(
    live: Live<'_>,
    shutdown: &mut Shutdown,
    memory: impl Fn() -> Option<u64>,
) -> Result<String, DemoError> {
    let started = Instant::now();
    let end = live.duration.map(|d| tokio::time::Instant::now() + d);
    let tty = std::io::stdout().is_terminal();
    let first = scrape(&live.client, live.namespace, started).await;
    let mut recent: VecDeque<Snapshot> = VecDeque::from([first.clone()]);
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut shown = 0u64;
    loop {
        let until_end = async {
            match end {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = until_end => break,
            _ = shutdown.wait() => break,
        }
        let snap = scrape(&live.client, live.namespace, started).await;
        let horizon = snap.t - WINDOW - 2.0 * PERIOD.as_secs_f64();
        recent.push_back(snap);
        while recent.len() > 2 && recent.get(1).is_some_and(|s| s.t <= horizon) {
            recent.pop_front();
        }
        let Some(frame) = Frame::compute(&first, recent.make_contiguous(), memory()) else {
            continue;
        };
        let text = render(&frame, &live.title, &live.footer);
        let mut out = std::io::stdout().lock();
        // A terminal gets the frame in place; a log gets every frame, one after another.
        let _ = if tty {
            write!(out, "\x1b[H\x1b[2J{text}")
        } else {
            writeln!(out, "{text}")
        };
        let _ = out.flush();
        shown += 1;
    }
    let last = Frame::compute(&first, recent.make_contiguous(), memory())
        .ok_or_else(|| DemoError::Check(vec!["no scrape of the mesh".to_owned()]))?;
    if shown == 0 {
        println!("{}", render(&last, &live.title, &live.footer));
    }
    last.check().map_err(DemoError::Check)
}
