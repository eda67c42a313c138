//! The command line (clap) and the `RELEASE_TASKS_*` settings (envy), merged so that flags win.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::plan::Selection;

/// Run a release phase: env-gated tasks from release.toml, with timeouts, signal forwarding and
/// clear exit codes.
#[derive(Debug, Parser)]
#[command(
    name = "release-tasks",
    version,
    about,
    after_help = "Put `release: release-tasks` in your Procfile. Every option can also be set with a \
RELEASE_TASKS_* variable (RELEASE_TASKS_CONFIG, _ONLY, _SKIP, _LOG_FORMAT); flags win.\n\n\
Exit status: 0 success; a failed task's own exit code; 124 a task timed out; 128+N killed by signal N; \
126 a command could not run; 127 a command was not found; 78 bad or missing config or gate value \
(nothing ran); 70 release-tasks itself failed; 2 bad usage."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Path of the config file [default: release.toml]
    #[arg(short, long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Run only these tasks (comma-separated names)
    #[arg(long, global = true, value_name = "TASKS", value_delimiter = ',')]
    pub only: Option<Vec<String>>,

    /// Skip these tasks (comma-separated names)
    #[arg(long, global = true, value_name = "TASKS", value_delimiter = ',')]
    pub skip: Option<Vec<String>>,

    /// Format of release-tasks's own log lines [default: text]
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Write the release report as JSON to this file when the release ends
    #[arg(long, global = true, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Write the release report as `JUnit` XML to this file when the release ends
    #[arg(long, global = true, value_name = "PATH")]
    pub junit: Option<PathBuf>,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the release: every task whose gates hold, in order (the default)
    Run,
    /// Show, per task, whether it would run and why; runs nothing
    Plan,
    /// Validate the config and the gate values (for CI); runs nothing
    Check,
    /// Write a release.toml for the framework in this directory (Rails, Django, Laravel, Phoenix,
    /// Node with Prisma, Knex or Sequelize)
    Init {
        /// Replace an existing config file
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// How release-tasks writes its own log lines (task output is passed through as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event
    Text,
    /// One JSON object per line
    Json,
}

/// Settings after merging flags over `RELEASE_TASKS_*` variables over defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub command: Command,
    pub config: PathBuf,
    pub selection: Selection,
    pub log_format: LogFormat,
    pub report: Option<PathBuf>,
    pub junit: Option<PathBuf>,
}

/// The `RELEASE_TASKS_*` variables this module reads.
#[derive(Debug, Default, Deserialize)]
struct EnvSettings {
    config: Option<PathBuf>,
    only: Option<String>,
    skip: Option<String>,
    log_format: Option<String>,
    report: Option<PathBuf>,
    junit: Option<PathBuf>,
}

impl Settings {
    /// Merges `cli` over the `RELEASE_TASKS_*` entries of `vars` (flags win).
    pub fn resolve(cli: Cli, vars: impl Iterator<Item = (String, String)>) -> Result<Settings> {
        let env: EnvSettings = envy::prefixed("RELEASE_TASKS_")
            // Other RELEASE_TASKS_* variables (APP, VERSION, COMMIT, RUN_ID) are not settings;
            // envy ignores them.
            .from_iter(vars)
            .map_err(|err| Error::Usage(format!("bad RELEASE_TASKS_* setting: {err}")))?;
        let log_format = match (cli.log_format, env.log_format.as_deref()) {
            (Some(format), _) => format,
            (None, None | Some("")) => LogFormat::Text,
            (None, Some(value)) => LogFormat::from_str(value, true).map_err(|_| {
                Error::Usage(format!(
                    "RELEASE_TASKS_LOG_FORMAT={value:?} is not a log format; use `text` or `json`"
                ))
            })?,
        };
        let list = |flag: Option<Vec<String>>, var: Option<String>| -> Vec<String> {
            flag.unwrap_or_else(|| {
                var.map(|v| v.split(',').map(str::to_owned).collect())
                    .unwrap_or_default()
            })
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
        };
        Ok(Settings {
            command: cli.command.unwrap_or(Command::Run),
            config: cli
                .config
                .or(env.config.filter(|p| !p.as_os_str().is_empty()))
                .unwrap_or_else(|| PathBuf::from("release.toml")),
            selection: Selection {
                only: list(cli.only, env.only),
                skip: list(cli.skip, env.skip),
            },
            log_format,
            report: cli
                .report
                .or(env.report)
                .filter(|p| !p.as_os_str().is_empty()),
            junit: cli
                .junit
                .or(env.junit)
                .filter(|p| !p.as_os_str().is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str], vars: &[(&str, &str)]) -> Result<Settings> {
        let cli = Cli::try_parse_from(std::iter::once("release-tasks").chain(args.iter().copied()))
            .expect("args parse");
        Settings::resolve(
            cli,
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn flags_win_over_variables() {
        let s = resolve(
            &["plan", "--only", "a,b", "-c", "x.toml"],
            &[
                ("RELEASE_TASKS_ONLY", "c"),
                ("RELEASE_TASKS_CONFIG", "y.toml"),
                ("RELEASE_TASKS_SKIP", "d, e"),
            ],
        )
        .unwrap();
        assert_eq!(s.command, Command::Plan);
        assert_eq!(s.selection.only, ["a", "b"]);
        assert_eq!(s.selection.skip, ["d", "e"]);
        assert_eq!(s.config, PathBuf::from("x.toml"));
    }

    #[test]
    fn defaults_and_variables() {
        let s = resolve(
            &[],
            &[
                ("RELEASE_TASKS_LOG_FORMAT", "JSON"),
                ("RELEASE_TASKS_APP", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(s.command, Command::Run);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.config, PathBuf::from("release.toml"));
        let err = resolve(&[], &[("RELEASE_TASKS_LOG_FORMAT", "xml")]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("RELEASE_TASKS_LOG_FORMAT=\"xml\""));
    }
}
