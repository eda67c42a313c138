//! The error type at release-tasks's boundary and the exit status each error maps to.
//!
//! A task that fails is not an `Error`: it is an outcome (see `report.rs`). `Error` is for what stops
//! release-tasks itself: a config it cannot accept, bad usage, or an I/O failure it cannot continue past.

use std::fmt;
use std::path::PathBuf;

/// `EX_CONFIG` from sysexits.h: bad or missing config or gate value; nothing ran.
pub const EXIT_CONFIG: i32 = 78;
/// Bad command-line usage, as clap itself reports it.
pub const EXIT_USAGE: i32 = 2;
/// `EX_SOFTWARE` from sysexits.h: release-tasks itself failed (not a task).
pub const EXIT_INTERNAL: i32 = 70;
/// `EX_UNAVAILABLE` from sysexits.h: the `[lock]` database cannot be reached or refuses us (nothing
/// ran), or the release lost its lock while it ran (see `report::EXIT_LOCK_LOST`).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// `EX_IOERR` from sysexits.h: `check`, `plan` or `init` could not write their output (a closed pipe,
/// a full disk).
pub const EXIT_IOERR: i32 = 74;
/// `EX_TEMPFAIL` from sysexits.h: another replica held the release lock past `lock.timeout`; nothing ran.
pub const EXIT_TEMPFAIL: i32 = 75;

/// One problem found in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line and column in the config file, where known.
    pub location: Option<(usize, usize)>,
    /// What is wrong and what to do about it.
    pub message: String,
}

/// Everything that stops release-tasks before or outside of running a task.
#[derive(Debug)]
pub enum Error {
    /// No config file where one was expected.
    ConfigMissing { path: PathBuf },
    /// The config file exists but cannot be read (permissions, not UTF-8, too large).
    ConfigUnreadable { path: PathBuf, reason: String },
    /// The config file was read but is not valid: syntax, unknown keys, bad values, a cycle.
    ConfigInvalid {
        path: PathBuf,
        problems: Vec<Diagnostic>,
    },
    /// The environment is not ready: a gate variable holds a value release-tasks refuses to guess
    /// about (`ture`, `2`), a `[require] env` variable is missing, or a `${VAR}` is unset.
    Environment { problems: Vec<String> },
    /// Bad command-line usage, or a bad `RELEASE_TASKS_*` setting.
    Usage(String),
    /// The `[lock]` database cannot be reached, refuses the login, or fails a query.
    Database(String),
    /// Another replica held the release lock for longer than `lock.timeout`.
    LockTimeout(String),
    /// A stopping signal arrived before any task started (while waiting for the lock).
    Interrupted(nix::sys::signal::Signal),
    /// `exec`: the release succeeded but its command cannot be started (127 not found, 126 not
    /// executable).
    Exec { code: i32, message: String },
    /// What `check`, `plan` or `init` had to say could not be written to stdout.
    Output(std::io::Error),
    /// release-tasks itself could not go on (an I/O error, a failed system call).
    Internal(anyhow::Error),
}

impl Error {
    /// The process exit status this error stands for (see the README's exit code table).
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::ConfigMissing { .. }
            | Error::ConfigUnreadable { .. }
            | Error::ConfigInvalid { .. }
            | Error::Environment { .. } => EXIT_CONFIG,
            Error::Usage(_) => EXIT_USAGE,
            Error::Database(_) => EXIT_UNAVAILABLE,
            Error::LockTimeout(_) => EXIT_TEMPFAIL,
            Error::Interrupted(sig) => 128 + *sig as i32,
            Error::Exec { code, .. } => *code,
            Error::Output(_) => EXIT_IOERR,
            Error::Internal(_) => EXIT_INTERNAL,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ConfigMissing { path } => write!(
                f,
                "no config file at {}\n\
                 hint: create release.toml in the app's root (see the README's release.toml reference), \
                 run `release-tasks init` to write one for your framework, \
                 or point to it with --config PATH or RELEASE_TASKS_CONFIG",
                path.display()
            ),
            Error::ConfigUnreadable { path, reason } => {
                write!(f, "cannot read config file {}: {reason}", path.display())
            }
            Error::ConfigInvalid { path, problems } => {
                let n = problems.len();
                write!(
                    f,
                    "{} has {n} problem{}; nothing was run",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                )?;
                for p in problems {
                    match p.location {
                        Some((line, col)) => {
                            write!(f, "\n  {}:{line}:{col}: {}", path.display(), p.message)?;
                        }
                        None => write!(f, "\n  {}: {}", path.display(), p.message)?,
                    }
                }
                Ok(())
            }
            Error::Environment { problems } => {
                write!(
                    f,
                    "the environment is not ready for this release; nothing was run"
                )?;
                for p in problems {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
            Error::Usage(message) | Error::Exec { message, .. } => write!(f, "{message}"),
            Error::Database(message) | Error::LockTimeout(message) => {
                write!(f, "{message}; nothing was run")
            }
            Error::Interrupted(sig) => {
                write!(f, "received {sig} before any task started; nothing was run")
            }
            Error::Output(err) => write!(
                f,
                "cannot write to stdout: {err}; check that whatever reads it is still reading and has room"
            ),
            Error::Internal(err) => write!(f, "{err:#}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<anyhow::Error> for Error {
    fn from(err: anyhow::Error) -> Self {
        Error::Internal(err)
    }
}

/// The result type of release-tasks's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
