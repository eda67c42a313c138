//! release-tasks: run a Procfile release phase from `release.toml`.
//!
//! Data flows one way: settings + config -> plan -> run -> report. `main.rs` owns the process (exit
//! status, logging set-up); this crate root wires the stages together for each subcommand.

pub mod cli;
pub mod config;
pub mod error;
pub mod gate;
pub mod guardian;
pub mod init;
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
pub mod signals;
pub mod supervisor;

use std::io::Write;

use cli::{Command, LogFormat, Settings};
use error::Result;
use gate::Env;
use plan::Plan;

/// Takes the environment snapshot that every decision is made from. Variables whose name or value
/// is not UTF-8 cannot be gate variables and are left out (tasks still inherit them).
#[must_use]
pub fn env_snapshot() -> Env {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Carries out `settings.command` and returns the exit status.
pub fn execute(settings: &Settings, env: &Env) -> Result<i32> {
    match settings.command {
        Command::Init { force } => {
            let written = init::write(&settings.config, force)?;
            print!("{}", written.message());
            Ok(0)
        }
        Command::Check => {
            let (config, plan) = load(settings, env)?;
            let runs = plan.to_run().count();
            println!(
                "{}: ok, {} task{} ({runs} would run with this environment)",
                config.path.display(),
                config.tasks.len(),
                if config.tasks.len() == 1 { "" } else { "s" }
            );
            Ok(0)
        }
        Command::Plan => {
            let (config, plan) = load(settings, env)?;
            print_plan(&config, &plan, settings.log_format)
                .map_err(|e| anyhow::anyhow!("cannot write the plan: {e}"))?;
            Ok(0)
        }
        Command::Run => {
            let (config, plan) = load(settings, env)?;
            if !plan.preflight.is_empty() {
                return Err(error::Error::Environment {
                    problems: plan.preflight,
                });
            }
            // Open the report files first: a path that cannot be written is found before anything runs.
            let report_files = open_report_files(settings)?;
            process::become_subreaper();
            let meta = plan.meta.clone();
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
            let report = run::run_release(&plan, &config, env, meta)?;
            report.log_summary();
            write_reports(report_files, &report);
            Ok(report.exit_code())
        }
    }
}

/// Reads the config and plans the release. For `check` and `plan`, what the environment lacks for
/// `run` is a warning; `run` itself refuses to start with it.
fn load(settings: &Settings, env: &Env) -> Result<(config::Config, Plan)> {
    let config = config::load(&settings.config)?;
    let plan = Plan::new(&config, env, &settings.selection)?;
    if settings.command != Command::Run {
        for missing in &plan.preflight {
            match settings.log_format {
                LogFormat::Text => {
                    eprintln!(
                        "release-tasks: warning: {missing}; `release-tasks run` would stop here"
                    );
                }
                LogFormat::Json => {
                    tracing::warn!(problem = %missing, "`release-tasks run` would stop here");
                }
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

/// Writes the report files; a failure is logged, since the release itself has already ended.
fn write_reports(files: ReportFiles, report: &report::Report) {
    let render_json = || format!("{}\n", report.to_json());
    let outputs: [(_, &dyn Fn() -> String); 2] = [
        (files.json, &render_json),
        (files.junit, &|| report.to_junit()),
    ];
    for (file, render) in outputs {
        if let Some((path, mut file)) = file {
            if let Err(err) = file.write_all(render().as_bytes()) {
                tracing::error!(path = %path.display(), error = %err, "cannot write the report file");
            }
        }
    }
}

fn print_plan(config: &config::Config, plan: &Plan, format: LogFormat) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if let (Some(lock), LogFormat::Text) = (&config.lock, format) {
        writeln!(
            out,
            "lock  PostgreSQL advisory lock `{}` through {}, waiting up to {}{}",
            lock.key
                .as_deref()
                .or(plan.meta.app.as_deref())
                .unwrap_or("<unknown: set [lock] key or RELEASE_TASKS_APP>"),
            lock.url_var,
            humantime::format_duration(lock.timeout),
            if lock.once { "; once per release" } else { "" }
        )?;
    }
    let width = plan
        .steps
        .iter()
        .map(|s| s.task.name.len())
        .max()
        .unwrap_or(0);
    for step in &plan.steps {
        let command = redact::urls_in(&step.task.command.to_string());
        match format {
            LogFormat::Text => {
                let decision = if step.run { "run " } else { "skip" };
                writeln!(out, "{decision}  {:<width$}  {command}", step.task.name)?;
                writeln!(out, "      {:<width$}  because {}", "", step.reason)?;
                match step.task.on {
                    config::On::Success => {}
                    config::On::Failure => writeln!(
                        out,
                        "      {:<width$}  only if the release fails (on = \"failure\")",
                        ""
                    )?,
                    config::On::Always => writeln!(
                        out,
                        "      {:<width$}  also if the release fails (on = \"always\")",
                        ""
                    )?,
                }
            }
            LogFormat::Json => {
                let line = serde_json::json!({
                    "task": step.task.name,
                    "run": step.run,
                    "reason": step.reason,
                    "command": command,
                    "timeout_s": step.task.timeout.as_secs(),
                    "allow_failure": step.task.allow_failure,
                    "on": step.task.on.to_string(),
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    if plan.steps.is_empty() {
        match format {
            LogFormat::Text => writeln!(out, "no tasks in the config")?,
            LogFormat::Json => {}
        }
    }
    out.flush()
}
