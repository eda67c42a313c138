//! `release-tasks exec -- CMD ARGS...`: after a successful release, release-tasks replaces itself with
//! the app's server through `execve`, so a container entrypoint needs no shell in between.
//!
//! The server keeps release-tasks's pid (PID 1 stays PID 1, and the platform's signals reach the
//! server directly) and gets the environment the tasks saw. It must not inherit anything of
//! release-tasks's own: this module makes every descriptor above stderr close on exec, empties the
//! signal mask and puts every disposition back to its default (Rust's runtime ignores SIGPIPE, which
//! `execve` would otherwise hand on). That no helper process outlives the release (the guardian)
//! is the run's business (`run.rs`), done before this is called.
//!
//! A stop signal that arrives between the release's end and the exec must not be lost (the server
//! would start after the platform asked to stop): [`hold_stop_signals`] takes the stop signals over
//! from the run's handlers when the release ends, and [`stop_received`] is asked before the exec.

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

use crate::error::Error;
use crate::report::{EXIT_CANNOT_RUN, EXIT_NOT_FOUND};
use crate::signals::STOPPING;
use crate::spawn::{candidates, reset_dispositions, to_cstrings};

/// The first stop signal that arrived once the release's own handlers were gone (0: none).
static STOP_RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_stop(sig: nix::libc::c_int) {
    // Async-signal-safe: one atomic operation.
    let _ = STOP_RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// From now until the exec, a stop signal is recorded for [`stop_received`] instead of going to the
/// run loop's handlers, which nobody polls once the release has ended. Call it while those handlers
/// are still installed and then take what they queued, so that no signal falls in between.
pub fn hold_stop_signals() {
    let action = SigAction::new(
        SigHandler::Handler(record_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in STOPPING {
        // SAFETY: the handler makes one atomic store, which is async-signal-safe.
        let _ = unsafe { signal::sigaction(sig, &action) };
    }
}

/// The first stop signal received since [`hold_stop_signals`], if any.
#[must_use]
pub fn stop_received() -> Option<Signal> {
    Signal::try_from(STOP_RECEIVED.load(Ordering::SeqCst)).ok()
}

/// Replaces release-tasks with `argv`, looked up on `PATH` as a shell would, with `env` as its whole
/// environment. Returns only when that cannot be done, with the error to exit with: 127 when the
/// program is not found, 126 when it cannot be executed.
pub fn replace_with(argv: &[OsString], env: &[(OsString, OsString)]) -> Error {
    let Some(program) = argv.first() else {
        return Error::Usage(
            "`exec` needs a command to run after the release: `release-tasks exec -- CMD ARGS...`"
                .into(),
        );
    };
    let Some(c_argv) = to_cstrings(argv.iter().map(OsString::as_os_str)) else {
        return Error::Usage("`exec`: a command argument contains a NUL byte".into());
    };
    let environ: Vec<OsString> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect();
    let Some(environ) = to_cstrings(environ.iter().map(OsString::as_os_str)) else {
        return Error::Usage("`exec`: an environment variable contains a NUL byte".into());
    };
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str());
    let candidates = candidates(Path::new(program), path);
    wait_for_children(CHILDREN_GONE);
    prepare_for_exec();
    // Past this point a stop signal takes its default action and ends release-tasks with 128+N;
    // one that came before must not be lost in the exec.
    if let Some(sig) = stop_received() {
        return interrupted(sig);
    }
    let mut last = Errno::ENOENT;
    for candidate in &candidates {
        let Some(file) = to_cstrings(std::iter::once(candidate.as_os_str())) else {
            continue;
        };
        // Returns only on failure. EACCES on one PATH entry does not hide the program later on PATH
        // (execvp's rule); the error reported is the most telling one seen.
        let Err(mut err) = nix::unistd::execve(&file[0], &c_argv, &environ);
        if err == Errno::ENOEXEC {
            // A script without a `#!` line: the shell runs it, as execvp and a shell would.
            let mut sh_argv = vec![c"/bin/sh".to_owned(), file[0].clone()];
            sh_argv.extend(c_argv.iter().skip(1).cloned());
            let Err(sh_err) = nix::unistd::execve(c"/bin/sh", &sh_argv, &environ);
            err = sh_err;
        }
        if err != Errno::ENOENT && err != Errno::ENOTDIR {
            last = err;
        }
    }
    let shown = program.to_string_lossy();
    if last == Errno::ENOENT {
        Error::Exec {
            code: EXIT_NOT_FOUND,
            message: format!("`exec`: command not found: `{shown}`; is it installed and on PATH?"),
        }
    } else {
        Error::Exec {
            code: EXIT_CANNOT_RUN,
            message: format!(
                "`exec`: cannot run `{shown}`: {}; is it an executable file (chmod +x)?",
                std::io::Error::from(last)
            ),
        }
    }
}

/// The error for a stop signal that arrived after the release but before the command started.
#[must_use]
pub fn interrupted(sig: Signal) -> Error {
    Error::Exec {
        code: 128 + sig as i32,
        message: format!(
            "`exec`: received {sig} after the release ended; the command was not started"
        ),
    }
}

/// How long the release's last helper processes get to exit before the command starts anyway.
const CHILDREN_GONE: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until release-tasks has no child left: the guardian ends once the release closed its pipe,
/// and must be gone before the server takes over this pid (a guardian still sweeping could take the
/// server for a leftover of the release). Every task's processes were reaped by the run already.
fn wait_for_children(limit: std::time::Duration) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = std::time::Instant::now() + limit;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(WaitStatus::StillAlive) => {
                tracing::warn!(
                    "a helper process of the release is still running; starting the command anyway"
                );
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// What the server must not inherit: descriptors other than 0, 1 and 2, a blocked signal, an ignored
/// one. A signal that arrives from here on kills release-tasks by its default action, as it would
/// kill the server an instant later.
fn prepare_for_exec() {
    close_descriptors_on_exec();
    reset_dispositions();
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Marks every open descriptor above stderr close-on-exec. Listing them (rather than looping to the
/// descriptor limit) keeps this quick when the limit is a million.
fn close_descriptors_on_exec() {
    let dir = if cfg!(target_os = "linux") {
        "/proc/self/fd"
    } else {
        "/dev/fd"
    };
    let fds: Vec<i32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: setting FD_CLOEXEC changes no memory; a descriptor that was the directory's own
        // (already closed) just fails with EBADF.
        unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
    }
}
