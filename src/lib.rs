//! release-tasks: run a Procfile release phase from `release.toml`.
//!
//! Data flows one way: settings + config -> plan -> run -> report. `main.rs` owns the process (exit
//! status, logging set-up); this crate root wires the stages together for each subcommand.

pub mod cli;
pub mod config;
pub mod env_file;
pub mod error;
pub mod exec;
pub mod gate;
pub mod guardian;
pub mod init;
pub mod limits;
#[cfg(feature = "postgres")]
pub mod lock;
pub mod log;
pub mod metadata;
pub mod notify;
pub mod output;
pub mod plan;
pub mod process;
pub mod redact;
pub mod report;
pub mod run;
pub mod secrets;
pub mod shell;
pub mod signals;
pub mod spawn;
pub mod supervisor;
pub mod tail;

use std::io::Write;

use cli::{Command, Settings};
use error::{Error, Result};
use gate::Env;
use log::LogFormat;
use output::Target;
use plan::Plan;

/// Takes the environment snapshot that every decision is made from, values as they are (see
/// [`Env`]: a value that is not UTF-8 is refused where it is used, never taken for unset).
#[must_use]
pub fn env_snapshot() -> Env {
    Env::from_os(std::env::vars_os())
}

/// Reads the `--env-file` files (none unless named) into `env` and into the process environment,
/// which every task inherits and `exec` hands on. The process environment wins over the files.
/// Then `env` is complete, and its secrets are the ones every output hides (`secrets.rs`).
///
/// Call it before any thread starts: it changes the process environment.
pub fn load_env_files(settings: &Settings, env: &mut Env) -> Result<()> {
    let loaded = env_file::load(&settings.env_files, settings.env_files_from, |name| {
        env.contains_key(name)
            .then(|| env.get_lossy(name).map(std::borrow::Cow::into_owned))
            .flatten()
    })?;
    for var in loaded {
        // SAFETY: called from `main` before any thread is started (see above), so nothing reads
        // the environment concurrently.
        unsafe { std::env::set_var(&var.name, &var.value) };
        env.insert_from(var.name, var.value, var.file.display().to_string());
    }
    secrets::install(secrets::Secrets::from_env(env));
    Ok(())
}

/// Writes what a command has to say to stdout; a failure (a closed pipe, a full disk) is an error
/// with its own exit status (74), never a panic.
fn say(text: &str) -> Result<()> {
    let text = secrets::mask(text);
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

/// Writes a line to stderr for people. Where stderr cannot be written there is nobody to tell, and
/// the exit status still says what happened, so the error is dropped. A stderr that nobody reads (a
/// full pipe) would block the write, and the output lock behind it, for ever: the write gets
/// `TELL_WAIT` (5 s) on a thread of its own, then release-tasks goes on without it; once a line has
/// timed out, later ones are dropped at once (`check` with many warnings waits once, not per line).
pub fn tell(line: &str) {
    static STALLED: log::Stall = log::Stall::new();
    let deadline = STALLED.deadline(TELL_WAIT);
    if deadline <= std::time::Instant::now() {
        return;
    }
    let line = secrets::mask(line).into_owned();
    let theirs = line.clone();
    let (said, wait) = std::sync::mpsc::channel();
    let writer = std::thread::Builder::new().spawn(move || {
        let _ = output::write(Target::Stderr, theirs.as_bytes());
        let _ = said.send(());
    });
    match writer {
        Ok(_) => {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if wait.recv_timeout(left).is_err() {
                STALLED.timed_out(deadline);
            }
        }
        // No thread can be made (the limit on processes, `ulimit -u`): the message still goes
        // out, written from here, for as long as the deadline allows.
        Err(_) => {
            if output::write_until(Target::Stderr, line.as_bytes(), deadline).is_err() {
                STALLED.timed_out(deadline);
            }
        }
    }
}

/// How long [`tell`] waits for a stalled stderr, once.
const TELL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Carries out `settings.command` and returns the exit status.
pub fn execute(settings: &Settings, env: &Env) -> Result<i32> {
    match &settings.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            let mut cli = <cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cli, "release-tasks", &mut script);
            let mut out = std::io::stdout().lock();
            out.write_all(&script)
                .and_then(|()| out.flush())
                .map_err(Error::Output)?;
            Ok(0)
        }
        Command::Init { force } => {
            let written = init::write(&settings.config, *force)?;
            say(&written.message())?;
            Ok(0)
        }
        Command::Check => {
            let (config, plan) = load(settings, env)?;
            check_report_paths(settings)?;
            let runs = plan.to_run().count();
            match settings.log_format {
                LogFormat::Text => say(&format!(
                    "{}: ok, {} task{} ({runs} would run with this environment)\n",
                    config.path.display(),
                    config.tasks.len(),
                    if config.tasks.len() == 1 { "" } else { "s" }
                ))?,
                // One object a log pipeline can parse, like every other line in JSON mode.
                LogFormat::Json => say(&format!(
                    "{}\n",
                    serde_json::json!({
                        "config": config.path.to_string_lossy(),
                        "ok": true,
                        "tasks": config.tasks.len(),
                        "would_run": runs,
                    })
                ))?,
            }
            Ok(0)
        }
        Command::Plan => {
            let (_, plan) = load(settings, env)?;
            let mut text = Vec::new();
            plan::print_plan(&plan, settings.log_format, &mut text).map_err(Error::Output)?;
            say(&String::from_utf8_lossy(&text))?;
            Ok(0)
        }
        Command::Run => run(settings, env),
        Command::Exec { command } => {
            let status = run(settings, env)?;
            if status != 0 {
                return Ok(status);
            }
            // A release with no task to run installed no handler of its own: hold them from here.
            exec::hold_stop_signals();
            if let Some(sig) = exec::stop_received() {
                return Err(exec::interrupted(sig));
            }
            tracing::info!(command = %redact::command(&shown_command(command)), "release succeeded; starting the command");
            // What release-tasks still has to say must be out before it is replaced.
            log::flush(std::time::Duration::from_secs(5));
            if let Some(sig) = exec::stop_received() {
                return Err(exec::interrupted(sig));
            }
            Err(exec::replace_with(command, &std::env::vars_os().collect::<Vec<_>>()))
        }
        #[cfg(feature = "postgres")]
        Command::Wait { timeout } => {
            let (config, plan) = load(settings, env)?;
            lock::wait(&config, &plan, env, *timeout)
        }
        #[cfg(feature = "postgres")]
        Command::History { limit } => {
            let (config, plan) = load(settings, env)?;
            lock::history(&config, &plan, env, *limit, settings.log_format)
        }
        #[cfg(not(feature = "postgres"))]
        Command::Wait { .. } | Command::History { .. } => Err(error::Error::Usage(
            "wait and history read the [lock] ledger; this release-tasks was built without the `postgres` feature"
                .into(),
        )),
    }
}

/// `run` (and the release part of `exec`): plan, run, report; the release's exit status.
fn run(settings: &Settings, env: &Env) -> Result<i32> {
    let (config, plan) = load(settings, env)?;
    if !plan.preflight.is_empty() {
        return Err(error::Error::Environment {
            problems: plan.preflight,
        });
    }
    limits::check_open_files()?;
    // Open the report files first: a path that cannot be written is found before anything runs.
    let report_files = open_report_files(settings)?;
    process::become_subreaper();
    let meta = &plan.meta;
    tracing::info!(
        app = meta.app.as_deref(),
        version = meta.version.as_deref(),
        commit = meta.commit.as_deref(),
        platform = meta.platform,
        config = %config.path.display(),
        tasks = config.tasks.len(),
        to_run = plan.to_run().count(),
        "release started"
    );
    metadata::warn_if_fly_stops_first(env, plan.defaults.release_timeout);
    let report = run::run_release(&plan, env)?;
    report.log_summary();
    write_reports(report_files, &report);
    Ok(report.exit_code())
}

/// A command line as one string for a log line (lossily, each argument quoted when it needs it).
fn shown_command(command: &[std::ffi::OsString]) -> String {
    command
        .iter()
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if arg.is_empty() || arg.contains(char::is_whitespace) {
                format!("{arg:?}")
            } else {
                arg.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads the config and plans the release. For `check` and `plan`, what the environment lacks for
/// `run` is a warning; `run` itself refuses to start with it.
fn load(settings: &Settings, env: &Env) -> Result<(config::Config, Plan)> {
    let config = config::load(&settings.config)?;
    // Before anything is planned or printed: the notify URLs and headers, and the tasks' own
    // variables, are secrets too.
    secrets::add_config(&config, env);
    let plan = Plan::new(&config, env, &settings.selection)?;
    // `check` and `plan` show what `run` would stop on; the others log it (or stop on it).
    let run = !matches!(settings.command, Command::Check | Command::Plan);
    let preflight = if run { &[][..] } else { &plan.preflight[..] };
    for warning in &plan.warnings {
        match settings.log_format {
            LogFormat::Text if !run => tell(&format!("release-tasks: warning: {warning}\n")),
            _ => tracing::warn!(problem = %warning, "check the config"),
        }
    }
    for missing in preflight {
        match settings.log_format {
            LogFormat::Text => tell(&format!(
                "release-tasks: warning: {missing}; `release-tasks run` would stop here\n"
            )),
            LogFormat::Json => {
                tracing::warn!(problem = %missing, "`release-tasks run` would stop here");
            }
        }
    }
    Ok((config, plan))
}

/// The `--report` and `--junit` files, created (empty) before the release starts.
struct ReportFiles {
    json: Option<(std::path::PathBuf, std::fs::File)>,
    junit: Option<(std::path::PathBuf, std::fs::File)>,
}

fn open_report_files(settings: &Settings) -> Result<ReportFiles> {
    let open = |path: Option<&std::path::PathBuf>, flag: &str| -> Result<_> {
        path.map(|p| {
            std::fs::File::create(p).map(|f| (p.clone(), f)).map_err(|e| {
                error::Error::Usage(format!(
                    "{flag} {}: cannot create the file ({e}); check that its directory exists and is writable",
                    p.display()
                ))
            })
        })
        .transpose()
    };
    Ok(ReportFiles {
        json: open(settings.report.as_ref(), "--report")?,
        junit: open(settings.junit.as_ref(), "--junit")?,
    })
}

/// For `check`: the `--report` and `--junit` paths that `run` could not create (before its first
/// task, exit 2), found without creating them: a directory that does not exist or cannot be
/// written, or a path that is a directory.
fn check_report_paths(settings: &Settings) -> Result<()> {
    for (path, flag) in [(&settings.report, "--report"), (&settings.junit, "--junit")] {
        let Some(path) = path else { continue };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        let problem = if path.is_dir() {
            Some("it is a directory".to_owned())
        } else if !dir.is_dir() {
            Some(format!("its directory {} does not exist", dir.display()))
        } else {
            nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
                .err()
                .map(|err| format!("its directory {} cannot be written ({err})", dir.display()))
        };
        if let Some(problem) = problem {
            return Err(error::Error::Usage(format!(
                "{flag} {}: `run` could not create the file: {problem}; check that its directory exists and is writable",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Writes the report files; a failure is logged, since the release itself has already ended.
fn write_reports(files: ReportFiles, report: &report::Report) {
    let render_json = || format!("{}\n", report.to_json());
    let outputs: [(_, &dyn Fn() -> String); 2] = [
        (files.json, &render_json),
        (files.junit, &|| report.to_junit()),
    ];
    for (file, render) in outputs {
        if let Some((path, mut file)) = file {
            if let Err(err) = file.write_all(secrets::mask(&render()).as_bytes()) {
                let error = limits::explain(&err).unwrap_or_else(|| err.to_string());
                tracing::error!(path = %path.display(), error = %error, "cannot write the report file");
            }
        }
    }
}
