//! Inputs the fuzz targets (`fuzz/`) found wrong, kept as plain tests.

use remora_webhook::annotations::{format_duration, parse_duration};

/// `fuzz/corpus/annotations`: `shutdown-grace-period: 999999999h` was accepted and written
/// to the proxy as `3599999996400s`, which the proxy's parser (9 digits per group)
/// refuses, so the proxy could not start.
#[test]
fn a_long_accepted_duration_is_written_so_the_proxy_reads_it_back() {
    for text in [
        "999999999h",
        "999999999s1ms",
        "999999999h999999999h59m59s999ms",
        "90s",
        "250ms",
    ] {
        let d = parse_duration(text).expect("the webhook accepts it");
        let written = format_duration(d);
        let read: remora_crds::duration::Duration = written
            .parse()
            .unwrap_or_else(|e| panic!("{text:?} written as {written:?}: {e}"));
        assert_eq!(read.get(), d, "{text:?} written as {written:?}");
    }
    assert_eq!(format_duration(parse_duration("90s").expect("90s")), "90s");
}
