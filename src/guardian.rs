//! The guardian: a small helper process that kills what a release started if release-tasks itself is
//! killed (SIGKILL, the OOM killer), when no clean-up code of release-tasks can run.
//!
//! `PR_SET_PDEATHSIG` reaches only a task's first process. The guardian is release-tasks started again
//! as `release-tasks __guardian RUN_ID`, in a process group of its own and deaf to the signals aimed
//! at release-tasks. It learns the running task's group id through a pipe on its stdin; when that pipe
//! closes (release-tasks is gone, however it ended), it SIGKILLs the group, then every process whose
//! environment carries `RELEASE_TASKS_RUN_ID=RUN_ID`, which finds what escaped the group (a `setsid`
//! daemon) as long as it kept its environment. After a normal end there is nothing left for it to do.
//!
//! On macOS, which has neither `PR_SET_PDEATHSIG` nor `/proc`, the guardian is all that kills a
//! killed release-tasks's task: it still kills the task's group; the sweep by environment needs
//! `/proc` and finds nothing there.

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::{self, Pid};

use crate::process::RUN_ID_VAR;

/// The first argument that makes release-tasks the guardian (handled first thing in `main`).
pub const SUBCOMMAND: &str = "__guardian";

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
    /// Starts the guardian for the run `run_id`.
    pub fn start(run_id: &str) -> io::Result<Guardian> {
        let mut child = std::process::Command::new(own_executable()?)
            .arg(SUBCOMMAND)
            .arg(run_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the guardian's pipe was not created"))?;
        Ok(Guardian {
            pid: Pid::from_raw(child.id() as i32),
            pipe: pipe.into(),
        })
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

/// What starts release-tasks again: /proc/self/exe, not a path, so it still runs if a deploy
/// replaced the binary meanwhile.
#[cfg(target_os = "linux")]
#[allow(clippy::unnecessary_wraps)] // the same signature as elsewhere, where it can fail
fn own_executable() -> io::Result<std::path::PathBuf> {
    Ok("/proc/self/exe".into())
}

/// Without /proc, the path the system gives for the running binary.
#[cfg(not(target_os = "linux"))]
fn own_executable() -> io::Result<std::path::PathBuf> {
    std::env::current_exe()
}

/// The guardian's whole life: collect group ids until stdin closes, then kill what is left.
pub fn guard(run_id: &str) -> ! {
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
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 4];
    while stdin.read_exact(&mut buf).is_ok() {
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
        let marker = format!("{RUN_ID_VAR}={run_id}");
        for _ in 0..5 {
            if sweep(marker.as_bytes()) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    std::process::exit(0)
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
