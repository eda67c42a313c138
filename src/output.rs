//! Task output: each stream's bytes, line by line, with a `name | ` prefix, to release-tasks's own
//! stdout or stderr.
//!
//! Bytes stay bytes (no UTF-8 is assumed), nothing is lost or altered, and memory is bounded for a line
//! of any length. A stream that ends mid-line gets a newline, so the next line starts on its own. Every write holds one process-wide lock and carries only whole lines (or a flushed
//! partial one), so a log collector that merges stdout and stderr never sees two lines mixed. A partial
//! line that waits longer than [`PARTIAL_FLUSH`] is written out, so a prompt like `Continue? [y/N]` is
//! visible while its task hangs. Each stream is pumped by its own thread, so a slow reader of
//! release-tasks's output can never delay a timeout or a signal in the run loop.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd;
use tokio::sync::oneshot;

/// How long a partial line may wait for the rest of it before it is written as it is.
pub const PARTIAL_FLUSH: Duration = Duration::from_millis(200);
/// The longest piece of one line held in memory; longer lines are written in pieces of this size.
const MAX_PENDING: usize = 64 * 1024;
/// Size of one read from a task's pipe.
const READ_SIZE: usize = 64 * 1024;
/// What is still read from a pipe after being told to stop, so a chatty leftover cannot hold us.
const FINAL_DRAIN: usize = 1024 * 1024;

/// Serializes all writes to release-tasks's stdout and stderr (task output and log lines alike).
static OUTPUT_LOCK: Mutex<()> = Mutex::new(());

/// Where a stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
}

impl Target {
    fn fd(self) -> RawFd {
        match self {
            Target::Stdout => 1,
            Target::Stderr => 2,
        }
    }
}

/// Writes `bytes` to `target` whole, under the output lock. Errors (a closed pipe) are returned for
/// the caller to decide; nothing is retried except interrupted and would-block writes.
pub fn write(target: Target, bytes: &[u8]) -> std::io::Result<()> {
    let _guard = OUTPUT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
    let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
    let mut rest = bytes;
    while !rest.is_empty() {
        match unistd::write(fd, rest) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                // Our stdout is a non-blocking file description shared with someone else: wait for room.
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Turns a byte stream into prefixed lines. Pure: the pump feeds it and writes what it returns.
#[derive(Debug)]
pub struct Lines {
    prefix: Vec<u8>,
    /// Whether the next byte written starts a line (and so gets the prefix).
    at_line_start: bool,
    pending: Vec<u8>,
    pending_since: Option<Instant>,
}

impl Lines {
    #[must_use]
    pub fn new(prefix: Vec<u8>) -> Self {
        Lines {
            prefix,
            at_line_start: true,
            pending: Vec::new(),
            pending_since: None,
        }
    }

    /// Appends to `out` every complete line in `data` (after what was pending), and keeps the rest.
    pub fn feed(&mut self, data: &[u8], now: Instant, out: &mut Vec<u8>) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.emit_pending(out);
            self.start_line(out);
            out.extend_from_slice(&rest[..=i]);
            self.at_line_start = true;
            rest = &rest[i + 1..];
        }
        if rest.is_empty() {
            return;
        }
        if self.pending.is_empty() {
            self.pending_since = Some(now);
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() >= MAX_PENDING {
            self.flush(out);
        }
    }

    /// Writes out the pending partial line, if any; the rest of that line will follow unprefixed.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.emit_pending(out);
            self.at_line_start = false;
        }
    }

    /// Ends the stream: writes the pending partial line, then a newline if the stream stopped in the
    /// middle of a line, so that the next line (another task's, a log line) starts on its own.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.flush(out);
        if !self.at_line_start {
            out.push(b'\n');
            self.at_line_start = true;
        }
    }

    /// When the pending partial line is due to be flushed, if there is one.
    #[must_use]
    pub fn flush_due(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + PARTIAL_FLUSH)
    }

    fn emit_pending(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.start_line(out);
            out.append(&mut self.pending);
            self.at_line_start = false;
        }
        self.pending_since = None;
    }

    fn start_line(&mut self, out: &mut Vec<u8>) {
        if self.at_line_start {
            out.extend_from_slice(&self.prefix);
            self.at_line_start = false;
        }
    }
}

/// A running pump thread for one stream.
pub struct Pump {
    done: oneshot::Receiver<()>,
    /// Closing this (dropping it) tells the pump to drain what is there and stop.
    stop: Option<OwnedFd>,
    finished: bool,
}

impl Pump {
    /// Starts copying `source` to `target`, each line prefixed with `prefix`.
    pub fn start(source: OwnedFd, target: Target, prefix: Vec<u8>) -> std::io::Result<Pump> {
        let (stop_read, stop_write) = unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("output-{target:?}"))
            .spawn(move || {
                pump(&source, &stop_read, target, Lines::new(prefix));
                let _ = tx.send(());
            })?;
        Ok(Pump {
            done: rx,
            stop: Some(stop_write),
            finished: false,
        })
    }

    /// Waits until the stream has ended (every writer closed it) and all of it was written.
    pub async fn finished(&mut self) {
        if !self.finished {
            // An error means the thread ended without saying so; either way it is done.
            let _ = (&mut self.done).await;
            self.finished = true;
        }
    }

    /// Whether the stream has ended, without waiting.
    pub fn is_finished(&mut self) -> bool {
        if !self.finished && self.done.try_recv() != Err(oneshot::error::TryRecvError::Empty) {
            self.finished = true;
        }
        self.finished
    }

    /// Tells the pump to stop waiting for an end of stream that a leftover process is holding back.
    pub fn stop(&mut self) {
        self.stop = None;
    }
}

fn pump(source: &OwnedFd, stop: &OwnedFd, target: Target, mut lines: Lines) {
    let mut buf = vec![0u8; READ_SIZE];
    let mut out = Vec::with_capacity(READ_SIZE * 2);
    let mut sink_open = true;
    let mut emit = |out: &mut Vec<u8>| {
        if sink_open && !out.is_empty() && write(target, out).is_err() {
            // Our own output is gone (a closed pipe): keep draining the task so it never blocks.
            sink_open = false;
        }
        out.clear();
    };
    loop {
        let timeout = match lines.flush_due() {
            None => PollTimeout::NONE,
            Some(due) => {
                let ms = due.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::ZERO)
            }
        };
        let mut fds = [
            PollFd::new(source.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Err(Errno::EINTR) => continue,
            Err(_) => break,
            Ok(0) => {
                lines.flush(&mut out);
                emit(&mut out);
                continue;
            }
            Ok(_) => {}
        }
        let stop_now = fds[1].revents().is_some_and(|r| !r.is_empty());
        let readable = fds[0].revents().is_some_and(|r| !r.is_empty());
        if readable {
            match unistd::read(source, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    lines.feed(&buf[..n], Instant::now(), &mut out);
                    emit(&mut out);
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => break,
            }
        }
        if stop_now {
            drain(source, &mut buf, &mut lines, &mut out);
            emit(&mut out);
            break;
        }
    }
    lines.finish(&mut out);
    emit(&mut out);
}

/// Reads what is already in the pipe without waiting for more, up to [`FINAL_DRAIN`] bytes.
fn drain(source: &OwnedFd, buf: &mut [u8], lines: &mut Lines, out: &mut Vec<u8>) {
    if fcntl(source, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    let mut total = 0;
    while total < FINAL_DRAIN {
        match unistd::read(source, buf) {
            Ok(n) if n > 0 => {
                total += n;
                lines.feed(&buf[..n], Instant::now(), out);
            }
            Err(Errno::EINTR) => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut out = Vec::new();
        for c in chunks {
            lines.feed(c, Instant::now(), &mut out);
        }
        lines.finish(&mut out);
        out
    }

    #[test]
    fn prefixes_each_line_once_across_chunks() {
        assert_eq!(run(&[b"a\nb", b"c\n", b"\n"]), b"t | a\nt | bc\nt | \n");
        assert_eq!(run(&[b"no newline"]), b"t | no newline\n");
        assert_eq!(run(&[b""]), b"");
    }

    #[test]
    fn bytes_pass_through_unchanged() {
        let line: Vec<u8> = (0..=255u8).filter(|&b| b != b'\n').collect();
        let mut data = line.clone();
        data.extend_from_slice(b"\n\xff\xfe");
        let mut want = b"t | ".to_vec();
        want.extend_from_slice(&line);
        want.extend_from_slice(b"\nt | \xff\xfe\n");
        assert_eq!(run(&[&data]), want);
    }

    #[test]
    fn long_lines_are_bounded_and_continue_unprefixed() {
        let long = vec![b'x'; MAX_PENDING * 3 + 5];
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut out = Vec::new();
        for chunk in long.chunks(1000) {
            lines.feed(chunk, Instant::now(), &mut out);
            assert!(lines.pending.len() < MAX_PENDING);
        }
        lines.feed(b"\nnext\n", Instant::now(), &mut out);
        let mut want = b"t | ".to_vec();
        want.extend_from_slice(&long);
        want.extend_from_slice(b"\nt | next\n");
        assert_eq!(out, want);
    }

    #[test]
    fn a_flushed_partial_line_is_not_prefixed_twice() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut out = Vec::new();
        let t0 = Instant::now();
        lines.feed(b"Continue? [y/N] ", t0, &mut out);
        assert!(out.is_empty());
        assert_eq!(lines.flush_due(), Some(t0 + PARTIAL_FLUSH));
        lines.flush(&mut out);
        assert_eq!(lines.flush_due(), None);
        lines.feed(b"y\n", t0, &mut out);
        assert_eq!(out, b"t | Continue? [y/N] y\n");
    }
}
