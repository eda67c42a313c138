//! Processes: spawning a task in its own process group, signalling everything a task started (its
//! group and what escaped it), reaping, and becoming the subreaper that finds escaped processes.
//!
//! This is the one place that makes process system calls for tasks. It knows nothing of deadlines or
//! of what a signal means to the release: the task's `TaskRun` (`task_run.rs`) calls it, on
//! `run.rs`'s word. The guardian (`guardian.rs`) uses its process listing and finds a run's processes
//! by [`RUN_ID_VAR`], which is defined here because every task gets it here.
//!
//! Linux-only parts sit behind `cfg(target_os = "linux")` with the fallback beside them: elsewhere
//! (macOS, for local runs) there is no subreaper, no `PR_SET_PDEATHSIG`, no real-time signals and no
//! `/proc`, so processes that escape a task's group are not found; groups, signals and reaping work.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{self, Pid};

use crate::config::Task;

/// The variable that marks every process of one release run.
pub const RUN_ID_VAR: &str = "RELEASE_TASKS_RUN_ID";

/// The process groups of the tasks running now (0: a free slot), kept by [`TaskProcesses`] for the
/// panic hook, which is why this is a process-wide static and not owned by a value passed down ([`kill_every_task`]): the release profile aborts on panic, so no destructor runs.
/// Tasks run one at a time; the spare slots cost nothing. Atomics, because a panic may strike while
/// any lock is held.
static LIVE_GROUPS: [AtomicI32; 4] = [const { AtomicI32::new(0) }; 4];
/// The child of release-tasks that is not a task's (the guardian), for the panic hook.
static EXEMPT: AtomicI32 = AtomicI32::new(0);

/// SIGKILLs every running task's process group and what escaped it: what the panic hook in `main`
/// does before release-tasks exits 70, so that even a bug leaves no task running.
pub fn kill_every_task() {
    let exempt: Vec<Pid> = match EXEMPT.load(Ordering::SeqCst) {
        0 => Vec::new(),
        pid => vec![Pid::from_raw(pid)],
    };
    for slot in &LIVE_GROUPS {
        let pgid = slot.swap(0, Ordering::SeqCst);
        if pgid != 0 {
            let procs = TaskProcesses {
                pgid: Pid::from_raw(pgid),
                exempt: exempt.clone(),
                finished: true,
            };
            procs.signal(Signal::SIGKILL);
        }
    }
}

/// Makes release-tasks the reaper of every orphan its tasks leave, so that a daemonized process is
/// still found (and terminated) when its task ends, and no zombie lingers when running as PID 1.
#[cfg(target_os = "linux")]
pub fn become_subreaper() {
    // Without it release-tasks still works, with fewer guarantees; it is not worth failing a release.
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %err, "cannot become a child subreaper; processes that escape a task's group may outlive it");
    }
}

/// Only Linux has a child subreaper: elsewhere an orphan goes to launchd or init, and what escaped a
/// task's group is not found (the README's macOS note says so).
#[cfg(not(target_os = "linux"))]
pub fn become_subreaper() {}

/// A task's main process just after spawning, with the read ends of its output pipes.
pub struct Spawned {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Starts a task: its own process group, stdin from /dev/null, stdout and stderr into pipes, an empty
/// signal mask, default signal dispositions, SIGKILL if release-tasks dies (`PR_SET_PDEATHSIG`, on
/// Linux), and `RELEASE_TASKS_RUN_ID`, which marks every process it starts as this release's.
///
/// A `run` string without shell syntax is exec'd directly (see `shell.rs`), with the `PWD` the shell
/// would have exported. When that exec fails for any reason but "not found" (which both answer with
/// 127), the string is run by the shell after all, so that every error path gives `sh -c`'s status
/// and message; so is everything when `PATH` is unset (the shell's default search path differs from
/// exec's). A `run` array follows execvp's rules, a file without a `#!` line included (run by
/// `/bin/sh`).
///
/// A `run` array gets that `PWD` too: release-tasks's own would name another directory than the
/// task's `dir`.
pub fn spawn(task: &Task, run_id: &str) -> io::Result<Spawned> {
    let through_shell = task.command.shell_argv();
    let argv = task.command.argv();
    let path_set = task.env.contains_key("PATH") || std::env::var_os("PATH").is_some();
    let pwd = || {
        let inherited = task
            .env
            .get("PWD")
            .map(std::ffi::OsString::from)
            .or_else(|| std::env::var_os("PWD"));
        crate::shell::shell_pwd(&task.dir, inherited.as_deref())
    };
    if argv != through_shell && path_set {
        match spawn_argv(task, run_id, &argv, pwd().as_deref()) {
            // The exec failed for a reason other than "not found anywhere" (a directory or a file
            // without execute permission on PATH, a symlink loop, a name too long, a busy file):
            // the shell's PATH search and its exit status differ from execvp's there (dash skips
            // what is not a regular file, and answers 127 or 126 or 2 by its own rules), so the
            // shell runs the string and decides, which makes the result `sh -c`'s by construction.
            Err(err) if err.raw_os_error().is_some_and(|e| e != nix::libc::ENOENT) => {}
            spawned => return spawned,
        }
    }
    // The shell sets its own PWD; a program exec'd from an array does not.
    let pwd = matches!(task.command, crate::config::Command::Exec(_))
        .then(pwd)
        .flatten();
    spawn_argv(task, run_id, &through_shell, pwd.as_deref())
}

/// Starts `argv` for `task` as [`spawn`] describes, with `PWD` set when given: on Linux without
/// copying release-tasks's memory (`spawn.rs` says why and how).
#[cfg(target_os = "linux")]
fn spawn_argv(
    task: &Task,
    run_id: &str,
    argv: &[&str],
    pwd: Option<&std::path::Path>,
) -> io::Result<Spawned> {
    use std::ffi::OsStr;
    // Not the kind of the error: a missing /dev/null must not read as a missing program.
    let set_up = |what: &str, err: &io::Error| match crate::limits::explain(err) {
        Some(limit) => io::Error::other(format!("cannot {what} for its process: {limit}")),
        None => io::Error::other(format!("cannot {what} for its process: {err}")),
    };
    let pipes = || -> io::Result<_> {
        let stdout = crate::output::cloexec_pipe()?;
        let stderr = crate::output::cloexec_pipe()?;
        Ok((stdout, stderr))
    };
    let ((stdout, child_stdout), (stderr, child_stderr)) =
        pipes().map_err(|err| set_up("make the pipes of stdout and stderr", &err))?;
    let stdin = dev_null().map_err(|err| set_up("open /dev/null as stdin", &err))?;
    let mut env: Vec<(&OsStr, &OsStr)> = task
        .env
        .iter()
        .map(|(k, v)| (OsStr::new(k), OsStr::new(v)))
        .collect();
    env.push((OsStr::new(RUN_ID_VAR), OsStr::new(run_id)));
    if let Some(pwd) = pwd {
        env.push((OsStr::new("PWD"), pwd.as_os_str()));
    }
    let pid = crate::spawn::spawn(&crate::spawn::Child {
        argv,
        env: &env,
        dir: &task.dir,
        stdin,
        stdout: &child_stdout,
        stderr: &child_stderr,
    })?;
    Ok(Spawned {
        pid,
        stdout,
        stderr,
    })
}

/// /dev/null, opened once: every task's stdin.
#[cfg(target_os = "linux")]
fn dev_null() -> io::Result<&'static OwnedFd> {
    // Not state but a cache: set once, never changed, and the same for every caller (one `open`
    // fewer per task).
    static NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd);
    }
    let fd = std::fs::File::open("/dev/null")?.into();
    Ok(NULL.get_or_init(|| fd))
}

/// Starts `argv` for `task` as [`spawn`] describes, with `PWD` set when given.
#[cfg(not(target_os = "linux"))]
fn spawn_argv(
    task: &Task,
    run_id: &str,
    argv: &[&str],
    pwd: Option<&std::path::Path>,
) -> io::Result<Spawned> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let Some((program, arguments)) = argv.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the task has no command to run",
        ));
    };
    let mut command = std::process::Command::new(program);
    command
        .args(arguments)
        .envs(&task.env)
        .env(RUN_ID_VAR, run_id)
        .current_dir(&task.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(pwd) = pwd {
        command.env("PWD", pwd);
    }
    // Runs in the child between fork and exec: only async-signal-safe system calls, no allocation.
    let prepare = move || {
        signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
        crate::spawn::reset_dispositions();
        Ok(())
    };
    // SAFETY: `prepare` only makes async-signal-safe system calls (see above).
    unsafe { command.pre_exec(prepare) };
    let mut child = command.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("the task's output pipes were not created"));
    };
    // `child` is dropped without waiting: the reaper below collects every exit, this one included.
    Ok(Spawned {
        pid,
        stdout: stdout.into(),
        stderr: stderr.into(),
    })
}

/// Collects every child that has exited, without blocking. Orphans adopted as subreaper are reaped
/// here too, and simply dropped.
#[must_use]
pub fn reap() -> Vec<(Pid, WaitStatus)> {
    let mut exited = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return exited,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    exited.push((pid, status));
                }
            }
        }
    }
}

/// Owns a running task's process group and whatever escaped from it. Dropping it SIGKILLs them all,
/// and while it lives its group is listed for the panic hook ([`kill_every_task`]), so no path out of
/// release-tasks, a panic included, leaves a task's processes running.
pub struct TaskProcesses {
    pgid: Pid,
    /// Children of release-tasks that are not tasks (the guardian).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    // only Linux looks for escaped children
    exempt: Vec<Pid>,
    finished: bool,
}

impl TaskProcesses {
    /// Takes ownership of the group led by `pgid`.
    #[must_use]
    pub fn new(pgid: Pid, exempt: Vec<Pid>) -> Self {
        if let Some(pid) = exempt.first() {
            EXEMPT.store(pid.as_raw(), Ordering::SeqCst);
        }
        for slot in &LIVE_GROUPS {
            if slot
                .compare_exchange(0, pgid.as_raw(), Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                break;
            }
        }
        TaskProcesses {
            pgid,
            exempt,
            finished: false,
        }
    }

    /// Sends `sig` to the task's process group and to every process that escaped it (a child of
    /// release-tasks adopted as subreaper, with its own group if it leads one).
    pub fn signal(&self, sig: Signal) {
        // ESRCH (the group is gone) is the outcome we want, not an error.
        let _ = signal::killpg(self.pgid, sig);
        for pid in self.escaped() {
            let _ = signal::kill(pid, sig);
            if unistd::getpgid(Some(pid)) == Ok(pid) {
                let _ = signal::killpg(pid, sig);
            }
        }
    }

    /// Whether anything the task started is still running.
    #[must_use]
    pub fn alive(&self) -> bool {
        signal::killpg(self.pgid, None) != Err(Errno::ESRCH) || !self.escaped().is_empty()
    }

    /// Records whether anything is still alive (as [`alive`](Self::alive) last found): when nothing
    /// is, drop sends no signal, since the group id may be reused by then.
    pub fn finish(&mut self, alive: bool) {
        self.finished = !alive;
    }

    /// Live children of release-tasks other than the exempt ones: with subreaper set, these are
    /// processes that left the task's group and were orphaned.
    #[cfg(target_os = "linux")]
    fn escaped(&self) -> Vec<Pid> {
        let me = unistd::getpid().as_raw();
        // Pids are handed out in increasing order, so what the task started has a pid above its
        // first process's, unless the counter wrapped since; only then is every process a candidate.
        let first = self.pgid.as_raw();
        let last =
            read_small("/proc/sys/kernel/ns_last_pid").and_then(|s| s.trim().parse::<i32>().ok());
        let wrapped = last.is_none_or(|last| last < first);
        // Few pids handed out since the task started (the usual case in a container): look at just
        // those, instead of listing every process on the machine.
        let candidates: Box<dyn Iterator<Item = i32>> = match last {
            Some(last) if !wrapped && last - first < NARROW_SCAN => Box::new(first..=last),
            _ => Box::new(process_ids()),
        };
        let mut found = Vec::new();
        for pid in candidates {
            if (pid < first && !wrapped) || self.exempt.contains(&Pid::from_raw(pid)) {
                continue;
            }
            let Some(stat) = read_small(&format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command name may hold spaces and parentheses; the fields after the last ')' do not.
            let mut fields = stat
                .rsplit_once(')')
                .map_or("", |(_, rest)| rest)
                .split_whitespace();
            let state = fields.next();
            let parent = fields.next().and_then(|p| p.parse::<i32>().ok());
            if parent == Some(me) && state != Some("Z") {
                found.push(Pid::from_raw(pid));
            }
        }
        found
    }

    /// Without a subreaper an escaped process is not our child, and without /proc there is no cheap
    /// way to find it: only the task's group is signalled.
    #[cfg(not(target_os = "linux"))]
    #[allow(clippy::unused_self)] // the same signature as Linux's
    fn escaped(&self) -> Vec<Pid> {
        Vec::new()
    }
}

/// Up to how many pids handed out since a task started are looked at one by one, rather than by
/// listing /proc.
#[cfg(target_os = "linux")]
const NARROW_SCAN: i32 = 64;

/// The pids of every process in /proc (of this PID namespace).
#[cfg(target_os = "linux")]
pub fn process_ids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// Reads a small /proc file in one read (a stat line is well under 1 KiB).
#[cfg(target_os = "linux")]
fn read_small(path: &str) -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 1024];
    let n = std::fs::File::open(path).ok()?.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

impl Drop for TaskProcesses {
    fn drop(&mut self) {
        for slot in &LIVE_GROUPS {
            let _ =
                slot.compare_exchange(self.pgid.as_raw(), 0, Ordering::SeqCst, Ordering::SeqCst);
        }
        if !self.finished {
            self.signal(Signal::SIGKILL);
        }
    }
}
