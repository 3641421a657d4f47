//! Out of file descriptors (EMFILE), the accept loop backs off instead of spinning, counts
//! the event (`remora_proxy_accept_errors_total{reason="emfile"}`), and serves again as
//! soon as descriptors are free. The proxy runs in this process, whose descriptor limit
//! the test lowers with util-linux's `prlimit` (one test per binary: the limit is the
//! process's), then exhausts, while it measures the process's CPU time from
//! `/proc/self/stat`.

mod abuse;
mod common;

use std::{
    fs::File,
    io::{Read, Write},
    process::Command,
    time::{Duration, Instant},
};

use abuse::{LOCAL, metric, plain_get, server};

/// User + system CPU time of this process, in seconds (clock ticks of 1/100 s), read
/// from `/proc/self/stat` opened beforehand (no descriptor is left to open it then).
fn cpu_seconds(stat: &File) -> f64 {
    let mut buf = vec![0u8; 4096];
    let n = std::os::unix::fs::FileExt::read_at(stat, &mut buf, 0).expect("/proc/self/stat");
    let stat = String::from_utf8_lossy(&buf[..n]);
    // Fields after the command name (which may hold spaces) start at state (field 3);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Sets this process's soft descriptor limit (the hard one stays).
fn set_nofile(soft: usize) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={soft}:"),
        ])
        .status()
        .expect("prlimit is required (apt-get install util-linux)");
    assert!(status.success(), "prlimit --nofile={soft}: failed");
}

const EMFILE: i32 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let s = server("  default: {mtls: Permissive}\n", |_| ()).await;
    let addr = s.proxy.inbound_addrs[0];
    assert_eq!(
        plain_get(LOCAL, addr).await.as_deref(),
        Ok("HTTP/1.1 200 OK")
    );

    let stat = File::open("/proc/self/stat").expect("/proc/self/stat");
    // Lower the limit a little above what is open, and take every descriptor left.
    set_nofile(open_fds() + 32);
    let mut hold = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => hold.push(f),
            Err(e) if e.raw_os_error() == Some(EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    // One descriptor for a client: its connection completes in the kernel and waits in
    // the listener's backlog, which the proxy cannot accept from.
    drop(hold.pop());
    let mut pending = std::net::TcpStream::connect(addr).expect("connect");
    let emfile = r#"remora_proxy_accept_errors_total{reason="emfile"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s.proxy, emfile) == 0 {
        assert!(Instant::now() < deadline, "no EMFILE counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (errors0, cpu0, t0) = (metric(&s.proxy, emfile), cpu_seconds(&stat), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (errors1, cpu1, wall) = (metric(&s.proxy, emfile), cpu_seconds(&stat), t0.elapsed());
    let share = (cpu1 - cpu0) / wall.as_secs_f64();
    let rate = (errors1 - errors0) as f64 / wall.as_secs_f64();

    // Descriptors come back: the waiting connection is accepted and served.
    drop(hold);
    pending
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    pending
        .write_all(b"GET /hello HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n")
        .expect("write");
    let mut out = Vec::new();
    let _ = pending.read_to_end(&mut out);
    let answer = String::from_utf8_lossy(&out);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "after recovery: {answer:?}"
    );
    assert_eq!(
        plain_get(LOCAL, addr).await.as_deref(),
        Ok("HTTP/1.1 200 OK")
    );
    println!(
        "EMFILE on the accept loop: {:.1} % of a core over {wall:?} ({rate:.0} accept attempts/s, backing off), {errors1} errors counted; the waiting connection was served once descriptors were free",
        share * 100.0
    );
    assert!(
        share < 0.2,
        "the accept loop used {:.0} % of a core while out of descriptors",
        share * 100.0
    );
    assert!(
        rate <= 110.0,
        "{rate} failed accepts per second: the loop does not back off"
    );
}
