//! The bounds the HTTP server puts on what one client can hold: slow bodies, unread
//! responses and HTTP/2 streams. (The head is bounded by `Settings::header_read_timeout`
//! and `Settings::max_header_bytes`.) Defaults and their reasons are in DESIGN.md.

use std::time::Duration;

/// Per-connection and per-request limits of the HTTP server.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A request body that sends nothing for this long while the proxy waits for it is
    /// cut off: 408 when no response has started (`--body-idle-timeout`).
    pub body_idle_timeout: Duration,
    /// A client whose connection takes none of the proxy's writes for this long is
    /// disconnected (`--write-stall-timeout`).
    pub write_stall_timeout: Duration,
    /// HTTP/2 streams one client may have open at once; more are refused
    /// (`--h2-max-concurrent-streams`).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the proxy accepted them (rapid reset,
    /// CVE-2023-44487); one more and the connection gets GOAWAY.
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the proxy may reset for a client's errors (refused streams,
    /// malformed requests) before the connection gets GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
    /// Response bytes buffered per HTTP/2 stream while the client's window is closed.
    pub h2_max_send_buf_size: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            // Envoy's stream idle timeout: long-lived gRPC streams pause, but not this long.
            body_idle_timeout: Duration::from_secs(300),
            write_stall_timeout: Duration::from_secs(60),
            // hyper's default, made explicit: a client needing more opens a connection.
            h2_max_concurrent_streams: 200,
            // h2's defaults, explicit so they are documented and tested.
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
            h2_max_send_buf_size: 400 * 1024,
        }
    }
}
