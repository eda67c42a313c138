//! The `Test` builder: a temp dir with a release.toml, a cleared environment, the real binary, and a
//! watchdog so that a hang fails the test instead of holding up the suite.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long any one run of release-tasks may take before the test fails as hung.
const WATCHDOG: Duration = Duration::from_secs(60);

pub const BIN: &str = env!("CARGO_BIN_EXE_release-tasks");

/// For a test that cannot run on this machine: says why, for the caller to return; but under CI
/// (`CI` set to anything but empty, `0` or `false`), where every test must run, it fails instead.
#[track_caller]
pub fn cannot_run(why: &str) {
    let ci = std::env::var("CI")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    assert!(!ci, "CI must run this test, but it cannot run here: {why}");
    eprintln!("SKIPPED: {why}");
}

pub struct Test {
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Variables whose values are bytes, not necessarily UTF-8.
    env_bytes: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    merge_stderr: bool,
}

/// What a finished run produced.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts the exit status, printing everything the run said when it differs.
    #[track_caller]
    pub fn status(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn stderr_lacks(&self, needle: &str) -> &Self {
        assert!(
            !self.stderr.contains(needle),
            "stderr has {needle:?}:\n{}",
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, needle: &str) -> &Self {
        assert!(
            self.stdout().contains(needle),
            "stdout lacks {needle:?}:\n{}",
            self.stdout()
        );
        self
    }

    #[track_caller]
    pub fn stdout_lacks(&self, needle: &str) -> &Self {
        assert!(
            !self.stdout().contains(needle),
            "stdout has {needle:?}:\n{}",
            self.stdout()
        );
        self
    }
}

impl Test {
    pub fn new() -> Test {
        Test {
            dir: tempfile::tempdir().expect("temp dir"),
            args: Vec::new(),
            env: Vec::new(),
            env_bytes: Vec::new(),
            merge_stderr: false,
        }
    }

    /// Writes `release.toml` in the test's directory.
    pub fn config(self, toml: &str) -> Test {
        self.file("release.toml", toml)
    }

    /// Writes a file in the test's directory (its directories made as needed).
    pub fn file(self, name: &str, contents: &str) -> Test {
        let path = self.dir.path().join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("make the test file's directory");
        }
        std::fs::write(path, contents).expect("write test file");
        self
    }

    pub fn args(mut self, args: &[&str]) -> Test {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Test {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets a variable to arbitrary bytes (for values that are not UTF-8).
    pub fn env_bytes(mut self, key: &str, value: &[u8]) -> Test {
        use std::os::unix::ffi::OsStringExt;
        self.env_bytes
            .push((key.into(), std::ffi::OsString::from_vec(value.to_vec())));
        self
    }

    /// The value this test gives a variable (the last one set wins, as in the run).
    pub fn env_var(&self, key: &str) -> Option<String> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// Sends release-tasks's stderr into the same pipe as its stdout, as a log collector does.
    pub fn merged(mut self) -> Test {
        self.merge_stderr = true;
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut cmd = if self.merge_stderr {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg("exec \"$0\" \"$@\" 2>&1").arg(BIN);
            c
        } else {
            Command::new(BIN)
        };
        cmd.args(&self.args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(self.env_bytes.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs release-tasks to the end (or fails the test after the watchdog's limit).
    pub fn run(&self) -> Output {
        self.spawn().wait()
    }

    /// Runs in the same directory and environment with other arguments in place of `args`.
    pub fn run_with(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        Running::start(cmd).wait()
    }

    /// Runs with `args`, stdout and stderr going where the caller says (`/dev/full`, a pipe nobody
    /// reads); returns the exit status as the shell would show it.
    pub fn run_into(&self, args: &[&str], stdout: Stdio, stderr: Stdio) -> Option<i32> {
        let mut cmd = self.command();
        cmd.args(args).stdout(stdout).stderr(stderr);
        let mut child = cmd.spawn().expect("spawn release-tasks");
        let deadline = Instant::now() + WATCHDOG;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("release-tasks hung for {WATCHDOG:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        std::os::unix::process::ExitStatusExt::signal(&status)
            .map_or(status.code(), |sig| Some(128 + sig))
    }

    /// Starts release-tasks and returns while it runs, for tests that signal it or read it live.
    pub fn spawn(&self) -> Running {
        Running::start(self.command())
    }

    /// Starts release-tasks and returns once its output shows `needle` (a task saying it is ready).
    #[track_caller]
    pub fn spawn_until(&self, needle: &str) -> Running {
        let running = self.spawn();
        running.wait_for(needle, Duration::from_secs(20));
        running
    }
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("spawn release-tasks");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Running {
            child,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }
}

/// A release-tasks process under test.
pub struct Running {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits until release-tasks is blocked opening a FIFO (that nobody has opened for the other
    /// end yet), as the kernel says in `/proc/PID/wchan`; fails the test after 20 s.
    #[track_caller]
    pub fn wait_blocked_on_fifo(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let wchan = format!("/proc/{}/wchan", self.pid());
        loop {
            let now = std::fs::read_to_string(&wchan).unwrap_or_default();
            // fifo_open() waits in wait_for_partner() (older kernels show fifo_open itself).
            if now == "wait_for_partner" || now == "fifo_open" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "release-tasks never blocked opening the FIFO (wchan {now:?}); saw:\n{}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` and waits until it is no longer pending (handled, or discarded as ignored).
    #[track_caller]
    pub fn signal_taken(&self, sig: &str) {
        self.signal(sig);
        wait_no_signal_pending(self.pid(), sig);
    }

    /// Waits until stdout+stderr so far contain `needle`; fails the test after `limit`.
    #[track_caller]
    pub fn wait_for(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.seen();
            if seen.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "did not see {needle:?} within {limit:?}; saw:\n{seen}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything printed so far, stdout then stderr.
    pub fn seen(&self) -> String {
        let out = self.stdout.lock().expect("lock").clone();
        let err = self.stderr.lock().expect("lock").clone();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    }

    pub fn wait(mut self) -> Output {
        let deadline = self.started + WATCHDOG;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "release-tasks hung for {WATCHDOG:?}; output so far:\n{}",
                    self.seen()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.started.elapsed();
        // The pipes close when release-tasks exits, unless it leaked a process that holds them: wait a
        // little for the reader threads, then take what they have.
        let until = Instant::now() + Duration::from_secs(5);
        while (Arc::strong_count(&self.stdout) > 1 || Arc::strong_count(&self.stderr) > 1)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stdout = self.stdout.lock().expect("lock").clone();
        let stderr = String::from_utf8_lossy(&self.stderr.lock().expect("lock")).into_owned();
        Output {
            code: std::os::unix::process::ExitStatusExt::signal(&status)
                .map_or(status.code(), |sig| Some(128 + sig)),
            stdout,
            stderr,
            elapsed,
        }
    }
}

fn collect(mut source: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 64 * 1024];
        while let Ok(n) = source.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().expect("lock").extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Reads a pid a task wrote to a file, waiting briefly for it to appear.
#[track_caller]
pub fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `limit` for a process to be gone; returns whether it is.
pub fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Waits until no signal is pending for process `pid` (one sent has been handled, or discarded as
/// ignored), as `/proc/PID/status` says; fails the test after 20 s.
#[track_caller]
pub fn wait_no_signal_pending(pid: i32, sig: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = format!("/proc/{pid}/status");
    loop {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let pending = text
            .lines()
            .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            .any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|m| !m.trim_start_matches('0').is_empty())
            });
        if !pending {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SIG{sig} stayed pending:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until a thread of process `pid` is held up by a full pipe, as the kernel says in
/// `/proc/PID/task/TID/wchan`: blocked writing to it (`pipe_write`, `anon_pipe_write`) or waiting
/// in `poll` for room in it (`poll_schedule_timeout`, where release-tasks's output threads wait);
/// fails the test after 20 s.
#[track_caller]
pub fn wait_blocked_writing(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let blocked = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|task| {
                std::fs::read_to_string(task.path().join("wchan"))
                    .is_ok_and(|w| w.ends_with("pipe_write") || w.starts_with("poll_schedule"))
            });
        if blocked {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no thread of {pid} blocked writing to a pipe"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits up to `limit` until no live process has `dir` as its working directory (what a task
/// started there, wherever its pid was or was not written); returns whether none has.
pub fn none_left_in(dir: &Path, limit: Duration) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&pid| {
                alive(pid)
                    && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
            })
            .collect();
        if left.is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes `name | ` prefixes (padded or not) from the lines of one task's output.
pub fn strip_prefix(output: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in output.split_inclusive(|&b| b == b'\n') {
        let rest = line
            .strip_prefix(name.as_bytes())
            .expect("line starts with the task name");
        let at = rest
            .windows(3)
            .position(|w| w == b" | ")
            .expect("prefix separator");
        assert!(
            rest[..at].iter().all(|&b| b == b' '),
            "padding only between name and separator"
        );
        out.extend_from_slice(&rest[at + 3..]);
    }
    out
}

/// A loopback port that nothing listens on (it was free a moment ago): a database that refuses.
#[cfg(feature = "postgres")]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .expect("address")
        .port()
}
