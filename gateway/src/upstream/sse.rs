//! Reads an upstream's Server-Sent Events answer incrementally: bytes in, the
//! `data:` payload of each complete event out. Only what OpenAI-compatible
//! servers send is handled (`data:` lines, comments, blank-line separators).

/// Buffers bytes until whole lines arrive; never holds more than one
/// incomplete line plus the current event.
#[derive(Default)]
pub struct SseReader {
    buffer: Vec<u8>,
    data: String,
}

/// Longest line accepted from an upstream (a chunk of one token is ~300 bytes); past it the answer is refused
/// rather than buffered without bound.
pub const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SseError {
    #[error("an upstream event line exceeds {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("an upstream event is not UTF-8")]
    NotUtf8,
}

impl SseReader {
    /// Feeds `bytes`; returns the payloads of the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = std::str::from_utf8(&line).map_err(|_| SseError::NotUtf8)?;
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(std::mem::take(&mut self.data));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
            // `event:`, `id:`, `retry:` and `:` comments carry nothing an OpenAI stream needs.
        }
        if self.buffer.len() > MAX_LINE_BYTES {
            return Err(SseError::LineTooLong);
        }
        Ok(events)
    }

    /// The last event when the body ended without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buffer);
        if let Ok(line) = std::str::from_utf8(&rest)
            && let Some(value) = line.trim_end().strip_prefix("data:")
        {
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(value.trim_start());
        }
        (!self.data.is_empty()).then(|| std::mem::take(&mut self.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_come_out_whole_and_in_order() {
        let mut reader = SseReader::default();
        assert_eq!(reader.push(b"data: {\"a\"").unwrap(), Vec::<String>::new());
        assert_eq!(reader.push(b":1}\r\n\r\n: keep-alive\n\ndata: [DO").unwrap(), vec!["{\"a\":1}"]);
        assert_eq!(reader.push(b"NE]\n\n").unwrap(), vec!["[DONE]"]);
        assert_eq!(reader.finish(), None);
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_kept_and_bad_input_is_refused() {
        let mut reader = SseReader::default();
        assert!(reader.push(b"data: x").unwrap().is_empty());
        assert_eq!(reader.finish().as_deref(), Some("x"));
        assert_eq!(reader.push(&[b'd', 0xff, b'\n']), Err(SseError::NotUtf8));
        let mut reader = SseReader::default();
        assert_eq!(reader.push(&vec![b'a'; MAX_LINE_BYTES + 1]), Err(SseError::LineTooLong));
    }
}
