//! release-tasks's stdout and stderr: the one [`Stdio`] handle that every write goes through, made
//! in `main` and passed down.
//!
//! The handle owns what must be shared by everything that writes: the locks (every write carries
//! whole lines under a lock shared by everything that writes to the same pipe, so a log collector
//! that merges stdout and stderr never sees two lines mixed), the output format of task lines, one
//! queue per output file with the thread that writes it, and one memory of a stalled output (a full
//! pipe that nobody reads), so that such an output holds release-tasks up for at most [`STALL_WAIT`]
//! before the release and as much at its end, however many lines, flushes and messages there are to
//! write.
//!
//! During a release the run loop itself writes task output and log lines ([`Stdio::send`]), but only
//! what cannot block, by construction: anything into a file or `/dev/null`, and into a pipe at most
//! `PIPE_BUF` bytes once `poll` says it has room (a write that size is atomic and fits in the room
//! `poll` promises), and only when nothing is queued before it. Anything else goes to the queue of
//! its file, which a thread of its own writes (started with the release), so that a stalled reader
//! holds up that thread, never a timeout or a signal. Most releases write a few lines at a time into
//! a pipe a log collector reads, and then no thread other than the run loop wakes for them.
//!
//! What it leaves to others: splitting and rendering task output ([`lines`], pure), copying a
//! task's streams ([`pump`]), pipe helpers ([`pipe`]), and the formatting of log lines (`log.rs`).

pub mod lines;
pub mod pipe;
pub mod pump;

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd;

pub use lines::{OutputFormat, PARTIAL_FLUSH};
pub use pipe::{SMALL_STACK, cloexec_pipe};
pub use pump::Pumping;

/// How long a stalled stderr may hold release-tasks up before the release, and again at its end.
pub const STALL_WAIT: Duration = Duration::from_secs(5);
/// How much may wait in an output's queue before the task output behind it waits in its pipe
/// instead (and its task with it, as if it wrote into a slow pipe itself): memory stays bounded.
pub const QUEUE_LIMIT: usize = 1024 * 1024;

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
    fn fd(self) -> RawFd {
        match self {
            Target::Stdout => 1,
            Target::Stderr => 2,
            #[cfg(test)]
            Target::Fd(fd) => fd,
        }
    }
}

/// The handle on release-tasks's stdout and stderr. Cheap to clone: every clone is the same handle.
#[derive(Clone)]
pub struct Stdio(Arc<Shared>);

struct Shared {
    /// Serialize writes to stdout and to stderr (task output and log lines alike). When both are
    /// the same pipe or file (a log collector's), the first serves both, so that two lines never
    /// mix; otherwise each has its own, so a stalled stdout does not hold up the log on stderr.
    locks: [Mutex<()>; 2],
    one_file: bool,
    /// What fds 1 and 2 are, for whether a write can block.
    files: [File; 2],
    /// The format of task output lines, set once the settings are read.
    format: OnceLock<OutputFormat>,
    stall: Mutex<Stall>,
    /// Whether writes may go through the queues (during a release); before, they are written
    /// directly within [`STALL_WAIT`].
    background: AtomicBool,
    /// Whether a stop signal came: the final flush then gets one [`STALL_WAIT`], however slowly the
    /// reader still takes what is queued.
    stopping: AtomicBool,
    /// What waits to be written, per lock: see [`Stdio::send`].
    queues: [Queue; 2],
}

/// The most slices one `writev` takes (Linux's and macOS's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// What an output is, as far as a write's blocking goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum File {
    /// A regular file, or a device that never makes a writer wait (`/dev/null`).
    NeverFull,
    /// A pipe (or FIFO): `PIPE_BUF` bytes fit once `poll` says it has room.
    Pipe,
    /// Anything else (a terminal, which Ctrl-S stops; a socket): never written from the run loop.
    Other,
}

/// The bytes waiting for one output file, and the thread that writes them.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// The writer waits here for something to write.
    more: Condvar,
    /// [`Stdio::flush`] waits here for the queue to empty.
    emptied: Condvar,
    /// Pumps wait here for the queue to fall below [`QUEUE_LIMIT`].
    room: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<(Target, Vec<u8>)>,
    /// Bytes queued or being written: while there are any, nothing is written past them.
    bytes: usize,
    /// Bytes written so far (counted a piece at a time), so that a wait for the queue can tell a
    /// slow reader from a stalled one.
    written: u64,
    /// Whether the writer thread runs.
    writer: bool,
}

/// What a stalled output has cost: the end of the wait that found it stalled, before the release
/// and at its end, per output file. The first wait that times out in a part sets when every later
/// one in that part ends, so that release-tasks waits once per part, not once per line.
#[derive(Debug, Default)]
struct Stall {
    ending: bool,
    stalled: [[Option<Instant>; 2]; 2],
}

impl Default for Stdio {
    fn default() -> Self {
        Stdio::new()
    }
}

impl Stdio {
    /// The handle on fds 1 and 2; make one, in `main`.
    #[must_use]
    pub fn new() -> Self {
        // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
        let stat = |fd| nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) });
        let (out, err) = (stat(1), stat(2));
        let id = |st: &nix::sys::stat::FileStat| (st.st_dev, st.st_ino);
        Stdio(Arc::new(Shared {
            locks: [Mutex::new(()), Mutex::new(())],
            one_file: matches!((&out, &err), (Ok(a), Ok(b)) if id(a) == id(b)),
            files: [File::of(out.ok()), File::of(err.ok())],
            format: OnceLock::new(),
            stall: Mutex::new(Stall::default()),
            background: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            queues: [Queue::default(), Queue::default()],
        }))
    }

    /// Chooses how task output is written (a later call changes nothing).
    pub fn set_output_format(&self, format: OutputFormat) {
        let _ = self.0.format.set(format);
    }

    /// How task output is written.
    #[must_use]
    pub fn output_format(&self) -> OutputFormat {
        self.0.format.get().copied().unwrap_or_default()
    }

    /// Which lock, queue and stall memory serve `target`: stdout's (and a test's file's), and
    /// stderr's unless it is stdout's file.
    fn index(&self, target: Target) -> usize {
        usize::from(!self.0.one_file && target == Target::Stderr)
    }

    fn lock(&self, target: Target) -> MutexGuard<'_, ()> {
        self.0.locks[self.index(target)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self, target: Target) -> &Queue {
        &self.0.queues[self.index(target)]
    }

    /// Writes `bytes` to `target` whole, under the output lock. Errors (a closed pipe) are returned
    /// for the caller to decide; nothing is retried except interrupted and would-block writes.
    pub fn write(&self, target: Target, bytes: &[u8]) -> std::io::Result<()> {
        let _guard = self.lock(target);
        write_all(target, &mut [IoSlice::new(bytes)])
    }

    /// Writes `slices` to `target`, in order after everything sent before, without ever blocking
    /// the caller on a reader: at once when that cannot block (any amount into a file or
    /// `/dev/null`, one `writev` of at most `PIPE_BUF` bytes into a pipe that `poll` says has room)
    /// and nothing is queued before it; otherwise copied into the target's queue for its writer
    /// thread. Before the release ([`write_in_background`](Self::write_in_background)), written
    /// directly within what is left of [`STALL_WAIT`]. An error means the output is gone (a closed
    /// pipe).
    pub fn send(&self, target: Target, slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let mut slices = slices;
        let len: usize = slices.iter().map(|s| s.len()).sum();
        if len == 0 {
            return Ok(());
        }
        if !self.0.background.load(Ordering::Relaxed) {
            let deadline = self.stall_deadline(target);
            let result = self.write_until(target, &joined(slices), deadline);
            if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::TimedOut) {
                self.stalled(target, deadline);
                return Ok(());
            }
            return result;
        }
        let queue = self.queue(target);
        let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
        // The output lock is held from the direct write until what it left is queued, so nothing
        // else is written between the two.
        let mut held = None;
        if state.bytes == 0 {
            if let Some(guard) = self.try_lock(target) {
                if self.takes_now(target, len, slices.len()) {
                    drop(state);
                    // `IOV_MAX` slices a call (a file takes any number of calls without blocking):
                    // a short write (a nonblocking stdout that someone else shares, or a signal)
                    // leaves the rest to the writer thread, which waits for room.
                    while !slices.is_empty() {
                        let batch: usize = slices.iter().take(IOV_MAX).map(|s| s.len()).sum();
                        match write_once(target, slices) {
                            Ok(n) => {
                                IoSlice::advance_slices(&mut slices, n);
                                if n < batch {
                                    break;
                                }
                            }
                            Err(Errno::EAGAIN) => break,
                            Err(err) => return Err(err.into()),
                        }
                    }
                    if slices.is_empty() {
                        return Ok(());
                    }
                    held = Some(guard);
                    state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
        let bytes = joined(slices);
        state.bytes += bytes.len();
        state.items.push_back((target, bytes));
        drop((state, held));
        queue.more.notify_one();
        Ok(())
    }

    fn try_lock(&self, target: Target) -> Option<MutexGuard<'_, ()>> {
        match self.0.locks[self.index(target)].try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// What `target` is.
    fn file(&self, target: Target) -> File {
        match target {
            Target::Stdout => self.0.files[0],
            Target::Stderr => self.0.files[1],
            #[cfg(test)]
            Target::Fd(fd) => {
                // SAFETY: the test keeps its file open while the handle writes to it.
                File::of(nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok())
            }
        }
    }

    /// Whether `len` bytes in `slices` slices can be written to `target` now without blocking: any
    /// amount into a file; into a pipe, one `writev` of at most `PIPE_BUF` bytes once `poll` says
    /// there is room (the room it promises takes that much, in one atomic write).
    fn takes_now(&self, target: Target, len: usize, slices: usize) -> bool {
        match self.file(target) {
            File::NeverFull => true,
            File::Pipe => len <= PIPE_BUF && slices <= IOV_MAX && has_room_now(target),
            File::Other => false,
        }
    }

    /// Starts the thread that writes queue `index`, unless it runs.
    fn start_writer(&self, index: usize) -> std::io::Result<()> {
        let queue = &self.0.queues[index];
        let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.writer {
            let stdio = self.clone();
            std::thread::Builder::new()
                .name("output".into())
                .stack_size(SMALL_STACK)
                .spawn(move || stdio.write_queue(index))?;
            state.writer = true;
        }
        Ok(())
    }

    /// The writer thread of queue `index`: writes what is queued, in order, blocking as long as its
    /// reader makes it.
    fn write_queue(&self, index: usize) {
        let queue = &self.0.queues[index];
        loop {
            let (target, bytes) = {
                let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(item) = state.items.pop_front() {
                        break item;
                    }
                    state = queue
                        .more
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            // A closed output loses the line, never the release.
            let _ = self.write_item(queue, target, &bytes);
            let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.bytes -= bytes.len();
            let (empty, room) = (state.bytes == 0, state.bytes < QUEUE_LIMIT);
            drop(state);
            if empty {
                queue.emptied.notify_all();
            }
            if room {
                queue.room.notify_waiters();
            }
        }
    }

    /// Writes a queued item under the output lock, counting what is written as it goes. Into a
    /// pipe in pieces of at most `PIPE_BUF` bytes, ending after a newline where one is, each once
    /// `poll` says there is room: the thread waits in `poll`, never inside a write, so what a
    /// stalled reader has been given ends where a piece ends (a line's end, for lines that short),
    /// also when release-tasks exits or execs without waiting longer.
    fn write_item(&self, queue: &Queue, target: Target, mut bytes: &[u8]) -> std::io::Result<()> {
        let _guard = self.lock(target);
        let pipe = self.file(target) == File::Pipe;
        while !bytes.is_empty() {
            let piece = if pipe { next_piece(bytes) } else { bytes };
            if pipe {
                wait_for_room(target);
            }
            let result = write_all(target, &mut [IoSlice::new(piece)]);
            queue
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .written += piece.len() as u64;
            result?;
            bytes = &bytes[piece.len()..];
        }
        Ok(())
    }

    /// How many bytes the writer threads have written so far, both outputs together: whether a
    /// reader is taking anything.
    #[must_use]
    pub fn written(&self) -> u64 {
        self.0
            .queues
            .iter()
            .map(|q| {
                q.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .written
            })
            .sum()
    }

    /// Whether task output for `target` may be read now: its queue is below [`QUEUE_LIMIT`].
    pub fn has_room(&self, target: Target) -> bool {
        let queue = self.queue(target);
        queue
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
            < QUEUE_LIMIT
    }

    /// What tells a pump that `target`'s queue has room again; enable the `Notified` before
    /// asking [`has_room`](Self::has_room), so that no word is missed in between.
    #[must_use]
    pub fn room_notify(&self, target: Target) -> &tokio::sync::Notify {
        &self.queue(target).room
    }

    /// Writes `bytes` to `target` under the output lock, waiting at most until `deadline` for
    /// room: a stalled reader (a full pipe nobody reads) makes it give up with `TimedOut` instead
    /// of blocking forever. Pieces of at most `PIPE_BUF` bytes go out only once `poll` says there is
    /// room, and a pipe with room takes that much without blocking.
    fn write_until(
        &self,
        target: Target,
        mut bytes: &[u8],
        deadline: Instant,
    ) -> std::io::Result<()> {
        const PIPE_BUF: usize = 4096;
        let _guard = self.lock(target);
        // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
        let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
        while !bytes.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::ZERO);
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

    /// When a wait for `target` must end: [`STALL_WAIT`] from now, or when the wait that found it
    /// stalled ended, in this part of the run (then it may be past already).
    fn stall_deadline(&self, target: Target) -> Instant {
        let stall = self.0.stall.lock().unwrap_or_else(PoisonError::into_inner);
        stall.stalled[usize::from(stall.ending)][self.index(target)]
            .unwrap_or_else(|| Instant::now() + STALL_WAIT)
    }

    /// Remembers that a wait for `target` ended at `deadline` with its lines still waiting.
    fn stalled(&self, target: Target, deadline: Instant) {
        let mut stall = self.0.stall.lock().unwrap_or_else(PoisonError::into_inner);
        let part = usize::from(stall.ending);
        stall.stalled[part][self.index(target)].get_or_insert(deadline);
    }

    /// The release (or the command) has ended: what is written from now on is its end, which a
    /// reader that stalled before may be back for, and which gets its own wait.
    pub fn ending(&self) {
        self.0
            .stall
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ending = true;
    }

    /// Writes a message to stderr for people. Where stderr cannot be written there is nobody to
    /// tell, and the exit status still says what happened, so the error is dropped. A stderr that
    /// nobody reads would block the write, and the output lock behind it, for ever: the write gets
    /// what is left of [`STALL_WAIT`] on a thread of its own, then release-tasks goes on without it.
    pub fn tell(&self, line: &str) {
        let deadline = self.stall_deadline(Target::Stderr);
        if deadline <= Instant::now() {
            return;
        }
        // Every error and warning for people passes here: their secrets are hidden by value.
        let line = crate::secrets::mask(line);
        let line = line.as_ref();
        let (theirs, stdio) = (line.to_owned(), self.clone());
        let (said, wait) = std::sync::mpsc::channel();
        let writer = std::thread::Builder::new().spawn(move || {
            let _ = stdio.write(Target::Stderr, theirs.as_bytes());
            let _ = said.send(());
        });
        let said = match writer {
            Ok(_) => {
                let left = deadline.saturating_duration_since(Instant::now());
                wait.recv_timeout(left).is_ok()
            }
            // No thread can be made (the limit on processes, `ulimit -u`): the message still goes
            // out, written from here, for as long as the deadline allows.
            Err(_) => self
                .write_until(Target::Stderr, line.as_bytes(), deadline)
                .is_ok(),
        };
        if !said {
            self.stalled(Target::Stderr, deadline);
        }
    }

    /// Writes one log line to stderr (see [`send`](Self::send)); a closed stderr loses it.
    pub fn log(&self, line: &[u8]) {
        let _ = self.send(Target::Stderr, &mut [IoSlice::new(line)]);
    }

    /// From now on, what cannot be written at once is queued for a thread of its own, so that the
    /// run loop never waits on a stalled reader: a timeout or a signal must be acted on even when
    /// nobody reads stdout or stderr. The threads start now (one per output file): an error (the
    /// limit on processes) is for the caller to report before anything runs.
    pub fn write_in_background(&self) -> std::io::Result<()> {
        self.start_writer(0)?;
        if !self.0.one_file {
            self.start_writer(1)?;
        }
        self.0.background.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A stop signal came: the end gets one [`STALL_WAIT`] for what is queued, not more.
    pub fn stopping(&self) {
        self.0.stopping.store(true, Ordering::Relaxed);
    }

    /// Waits until what was queued so far is written: as long as the readers take it, and at most
    /// what is left of [`STALL_WAIT`] for one that takes nothing (stalled), each output once; after
    /// a stop signal, at most that however much they take.
    pub fn flush(&self) {
        // Both deadlines first: two stalled outputs cost one wait, not two.
        let outputs = [Target::Stdout, Target::Stderr];
        let deadlines = outputs.map(|t| self.stall_deadline(t));
        for (target, mut deadline) in outputs.into_iter().zip(deadlines) {
            if target == Target::Stderr && self.0.one_file {
                break;
            }
            let queue = self.queue(target);
            let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
            let mut written = state.written;
            while state.bytes > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    if state.written == written || self.0.stopping.load(Ordering::Relaxed) {
                        drop(state);
                        self.stalled(target, deadline);
                        break;
                    }
                    // A slow reader, not a stalled one: it gets another wait.
                    written = state.written;
                    deadline = Instant::now() + STALL_WAIT;
                    continue;
                }
                state = queue
                    .emptied
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
    }
}

impl File {
    fn of(stat: Option<nix::sys::stat::FileStat>) -> File {
        use nix::sys::stat::SFlag;
        let Some(st) = stat else {
            return File::Other;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFREG {
            File::NeverFull
        } else if kind == SFlag::S_IFIFO {
            File::Pipe
        } else if kind == SFlag::S_IFCHR && never_full_device(st.st_rdev) {
            File::NeverFull
        } else {
            File::Other
        }
    }
}

/// Linux's memory devices (major 1: `/dev/null`, `/dev/zero`, `/dev/full`) never make a writer wait.
#[cfg(target_os = "linux")]
fn never_full_device(rdev: nix::libc::dev_t) -> bool {
    nix::sys::stat::major(rdev) == 1
}

#[cfg(not(target_os = "linux"))]
fn never_full_device(_: nix::libc::dev_t) -> bool {
    false
}

/// The most bytes one write into a pipe takes atomically, and that the room `poll` promises holds.
const PIPE_BUF: usize = nix::libc::PIPE_BUF;

/// Whether `poll` says `target` has room now.
fn has_room_now(target: Target) -> bool {
    // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
    let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLOUT))
}

/// Waits, as long as it takes, until `poll` says `target` has room (or an error or hang-up, which
/// the write then reports).
fn wait_for_room(target: Target) {
    // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
    let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    while let Err(Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
}

/// The next piece of `bytes` to write into a pipe: at most `PIPE_BUF` bytes, ending after the last
/// newline in them, unless they are all that is left or hold no newline.
fn next_piece(bytes: &[u8]) -> &[u8] {
    let most = &bytes[..bytes.len().min(PIPE_BUF)];
    match memchr::memrchr(b'\n', most) {
        Some(i) if most.len() < bytes.len() => &most[..=i],
        _ => most,
    }
}

/// The bytes of `slices`, in one piece.
fn joined(slices: &[IoSlice<'_>]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(slices.iter().map(|s| s.len()).sum());
    for slice in slices {
        bytes.extend_from_slice(slice);
    }
    bytes
}

/// One `writev` of `slices` to `target` (retried only when interrupted before writing anything):
/// how much of them it wrote.
fn write_once(target: Target, slices: &[IoSlice<'_>]) -> Result<usize, Errno> {
    // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
    let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
    loop {
        match nix::sys::uio::writev(fd, &slices[..slices.len().min(IOV_MAX)]) {
            Err(Errno::EINTR) => {}
            other => return other,
        }
    }
}

/// Writes all of `slices` to `target` (the caller holds its lock), waiting for room as long as it
/// takes.
fn write_all(target: Target, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match write_once(target, slices) {
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(Errno::EAGAIN) => {
                // Our output is a non-blocking file description shared with someone else: wait
                // for room.
                // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
                let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_waited_for_once_before_the_release_and_once_at_its_end() {
        let stdio = Stdio::new();
        let first = stdio.stall_deadline(Target::Stderr);
        assert!(first + Duration::from_secs(1) > Instant::now() + STALL_WAIT);
        stdio.stalled(Target::Stderr, first);
        assert_eq!(
            stdio.stall_deadline(Target::Stderr),
            first,
            "later waits end with the first"
        );
        stdio.stalled(Target::Stderr, first + STALL_WAIT);
        assert_eq!(
            stdio.stall_deadline(Target::Stderr),
            first,
            "the first stall is the one kept"
        );
        stdio.ending();
        let end = stdio.stall_deadline(Target::Stderr);
        assert!(end >= first, "the end gets a wait of its own");
        stdio.stalled(Target::Stderr, end);
        assert_eq!(stdio.stall_deadline(Target::Stderr), end);
    }

    /// A pipe, its write end a target, during a release (with no writer thread: what is queued
    /// stays queued).
    fn pipe_target() -> (Stdio, std::os::fd::OwnedFd, std::os::fd::OwnedFd, Target) {
        let stdio = Stdio::new();
        stdio.0.background.store(true, Ordering::Relaxed);
        let (read, write) = unistd::pipe().expect("pipe");
        let target = Target::Fd(std::os::fd::AsRawFd::as_raw_fd(&write));
        (stdio, read, write, target)
    }

    /// Whether anything went through `target`'s queue.
    fn queued(stdio: &Stdio, target: Target) -> bool {
        let state = stdio.queue(target).state.lock().expect("lock");
        state.written > 0 || state.bytes > 0
    }

    #[test]
    fn a_line_a_pipe_has_room_for_is_written_at_once_by_the_caller() {
        let (stdio, read, _write, target) = pipe_target();
        stdio
            .send(
                target,
                &mut [IoSlice::new(b"a | "), IoSlice::new(b"line\n")],
            )
            .expect("send");
        let mut buf = [0u8; 64];
        let n = unistd::read(&read, &mut buf).expect("read");
        assert_eq!(&buf[..n], b"a | line\n");
        assert!(!queued(&stdio, target), "written by the caller");
    }

    #[test]
    fn more_slices_than_one_writev_takes_are_all_written_by_the_caller() {
        let file = tempfile::NamedTempFile::new().expect("file");
        let target = Target::Fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        let stdio = Stdio::new();
        stdio.write_in_background().expect("writer threads");
        let lines: Vec<Vec<u8>> = (0..3 * IOV_MAX)
            .map(|i| format!("{i}\n").into_bytes())
            .collect();
        let mut slices: Vec<IoSlice<'_>> = lines.iter().map(|l| IoSlice::new(l)).collect();
        stdio.send(target, &mut slices).expect("send");
        assert!(!queued(&stdio, target), "handed to a thread");
        assert_eq!(std::fs::read(file.path()).expect("read"), lines.concat());
    }

    #[test]
    fn what_a_full_pipe_cannot_take_is_queued_in_order_and_written_once_it_is_read() {
        let (stdio, read, write, target) = pipe_target();
        stdio.start_writer(0).expect("writer thread");
        nix::fcntl::fcntl(
            &write,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("nonblocking");
        let chunk = [b'x'; 4096];
        let mut filled = 0;
        while let Ok(n) = unistd::write(&write, &chunk) {
            filled += n;
        }
        nix::fcntl::fcntl(
            &write,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .expect("blocking again");
        let started = Instant::now();
        for line in [&b"first\n"[..], b"second\n"] {
            stdio.send(target, &mut [IoSlice::new(line)]).expect("send");
        }
        let big = vec![b'y'; QUEUE_LIMIT];
        stdio.send(target, &mut [IoSlice::new(&big)]).expect("send");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a stalled reader held the caller up"
        );
        assert!(queued(&stdio, target));
        assert!(!stdio.has_room(target), "over the limit");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = unistd::read(&read, &mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            all
        });
        let flushing = Instant::now();
        stdio.flush();
        assert!(
            flushing.elapsed() < Duration::from_secs(4),
            "the flush waited for a reader that took everything"
        );
        assert!(stdio.has_room(target));
        assert_eq!(stdio.queue(target).state.lock().expect("lock").bytes, 0);
        assert_eq!(
            stdio.written(),
            (13 + QUEUE_LIMIT) as u64,
            "every byte counted"
        );
        drop(write);
        let all = reader.join().expect("reader");
        assert_eq!(all.len(), filled + 13 + QUEUE_LIMIT);
        assert_eq!(&all[filled..filled + 13], b"first\nsecond\n");
    }

    #[test]
    fn pieces_for_a_pipe_end_at_a_line_end_and_are_at_most_pipe_buf() {
        let line = |n: usize| [vec![b'x'; n - 1], b"\n".to_vec()].concat();
        let short = [line(100), line(100)].concat();
        assert_eq!(next_piece(&short), &short[..], "all that is left");
        let rest = b"line\npartial";
        assert_eq!(
            next_piece(rest),
            &rest[..],
            "all that is left, a partial line too"
        );
        let many = line(1000).repeat(10);
        assert_eq!(next_piece(&many).len(), 4000, "whole lines within PIPE_BUF");
        let long = vec![b'x'; 3 * PIPE_BUF];
        assert_eq!(
            next_piece(&long).len(),
            PIPE_BUF,
            "a long line, PIPE_BUF at a time"
        );
        let tail = [line(PIPE_BUF - 10), vec![b'y'; 20]].concat();
        assert_eq!(next_piece(&tail).len(), PIPE_BUF - 10);
        let exact = vec![b'z'; PIPE_BUF];
        assert_eq!(next_piece(&exact).len(), PIPE_BUF);
    }

    #[test]
    fn a_pump_waiting_for_room_is_told_when_the_queue_drains() {
        let (stdio, read, write, target) = pipe_target();
        stdio.start_writer(0).expect("writer thread");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let notified = stdio.room_notify(target).notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let big = vec![b'y'; QUEUE_LIMIT + 1];
        stdio.send(target, &mut [IoSlice::new(&big)]).expect("send");
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut total = 0;
            while let Ok(n @ 1..) = unistd::read(&read, &mut buf) {
                total += n;
            }
            total
        });
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .expect("told of room");
        });
        assert!(stdio.has_room(target));
        stdio.flush();
        drop(write);
        assert_eq!(reader.join().expect("reader"), QUEUE_LIMIT + 1);
    }

    /// Fills the pipe `write` (to its last page) without blocking, then makes it blocking again.
    fn fill(write: &std::os::fd::OwnedFd) {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        fcntl(write, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("nonblocking");
        while unistd::write(write, &[b'x'; 4096]).is_ok() {}
        fcntl(write, FcntlArg::F_SETFL(OFlag::empty())).expect("blocking again");
    }

    #[test]
    fn each_item_written_leaves_the_queue_and_the_flush_sees_it_empty() {
        let (stdio, read, write, target) = pipe_target();
        {
            let mut state = stdio.queue(target).state.lock().expect("lock");
            for byte in [b"a", b"b"] {
                state.items.push_back((target, byte.to_vec()));
            }
            state.bytes = 2;
        }
        stdio.start_writer(0).expect("writer thread");
        let flushing = Instant::now();
        stdio.flush();
        assert!(flushing.elapsed() < Duration::from_secs(4));
        assert_eq!(stdio.queue(target).state.lock().expect("lock").bytes, 0);
        let mut buf = [0u8; 8];
        assert_eq!(unistd::read(&read, &mut buf).expect("read"), 2);
        assert_eq!(&buf[..2], b"ab");
        drop(write);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_queued_item_goes_into_a_pipe_a_piece_at_a_time_as_room_is_made() {
        let (stdio, read, write, target) = pipe_target();
        stdio.start_writer(0).expect("writer thread");
        fill(&write);
        let item = b"0123456789abcde\n".repeat(3 * PIPE_BUF / 16);
        stdio
            .send(target, &mut [IoSlice::new(&item)])
            .expect("send");
        // One page of room: one piece goes in, and is counted, while the rest waits.
        let mut page = vec![0u8; 4096];
        let mut got = 0;
        while got < page.len() {
            got += unistd::read(&read, &mut page[got..]).expect("read");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while stdio.written() == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing counted with a page of room"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let written = stdio.written();
        assert_eq!(written % 16, 0, "pieces end at a line's end");
        assert!(
            written < item.len() as u64,
            "the whole item at once: {written}"
        );
        drop((read, write));
    }

    #[test]
    fn a_flush_gives_up_on_a_reader_that_takes_nothing_after_the_stall_wait() {
        let (stdio, read, write, target) = pipe_target();
        stdio.start_writer(0).expect("writer thread");
        fill(&write);
        stdio
            .send(target, &mut [IoSlice::new(b"never read\n")])
            .expect("send");
        let flushing = Instant::now();
        stdio.flush();
        let waited = flushing.elapsed();
        assert!(
            waited + Duration::from_millis(100) >= STALL_WAIT && waited < STALL_WAIT * 3,
            "waited {waited:?}"
        );
        assert!(stdio.queue(target).state.lock().expect("lock").bytes > 0);
        drop((read, write));
    }

    #[test]
    fn a_line_behind_queued_ones_waits_its_turn() {
        let (stdio, read, write, target) = pipe_target();
        let queue = stdio.queue(target);
        // Something queued and not yet written (no writer thread runs for it).
        {
            let mut state = queue.state.lock().expect("lock");
            state.items.push_back((target, b"queued\n".to_vec()));
            state.bytes = 7;
        }
        stdio
            .send(target, &mut [IoSlice::new(b"later\n")])
            .expect("send");
        let state = queue.state.lock().expect("lock");
        assert_eq!(state.items.len(), 2, "queued behind, not written past");
        assert_eq!(state.items[1].1, b"later\n");
        drop((state, read, write));
    }

    #[test]
    fn a_pipe_takes_at_most_pipe_buf_bytes_at_once_and_only_with_room() {
        let (_read, write) = unistd::pipe().expect("pipe");
        let target = Target::Fd(std::os::fd::AsRawFd::as_raw_fd(&write));
        let stdio = Stdio::new();
        assert!(stdio.takes_now(target, PIPE_BUF, 1));
        assert!(
            !stdio.takes_now(target, PIPE_BUF + 1, 1),
            "more than PIPE_BUF"
        );
        assert!(
            !stdio.takes_now(target, 100, IOV_MAX + 1),
            "more than one writev"
        );
        // Writes of uneven size take a page each: the pipe is full long before its bytes fill it.
        nix::fcntl::fcntl(
            &write,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("nonblocking");
        while unistd::write(&write, &[b'x'; 2100]).is_ok() {}
        assert!(!stdio.takes_now(target, 1, 1), "a full pipe takes nothing");
    }

    #[test]
    fn what_an_output_is_decides_whether_it_is_written_from_the_run_loop() {
        let stat = |fd: &dyn std::os::fd::AsFd| nix::sys::stat::fstat(fd.as_fd()).ok();
        let file = tempfile::tempfile().expect("file");
        assert_eq!(File::of(stat(&file)), File::NeverFull);
        let (read, _write) = unistd::pipe().expect("pipe");
        assert_eq!(File::of(stat(&read)), File::Pipe);
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        assert_eq!(File::of(stat(&a)), File::Other);
        assert_eq!(File::of(None), File::Other);
        let null = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        let expected = if cfg!(target_os = "linux") {
            File::NeverFull
        } else {
            File::Other
        };
        assert_eq!(File::of(stat(&null)), expected);
    }

    /// A handle whose fds 1 and 2 are one file, or two.
    fn stdio_with(one_file: bool) -> Stdio {
        let stdio = Stdio::new();
        let mut shared = Arc::try_unwrap(stdio.0).unwrap_or_else(|_| unreachable!("one handle"));
        shared.one_file = one_file;
        Stdio(Arc::new(shared))
    }

    #[test]
    fn stderr_has_a_lock_and_queue_of_its_own_unless_it_is_stdouts_file() {
        let two = stdio_with(false);
        assert_eq!(two.index(Target::Stdout), 0);
        assert_eq!(two.index(Target::Stderr), 1);
        assert!(!std::ptr::eq(
            two.queue(Target::Stdout),
            two.queue(Target::Stderr)
        ));
        let one = stdio_with(true);
        assert_eq!(one.index(Target::Stdout), 0);
        assert_eq!(
            one.index(Target::Stderr),
            0,
            "one file, one lock: lines never mix"
        );
        assert!(std::ptr::eq(
            one.queue(Target::Stdout),
            one.queue(Target::Stderr)
        ));
    }

    #[test]
    fn the_output_format_is_set_once() {
        let stdio = Stdio::new();
        assert_eq!(stdio.output_format(), OutputFormat::Text);
        stdio.set_output_format(OutputFormat::Json);
        stdio.set_output_format(OutputFormat::Text);
        assert_eq!(stdio.output_format(), OutputFormat::Json);
        assert_eq!(stdio.clone().output_format(), OutputFormat::Json);
    }
}
