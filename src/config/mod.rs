//! `release.toml` -> [`Config`]: the typed configuration every later stage reads, and reading the file.
//!
//! Three rooms: this one holds the typed values (durations are `Duration`s, gates are [`Gate`]s,
//! commands are argv vectors, tasks are in run order); `raw.rs` is the serde mirror of the file, with
//! positions; `validate.rs` turns the mirror into a `Config`, reporting every problem at once (unknown
//! keys included) with its line and column, before anything runs. After this module no code looks at
//! raw strings from the file.

mod duplicates;
mod raw;
mod validate;

pub use validate::{MAX_DURATION, valid_header_value};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::changed::Glob;
use crate::error::{Error, Result};
use crate::gate::Gate;

/// The largest config file accepted; a release.toml is a few kilobytes, and a bigger one is a mistake.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The validated configuration of one release.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from (for messages).
    pub path: PathBuf,
    pub defaults: Defaults,
    /// Tasks in run order: file order, with `after` applied.
    pub tasks: Vec<Task>,
    /// `[require] env`: variables that must be set and not empty before anything runs.
    pub required_env: Vec<String>,
    /// `[lock]`: once per release across replicas, through a PostgreSQL advisory lock or a MySQL named lock.
    pub lock: Option<Lock>,
}

impl Config {
    /// The config file's directory, which `dir` and `changed` are relative to.
    #[must_use]
    pub fn dir(&self) -> PathBuf {
        let dir = match self.path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned())
    }
}

/// `[lock]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// Which database the lock is taken on: `postgres = ...` or `mysql = ...`.
    pub backend: Backend,
    /// The variables that may hold the database URL (the URL itself carries a password); the first
    /// one set wins, so `["DIRECT_URL", "DATABASE_URL"]` prefers the unpooled URL.
    pub url_vars: Vec<String>,
    /// The lock's name; the app's name when not given.
    pub key: Option<String>,
    /// How long a replica waits for the lock before it gives up.
    pub timeout: Duration,
    /// Record each release in `release_tasks_runs` and skip one that already succeeded.
    pub once: bool,
    /// How long a database that refuses connections (still starting, too many connections) is tried.
    pub connect_timeout: Duration,
}

/// The database `[lock]` is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres = "DATABASE_URL"`: a transaction-level advisory lock.
    Postgres,
    /// `mysql = "DATABASE_URL"` (MySQL or MariaDB): `GET_LOCK` on one connection.
    Mysql,
}

impl Backend {
    /// The `[lock]` key that names the URL's variables.
    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }

    /// The database's name, for people.
    #[must_use]
    pub fn product(self) -> &'static str {
        match self {
            Backend::Postgres => "PostgreSQL",
            Backend::Mysql => "MySQL",
        }
    }
}

/// `[defaults]`, with the built-in values filled in.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub timeout: Duration,
    pub grace: Duration,
    pub shell: String,
    /// How often a long task logs that it is still running.
    pub heartbeat: Duration,
    /// A bound on the whole release, below the platform's own (Heroku stops a release phase at 1 h).
    pub release_timeout: Duration,
    /// How many of a task's last output lines the report, the log and the notifications show.
    pub tail_lines: usize,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(10),
            shell: "/bin/sh".to_owned(),
            heartbeat: Duration::from_secs(60),
            release_timeout: Duration::from_secs(55 * 60),
            tail_lines: 20,
        }
    }
}

/// One `[tasks.NAME]` entry, validated.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub command: Command,
    pub when: Option<Gate>,
    pub unless: Option<Gate>,
    pub timeout: Duration,
    pub grace: Duration,
    pub allow_failure: bool,
    /// When the task runs relative to the release's success or failure.
    pub on: On,
    /// Extra variables for this task, on top of the inherited environment.
    pub env: BTreeMap<String, String>,
    /// Absolute working directory (a relative `dir` is taken from the config file's directory).
    pub dir: PathBuf,
    /// `changed`: the task runs only if the files these globs match (relative to the config file's
    /// directory) changed since its last successful run; empty when the task has no such gate.
    pub changed: Vec<Glob>,
    /// `retries`, `retry_delay`, `retry_on`, `attempt_timeout`.
    pub retry: Retry,
}

/// How a failed attempt of a task is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Further attempts after a failed one (0: none).
    pub retries: u32,
    /// The pause before the second attempt; it doubles for each further one, up to
    /// [`Retry::MAX_DELAY`] (a longer `retry_delay` is used as it is).
    pub delay: Duration,
    /// Which failed attempts are tried again.
    pub on: RetryOn,
    /// A bound on each attempt, within the task's `timeout` (which bounds all attempts together).
    pub attempt_timeout: Option<Duration>,
}

impl Retry {
    /// Where the doubling of `retry_delay` stops.
    pub const MAX_DELAY: Duration = Duration::from_secs(60);
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            retries: 0,
            delay: Duration::from_secs(1),
            on: RetryOn::default(),
            attempt_timeout: None,
        }
    }
}

/// `retry_on`: the exit statuses worth another attempt, and whether an attempt cut off by
/// `attempt_timeout` is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Empty: any failed exit status (or death by a signal release-tasks did not send).
    pub statuses: Vec<i32>,
    /// `"timeout"` in the list: an attempt that ran past `attempt_timeout` is tried again.
    pub timeout: bool,
}

impl Task {
    /// The directory that the task's program names, if it names one (`run = ["/tmp"]`): exec refuses
    /// it with "permission denied", which chmod would not fix. `path` is the `PATH` to look a bare
    /// name up in.
    #[must_use]
    pub fn program_directory(&self, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
        let Command::Exec(argv) = &self.command else {
            return None;
        };
        let program = argv.first()?;
        if program.contains('/') {
            let at = self.dir.join(program);
            return at.is_dir().then_some(at);
        }
        std::env::split_paths(path?)
            .map(|dir| dir.join(program))
            .find(|at| at.is_dir())
    }
}

/// `on`: whether a task runs while the release is succeeding, after it failed, or either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum On {
    /// Runs only while every task before it succeeded (the default).
    #[default]
    Success,
    /// Runs only after the release has failed (a failure, a timeout or a stopping signal).
    Failure,
    /// Runs in both cases: `heroku maintenance:off`, a notification.
    Always,
}

impl On {
    /// Whether a task with this `on` runs, given whether the release has failed so far.
    #[must_use]
    pub fn runs(self, release_failed: bool) -> bool {
        match self {
            On::Success => !release_failed,
            On::Failure => release_failed,
            On::Always => true,
        }
    }
}

impl fmt::Display for On {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            On::Success => "success",
            On::Failure => "failure",
            On::Always => "always",
        })
    }
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `run = "..."`: run through `[shell, "-c", script]`.
    Shell { shell: String, script: String },
    /// `run = ["prog", "arg"]`: exec'd directly, `prog` looked up on PATH.
    Exec(Vec<String>),
    /// `notify = { url = ... }`: POST the release report to a webhook; runs no process.
    Notify(Notify),
}

impl Command {
    /// The argv that is exec'd (empty for a notify task). A string without shell syntax is exec'd
    /// directly, as `sh -c` would end up doing (see `shell.rs`).
    #[must_use]
    pub fn argv(&self) -> Vec<&str> {
        match self {
            Command::Shell { shell, script } => {
                crate::shell::direct_argv(shell, script).unwrap_or_else(|| self.shell_argv())
            }
            Command::Exec(argv) => argv.iter().map(String::as_str).collect(),
            Command::Notify(_) => Vec::new(),
        }
    }

    /// The argv through the shell, even for a string [`argv`](Self::argv) would exec directly: for a
    /// file without a `#!` line, which only the shell runs (as a script).
    #[must_use]
    pub fn shell_argv(&self) -> Vec<&str> {
        match self {
            Command::Shell { shell, script } => vec![shell.as_str(), "-c", script.as_str()],
            _ => self.argv(),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Shell { script, .. } => f.write_str(script),
            Command::Exec(argv) => write!(f, "{argv:?}"),
            Command::Notify(notify) => write!(f, "notify {} ({})", notify.url.raw, notify.format),
        }
    }
}

/// A built-in notify task: where and how to POST the release report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub url: Template,
    pub headers: Vec<(String, Template)>,
    pub format: NotifyFormat,
    /// Per request.
    pub timeout: Duration,
    /// Further attempts after a connection error or a 5xx answer.
    pub retries: u32,
}

/// The body a notify task sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// The release report as JSON.
    Json,
    /// `{"text": ...}`, a readable summary for a Slack incoming webhook.
    Slack,
}

impl fmt::Display for NotifyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotifyFormat::Json => "json",
            NotifyFormat::Slack => "slack",
        })
    }
}

/// A string with `${VAR}` references, expanded from the environment when the release is planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub raw: String,
}

impl Template {
    /// Checks the `${...}` syntax; a `$` not followed by `{` is literal.
    pub(crate) fn parse(raw: &str) -> Result<Template, String> {
        let mut rest = raw;
        while let Some(at) = rest.find("${") {
            let after = &rest[at + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "`${` without a closing `}`".to_owned())?;
            if !crate::gate::is_var_name(&after[..end]) {
                return Err(format!(
                    "`${{{}}}` is not a variable reference; write ${{NAME}} with letters, digits and _",
                    &after[..end]
                ));
            }
            rest = &after[end + 1..];
        }
        Ok(Template {
            raw: raw.to_owned(),
        })
    }

    /// The names of the variables it refers to, in order.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.raw
            .split("${")
            .skip(1)
            .filter_map(|part| part.split_once('}').map(|(name, _)| name))
    }

    /// Expands every `${VAR}`; an unset variable is an error that names it.
    pub fn expand(&self, env: &crate::gate::Env) -> Result<String, String> {
        let mut out = String::with_capacity(self.raw.len());
        let mut rest = self.raw.as_str();
        while let Some(at) = rest.find("${") {
            out.push_str(&rest[..at]);
            let Some((name, tail)) = rest[at + 2..].split_once('}') else {
                break;
            };
            out.push_str(env.get(name).ok_or_else(|| name.to_owned())?);
            rest = tail;
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config> {
    let source = read(path)?;
    parse(path, &source)
}

/// The file's bytes, never more than one byte past [`MAX_CONFIG_BYTES`] (the size checked before
/// may have grown).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read(path: &Path) -> Result<String> {
    let unreadable = |reason: String| Error::ConfigUnreadable {
        path: path.to_owned(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::ConfigMissing {
                path: path.to_owned(),
            });
        }
        Err(err) => {
            return Err(unreadable(format!(
                "{err}; check the path and its permissions"
            )));
        }
    };
    if !meta.is_file() {
        return Err(unreadable(
            "it is not a regular file; pass the path of release.toml itself".into(),
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(unreadable(format!(
            "it is {} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config file; is this the right file?",
            meta.len()
        )));
    }
    // Opening it is what needs a descriptor; `metadata` did not.
    let bytes = read_bounded(path).map_err(|err| match crate::limits::explain(&err) {
        Some(limit) => Error::Limit(format!(
            "cannot read config file {}: {limit}",
            path.display()
        )),
        None => unreadable(format!("{err}; check its permissions")),
    })?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(unreadable(format!(
            "it grew over the {MAX_CONFIG_BYTES}-byte limit for a config file while it was read"
        )));
    }
    String::from_utf8(bytes).map_err(|err| {
        let offset = err.utf8_error().valid_up_to();
        let source = String::from_utf8_lossy(err.as_bytes());
        let (line, col) = validate::line_col(&source, offset);
        unreadable(format!(
            "line {line}, column {col}: not valid UTF-8; TOML files must be UTF-8, so re-save it as UTF-8"
        ))
    })
}

/// Parses and validates config text; `path` is used for messages and to resolve `dir`.
pub fn parse(path: &Path, source: &str) -> Result<Config> {
    validate::validate(path, source)
}
