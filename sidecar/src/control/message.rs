//! The stream's framing (docs/stream.md): ndjson, one message per line. The messages are
//! the shared wire types ([`remora_crds::wire`]); what one does to the served config is
//! decided by `subscriptions` and `assemble`.

use bytes::{Buf as _, BytesMut};

/// Longest line accepted (an outbound piece with many endpoints is a few hundred KiB).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// One message of a watch stream, each piece parsed on its own (the shared wire type,
/// [`remora_crds::wire::Message`]).
pub use remora_crds::wire::ReceivedMessage as Message;

/// Why the line splitter gave up on a stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a stream line exceeds {MAX_LINE} bytes")]
pub struct LineTooLong;

/// Splits a byte stream into lines across arbitrary chunk boundaries.
#[derive(Debug, Default)]
pub struct Lines {
    buf: BytesMut,
}

impl Lines {
    /// Adds a chunk and returns the complete, non-blank lines it finished.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<BytesMut>, LineTooLong> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line = self.buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(line);
            }
        }
        if self.buf.len() > MAX_LINE {
            self.buf.advance(self.buf.len());
            return Err(LineTooLong);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_survive_any_chunking() {
        let text = b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\":3}\n";
        for split in 0..text.len() {
            let mut lines = Lines::default();
            let mut got = lines.push(&text[..split]).expect("fits");
            got.extend(lines.push(&text[split..]).expect("fits"));
            let got: Vec<&[u8]> = got.iter().map(|l| &l[..]).collect();
            assert_eq!(
                got,
                [&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"],
                "split at {split}"
            );
        }
        let mut lines = Lines::default();
        assert!(lines.push(b"partial").expect("fits").is_empty());
    }
}
