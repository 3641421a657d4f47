//! Helpers shared by the fuzz targets: an in-memory runtime for the async parsers, a
//! reader that hands out its bytes in small chunks, and input splitting.

use std::{
    cell::RefCell,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime"),
    );
}

/// Runs `f` to completion on a runtime kept for the whole fuzzing run (building one per
/// input would dominate the cost of an execution).
pub fn block_on<F: Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.borrow().block_on(f))
}

/// An [`AsyncRead`] over `data` that returns at most `chunk` bytes per read, then EOF.
#[derive(Debug)]
pub struct ChunkedReader<'a> {
    data: &'a [u8],
    chunk: usize,
}

pub fn chunked_reader(data: &[u8], chunk: usize) -> ChunkedReader<'_> {
    ChunkedReader {
        data,
        chunk: chunk.max(1),
    }
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// Splits `data` at the first `sep`: what comes before and after (empty when absent).
pub fn split_once<'a>(data: &'a [u8], sep: &[u8]) -> (&'a [u8], &'a [u8]) {
    match data.windows(sep.len()).position(|w| w == sep) {
        Some(i) => (&data[..i], &data[i + sep.len()..]),
        None => (data, &[]),
    }
}
