//! Task output split into lines and rendered, as text after a `name | ` prefix or as JSON objects:
//! pure, no I/O and no clock of its own.
//!
//! [`Lines::render`] takes one thing that happened on a stream (a chunk read, a partial line that
//! waited long enough, the end) and returns the bytes to write for it, as slices for one `writev`;
//! that is the whole protocol, one call per event. Bytes stay bytes (no UTF-8 is assumed), nothing
//! is lost or altered, and memory is bounded for a line of any length: a partial line is held back
//! until its newline, for at most [`PARTIAL_FLUSH`] (a prompt like `Continue? [y/N]` must show while
//! its task hangs) and at most [`MAX_PENDING`] bytes; the rest of such a line follows unprefixed. A
//! stream that ends mid-line gets a newline, so the next line starts on its own.
//!
//! As JSON ([`OutputFormat::Json`]) each line is one object, `{"task":..,"stream":..,"line":..}`,
//! lossily decoded, with `"partial":true` on a piece that is not a whole line (a flushed prompt, a
//! piece of a line over 64 KiB): every line a log collector reads is then JSON. Only the rendering
//! of a batch differs; splitting and flushing are the same for both.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use super::pump::READ_SIZE;

/// How long a partial line may wait for the rest of it before it is written as it is.
pub const PARTIAL_FLUSH: Duration = Duration::from_millis(200);
/// The longest piece of one line held in memory; longer lines are written in pieces of this size.
pub const MAX_PENDING: usize = 64 * 1024;

/// How task output lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Each line as it is, after a `name | ` prefix
    #[default]
    Text,
    /// Each line as a JSON object: {"task", "stream", "line"}
    Json,
}

/// What happened on a stream, for [`Lines::render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// A chunk read from the stream.
    Data(&'a [u8]),
    /// The partial line is due ([`Lines::flush_due`]): write it as it is.
    Flush,
    /// The stream ended.
    End,
}

/// Where one piece of a batch comes from: the pieces of a batch, written in one `writev`, are whole
/// lines, so nothing is copied on the way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// The `name | ` prefix.
    Prefix,
    /// The partial line held from earlier chunks.
    Pending,
    /// `data[start..end]` of the chunk being rendered.
    Data(usize, usize),
    /// A newline added at the end of a stream that ended mid-line.
    Newline,
}

/// How the pieces of a batch are rendered.
#[derive(Debug)]
enum LineFormat {
    /// The bytes as they are, each line after the prefix.
    Text,
    /// One JSON object per line or piece of a line, rendered into `out`.
    Json {
        task: String,
        stream: &'static str,
        /// The bytes of the line being rendered.
        line: Vec<u8>,
        /// The batch's objects.
        out: Vec<u8>,
    },
}

/// One task output line in JSON.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    task: &'a str,
    stream: &'a str,
    line: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    partial: bool,
}

/// One stream split into lines: see the module's documentation.
#[derive(Debug)]
pub struct Lines {
    prefix: Vec<u8>,
    format: LineFormat,
    /// Whether the next byte written starts a line (and so gets the prefix).
    at_line_start: bool,
    /// The partial line held back.
    pending: Vec<u8>,
    /// Since when a partial line has been held back (in `pending`, or in `carry` when `pending`
    /// went out in the last batch).
    held_since: Option<Instant>,
    /// Whether the last batch included `pending`: it is emptied at the next call, when the slices
    /// that borrowed it have been written.
    pending_out: bool,
    /// The start of a new partial line that came in the batch that wrote `pending` out: it becomes
    /// `pending` at the next call.
    carry: Vec<u8>,
    pieces: Vec<Piece>,
}

impl Lines {
    /// Lines written as text, each after `prefix`.
    #[must_use]
    pub fn new(prefix: Vec<u8>) -> Self {
        Lines {
            prefix,
            format: LineFormat::Text,
            at_line_start: true,
            pending: Vec::new(),
            held_since: None,
            pending_out: false,
            carry: Vec::new(),
            pieces: Vec::new(),
        }
    }

    /// Lines written as JSON objects that name `task` and `stream` (`stdout` or `stderr`).
    #[must_use]
    pub fn json(task: &str, stream: &'static str) -> Self {
        Lines {
            format: LineFormat::Json {
                task: task.to_owned(),
                stream,
                line: Vec::new(),
                out: Vec::new(),
            },
            ..Lines::new(Vec::new())
        }
    }

    /// Lines of a task's `stream` in `format`. The task's name is what `prefix` (`NAME | `, padded
    /// for alignment) holds: task names have no spaces.
    #[must_use]
    pub fn with_format(format: OutputFormat, stream: &'static str, prefix: Vec<u8>) -> Self {
        match format {
            OutputFormat::Text => Lines::new(prefix),
            OutputFormat::Json => Lines::json(&task_of_prefix(&prefix), stream),
        }
    }

    /// The bytes to write for `input`, which happened at `now`: whole lines (and a partial line
    /// when it is due, too long, or the stream ended), for one `writev`. Empty when there is
    /// nothing to write yet.
    pub fn render<'a>(&'a mut self, input: Input<'a>, now: Instant) -> Vec<IoSlice<'a>> {
        self.settle();
        self.pieces.clear();
        let data = match input {
            Input::Data(data) => {
                self.split(data, now);
                data
            }
            Input::Flush => {
                self.flush();
                &[]
            }
            Input::End => {
                self.flush();
                if !self.at_line_start {
                    self.pieces.push(Piece::Newline);
                    self.at_line_start = true;
                }
                &[]
            }
        };
        self.slices(data)
    }

    /// When the held partial line is due to be written, if there is one.
    #[must_use]
    pub fn flush_due(&self) -> Option<Instant> {
        self.held_since.map(|t| t + PARTIAL_FLUSH)
    }

    /// Forgets what the last batch wrote out of `pending`; what was carried takes its place.
    fn settle(&mut self) {
        if self.pending_out {
            self.pending.clear();
            std::mem::swap(&mut self.pending, &mut self.carry);
            self.pending_out = false;
        }
        // After a batch of escapes or U+FFFDs (up to six bytes of JSON for one byte read), give back
        // what its JSON took beyond what a full read of plain text needs.
        if let LineFormat::Json { out, .. } = &mut self.format {
            if out.capacity() > 2 * (READ_SIZE + MAX_PENDING) {
                *out = Vec::new();
            }
        }
    }

    /// Every complete line in `data` (after the held partial line); the rest is held back, or
    /// written now if the partial line has grown to [`MAX_PENDING`].
    fn split(&mut self, data: &[u8], now: Instant) {
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &data[start..]) {
            let end = start + i + 1;
            self.start_line();
            if !self.pending.is_empty() && !self.pending_out {
                self.pieces.push(Piece::Pending);
                self.pending_out = true;
            }
            self.pieces.push(Piece::Data(start, end));
            self.at_line_start = true;
            start = end;
        }
        let rest = &data[start..];
        let held = if self.pending_out {
            0
        } else {
            self.pending.len()
        };
        if held + rest.len() >= MAX_PENDING {
            // Too long to hold: out now, in pieces of the line; the rest of it follows unprefixed.
            self.start_line();
            if held > 0 {
                self.pieces.push(Piece::Pending);
                self.pending_out = true;
            }
            self.pieces.push(Piece::Data(start, data.len()));
            self.held_since = None;
        } else if self.pending_out {
            // `pending` goes out in this batch: what starts the next partial line waits beside it.
            self.carry.extend_from_slice(rest);
            self.held_since = (!rest.is_empty()).then_some(now);
        } else if !rest.is_empty() {
            if self.pending.is_empty() {
                self.held_since = Some(now);
            }
            self.pending.extend_from_slice(rest);
        }
    }

    /// The held partial line, as it is; the rest of that line will follow unprefixed.
    fn flush(&mut self) {
        if !self.pending.is_empty() && !self.pending_out {
            self.start_line();
            self.pieces.push(Piece::Pending);
            self.pending_out = true;
        }
        self.held_since = None;
    }

    fn start_line(&mut self) {
        if self.at_line_start {
            self.pieces.push(Piece::Prefix);
            self.at_line_start = false;
        }
    }

    /// The bytes of the batch's pieces (`data` is the chunk they come from). As text, the pieces
    /// themselves; as JSON, one slice with an object per line, and per piece of a line that the
    /// batch ends in the middle of.
    fn slices<'a>(&'a mut self, data: &'a [u8]) -> Vec<IoSlice<'a>> {
        let Lines {
            prefix,
            format,
            pending,
            pieces,
            ..
        } = self;
        match format {
            LineFormat::Text => pieces
                .iter()
                .map(|piece| {
                    IoSlice::new(match *piece {
                        Piece::Prefix => prefix,
                        Piece::Pending => pending,
                        Piece::Data(start, end) => &data[start..end],
                        Piece::Newline => b"\n",
                    })
                })
                .collect(),
            LineFormat::Json {
                task,
                stream,
                line,
                out,
            } => {
                out.clear();
                for piece in pieces.iter() {
                    match *piece {
                        Piece::Prefix | Piece::Newline => {}
                        Piece::Pending => line.extend_from_slice(pending),
                        Piece::Data(start, end) => line.extend_from_slice(&data[start..end]),
                    }
                    // Data pieces are whole lines, but for the piece of a line too long to hold;
                    // Newline ends a stream that stopped mid-line.
                    let ends = matches!(piece, Piece::Newline)
                        || matches!(piece, Piece::Data(..)) && line.ends_with(b"\n");
                    if ends {
                        let text = line.strip_suffix(b"\n").unwrap_or(line);
                        // A Newline after a flushed partial line has nothing left to say.
                        if !(text.is_empty() && matches!(piece, Piece::Newline)) {
                            json_line(out, task, stream, text, false);
                        }
                        line.clear();
                    }
                }
                if !line.is_empty() {
                    json_line(out, task, stream, line, true);
                    line.clear();
                }
                if out.is_empty() {
                    Vec::new()
                } else {
                    vec![IoSlice::new(out)]
                }
            }
        }
    }
}

/// The task name in a text prefix, `NAME | ` padded with spaces for alignment.
fn task_of_prefix(prefix: &[u8]) -> String {
    let name = prefix
        .strip_suffix(b" | ")
        .unwrap_or(prefix)
        .trim_ascii_end();
    String::from_utf8_lossy(name).into_owned()
}

/// Appends `line` (lossily decoded) as one JSON object and a newline to `out`.
fn json_line(out: &mut Vec<u8>, task: &str, stream: &str, line: &[u8], partial: bool) {
    let object = JsonLine {
        task,
        stream,
        line: &String::from_utf8_lossy(line),
        partial,
    };
    // Serializing strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &object);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is written for `input` at `now`, as one byte string.
    fn one(lines: &mut Lines, input: Input<'_>, now: Instant) -> Vec<u8> {
        lines
            .render(input, now)
            .iter()
            .flat_map(|s| s.to_vec())
            .collect()
    }

    /// What is written for each chunk in turn, then (if `end`) for the end of the stream.
    fn each(lines: &mut Lines, chunks: &[&[u8]], end: bool) -> Vec<u8> {
        let now = Instant::now();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(one(lines, Input::Data(chunk), now));
        }
        if end {
            out.extend(one(lines, Input::End, now));
        }
        out
    }

    fn text(chunks: &[&[u8]]) -> Vec<u8> {
        each(&mut Lines::new(b"t | ".to_vec()), chunks, true)
    }

    #[test]
    fn each_chunk_writes_its_whole_lines_at_once() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let t0 = Instant::now();
        assert_eq!(one(&mut lines, Input::Data(b"a\nb"), t0), b"t | a\n");
        assert_eq!(one(&mut lines, Input::Data(b"c\n"), t0), b"t | bc\n");
        assert_eq!(one(&mut lines, Input::Data(b"\n"), t0), b"t | \n");
        assert_eq!(one(&mut lines, Input::Data(b"x"), t0), b"");
        assert_eq!(one(&mut lines, Input::Data(b"y\nz"), t0), b"t | xy\n");
        assert_eq!(one(&mut lines, Input::End, t0), b"t | z\n");
        assert_eq!(one(&mut lines, Input::End, t0), b"");
    }

    #[test]
    fn prefixes_each_line_once_across_chunks() {
        assert_eq!(text(&[b"a\nb", b"c\n", b"\n"]), b"t | a\nt | bc\nt | \n");
        assert_eq!(text(&[b"no newline"]), b"t | no newline\n");
        assert_eq!(text(&[b"x", b"y", b"z\nw"]), b"t | xyz\nt | w\n");
        assert_eq!(text(&[b""]), b"");
        assert_eq!(text(&[]), b"");
    }

    #[test]
    fn bytes_pass_through_unchanged() {
        let line: Vec<u8> = (0..=255u8).filter(|&b| b != b'\n').collect();
        let mut data = line.clone();
        data.extend_from_slice(b"\n\xff\xfe");
        let mut want = b"t | ".to_vec();
        want.extend_from_slice(&line);
        want.extend_from_slice(b"\nt | \xff\xfe\n");
        assert_eq!(text(&[&data]), want);
    }

    #[test]
    fn long_lines_are_bounded_and_continue_unprefixed() {
        let long = vec![b'x'; MAX_PENDING * 3 + 5];
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut out = Vec::new();
        for chunk in long.chunks(1000) {
            out.extend(each(&mut lines, &[chunk], false));
            assert!(lines.pending.len() < MAX_PENDING);
        }
        // Twice the line reached the limit within a chunk (66 of them) and went out.
        assert_eq!(out.len(), 4 + 2 * 66_000);
        out.extend(each(&mut lines, &[b"\nnext\n"], true));
        let mut want = b"t | ".to_vec();
        want.extend_from_slice(&long);
        want.extend_from_slice(b"\nt | next\n");
        assert_eq!(out, want);
    }

    #[test]
    fn a_line_over_the_limit_in_one_chunk_goes_out_with_it() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut chunk = b"a\n".to_vec();
        chunk.extend(vec![b'x'; MAX_PENDING]);
        let out = one(&mut lines, Input::Data(&chunk), Instant::now());
        assert_eq!(out.len(), 4 + chunk.len() + 4);
        assert_eq!(lines.flush_due(), None);
        assert_eq!(each(&mut lines, &[b"y\n"], true), b"y\n");
    }

    #[test]
    fn a_partial_line_is_due_a_flush_after_it_waited_its_time() {
        let mut lines = Lines::new(b"t | ".to_vec());
        assert_eq!(lines.flush_due(), None);
        let t0 = Instant::now();
        assert_eq!(one(&mut lines, Input::Data(b"Continue? "), t0), b"");
        assert_eq!(lines.flush_due(), Some(t0 + PARTIAL_FLUSH));
        // More of the same line does not make it wait longer.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(one(&mut lines, Input::Data(b"[y/N] "), t1), b"");
        assert_eq!(lines.flush_due(), Some(t0 + PARTIAL_FLUSH));
        assert_eq!(one(&mut lines, Input::Flush, t1), b"t | Continue? [y/N] ");
        assert_eq!(lines.flush_due(), None);
        assert_eq!(one(&mut lines, Input::Flush, t1), b"");
        assert_eq!(one(&mut lines, Input::Data(b"y\n"), t1), b"y\n");
        assert_eq!(one(&mut lines, Input::End, t1), b"");
    }

    #[test]
    fn a_new_partial_line_in_the_chunk_that_ends_the_last_waits_from_its_own_arrival() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(150);
        assert_eq!(one(&mut lines, Input::Data(b"a"), t0), b"");
        assert_eq!(one(&mut lines, Input::Data(b"b\nc"), t1), b"t | ab\n");
        assert_eq!(lines.flush_due(), Some(t1 + PARTIAL_FLUSH));
        assert_eq!(one(&mut lines, Input::Flush, t1), b"t | c");
        assert_eq!(one(&mut lines, Input::Data(b"d\ne\n"), t1), b"d\nt | e\n");
        assert_eq!(lines.flush_due(), None);
    }

    /// What a JSON stream writes for `chunks`, as parsed objects.
    fn json_objects(lines: &mut Lines, chunks: &[&[u8]], end: bool) -> Vec<serde_json::Value> {
        parse(&each(lines, chunks, end))
    }

    fn parse(out: &[u8]) -> Vec<serde_json::Value> {
        assert!(out.is_empty() || out.ends_with(b"\n"));
        out.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn json_lines_are_one_object_per_line_lossily_decoded() {
        let mut lines = Lines::json("migrate", "stderr");
        let objects = json_objects(&mut lines, &[b"a\nb", b"\xffc \"q\"\t\n", b"\nend"], true);
        assert_eq!(
            objects,
            [
                serde_json::json!({"task": "migrate", "stream": "stderr", "line": "a"}),
                serde_json::json!({"task": "migrate", "stream": "stderr", "line": "b\u{fffd}c \"q\"\t"}),
                serde_json::json!({"task": "migrate", "stream": "stderr", "line": ""}),
                serde_json::json!({"task": "migrate", "stream": "stderr", "line": "end"}),
            ]
        );
        assert!(json_objects(&mut Lines::json("t", "stdout"), &[b""], true).is_empty());
    }

    #[test]
    fn json_partial_lines_are_objects_of_their_own() {
        let mut lines = Lines::json("t", "stdout");
        let now = Instant::now();
        assert_eq!(one(&mut lines, Input::Data(b"Continue? "), now), b"");
        let flushed = one(&mut lines, Input::Flush, now);
        assert_eq!(
            flushed,
            b"{\"task\":\"t\",\"stream\":\"stdout\",\"line\":\"Continue? \",\"partial\":true}\n"
        );
        assert_eq!(
            json_objects(&mut lines, &[b"y\n"], true),
            [serde_json::json!({"task": "t", "stream": "stdout", "line": "y"})]
        );
        // A stream that ends after a flushed partial line adds nothing.
        let mut lines = Lines::json("t", "stdout");
        assert_eq!(one(&mut lines, Input::Data(b"half"), now), b"");
        assert_eq!(parse(&one(&mut lines, Input::Flush, now)).len(), 1);
        assert_eq!(one(&mut lines, Input::End, now), b"");
    }

    #[test]
    fn json_gives_back_what_a_batch_of_escapes_took_and_keeps_what_plain_text_needs() {
        let json_capacity = |lines: &Lines| match &lines.format {
            LineFormat::Json { out, .. } => out.capacity(),
            LineFormat::Text => 0,
        };
        let now = Instant::now();
        let mut lines = Lines::json("t", "stdout");
        // Control bytes take six bytes of JSON each: a full read of them needs far more room than
        // a full read of text.
        let escapes = [vec![1u8; READ_SIZE - 1], b"\n".to_vec()].concat();
        let _ = lines.render(Input::Data(&escapes), now);
        assert!(json_capacity(&lines) > 2 * (READ_SIZE + MAX_PENDING));
        let _ = lines.render(Input::Data(b"small\n"), now);
        assert!(
            json_capacity(&lines) < 2 * (READ_SIZE + MAX_PENDING),
            "kept {}",
            json_capacity(&lines)
        );
        // What plain text needs stays, so that every read does not allocate again.
        let text = [vec![b'x'; READ_SIZE - 1], b"\n".to_vec()].concat();
        let _ = lines.render(Input::Data(&text), now);
        let kept = json_capacity(&lines);
        let _ = lines.render(Input::Data(b"small\n"), now);
        assert_eq!(json_capacity(&lines), kept);
    }

    #[test]
    fn json_long_lines_come_in_bounded_partial_pieces() {
        let long = vec![b'x'; MAX_PENDING * 3 + 5];
        let mut lines = Lines::json("t", "stdout");
        let mut objects = Vec::new();
        for chunk in long.chunks(1000) {
            objects.extend(json_objects(&mut lines, &[chunk], false));
            assert!(lines.pending.len() < MAX_PENDING);
        }
        objects.extend(json_objects(&mut lines, &[b"\n"], true));
        let text: String = objects
            .iter()
            .map(|o| o["line"].as_str().expect("line"))
            .collect();
        assert_eq!(text.len(), long.len());
        assert_eq!(objects.len(), 3);
        assert!(
            objects
                .iter()
                .all(|o| o["line"].as_str().map_or(0, str::len) <= MAX_PENDING + 1000)
        );
        let (last, pieces) = objects.split_last().expect("objects");
        assert!(pieces.iter().all(|o| o["partial"] == true));
        assert_eq!(last.get("partial"), None);
    }

    #[test]
    fn the_format_decides_the_rendering() {
        let now = Instant::now();
        let mut lines =
            Lines::with_format(OutputFormat::Json, "stderr", b"db.migrate   | ".to_vec());
        assert_eq!(
            one(&mut lines, Input::Data(b"x\n"), now),
            b"{\"task\":\"db.migrate\",\"stream\":\"stderr\",\"line\":\"x\"}\n"
        );
        let mut lines = Lines::with_format(OutputFormat::Text, "stderr", b"a | ".to_vec());
        assert_eq!(one(&mut lines, Input::Data(b"x\n"), now), b"a | x\n");
    }

    #[test]
    fn the_task_name_of_a_padded_prefix() {
        assert_eq!(task_of_prefix(b"db.migrate   | "), "db.migrate");
        assert_eq!(task_of_prefix(b"a | "), "a");
    }
}
