//! The breaker's tests: limits, the state machine and the rolling window, on an injected
//! clock.

use super::*;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn limits(conns: u32, pending: u32, requests: u32) -> Arc<Breaker> {
    Arc::new(Breaker::new(
        BreakerConfig::from_policy(&CircuitBreaker {
            max_connections: Some(conns),
            max_pending_requests: Some(pending),
            max_requests: Some(requests),
            error_rate_percent: None,
            window: None,
            min_requests: None,
            open_for: None,
        }),
        Instant::now(),
    ))
}

fn error_rate(percent: u32, min_requests: u32, t0: Instant) -> Arc<Breaker> {
    let d = remora_crds::duration::Duration::from_secs;
    Arc::new(Breaker::new(
        BreakerConfig::from_policy(&CircuitBreaker {
            max_connections: None,
            max_pending_requests: None,
            max_requests: None,
            error_rate_percent: Some(percent),
            window: Some(d(10)),
            min_requests: Some(min_requests),
            open_for: Some(d(5)),
        }),
        t0,
    ))
}

#[test]
fn concurrency_limits_overflow_and_free_on_drop() {
    let b = limits(2, 0, 3);
    let now = Instant::now();
    let c1 = b.connection().expect("1st");
    let _c2 = b.connection().expect("2nd");
    assert_eq!(b.connection().map(|_| ()), Err(Overflow::Connections(2)));
    drop(c1);
    let _c3 = b.connection().expect("a slot was freed");
    assert_eq!(
        b.pending_request().map(|_| ()),
        Err(Overflow::PendingRequests(0))
    );
    let r: Vec<Admission> = (0..3).map(|_| b.admit(now).expect("admitted")).collect();
    let err = b.admit(now).map(|_| ()).expect_err("4th request");
    assert_eq!(err, Rejected::Overflow(Overflow::Requests(3)));
    assert_eq!(err.header_value(), "max-requests");
    assert_eq!(err.retry_after(), None);
    assert_eq!(err.to_string(), "circuit breaker: maxRequests (3) reached");
    let st = b.stats();
    assert_eq!((st.connections, st.requests), (2, 3));
    assert_eq!(
        (
            st.connection_overflows,
            st.pending_overflows,
            st.request_overflows
        ),
        (1, 1, 1)
    );
    drop(r);
    assert_eq!(b.stats().requests, 0);
    assert!(b.admit(now).is_ok());
    assert_eq!(
        b.state(now),
        State::Closed,
        "no error-rate breaker: always closed"
    );
}

#[test]
fn opens_fast_fails_half_opens_and_closes() {
    let t0 = Instant::now();
    let b = error_rate(50, 10, t0);
    let run = |b: &Arc<Breaker>, n: usize, outcome: Outcome, at: Instant| {
        for _ in 0..n {
            b.admit(at).expect("admitted").finish(outcome, at);
        }
    };
    // 9 failures: below the minimum request count, stays closed.
    run(&b, 9, Outcome::Response(503), t0);
    assert_eq!(b.state(t0), State::Closed);
    // The 10th request fails too: 100 % ≥ 50 % of ≥ 10 requests: open.
    run(&b, 1, Outcome::Reset, t0 + secs(1));
    assert_eq!(
        b.state(t0 + secs(1)),
        State::Open {
            until: b.base + secs(6)
        }
    );
    let err = b.admit(t0 + secs(2)).map(|_| ()).expect_err("open");
    assert_eq!(err.header_value(), "circuit-open");
    assert_eq!(err.retry_after(), Some(secs(4)));
    assert_eq!(retry_after_secs(secs(4)), 4);
    // After openFor: half-open, one probe at a time.
    let t = t0 + secs(6);
    assert_eq!(b.state(t), State::HalfOpen);
    let probe = b.admit(t).expect("a probe");
    assert_eq!(
        b.admit(t).map(|_| ()),
        Err(Rejected::Open {
            retry_after: PROBE_RETRY_AFTER
        })
    );
    // A failed probe opens it again.
    probe.finish(Outcome::Response(500), t);
    assert!(matches!(b.state(t), State::Open { .. }));
    assert!(b.admit(t + secs(4)).is_err());
    // Next time the probes succeed: closed after PROBES_TO_CLOSE of them.
    let t = t + secs(5);
    for i in 0..PROBES_TO_CLOSE {
        assert_eq!(b.state(t), State::HalfOpen, "probe {i}");
        b.admit(t).expect("probe").finish(Outcome::Response(200), t);
    }
    assert_eq!(b.state(t), State::Closed);
    // The window restarted empty: 9 failures do not reopen it.
    run(&b, 9, Outcome::Timeout, t);
    assert_eq!(b.state(t), State::Closed);
    let st = b.stats();
    assert_eq!((st.opened, st.rejected_open), (2, 3));
}

#[test]
fn a_cancelled_probe_frees_its_slot() {
    let t0 = Instant::now();
    let b = error_rate(0, 1, t0);
    b.admit(t0)
        .expect("admitted")
        .finish(Outcome::ConnectFailure, t0);
    let t = t0 + secs(5);
    drop(b.admit(t).expect("probe"));
    assert!(b.admit(t).is_ok(), "another request may probe");
}

#[test]
fn the_rate_is_over_the_window_only() {
    let t0 = Instant::now();
    let b = error_rate(50, 10, t0);
    for i in 0..20u64 {
        // 30 % failures over 10 s (never 50 % once 10 requests are in): stays closed.
        let at = t0 + Duration::from_millis(500 * i);
        let outcome = if i % 10 < 3 {
            Outcome::Response(502)
        } else {
            Outcome::Response(200)
        };
        b.admit(at).expect("closed").finish(outcome, at);
    }
    assert_eq!(b.state(t0 + secs(10)), State::Closed);
    // Old successes leave the window; failures now dominate it.
    let t = t0 + secs(25);
    for _ in 0..10 {
        b.admit(t)
            .expect("closed")
            .finish(Outcome::Response(503), t);
    }
    assert!(matches!(b.state(t), State::Open { .. }));
}

#[test]
fn rolling_counts_roll_and_saturate() {
    let t0 = Instant::now();
    let w = RollingCounts::new(secs(10), t0);
    w.add(t0, 3, 1);
    w.add(t0 + secs(5), 2, 2);
    assert_eq!(w.sum(t0 + secs(5)), (5, 3));
    assert_eq!(
        w.sum(t0 + Duration::from_millis(10_500)),
        (2, 2),
        "first bucket left"
    );
    assert_eq!(w.sum(t0 + secs(16)), (0, 0));
    w.add(t0 + secs(16), COUNT_MAX + 10, 0);
    assert_eq!(w.sum(t0 + secs(16)), (COUNT_MAX, 0));
    w.reset();
    assert_eq!(w.sum(t0 + secs(16)), (0, 0));
    // Many threads counting at once lose nothing.
    let w = RollingCounts::new(secs(10), t0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| (0..10_000).for_each(|_| w.add(t0, 1, 1)));
        }
    });
    assert_eq!(w.sum(t0), (40_000, 40_000));
}
