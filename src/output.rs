//! Task output: each stream's bytes, line by line, with a `name | ` prefix, to release-tasks's own
//! stdout or stderr.
//!
//! Bytes stay bytes (no UTF-8 is assumed), nothing is lost or altered, and memory is bounded for a line
//! of any length. A stream that ends mid-line gets a newline, so the next line starts on its own.
//! Every write carries only whole lines (or a flushed partial one) under a lock shared by everything
//! that writes to the same pipe, so a log collector that merges stdout and stderr never sees two lines
//! mixed. A partial line that waits longer than [`PARTIAL_FLUSH`] is written out, so a prompt like
//! `Continue? [y/N]` is visible while its task hangs. Each stream is pumped by its own thread, so a
//! slow reader of release-tasks's output can never delay a timeout or a signal in the run loop; a
//! thread that finished a stream waits for the next task's rather than ending (starting two threads
//! per task cost more than the rest of the pumping of a short task). A
//! task's supervisor (`supervisor.rs`) owns its two [`Pump`]s: it waits for them to finish, and tells
//! them to stop (after a last bounded drain) when a process outside the task holds a pipe open.
//!
//! With `--output-format json` ([`OutputFormat::Json`], chosen once at start-up with [`set_format`])
//! each line is written instead as one JSON object, `{"task":..,"stream":..,"line":..}`, lossily
//! decoded, with `"partial":true` on a piece that is not a whole line (a flushed prompt, a piece of a
//! line over 64 KiB): every line a log collector reads is then JSON. Only the rendering of a batch of
//! pieces ([`Lines::slices`]) differs; splitting, flushing and the one locked write per batch are
//! the same for both.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd;
use tokio::sync::oneshot;

use crate::tail::Tail;

/// How long a partial line may wait for the rest of it before it is written as it is.
pub const PARTIAL_FLUSH: Duration = Duration::from_millis(200);
/// The longest piece of one line held in memory; longer lines are written in pieces of this size.
const MAX_PENDING: usize = 64 * 1024;
/// Size of one read from a task's pipe, at most.
const READ_SIZE: usize = 256 * 1024;
/// A pump thread's first read buffer: most tasks write a few lines, which do not pay for zeroing and
/// faulting in 256 KiB. It grows (to [`READ_SIZE`]) whenever a read fills it, and stays with the
/// thread for its next tasks.
const FIRST_READ: usize = 16 * 1024;
/// The capacity asked for a task's output pipes: fewer wake-ups for a chatty task (Linux's default
/// is 64 KiB; a smaller grant is fine).
#[cfg(target_os = "linux")]
const PIPE_SIZE: i32 = 1024 * 1024;
/// What is still read from a pipe after being told to stop, so a chatty leftover cannot hold us.
const FINAL_DRAIN: usize = 1024 * 1024;

/// Stack size of the output and log threads: their buffers live on the heap, and a small stack is
/// cheaper to set up for every task than the default 2 MiB.
pub const SMALL_STACK: usize = 128 * 1024;

/// Serialize writes to release-tasks's stdout and to its stderr (task output and log lines alike).
/// When both are the same pipe or file (a log collector's), one lock serves both, so that two lines
/// never mix; otherwise each has its own, so a stalled stdout does not hold up the log on stderr.
static OUTPUT_LOCKS: [Mutex<()>; 2] = [Mutex::new(()), Mutex::new(())];

fn lock(target: Target) -> std::sync::MutexGuard<'static, ()> {
    static SHARED: OnceLock<bool> = OnceLock::new();
    let shared = *SHARED.get_or_init(|| {
        let id = |fd| {
            // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
            nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) })
                .map(|st| (st.st_dev, st.st_ino))
        };
        matches!((id(1), id(2)), (Ok(a), Ok(b)) if a == b)
    });
    // stdout (and a test's file) use the first lock; stderr the second unless it is stdout's file.
    let index = usize::from(!shared && target == Target::Stderr);
    OUTPUT_LOCKS[index]
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How task output lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Each line as it is, after a `name | ` prefix
    #[default]
    Text,
    /// Each line as a JSON object: {"task", "stream", "line"}
    Json,
}

/// The format of every pump started from now on; set once, before the release starts.
static FORMAT: OnceLock<OutputFormat> = OnceLock::new();

/// Chooses how task output is written (a later call changes nothing).
pub fn set_format(format: OutputFormat) {
    let _ = FORMAT.set(format);
}

/// Where a stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
    /// A file a unit test reads back (it shares stdout's lock).
    #[cfg(test)]
    Fd(RawFd),
}

impl Target {
    /// The stream's name in a JSON line.
    fn stream(self) -> &'static str {
        match self {
            Target::Stderr => "stderr",
            Target::Stdout => "stdout",
            #[cfg(test)]
            Target::Fd(_) => "stdout",
        }
    }

    fn fd(self) -> RawFd {
        match self {
            Target::Stdout => 1,
            Target::Stderr => 2,
            #[cfg(test)]
            Target::Fd(fd) => fd,
        }
    }
}

/// Writes `bytes` to `target` whole, under the output lock. Errors (a closed pipe) are returned for
/// the caller to decide; nothing is retried except interrupted and would-block writes.
pub fn write(target: Target, bytes: &[u8]) -> std::io::Result<()> {
    write_vectored(target, &mut [IoSlice::new(bytes)])
}

/// Writes `bytes` to `target` under the output lock, waiting at most until `deadline` for room: a
/// stalled reader (a full pipe nobody reads) makes it give up with `TimedOut` instead of blocking
/// forever. Pieces of at most `PIPE_BUF` bytes go out only once `poll` says there is room, and a
/// pipe with room takes that much without blocking.
pub fn write_until(target: Target, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    const PIPE_BUF: usize = 4096;
    let _guard = lock(target);
    // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
    let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
        // Room, or an error or hang-up that the write then reports.
        match poll(&mut fds, wait) {
            Ok(0) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
        match unistd::write(fd, &bytes[..bytes.len().min(PIPE_BUF)]) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Where one piece of output comes from: the pieces of a batch, written in one `writev`, are whole
/// lines, so nothing is copied on the way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// The `name | ` prefix.
    Prefix,
    /// The partial line held from earlier reads.
    Pending,
    /// `data[start..end]` of the chunk just fed.
    Data(usize, usize),
    /// A newline added at the end of a stream that ended mid-line.
    Newline,
}

/// How [`Lines::slices`] renders the pieces of a batch.
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

/// Splits a byte stream into prefixed lines. Pure: the pump feeds it chunks, writes the pieces it
/// returns, then calls [`settle`](Lines::settle).
#[derive(Debug)]
pub struct Lines {
    prefix: Vec<u8>,
    format: LineFormat,
    /// Whether the next byte written starts a line (and so gets the prefix).
    at_line_start: bool,
    pending: Vec<u8>,
    pending_since: Option<Instant>,
    /// Whether the pieces handed out include `Pending` (so it is dropped on `settle`).
    pending_out: bool,
    /// Where the unwritten tail of the last chunk starts, and when it was fed.
    tail_from: usize,
    fed_at: Option<Instant>,
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
            pending_since: None,
            pending_out: false,
            tail_from: 0,
            fed_at: None,
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

    /// Lines for a task's stream to `target` in the format chosen with [`set_format`]. The task's
    /// name is what `prefix` (`NAME | `, padded for alignment) holds: task names have no spaces.
    #[must_use]
    pub fn for_target(target: Target, prefix: Vec<u8>) -> Self {
        match FORMAT.get().copied().unwrap_or_default() {
            OutputFormat::Text => Lines::new(prefix),
            OutputFormat::Json => Lines::json(&task_of_prefix(&prefix), target.stream()),
        }
    }

    /// Appends to `pieces` every complete line in `data` (after the pending partial line).
    pub fn feed(&mut self, data: &[u8], now: Instant, pieces: &mut Vec<Piece>) {
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &data[start..]) {
            let end = start + i + 1;
            self.start_line(pieces);
            if !self.pending.is_empty() && !self.pending_out {
                pieces.push(Piece::Pending);
                self.pending_out = true;
            }
            pieces.push(Piece::Data(start, end));
            self.at_line_start = true;
            start = end;
        }
        self.tail_from = start;
        self.fed_at = Some(now);
    }

    /// After the pieces were written: forgets the pending bytes they included and keeps the tail of
    /// `data` (the chunk last fed, or empty after a flush) as the new partial line.
    pub fn settle(&mut self, data: &[u8]) {
        if self.pending_out {
            self.pending.clear();
            self.pending_since = None;
            self.pending_out = false;
        }
        self.shrink();
        let tail = data.get(self.tail_from..).unwrap_or_default();
        if !tail.is_empty() {
            if self.pending.is_empty() {
                self.pending_since = self.fed_at;
            }
            self.pending.extend_from_slice(tail);
        }
        self.tail_from = 0;
    }

    /// Whether the partial line has grown to `MAX_PENDING` (64 KiB) and must be flushed to bound memory.
    #[must_use]
    pub fn over_limit(&self) -> bool {
        self.pending.len() >= MAX_PENDING
    }

    /// Appends the pending partial line, if any; the rest of that line will follow unprefixed.
    pub fn flush(&mut self, pieces: &mut Vec<Piece>) {
        if !self.pending.is_empty() && !self.pending_out {
            self.start_line(pieces);
            pieces.push(Piece::Pending);
            self.pending_out = true;
        }
    }

    /// Ends the stream: the pending partial line, then a newline if the stream stopped in the middle
    /// of a line, so that the next line (another task's, a log line) starts on its own.
    pub fn finish(&mut self, pieces: &mut Vec<Piece>) {
        self.flush(pieces);
        if !self.at_line_start {
            pieces.push(Piece::Newline);
            self.at_line_start = true;
        }
    }

    /// When the pending partial line is due to be flushed, if there is one.
    #[must_use]
    pub fn flush_due(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + PARTIAL_FLUSH)
    }

    /// The bytes of `pieces`, for a `writev` (`data` is the chunk they were fed from). As text,
    /// the pieces themselves; as JSON, one slice with an object per line, and per piece of a line
    /// that the batch ends in the middle of.
    #[must_use]
    pub fn slices<'a>(&'a mut self, pieces: &[Piece], data: &'a [u8]) -> Vec<IoSlice<'a>> {
        match &mut self.format {
            LineFormat::Text => pieces
                .iter()
                .map(|piece| {
                    IoSlice::new(match *piece {
                        Piece::Prefix => &self.prefix,
                        Piece::Pending => &self.pending,
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
                for piece in pieces {
                    match *piece {
                        Piece::Prefix | Piece::Newline => {}
                        Piece::Pending => line.extend_from_slice(&self.pending),
                        Piece::Data(start, end) => line.extend_from_slice(&data[start..end]),
                    }
                    // Data pieces are whole lines; Newline ends a stream that stopped mid-line.
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
                vec![IoSlice::new(out)]
            }
        }
    }

    /// After a batch of escapes or U+FFFDs (up to six bytes of JSON for one byte read), gives back
    /// what its JSON took beyond what a full read of plain text needs.
    fn shrink(&mut self) {
        if let LineFormat::Json { out, .. } = &mut self.format {
            if out.capacity() > 2 * (READ_SIZE + MAX_PENDING) {
                *out = Vec::new();
            }
        }
    }

    fn start_line(&mut self, pieces: &mut Vec<Piece>) {
        if self.at_line_start {
            pieces.push(Piece::Prefix);
            self.at_line_start = false;
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

/// A stream being pumped, by a thread of its own.
pub struct Pump {
    done: oneshot::Receiver<()>,
    /// Closing this (dropping it) tells the pump to drain what is there and stop.
    stop: Option<OwnedFd>,
    finished: bool,
}

/// One stream for a pump thread to copy.
struct Job {
    source: OwnedFd,
    stop: OwnedFd,
    target: Target,
    lines: Lines,
    /// Where the task's last lines are kept (see `tail.rs`).
    tail: Option<Arc<Mutex<Tail>>>,
    done: oneshot::Sender<()>,
}

/// Pump threads waiting for their next stream. A thread that has finished a stream waits here for
/// the next task's instead of ending, so a task does not pay for starting two threads; one still
/// busy (blocked on a stalled stdout) is simply not here, and a new thread is started instead.
static IDLE: Mutex<Vec<std::sync::mpsc::Sender<Job>>> = Mutex::new(Vec::new());

impl Pump {
    /// Starts copying `source` to `target`, each line prefixed with `prefix`, and feeding what
    /// passes to `tail` (the task's last lines, for the report).
    pub fn start(
        source: OwnedFd,
        target: Target,
        prefix: Vec<u8>,
        tail: Option<Arc<Mutex<Tail>>>,
    ) -> std::io::Result<Pump> {
        enlarge_pipe(&source);
        let (stop_read, stop_write) = cloexec_pipe().map_err(|err| {
            crate::limits::named("cannot make a pipe for a task's output", err.into(), false)
        })?;
        let (tx, rx) = oneshot::channel();
        let mut job = Job {
            source,
            stop: stop_read,
            target,
            lines: Lines::for_target(target, prefix),
            tail,
            done: tx,
        };
        loop {
            let idle = IDLE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let Some(worker) = idle else { break };
            // A thread that is gone hands the job back.
            match worker.send(job) {
                Ok(()) => return Ok(Pump::new(rx, stop_write)),
                Err(std::sync::mpsc::SendError(back)) => job = back,
            }
        }
        std::thread::Builder::new()
            .name("output".into())
            .stack_size(SMALL_STACK)
            .spawn(move || pump_thread(job))
            .map_err(|err| {
                crate::limits::named("cannot start a thread for a task's output", err, true)
            })?;
        Ok(Pump::new(rx, stop_write))
    }

    fn new(done: oneshot::Receiver<()>, stop: OwnedFd) -> Pump {
        Pump {
            done,
            stop: Some(stop),
            finished: false,
        }
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

/// Asks for a larger pipe; a smaller grant (or none) only costs wake-ups.
#[cfg(target_os = "linux")]
fn enlarge_pipe(source: &OwnedFd) {
    let _ = fcntl(source, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
}

/// macOS sizes a pipe by itself (up to 64 KiB as it fills): nothing to ask for.
#[cfg(not(target_os = "linux"))]
fn enlarge_pipe(_source: &OwnedFd) {}

/// A pipe that no task inherits: a task holding the stop pipe's write end would keep the pump from
/// ever being told to stop.
#[cfg(target_os = "linux")]
pub(crate) fn cloexec_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    unistd::pipe2(OFlag::O_CLOEXEC)
}

/// Without `pipe2`, close-on-exec is set just after `pipe`. Tasks are spawned from the thread that
/// starts pumps, so no fork falls between the two calls.
#[cfg(not(target_os = "linux"))]
pub(crate) fn cloexec_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::FdFlag;
    let (read, write) = unistd::pipe()?;
    for fd in [&read, &write] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    Ok((read, write))
}

/// The life of a pump thread: a stream, then the next one handed to it while idle.
fn pump_thread(mut job: Job) {
    let (next, jobs) = std::sync::mpsc::channel();
    let mut buf = vec![0u8; FIRST_READ];
    loop {
        let Job {
            source,
            stop,
            target,
            lines,
            tail,
            done,
        } = job;
        pump(&source, &stop, target, lines, tail, &mut buf);
        drop((source, stop));
        // Idle before saying so: the next task's pump, started on that word, finds this thread.
        IDLE.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(next.clone());
        let _ = done.send(());
        match jobs.recv() {
            Ok(more) => job = more,
            Err(_) => return,
        }
    }
}

fn pump(
    source: &OwnedFd,
    stop: &OwnedFd,
    target: Target,
    mut lines: Lines,
    tail: Option<Arc<Mutex<Tail>>>,
    buf: &mut Vec<u8>,
) {
    let mut sink = Sink {
        target,
        open: true,
        pieces: Vec::new(),
        tail,
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
                sink.emit(&mut lines, &[], Lines::flush);
                continue;
            }
            Ok(_) => {}
        }
        let stop_now = fds[1].revents().is_some_and(|r| !r.is_empty());
        let readable = fds[0].revents().is_some_and(|r| !r.is_empty());
        if readable {
            match unistd::read(source, buf) {
                Ok(0) => break,
                Ok(n) => {
                    sink.feed(&mut lines, &buf[..n]);
                    if n == buf.len() && n < READ_SIZE {
                        buf.resize((4 * n).min(READ_SIZE), 0);
                    }
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => break,
            }
        }
        if stop_now {
            drain(source, buf, &mut lines, &mut sink);
            break;
        }
    }
    sink.emit(&mut lines, &[], Lines::finish);
}

/// Writes the pieces that [`Lines`] hands out, until our own output turns out to be closed.
struct Sink {
    target: Target,
    open: bool,
    pieces: Vec<Piece>,
    /// Where the task's last lines are kept, fed with every chunk that passes.
    tail: Option<Arc<Mutex<Tail>>>,
}

impl Sink {
    /// Feeds a chunk and writes its complete lines; flushes a partial line that grew too long.
    fn feed(&mut self, lines: &mut Lines, data: &[u8]) {
        if let Some(tail) = &self.tail {
            let stream = usize::from(self.target != Target::Stdout);
            tail.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .feed(stream, data);
        }
        let now = Instant::now();
        self.emit(lines, data, |l, p| l.feed(data, now, p));
        if lines.over_limit() {
            self.emit(lines, &[], Lines::flush);
        }
    }

    /// Collects pieces with `step`, writes them in one locked `writev` batch, then settles `lines`.
    fn emit(
        &mut self,
        lines: &mut Lines,
        data: &[u8],
        step: impl FnOnce(&mut Lines, &mut Vec<Piece>),
    ) {
        self.pieces.clear();
        step(lines, &mut self.pieces);
        if self.open && !self.pieces.is_empty() {
            let mut slices = lines.slices(&self.pieces, data);
            if write_vectored(self.target, &mut slices).is_err() {
                // Our own output is gone (a closed pipe): keep draining the task so it never blocks.
                self.open = false;
            }
        }
        lines.settle(data);
    }
}

/// Writes all of `slices` under the output lock, `IOV_MAX` slices at a time.
fn write_vectored(target: Target, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    const IOV_MAX: usize = 1024;
    let _guard = lock(target);
    // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
    let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
    while !slices.is_empty() {
        let batch = slices.len().min(IOV_MAX);
        match nix::sys::uio::writev(fd, &slices[..batch]) {
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
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

/// Reads what is already in the pipe without waiting for more, up to [`FINAL_DRAIN`] bytes.
fn drain(source: &OwnedFd, buf: &mut [u8], lines: &mut Lines, sink: &mut Sink) {
    if fcntl(source, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    let mut total = 0;
    while total < FINAL_DRAIN {
        match unistd::read(source, buf) {
            Ok(n) if n > 0 => {
                total += n;
                sink.feed(lines, &buf[..n]);
            }
            Err(Errno::EINTR) => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds chunks and renders every piece to bytes, as the pump would write them.
    fn render(lines: &mut Lines, chunks: &[&[u8]], finish: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pieces = Vec::new();
        let mut write = |lines: &mut Lines, data: &[u8], pieces: &mut Vec<Piece>| {
            for slice in lines.slices(pieces, data) {
                out.extend_from_slice(&slice);
            }
            pieces.clear();
            lines.settle(data);
        };
        for chunk in chunks {
            lines.feed(chunk, Instant::now(), &mut pieces);
            write(lines, chunk, &mut pieces);
            if lines.over_limit() {
                lines.flush(&mut pieces);
                write(lines, &[], &mut pieces);
            }
        }
        if finish {
            lines.finish(&mut pieces);
            write(lines, &[], &mut pieces);
        }
        out
    }

    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        render(&mut Lines::new(b"t | ".to_vec()), chunks, true)
    }

    #[test]
    fn prefixes_each_line_once_across_chunks() {
        assert_eq!(run(&[b"a\nb", b"c\n", b"\n"]), b"t | a\nt | bc\nt | \n");
        assert_eq!(run(&[b"no newline"]), b"t | no newline\n");
        assert_eq!(run(&[b"x", b"y", b"z\nw"]), b"t | xyz\nt | w\n");
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
            out.extend(render(&mut lines, &[chunk], false));
            assert!(lines.pending.len() < MAX_PENDING);
        }
        out.extend(render(&mut lines, &[b"\nnext\n"], true));
        let mut want = b"t | ".to_vec();
        want.extend_from_slice(&long);
        want.extend_from_slice(b"\nt | next\n");
        assert_eq!(out, want);
    }

    #[test]
    fn a_flushed_partial_line_is_not_prefixed_twice() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let t0 = Instant::now();
        let mut pieces = Vec::new();
        lines.feed(b"Continue? [y/N] ", t0, &mut pieces);
        assert!(pieces.is_empty());
        lines.settle(b"Continue? [y/N] ");
        assert!(lines.flush_due().is_some());
        let mut out = render(&mut lines, &[], false);
        lines.flush(&mut pieces);
        for slice in lines.slices(&pieces, &[]) {
            out.extend_from_slice(&slice);
        }
        pieces.clear();
        lines.settle(&[]);
        assert_eq!(lines.flush_due(), None);
        out.extend(render(&mut lines, &[b"y\n"], true));
        assert_eq!(out, b"t | Continue? [y/N] y\n");
    }
    #[test]
    fn only_a_partial_line_of_the_limit_must_be_flushed() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut pieces = Vec::new();
        lines.feed(b"short", Instant::now(), &mut pieces);
        lines.settle(b"short");
        assert!(!lines.over_limit());
        let long = vec![b'x'; MAX_PENDING];
        lines.feed(&long, Instant::now(), &mut pieces);
        lines.settle(&long);
        assert!(lines.over_limit());
    }

    #[test]
    fn a_partial_line_is_due_a_flush_after_it_waited_its_time() {
        let mut lines = Lines::new(b"t | ".to_vec());
        let mut pieces = Vec::new();
        assert_eq!(lines.flush_due(), None);
        let t0 = Instant::now();
        lines.feed(b"Continue? ", t0, &mut pieces);
        lines.settle(b"Continue? ");
        assert_eq!(lines.flush_due(), Some(t0 + PARTIAL_FLUSH));
    }

    /// What a JSON pump writes for `chunks`, as parsed objects.
    fn json_objects(lines: &mut Lines, chunks: &[&[u8]], finish: bool) -> Vec<serde_json::Value> {
        let out = render(lines, chunks, finish);
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

    /// Flushes a partial line and renders what the pump would write for it.
    fn flush_rendered(lines: &mut Lines, pieces: &mut Vec<Piece>) -> Vec<u8> {
        lines.flush(pieces);
        let out = lines
            .slices(pieces, &[])
            .iter()
            .flat_map(|s| s.to_vec())
            .collect();
        pieces.clear();
        lines.settle(&[]);
        out
    }

    #[test]
    fn json_partial_lines_are_objects_of_their_own() {
        let mut lines = Lines::json("t", "stdout");
        let mut pieces = Vec::new();
        lines.feed(b"Continue? ", Instant::now(), &mut pieces);
        lines.settle(b"Continue? ");
        let mut objects = json_objects(&mut lines, &[], false);
        let out = flush_rendered(&mut lines, &mut pieces);
        objects.push(serde_json::from_slice(out.trim_ascii_end()).expect("JSON"));
        objects.extend(json_objects(&mut lines, &[b"y\n"], true));
        assert_eq!(
            objects,
            [
                serde_json::json!({"task": "t", "stream": "stdout", "line": "Continue? ", "partial": true}),
                serde_json::json!({"task": "t", "stream": "stdout", "line": "y"}),
            ]
        );
        // A stream that ends after a flushed partial line adds nothing.
        let mut lines = Lines::json("t", "stdout");
        lines.feed(b"half", Instant::now(), &mut pieces);
        lines.settle(b"half");
        let out = flush_rendered(&mut lines, &mut pieces);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(json_objects(&mut lines, &[], true).is_empty());
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
        assert!(objects.len() >= 3, "{}", objects.len());
        assert!(
            objects
                .iter()
                .all(|o| o["line"].as_str().map_or(0, str::len) < 2 * MAX_PENDING)
        );
        let (last, pieces) = objects.split_last().expect("objects");
        assert!(pieces.iter().all(|o| o["partial"] == true));
        assert_eq!(last.get("partial"), None);
    }

    #[test]
    fn the_task_name_of_a_padded_prefix() {
        assert_eq!(task_of_prefix(b"db.migrate   | "), "db.migrate");
        assert_eq!(task_of_prefix(b"a | "), "a");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    /// A file for a pump to write to, and the target that writes there.
    fn output_file() -> (tempfile::NamedTempFile, Target) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let target = Target::Fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        (file, target)
    }

    #[test]
    fn a_pump_finishes_only_when_every_writer_has_closed_its_stream() {
        let (file, target) = output_file();
        let (read, write) = unistd::pipe().expect("pipe");
        let mut pump = Pump::start(read, target, b"t | ".to_vec(), None).expect("pump");
        unistd::write(&write, b"a\n").expect("write");
        let rt = runtime();
        let early = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(300), pump.finished()).await
        });
        assert!(early.is_err(), "finished while a writer held the stream");
        assert!(!pump.is_finished());
        drop(write);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pump.is_finished() {
            assert!(
                Instant::now() < deadline,
                "never finished after the stream ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), pump.finished()).await })
            .expect("finished at once once it is known to be");
        assert_eq!(std::fs::read(file.path()).expect("read"), b"t | a\n");
    }

    #[test]
    fn a_stopped_pump_ends_though_a_writer_still_holds_the_stream() {
        let (file, target) = output_file();
        let (read, write) = unistd::pipe().expect("pipe");
        let mut pump = Pump::start(read, target, b"t | ".to_vec(), None).expect("pump");
        unistd::write(&write, b"whole\npartial").expect("write");
        pump.stop();
        runtime()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), pump.finished()).await
            })
            .expect("a stopped pump ends");
        assert!(pump.is_finished());
        assert_eq!(
            std::fs::read(file.path()).expect("read"),
            b"t | whole\nt | partial\n"
        );
        drop(write);
    }

    /// Runs a pump on `source` until it ends by itself, as if told to stop before it began; fails
    /// the test if it has not ended within a few seconds.
    fn pump_stopped(source: OwnedFd, target: Target) {
        pump_stopped_with(source, target, vec![0; READ_SIZE]);
    }

    /// [`pump_stopped`] with a read buffer of the caller's; returns it as the pump left it.
    fn pump_stopped_with(source: OwnedFd, target: Target, mut buf: Vec<u8>) -> Vec<u8> {
        let (stop_read, stop_write) = unistd::pipe().expect("pipe");
        drop(stop_write);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            pump(
                &source,
                &stop_read,
                target,
                Lines::new(b"t | ".to_vec()),
                None,
                &mut buf,
            );
            let _ = tx.send(buf);
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the pump ended")
    }

    #[test]
    fn a_read_that_does_not_fill_the_buffer_leaves_it_as_it_is() {
        let source = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(source.path(), line().repeat(3)).expect("write");
        let (file, target) = output_file();
        let buf = pump_stopped_with(
            std::fs::File::open(source.path()).expect("open").into(),
            target,
            vec![0; FIRST_READ],
        );
        assert_eq!(buf.len(), FIRST_READ);
        assert_eq!(
            std::fs::read(file.path()).expect("read").len(),
            3 * (line().len() + 4)
        );
    }

    #[test]
    fn the_read_buffer_grows_while_reads_fill_it_and_everything_is_written() {
        let source = tempfile::NamedTempFile::new().expect("temp file");
        let total = 2 * FINAL_DRAIN / line().len();
        std::fs::write(source.path(), line().repeat(total)).expect("write");
        let (file, target) = output_file();
        let buf = pump_stopped_with(
            std::fs::File::open(source.path()).expect("open").into(),
            target,
            vec![0; FIRST_READ],
        );
        // The one read of the pump's loop filled 16 KiB; the drain then read its 1 MiB 64 KiB at a
        // time.
        assert_eq!(buf.len(), 4 * FIRST_READ);
        let out = std::fs::read(file.path()).expect("read");
        assert_eq!(
            out.len(),
            (FIRST_READ + FINAL_DRAIN) / line().len() * (line().len() + 4)
        );
    }

    /// 64-byte lines, so that byte counts tell how many were written.
    fn line() -> Vec<u8> {
        [b"x".repeat(63), b"\n".to_vec()].concat()
    }

    // Needs a 1 MiB pipe, which only Linux grants.
    #[cfg(target_os = "linux")]
    #[test]
    fn what_is_in_the_pipe_when_told_to_stop_is_still_written() {
        let (file, target) = output_file();
        let (read, write) = unistd::pipe().expect("pipe");
        // More than one read's worth waits in the pipe, so the final drain must read the rest, up
        // to the end of the stream (its writer has gone).
        fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).expect("a 1 MiB pipe");
        let count = 2 * READ_SIZE / line().len() + 7;
        for _ in 0..count {
            unistd::write(&write, &line()).expect("write");
        }
        drop(write);
        pump_stopped(read, target);
        let out = std::fs::read(file.path()).expect("read");
        assert_eq!(out.len(), count * (line().len() + 4));
    }

    #[test]
    fn the_final_drain_is_bounded_while_there_is_more_to_read() {
        // A file never runs dry like a pipe a leftover keeps filling: the drain must stop at its
        // bound, after the one read of the pump's loop.
        let source = tempfile::NamedTempFile::new().expect("temp file");
        let total = 4 * FINAL_DRAIN / line().len();
        std::fs::write(source.path(), line().repeat(total)).expect("write");
        let (file, target) = output_file();
        pump_stopped(
            std::fs::File::open(source.path()).expect("open").into(),
            target,
        );
        let out = std::fs::read(file.path()).expect("read");
        let lines = (READ_SIZE + FINAL_DRAIN) / line().len();
        assert_eq!(out.len(), lines * (line().len() + 4));
    }
}
