//! The last lines a task printed, kept for the places people look when a release fails: the JSON
//! report's `output_tail`, the `release failed` log line, the Slack message and the JUnit file.
//!
//! The output pumps feed every byte they forward; this keeps only the last `limit` lines of stdout
//! and stderr merged in arrival order, each cut at [`MAX_LINE`] bytes, so memory stays bounded
//! whatever the task prints. Rendering decodes lossily, removes terminal escapes (colours, cursor
//! moves; a `\r`-redrawn progress line keeps what a terminal would show last) and hides secrets:
//! the values of secret-looking variables and the credentials of URLs.

use std::collections::VecDeque;

use crate::redact;

/// The longest line kept, in bytes; a longer one is cut and marked with `…`.
pub const MAX_LINE: usize = 1024;

/// The last lines of one task's output.
#[derive(Debug, Default)]
pub struct Tail {
    limit: usize,
    lines: VecDeque<Vec<u8>>,
    /// The unfinished last line of stdout (0) and stderr (1), with whether it was cut.
    partial: [(Vec<u8>, bool); 2],
}

impl Tail {
    /// Keeps the last `limit` lines (none when `limit` is 0).
    #[must_use]
    pub fn new(limit: usize) -> Tail {
        Tail {
            limit,
            ..Tail::default()
        }
    }

    /// Takes bytes of stream 0 (stdout) or 1 (stderr), as they arrive.
    ///
    /// Only the chunk's last `limit` lines can still be kept, so it is scanned from its end, and a
    /// line that leaves the ring lends its buffer to the next: a task that prints millions of lines
    /// costs a search for a few newlines per chunk, not a copy and an allocation per line.
    pub fn feed(&mut self, stream: usize, bytes: &[u8]) {
        if self.limit == 0 {
            return;
        }
        let stream = stream.min(1);
        let Some(last) = memchr::memrchr(b'\n', bytes) else {
            self.extend_partial(stream, bytes);
            return;
        };
        // `complete` is one or more lines; its first one continues the unfinished line.
        let (complete, rest) = (&bytes[..last], &bytes[last + 1..]);
        let start = memchr::memrchr_iter(b'\n', complete)
            .nth(self.limit - 1)
            .map(|newline| newline + 1);
        if let Some(start) = start {
            // At least `limit` lines end here: they push out everything before, the unfinished
            // line of this stream included.
            self.partial[stream].0.clear();
            self.partial[stream].1 = false;
            for line in complete[start..].split(|&b| b == b'\n') {
                self.push_line(line, false);
            }
        } else {
            let mut lines = complete.split(|&b| b == b'\n');
            if let Some(first) = lines.next() {
                self.extend_partial(stream, first);
                self.end_line(stream);
            }
            for line in lines {
                self.push_line(line, false);
            }
        }
        self.extend_partial(stream, rest);
    }

    /// Adds to the unfinished line of `stream`, up to [`MAX_LINE`] bytes.
    fn extend_partial(&mut self, stream: usize, bytes: &[u8]) {
        let (partial, cut) = &mut self.partial[stream];
        let room = MAX_LINE.saturating_sub(partial.len());
        partial.extend_from_slice(&bytes[..bytes.len().min(room)]);
        *cut |= bytes.len() > room;
    }

    /// Ends both streams: an unfinished last line counts as a line.
    pub fn finish(&mut self) {
        for stream in 0..2 {
            if !self.partial[stream].0.is_empty() {
                self.end_line(stream);
            }
        }
    }

    fn end_line(&mut self, stream: usize) {
        let (partial, cut) = &mut self.partial[stream];
        let was_cut = std::mem::take(cut);
        let line = std::mem::take(partial);
        self.push_owned(line, was_cut);
    }

    /// Keeps `line` (cut at [`MAX_LINE`]), reusing the buffer of the line it pushes out.
    fn push_line(&mut self, line: &[u8], cut: bool) {
        let mut buf = if self.lines.len() == self.limit {
            self.lines.pop_front().unwrap_or_default()
        } else {
            Vec::new()
        };
        buf.clear();
        buf.extend_from_slice(&line[..line.len().min(MAX_LINE)]);
        self.push_owned(buf, cut || line.len() > MAX_LINE);
    }

    fn push_owned(&mut self, mut line: Vec<u8>, cut: bool) {
        if cut {
            line.extend_from_slice("…".as_bytes());
        }
        if self.lines.len() == self.limit {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The kept lines as text that is safe to show: lossily decoded, without terminal escapes, with
    /// every value in `secrets` (of four characters or more) and every URL credential hidden.
    #[must_use]
    pub fn render(&self, secrets: &[String]) -> Vec<String> {
        self.lines
            .iter()
            .map(|line| {
                let text = printable(&String::from_utf8_lossy(line));
                // A line cut at MAX_LINE may end in the first part of a secret or of a URL, which
                // neither `scrub` nor `urls_in` would know for one: that part is left out.
                let current = crate::secrets::current();
                let (text, cut) = match text.strip_suffix('…') {
                    Some(kept) => (
                        without_cut_secret(without_cut_secret(kept, secrets), current.needles()),
                        "…",
                    ),
                    None => (text.as_str(), ""),
                };
                let text = redact::urls_in(&redact::scrub(text, secrets));
                current.mask(&text).into_owned() + cut
            })
            .collect()
    }
}

/// `text` without what may be the start of a secret cut off at its end: the longest beginning of
/// any of `secrets` that it ends with, and then a last word that holds `://` (a URL whose `@` was
/// cut off would read as a host).
fn without_cut_secret<'a>(text: &'a str, secrets: &[String]) -> &'a str {
    let mut end = text.len();
    for secret in secrets {
        let longest = (1..secret.len())
            .rev()
            .filter(|&k| secret.is_char_boundary(k))
            .find(|&k| text[..end].ends_with(&secret[..k]));
        if let Some(k) = longest {
            end -= k;
        }
    }
    let word = text[..end]
        .rfind(char::is_whitespace)
        .map_or(0, |at| at + 1);
    if text[word..end].contains("://") {
        end = word;
    }
    &text[..end]
}

/// The values to hide in shown output: those of variables whose names look secret (four characters
/// or more, as `redact::scrub` needs), from an environment snapshot or a task's own `env`.
pub fn secrets<'a>(vars: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<String> {
    vars.filter(|(name, value)| redact::is_secret_name(name) && value.len() >= 4)
        .map(|(_, value)| value.clone())
        .collect()
}

/// What a terminal would show of `line`: escape sequences (CSI such as colours, OSC such as titles
/// and hyperlinks, and two-byte ones) removed, the text after the last carriage return kept, and
/// other control characters but tab dropped.
#[must_use]
pub fn printable(line: &str) -> String {
    let line = line.trim_end_matches('\r');
    let line = line.rsplit('\r').next().unwrap_or(line);
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC (and DCS, APC, PM, SOS): up to BEL or ESC \.
                Some(']' | 'P' | '_' | '^' | 'X') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                // Others: intermediates (space to `/`) then one final byte, as `ESC ( B`.
                Some(' '..='/') => {
                    for c in chars.by_ref() {
                        if !(' '..='/').contains(&c) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_of_both_streams_in_arrival_order() {
        let mut tail = Tail::new(3);
        tail.feed(0, b"one\ntw");
        tail.feed(1, b"err1\n");
        tail.feed(0, b"o\nthree\nfour");
        tail.finish();
        assert_eq!(tail.render(&[]), ["two", "three", "four"]);
        // Below the limit everything is kept; a limit of 0 keeps nothing.
        let mut tail = Tail::new(5);
        tail.feed(1, b"a\n\nb\n");
        assert_eq!(tail.render(&[]), ["a", "", "b"]);
        let mut none = Tail::new(0);
        none.feed(0, b"a\n");
        none.finish();
        assert!(none.render(&[]).is_empty());
    }

    #[test]
    fn long_lines_are_cut_and_memory_stays_bounded() {
        let mut tail = Tail::new(2);
        for _ in 0..100 {
            tail.feed(0, &[b'x'; 10_000]);
        }
        tail.feed(0, b"\nshort\n");
        let lines = tail.render(&[]);
        // Many lines in one chunk: only the last ones are kept, in order.
        let mut many = Tail::new(3);
        let chunk: Vec<u8> = (0..10_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        many.feed(1, b"partial start ");
        many.feed(1, &chunk);
        assert_eq!(many.render(&[]), ["line 9997", "line 9998", "line 9999"]);
        let mut few = Tail::new(3);
        few.feed(0, b"partial start ");
        few.feed(0, b"end\nnext\nrest");
        few.finish();
        assert_eq!(few.render(&[]), ["partial start end", "next", "rest"]);
        assert_eq!(lines[0].len(), MAX_LINE + "…".len());
        assert!(lines[0].ends_with('…'));
        assert_eq!(lines[1], "short");
        assert!(tail.partial[0].0.capacity() <= 4 * MAX_LINE);
    }

    #[test]
    fn a_line_of_exactly_the_maximum_is_not_marked_cut() {
        let mut tail = Tail::new(2);
        tail.feed(0, &[b'y'; MAX_LINE]);
        tail.feed(0, b"\n");
        tail.feed(1, &[b'z'; MAX_LINE + 1]);
        tail.finish();
        let lines = tail.render(&[]);
        assert_eq!(lines[0], "y".repeat(MAX_LINE));
        assert_eq!(lines[1], "z".repeat(MAX_LINE) + "…");
    }

    #[test]
    fn secrets_are_the_values_of_secret_looking_variables() {
        let vars = [
            ("API_TOKEN".to_owned(), "tok-123456".to_owned()),
            ("DATABASE_URL".to_owned(), "postgres://u:p@h/db".to_owned()),
            ("SECRET_KEY".to_owned(), "abc".to_owned()),
            ("PATH".to_owned(), "/usr/bin".to_owned()),
        ];
        assert_eq!(
            secrets(vars.iter().map(|(k, v)| (k, v))),
            ["tok-123456", "postgres://u:p@h/db"]
        );
    }

    #[test]
    fn a_secret_or_url_cut_at_the_line_limit_is_not_shown_in_part() {
        let secret = "hunter2hunter2".to_owned();
        let mut tail = Tail::new(3);
        tail.feed(
            0,
            format!("{}pw={secret}\n", "y".repeat(MAX_LINE - 8)).as_bytes(),
        );
        tail.feed(
            0,
            format!(
                "{} postgres://admin:supersecretpw@db/app\n",
                "x".repeat(MAX_LINE - 30)
            )
            .as_bytes(),
        );
        tail.feed(0, b"pw=hunter2hunter2 and https://u:p@h/x\n");
        let lines = tail.render(&[secret]);
        assert!(lines[0].ends_with("pw=…"), "{}", lines[0]);
        assert!(lines[1].ends_with("x …"), "{}", lines[1]);
        assert!(!lines[1].contains("admin"), "{}", lines[1]);
        assert_eq!(
            lines[2],
            "pw=[redacted] and https://[redacted]@h/[redacted]"
        );
    }

    #[test]
    fn renders_what_a_terminal_shows_without_secrets() {
        let mut tail = Tail::new(10);
        tail.feed(
            0,
            b"\x1b[31mPG::UndefinedColumn\x1b[0m: column \"x\" does not exist\n\
              \x1b]8;;http://x\x07link\x1b]8;;\x07 \x1b(Bok\n\
              10%\r50%\r100%\r\n\
              password=hunter2-secret \xff\n\
              postgres://admin:Pw-x@db.internal/app failed\n",
        );
        let secrets = vec!["hunter2-secret".to_owned()];
        assert_eq!(
            tail.render(&secrets),
            [
                "PG::UndefinedColumn: column \"x\" does not exist",
                "link ok",
                "100%",
                "password=[redacted] \u{fffd}",
                "postgres://[redacted]@db.internal/[redacted] failed",
            ]
        );
    }
}
