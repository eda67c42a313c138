//! release-tasks: run a Procfile release phase from `release.toml`.
//!
//! Data flows one way: settings + config -> plan -> run -> report. `main.rs` owns the process (exit
//! status, logging set-up); this crate root wires the stages together for each subcommand.

pub mod changed;
pub mod cli;
pub mod config;
pub mod env_file;
pub mod error;
pub mod exec;
pub mod gate;
pub mod guardian;
pub mod history;
pub mod init;
pub mod limits;
#[cfg(feature = "postgres")]
pub mod lock;
pub mod lock_check;
pub mod log;
pub mod metadata;
pub mod notify;
pub mod output;
pub mod plan;
pub mod process;
pub mod record;
pub mod redact;
pub mod report;
pub mod run;
pub mod secrets;
pub mod shell;
pub mod signals;
pub mod spawn;
pub mod tail;
pub mod task_run;

use std::io::Write;

use cli::{Command, Settings};
use error::{Error, Result};
use gate::Env;
use log::LogFormat;
use output::Stdio;
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

/// Carries out `settings.command` and returns the exit status.
pub fn execute(settings: &Settings, env: &Env, stdio: &Stdio) -> Result<i32> {
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
        Command::Init => {
            let written = init::write(&settings.config, settings.force_flag)?;
            say(&written.message())?;
            Ok(0)
        }
        Command::Check => {
            let (config, plan) = load(settings, env, stdio)?;
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
            #[allow(unused_mut)] // decided from the ledger only with the postgres feature
            let (_, mut plan) = load(settings, env, stdio)?;
            #[cfg(feature = "postgres")]
            decide_changed_for_plan(&mut plan, env);
            let mut text = Vec::new();
            plan::print_plan(&plan, settings.log_format, &mut text).map_err(Error::Output)?;
            say(&String::from_utf8_lossy(&text))?;
            Ok(0)
        }
        Command::Run => run(settings, env, stdio),
        Command::Exec { command } => {
            let status = run(settings, env, stdio)?;
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
            stdio.flush();
            if let Some(sig) = exec::stop_received() {
                return Err(exec::interrupted(sig));
            }
            Err(exec::replace_with(command, &std::env::vars_os().collect::<Vec<_>>()))
        }
        #[cfg(feature = "postgres")]
        Command::Wait { timeout, fail_fast } => wait(settings, env, stdio, *timeout, *fail_fast),
        #[cfg(feature = "postgres")]
        Command::History { limit, show } => history(settings, env, stdio, *limit, show.as_deref()),
        #[cfg(not(feature = "postgres"))]
        Command::Wait { .. } | Command::History { .. } => Err(error::Error::Usage(
            "wait and history read the [lock] ledger; this release-tasks was built without the `postgres` feature"
                .into(),
        )),
    }
}

/// `release-tasks wait`: the ledger of `[lock]` with `once = true`.
#[cfg(feature = "postgres")]
fn wait(
    settings: &Settings,
    env: &Env,
    stdio: &Stdio,
    timeout: Option<std::time::Duration>,
    fail_fast: bool,
) -> Result<i32> {
    let (config, plan) = load(settings, env, stdio)?;
    let lock = ledger_lock(&config, "wait")?;
    if !lock.once {
        return Err(Error::ConfigInvalid {
            path: config.path.clone(),
            problems: vec![error::Diagnostic {
                location: None,
                message: "`release-tasks wait` waits for the ledger to record the release, which [lock] keeps only \
                          with once = true; add once = true to [lock]"
                    .into(),
            }],
        });
    }
    // Log lines from now on by a thread of their own: signals are acted on while waiting.
    stdio.write_in_background().map_err(|err| {
        limits::thread_error("cannot start a thread for release-tasks's output", err)
    })?;
    lock::wait(lock, env, &plan.meta, timeout, fail_fast)
}

/// `release-tasks history [--show VERSION]`: read by the lock layer, printed by `history.rs`; a
/// stdout that cannot be written is an output error (74), as for `check` and `plan`.
#[cfg(feature = "postgres")]
fn history(
    settings: &Settings,
    env: &Env,
    stdio: &Stdio,
    limit: u32,
    show: Option<&str>,
) -> Result<i32> {
    let (config, plan) = load(settings, env, stdio)?;
    let lock = ledger_lock(&config, "history")?;
    let query = match show {
        Some(version) => lock::Query::Show(version),
        None => lock::Query::Last(limit),
    };
    let (name, answer) = lock::read(lock, env, &plan.meta, &query)?;
    // Rendered whole, then written through `say`, which hides the secrets known here by value.
    let mut out = Vec::new();
    let format = settings.log_format;
    match answer {
        lock::Answer::Releases(entries) => {
            history::print_releases(&name, &entries, format, &mut out).map_err(Error::Output)?;
            say(&String::from_utf8_lossy(&out))?;
        }
        lock::Answer::Release(Some((release, tasks))) => {
            history::print_release(&name, &release, &tasks, format, &mut out)
                .map_err(Error::Output)?;
            say(&String::from_utf8_lossy(&out))?;
        }
        lock::Answer::Release(None) => {
            let wanted = history::shown(show.unwrap_or_default());
            match format {
                LogFormat::Text => stdio.tell(&format!(
                    "release-tasks: no release {wanted} recorded for `{}`; `release-tasks history` lists the recorded ones\n",
                    history::shown(&name)
                )),
                LogFormat::Json => {
                    tracing::error!(lock = %name, release = %wanted, "no such release recorded");
                }
            }
            return Ok(history::EXIT_NOT_RECORDED);
        }
    }
    Ok(0)
}

/// `plan`: the `changed` gates decided from the ledger as `run` would (without the lock), or, where
/// the ledger cannot be read (no database URL in CI), said to be decided by `run`.
#[cfg(feature = "postgres")]
fn decide_changed_for_plan(plan: &mut Plan, env: &Env) {
    let undecided = plan.undecided_changed();
    let Some(lock) = plan.lock.as_ref().filter(|_| !undecided.is_empty()) else {
        return;
    };
    if plan.force {
        plan.apply_ledger(&std::collections::HashMap::new(), true);
        return;
    }
    match lock::last_successes(lock, env, &plan.meta, &undecided) {
        Ok(last) => plan.apply_ledger(&last, false),
        Err(why) => plan.ledger_unread(&why),
    }
}

/// The `[lock]` table whose ledger `wait` and `history` read; a config without one is a config
/// error that says what to add.
#[cfg(feature = "postgres")]
fn ledger_lock<'a>(config: &'a config::Config, command: &str) -> Result<&'a config::Lock> {
    config.lock.as_ref().ok_or_else(|| Error::ConfigInvalid {
        path: config.path.clone(),
        problems: vec![error::Diagnostic {
            location: None,
            message: format!(
                "`release-tasks {command}` reads the release ledger of [lock], and this config has no [lock] table; \
                 add [lock] with postgres = \"DATABASE_URL\" and once = true"
            ),
        }],
    })
}

/// `run` (and the release part of `exec`): plan, run, report; the release's exit status.
fn run(settings: &Settings, env: &Env, stdio: &Stdio) -> Result<i32> {
    let (config, plan) = load(settings, env, stdio)?;
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
    let report = run::run_release(&plan, env, stdio);
    stdio.ending();
    let report = report?;
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
fn load(settings: &Settings, env: &Env, stdio: &Stdio) -> Result<(config::Config, Plan)> {
    let config = config::load(&settings.config)?;
    #[allow(unused_mut)] // hashed only with the postgres feature, which `changed` needs
    // Before anything is planned or printed: the notify URLs and headers, and the tasks' own
    // variables, are secrets too.
    secrets::add_config(&config, env);
    let mut plan = Plan::new(&config, env, &settings.selection)?;
    plan.force = settings.force;
    #[cfg(feature = "postgres")]
    if !matches!(
        settings.command,
        Command::Wait { .. } | Command::History { .. }
    ) {
        plan.hash_inputs(&config.dir())?;
    }
    // `check` and `plan` show what `run` would stop on; the others log it (or stop on it).
    let run = !matches!(settings.command, Command::Check | Command::Plan);
    let preflight = if run { &[][..] } else { &plan.preflight[..] };
    for warning in &plan.warnings {
        match settings.log_format {
            LogFormat::Text if !run => stdio.tell(&format!("release-tasks: warning: {warning}\n")),
            _ => tracing::warn!(problem = %warning, "check the config"),
        }
    }
    for missing in preflight {
        match settings.log_format {
            LogFormat::Text => stdio.tell(&format!(
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
