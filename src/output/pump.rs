//! The pumps: each stream of a running task is copied by a thread of its own to release-tasks's
//! stdout or stderr, through [`Lines`], so that a slow reader of release-tasks's output can never
//! delay a timeout or a signal in the run loop.
//!
//! A thread that finished a stream waits (in the [`Stdio`] handle's pool) for the next task's rather
//! than ending: starting two threads per task cost more than the rest of the pumping of a short
//! task. A task's `TaskRun` (`task_run.rs`) owns its two [`Pump`]s: it waits for them to finish, and
//! tells them to stop (after a last bounded drain) when a process outside the task holds a pipe open.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd;
use tokio::sync::oneshot;

use super::lines::{Input, Lines};
use super::pipe::{SMALL_STACK, cloexec_pipe, enlarge_pipe};
use super::{Stdio, Target};
use crate::tail::Tail;

/// Size of one read from a task's pipe, at most.
pub(super) const READ_SIZE: usize = 256 * 1024;
/// A pump thread's first read buffer: most tasks write a few lines, which do not pay for zeroing and
/// faulting in 256 KiB. It grows (to [`READ_SIZE`]) whenever a read fills it, and stays with the
/// thread for its next tasks.
const FIRST_READ: usize = 16 * 1024;
/// What is still read from a pipe after being told to stop, so a chatty leftover cannot hold us.
const FINAL_DRAIN: usize = 1024 * 1024;

/// A stream being pumped, by a thread of its own.
pub struct Pump {
    done: oneshot::Receiver<()>,
    /// Closing this (dropping it) tells the pump to drain what is there and stop.
    stop: Option<OwnedFd>,
    finished: bool,
}

/// One stream for a pump thread to copy.
pub(super) struct Job {
    source: OwnedFd,
    stop: OwnedFd,
    target: Target,
    lines: Lines,
    /// Where the task's last lines are kept (see `tail.rs`).
    tail: Option<Arc<Mutex<Tail>>>,
    stdio: Stdio,
    done: oneshot::Sender<()>,
}

impl Pump {
    /// Starts copying `source` to `target` through `stdio`, each line prefixed with `prefix` (or as
    /// JSON, as `stdio` says), and feeding what passes to `tail` (the task's last lines).
    pub fn start(
        stdio: &Stdio,
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
            lines: Lines::with_format(stdio.output_format(), target.stream(), prefix),
            tail,
            stdio: stdio.clone(),
            done: tx,
        };
        loop {
            let Some(worker) = stdio.idle_pump() else {
                break;
            };
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
            stdio,
            done,
        } = job;
        pump(
            &source,
            &stop,
            Sink::new(&stdio, target, tail),
            lines,
            &mut buf,
        );
        drop((source, stop));
        // Idle before saying so: the next task's pump, started on that word, finds this thread.
        stdio.pump_idle(next.clone());
        drop(stdio);
        let _ = done.send(());
        match jobs.recv() {
            Ok(more) => job = more,
            Err(_) => return,
        }
    }
}

fn pump(source: &OwnedFd, stop: &OwnedFd, mut sink: Sink<'_>, mut lines: Lines, buf: &mut Vec<u8>) {
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
                sink.emit(&mut lines, Input::Flush);
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
    sink.emit(&mut lines, Input::End);
}

/// Writes what [`Lines`] renders, until our own output turns out to be closed.
struct Sink<'a> {
    stdio: &'a Stdio,
    target: Target,
    open: bool,
    /// Where the task's last lines are kept, fed with every chunk that passes.
    tail: Option<Arc<Mutex<Tail>>>,
}

impl<'a> Sink<'a> {
    fn new(stdio: &'a Stdio, target: Target, tail: Option<Arc<Mutex<Tail>>>) -> Self {
        Sink {
            stdio,
            target,
            open: true,
            tail,
        }
    }

    /// A chunk read: to the tail, and its lines out.
    fn feed(&mut self, lines: &mut Lines, data: &[u8]) {
        if let Some(tail) = &self.tail {
            let stream = usize::from(self.target != Target::Stdout);
            tail.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .feed(stream, data);
        }
        self.emit(lines, Input::Data(data));
    }

    /// Writes what `lines` renders for `input` in one locked `writev` batch.
    fn emit(&mut self, lines: &mut Lines, input: Input<'_>) {
        let mut slices = lines.render(input, Instant::now());
        if self.open
            && !slices.is_empty()
            && self.stdio.write_vectored(self.target, &mut slices).is_err()
        {
            // Our own output is gone (a closed pipe): keep draining the task so it never blocks.
            self.open = false;
        }
    }
}

/// Reads what is already in the pipe without waiting for more, up to [`FINAL_DRAIN`] bytes.
fn drain(source: &OwnedFd, buf: &mut [u8], lines: &mut Lines, sink: &mut Sink<'_>) {
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
    use std::time::Duration;

    use super::*;
    use crate::output::pipe::PIPE_SIZE;

    fn stdio() -> Stdio {
        Stdio::new()
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
        let mut pump = Pump::start(&stdio(), read, target, b"t | ".to_vec(), None).expect("pump");
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
        let mut pump = Pump::start(&stdio(), read, target, b"t | ".to_vec(), None).expect("pump");
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
            let stdio = stdio();
            pump(
                &source,
                &stop_read,
                Sink::new(&stdio, target, None),
                Lines::new(b"t | ".to_vec()),
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
