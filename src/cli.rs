//! The command line (clap) and the `RELEASE_TASKS_*` settings, merged so that flags win.
//!
//! The settings are read from the environment snapshot as bytes: paths (`_CONFIG`, `_REPORT`,
//! `_JUNIT`) as the operating system gives them, so a path that is not UTF-8 works; the others must be
//! text, and one that is not UTF-8 is an error that names it, never an unset setting.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::gate::Env;
pub use crate::log::LogFormat;
pub use crate::output::OutputFormat;
use crate::plan::Selection;

/// Run a release phase: env-gated tasks from release.toml, with timeouts, signal forwarding and
/// clear exit codes.
#[derive(Debug, Parser)]
#[command(
    name = "release-tasks",
    version,
    about,
    after_help = "Put `release: release-tasks` in your Procfile. Every option can also be set with a \
RELEASE_TASKS_* variable (RELEASE_TASKS_CONFIG, _ONLY, _SKIP, _LOG_FORMAT, _OUTPUT_FORMAT, _FORCE); flags win.\n\n\
Exit status: 0 success; a failed task's own exit code; 124 a task timed out; 128+N killed by signal N; \
126 a command could not run; 127 a command was not found; 78 bad or missing config or gate value \
(nothing ran); 69 the [lock] database is unavailable, or the release lost its lock (another replica \
may run it again); 75 another replica held the lock too long; 74 check, plan, history or init could not \
write their output; 71 a system limit (ulimit -n, ulimit -u) stopped release-tasks itself; 70 release-tasks itself failed; 2 bad usage."
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
    #[arg(
        long,
        global = true,
        value_enum,
        ignore_case = true,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,

    /// Format of the tasks' output lines: `json` makes each one {"task", "stream", "line"}
    /// [default: text]
    #[arg(
        long,
        global = true,
        value_enum,
        ignore_case = true,
        value_name = "FORMAT"
    )]
    pub output_format: Option<OutputFormat>,

    /// Write the release report as JSON to this file when the release ends
    #[arg(long, global = true, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Write the release report as `JUnit` XML to this file when the release ends
    #[arg(long, global = true, value_name = "PATH")]
    pub junit: Option<PathBuf>,

    /// Read variables from this .env file for a local run (repeatable; the environment wins, then
    /// the first file that sets a variable)
    #[arg(long = "env-file", global = true, value_name = "PATH")]
    pub env_files: Vec<PathBuf>,

    /// Run (or plan) tasks whose `changed` files did not change since their last successful run;
    /// with `init`, replace an existing config file
    #[arg(long, global = true)]
    pub force: bool,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the release: every task whose gates hold, in order (the default)
    Run,
    /// Run the release, then, only if it succeeded, replace release-tasks with COMMAND (same pid,
    /// no shell in between): for container entrypoints, `release-tasks exec -- puma`
    Exec {
        /// The program to start after the release, and its arguments
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Show, per task, whether it would run and why; runs nothing
    Plan,
    /// Validate the config and the gate values (for CI); runs nothing
    Check,
    /// Write a release.toml for the framework in this directory (Rails, Django, Laravel, Phoenix,
    /// Node with Prisma, Knex or Sequelize); with --force, over an existing one
    Init,
    /// Wait until the lock's ledger records this release as completed (for worker and web pods
    /// that must not start before the release ran; needs once = true in the lock table)
    Wait {
        /// Give up (exit 75) after this long [default: the lock's timeout]
        #[arg(long, value_name = "DURATION", value_parser = wait_timeout)]
        timeout: Option<std::time::Duration>,
        /// Exit 1 as soon as the ledger records this release as failed and no replica holds the
        /// lock, instead of waiting for another replica to run it again
        #[arg(long)]
        fail_fast: bool,
    },
    /// Show the last releases recorded in the lock's ledger, or one release's tasks (--show);
    /// needs no release version
    History {
        /// How many releases to show
        #[arg(short = 'n', long, value_name = "N", default_value_t = 10,
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Show this release's tasks: outcome, exit status, start, duration, attempts, and a
        /// failed task's last output lines (VERSION as the ledger shows it, or a commit)
        #[arg(long, value_name = "VERSION", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        show: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Settings after merging flags over `RELEASE_TASKS_*` variables over defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub command: Command,
    pub config: PathBuf,
    pub selection: Selection,
    pub log_format: LogFormat,
    pub output_format: OutputFormat,
    pub report: Option<PathBuf>,
    pub junit: Option<PathBuf>,
    /// The `.env` files to read, in order (none unless named).
    pub env_files: Vec<PathBuf>,
    /// Where they were named, for messages: `--env-file` or `RELEASE_TASKS_ENV_FILE`.
    pub env_files_from: &'static str,
    /// `--force` or `RELEASE_TASKS_FORCE`: tasks with a `changed` gate run whatever their files say.
    pub force: bool,
    /// `--force` itself (`init` takes only the flag: a variable left set must not overwrite a file).
    pub force_flag: bool,
}

impl Settings {
    /// Merges `cli` over the `RELEASE_TASKS_*` variables of `env` (flags win). An empty variable is
    /// the same as an unset one; so is an empty `--only` or `--skip` list (`--only ''`).
    pub fn resolve(cli: Cli, env: &Env) -> Result<Settings> {
        // Flags win: a variable whose flag is given is not read at all (not even checked for UTF-8).
        let given = [
            cli.only.is_some(),
            cli.skip.is_some(),
            cli.log_format.is_some(),
            cli.output_format.is_some(),
            cli.force,
        ];
        let vars = EnvSettings::read(env, given)?;
        let force = match &vars.force {
            _ if cli.force => true,
            None => false,
            Some(value) => crate::gate::parse_bool(value).ok_or_else(|| Error::Environment {
                problems: vec![format!(
                    "RELEASE_TASKS_FORCE={value:?} is not true or false; use true, 1, yes or on to run tasks whose `changed` files did not change (false, 0, no, off or unset: not)"
                )],
            })?,
        };
        let (only, skip, log_format) = (vars.only, vars.skip, vars.log_format);
        let output_format = format_setting(
            cli.output_format,
            vars.output_format,
            "RELEASE_TASKS_OUTPUT_FORMAT",
            "an output format",
        )?;
        let path = |name: &str| {
            env.get_os(name)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        };
        let log_format = format_setting(
            cli.log_format,
            log_format,
            "RELEASE_TASKS_LOG_FORMAT",
            "a log format",
        )?;
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
        let nonempty = |p: PathBuf| (!p.as_os_str().is_empty()).then_some(p);
        let report = cli
            .report
            .and_then(nonempty)
            .or_else(|| path("RELEASE_TASKS_REPORT"));
        let junit = cli
            .junit
            .and_then(nonempty)
            .or_else(|| path("RELEASE_TASKS_JUNIT"));
        if let (Some(report), Some(junit)) = (&report, &junit) {
            if same_file(report, junit) {
                return Err(Error::Usage(format!(
                    "--report and --junit both name {}; give each report its own file",
                    report.display()
                )));
            }
        }
        let (env_files, env_files_from) = if cli.env_files.is_empty() {
            let named = path("RELEASE_TASKS_ENV_FILE").into_iter().collect();
            (named, "RELEASE_TASKS_ENV_FILE")
        } else {
            (cli.env_files, "--env-file")
        };
        Ok(Settings {
            force,
            force_flag: cli.force,
            env_files,
            env_files_from,
            command: cli.command.unwrap_or(Command::Run),
            config: cli
                .config
                .and_then(nonempty)
                .or_else(|| path("RELEASE_TASKS_CONFIG"))
                .unwrap_or_else(|| PathBuf::from("release.toml")),
            selection: Selection {
                only: list(cli.only, only),
                skip: list(cli.skip, skip),
            },
            log_format,
            output_format,
            report,
            junit,
        })
    }
}

/// The `RELEASE_TASKS_*` settings that are text, read with envy. Paths (`_CONFIG`, `_REPORT`,
/// `_JUNIT`, `_ENV_FILE`) are read as bytes instead, so that a path that is not UTF-8 still works; the metadata
/// overrides (`_APP`, `_VERSION`, `_COMMIT`) belong to `metadata.rs`.
#[derive(Debug, Default, serde::Deserialize)]
struct EnvSettings {
    only: Option<String>,
    skip: Option<String>,
    log_format: Option<String>,
    output_format: Option<String>,
    force: Option<String>,
}

impl EnvSettings {
    const NAMES: [&str; 5] = ["ONLY", "SKIP", "LOG_FORMAT", "OUTPUT_FORMAT", "FORCE"];

    /// Reads the settings from `env`; an empty variable is the same as an unset one, and a value
    /// that is not UTF-8 is an error that names its variable (never taken as unset).
    /// `given[i]` says that the flag of `NAMES[i]` was given, so its variable is left unread.
    fn read(env: &Env, given: [bool; 5]) -> Result<EnvSettings> {
        let mut vars = Vec::new();
        let mut not_text = Vec::new();
        for (name, _) in Self::NAMES
            .into_iter()
            .zip(given)
            .filter(|(_, given)| !given)
        {
            let var = format!("RELEASE_TASKS_{name}");
            match env.lookup(&var) {
                Ok(Some(value)) if !value.is_empty() => vars.push((var, value.to_owned())),
                Ok(_) => {}
                Err(err) => not_text.push(err.to_string()),
            }
        }
        if !not_text.is_empty() {
            return Err(Error::Environment { problems: not_text });
        }
        envy::prefixed("RELEASE_TASKS_")
            .from_iter(vars)
            .map_err(|err| Error::Usage(format!("a RELEASE_TASKS_* setting cannot be read: {err}")))
    }
}

/// A format setting: the flag, else its variable (in any case), else the default (`text`).
fn format_setting<T: ValueEnum + Default>(
    flag: Option<T>,
    var: Option<String>,
    variable: &str,
    what: &str,
) -> Result<T> {
    match (flag, var) {
        (Some(format), _) => Ok(format),
        (None, None) => Ok(T::default()),
        (None, Some(value)) => T::from_str(&value, true).map_err(|_| {
            Error::Usage(format!(
                "{variable}={value:?} is not {what}; use `text` or `json`"
            ))
        }),
    }
}

/// Whether two paths name one file: the same path once made absolute, or (when both exist) the same
/// file through a link.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if where_written(a) == where_written(b) {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// `wait --timeout`: a duration as in release.toml (`90s`, `15m`), above zero and at most 30 days.
fn wait_timeout(text: &str) -> std::result::Result<std::time::Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e}; write it like 90s or 15m"))?;
    if duration.is_zero() || duration > crate::config::MAX_DURATION {
        return Err("give a duration above zero and at most 30 days, like 10m".into());
    }
    Ok(duration)
}

/// The file that writing to `path` creates or replaces, as far as it can be known before it exists:
/// symbolic links followed (a dangling one too, which creating the file follows), and the directory
/// made canonical.
fn where_written(path: &Path) -> PathBuf {
    let mut path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    // As the kernel does, give up on a chain of links after 40.
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        path = match path.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_paths_through_links_are_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let x = dir.path().join("x.json");
        let y = dir.path().join("y.json");
        std::os::unix::fs::symlink(&x, &y).unwrap();
        assert!(same_file(&x, &y), "a dangling link to the other file");
        let sub = dir.path().join("d1");
        std::fs::create_dir(&sub).unwrap();
        std::os::unix::fs::symlink(&sub, dir.path().join("dl")).unwrap();
        assert!(
            same_file(&sub.join("r"), &dir.path().join("dl/r")),
            "through a linked directory"
        );
        assert!(same_file(&x, &dir.path().join("d1/../x.json")));
        assert!(!same_file(&x, &sub.join("x.json")));
    }

    fn resolve(args: &[&str], vars: &[(&str, &str)]) -> Result<Settings> {
        let cli = Cli::try_parse_from(std::iter::once("release-tasks").chain(args.iter().copied()))
            .expect("args parse");
        Settings::resolve(cli, &crate::gate::env_of(vars))
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

    #[test]
    fn empty_only_means_no_selection_from_flag_and_variable_alike() {
        let s = resolve(&["--only", ""], &[]).unwrap();
        assert!(s.selection.only.is_empty());
        let s = resolve(&[], &[("RELEASE_TASKS_ONLY", "")]).unwrap();
        assert!(s.selection.only.is_empty());
        let s = resolve(&["--only", " , "], &[("RELEASE_TASKS_ONLY", "x")]).unwrap();
        assert!(s.selection.only.is_empty(), "a flag, even empty, wins");
    }

    #[test]
    fn settings_are_read_as_bytes() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let cli = || Cli::try_parse_from(["release-tasks"]).unwrap();
        let bytes = |b: &[u8]| OsString::from_vec(b.to_vec());
        let env = Env::from_os([("RELEASE_TASKS_CONFIG".into(), bytes(b"conf\xff.toml"))]);
        let s = Settings::resolve(cli(), &env).unwrap();
        assert_eq!(s.config.as_os_str(), bytes(b"conf\xff.toml"));
        for name in [
            "RELEASE_TASKS_ONLY",
            "RELEASE_TASKS_SKIP",
            "RELEASE_TASKS_LOG_FORMAT",
        ] {
            let env = Env::from_os([(name.into(), bytes(b"a\xff"))]);
            let err = Settings::resolve(cli(), &env).unwrap_err();
            assert_eq!(err.exit_code(), 78, "{name}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn the_two_reports_need_two_files() {
        let err = resolve(&["--report", "r.xml", "--junit", "./r.xml"], &[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = resolve(&["--junit", "r.xml"], &[("RELEASE_TASKS_REPORT", "r.xml")]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(resolve(&["--report", "r.json", "--junit", "r.xml"], &[]).is_ok());
    }
}
