//! The guardian: a small helper process that kills what a release started if release-tasks itself is
//! killed (SIGKILL, the OOM killer), when no clean-up code of release-tasks can run.
//!
//! `PR_SET_PDEATHSIG` reaches only a task's first process. The guardian is a fork of release-tasks,
//! made once per release before the first task and before any thread exists (so the copy is whole:
//! no lock is held by a thread that is not there), in a process group of its own, with /dev/null as
//! its stdout and stderr, and deaf to the signals aimed at release-tasks. It learns the running task's
//! group id through a pipe; when that pipe closes (release-tasks is gone, however it ended), it
//! SIGKILLs the group, then every process whose environment carries `RELEASE_TASKS_RUN_ID=RUN_ID`,
//! which finds what escaped the group (a `setsid` daemon) as long as it kept its environment. After a
//! normal end there is nothing left for it to do.
//!
//! A fork, not an exec of the binary: it costs a fraction of starting the program again (measured in
//! the README, "Benchmarks"), works where the binary cannot be re-executed (qemu-user, a binary
//! replaced by a deploy), and needs no hidden subcommand.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::{self, ForkResult, Pid};

use crate::process::RUN_ID_VAR;

/// The running guardian, as release-tasks sees it.
pub struct Guardian {
    pid: Pid,
    pipe: OwnedFd,
}

/// An id for this run of release-tasks, unique on the machine.
#[must_use]
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

impl Guardian {
    /// Starts the guardian for the run `run_id`. Call it before release-tasks starts any thread: the
    /// child carries on in this program's code, which needs the memory allocator (musl and glibc
    /// both keep it usable in a child forked from several threads, but nothing else is promised).
    pub fn start(run_id: &str) -> std::io::Result<Guardian> {
        let (read, write) = crate::output::cloexec_pipe()?;
        let null = nix::fcntl::open(
            "/dev/null",
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let marker = format!("{RUN_ID_VAR}={run_id}");
        // SAFETY: the child runs `guard`, which only makes system calls and allocates, and ends with
        // _exit: it never returns into the caller's code.
        match unsafe { unistd::fork() }? {
            ForkResult::Child => {
                drop(write);
                // Out of release-tasks's group, so a signal to that group (a terminal's Ctrl-C) does
                // not reach it; and off release-tasks's stdout and stderr, so a reader of those sees
                // their end when release-tasks ends.
                let _ = unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
                // SAFETY: dup2 on descriptors this process owns.
                unsafe {
                    nix::libc::dup2(null.as_raw_fd(), 0);
                    nix::libc::dup2(null.as_raw_fd(), 1);
                    nix::libc::dup2(null.as_raw_fd(), 2);
                }
                drop(null);
                guard(&read, marker.as_bytes())
            }
            ForkResult::Parent { child } => Ok(Guardian {
                pid: child,
                pipe: write,
            }),
        }
    }

    /// The guardian's pid, which is not a task's process.
    #[must_use]
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Tells the guardian about a group to kill (`watch = true`) or to forget.
    pub fn tell(&self, pgid: Pid, watch: bool) {
        let value = if watch { pgid.as_raw() } else { -pgid.as_raw() };
        // A failed write means the guardian is gone; on Linux the task still has PR_SET_PDEATHSIG.
        let _ = unistd::write(&self.pipe, &value.to_ne_bytes());
    }
}

/// The guardian's whole life: collect group ids until the pipe closes, then kill what is left.
fn guard(pipe: &OwnedFd, marker: &[u8]) -> ! {
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal::signal(sig, SigHandler::SigIgn) };
    }
    let mut groups: Vec<i32> = Vec::new();
    let mut buf = [0u8; 4];
    while read_exact(pipe, &mut buf) {
        let value = i32::from_ne_bytes(buf);
        if value > 0 {
            groups.push(value);
        } else {
            groups.retain(|&g| g != -value);
        }
    }
    for &g in &groups {
        let _ = signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    if !groups.is_empty() {
        // A process may fork while the sweep runs; a few rounds catch its children too.
        for _ in 0..5 {
            if sweep(marker) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // SAFETY: _exit skips the destructors and exit handlers of the release-tasks this is a copy of.
    unsafe { nix::libc::_exit(0) }
}

/// Fills `buf` from `pipe`; false once the pipe has closed (or fails).
fn read_exact(pipe: &OwnedFd, buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        match unistd::read(pipe, &mut buf[filled..]) {
            Ok(0) => return false,
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// SIGKILLs every process whose environment holds `marker`; returns how many there were.
#[cfg(target_os = "linux")]
fn sweep(marker: &[u8]) -> usize {
    let me = std::process::id() as i32;
    let mut killed = 0;
    for pid in crate::process::process_ids().filter(|&pid| pid != me) {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ.split(|&b| b == 0).any(|var| var == marker) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// Another process's environment is readable only through /proc (macOS's `KERN_PROCARGS2` needs
/// more than a guardian should do): there is nothing to sweep, and the group kill is all it does.
#[cfg(not(target_os = "linux"))]
fn sweep(_marker: &[u8]) -> usize {
    0
}
