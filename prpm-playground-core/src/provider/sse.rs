//! A server-sent events decoder (the `text/event-stream` format): bytes in, events out.

/// One event: its `event:` name (empty when none was given) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Largest event accepted; a longer one is a malformed stream (bounds the buffer).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Decodes events from chunks as they arrive, whatever the chunk boundaries.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
    started: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    /// Feeds a chunk; returns the events it completed. Errors on an over-long event or bad UTF-8.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(chunk);
        if !self.started && self.buf.len() >= 3 {
            // A leading byte-order mark is not part of the first line.
            self.started = true;
            if self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
                self.scanned = 0;
            }
        }
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start.max(self.scanned)..].iter().position(|&b| b == b'\n').map(|i| i + start.max(self.scanned) - start) {
            let end = start + nl;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = std::str::from_utf8(line).map_err(|_| "event stream is not UTF-8".to_string())?.to_owned();
            start = end + 1;
            if let Some(e) = self.line(&line) {
                out.push(e);
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(format!("an event is longer than {MAX_EVENT_BYTES} bytes"));
        }
        Ok(out)
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if !self.has_data {
                self.event.clear();
                return None;
            }
            self.has_data = false;
            return Some(SseEvent { event: std::mem::take(&mut self.event), data: std::mem::take(&mut self.data) });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere() {
        let text = b"event: message_start\ndata: {\"a\":1}\n\n: comment\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut d = SseDecoder::default();
            let mut events = d.feed(&text[..split]).unwrap();
            events.extend(d.feed(&text[split..]).unwrap());
            assert_eq!(
                events,
                vec![
                    SseEvent { event: "message_start".into(), data: "{\"a\":1}".into() },
                    SseEvent { event: String::new(), data: "one\ntwo".into() },
                    SseEvent { event: String::new(), data: "[DONE]".into() },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn multibyte_text_and_a_byte_order_mark_split_anywhere() {
        let text = "\u{feff}data: {\"t\":\"héllo 日本 🎉\"}\r\n\r\ndata: 二\n\n".as_bytes();
        for split in 0..text.len() {
            for split2 in split..text.len() {
                let mut d = SseDecoder::default();
                let mut events = d.feed(&text[..split]).unwrap();
                events.extend(d.feed(&text[split..split2]).unwrap());
                events.extend(d.feed(&text[split2..]).unwrap());
                let data: Vec<_> = events.into_iter().map(|e| e.data).collect();
                assert_eq!(data, ["{\"t\":\"héllo 日本 🎉\"}", "二"], "split at {split}/{split2}");
            }
        }
    }

    #[test]
    fn over_long_events_are_refused() {
        let mut d = SseDecoder::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(d.feed(b"data: ").is_ok());
        assert!(d.feed(&big).is_err());
    }
}
