//! `release.toml` -> [`Config`]: raw serde structs first, then validation into typed values.
//!
//! The raw structs mirror the file (unknown keys are rejected, positions are kept with
//! `toml::Spanned`); [`load`] turns them into a `Config` in which durations are `Duration`s, gates are
//! [`Gate`]s, commands are argv vectors and tasks are already in run order. Every problem found is
//! reported at once, with its line and column, before anything runs. After this module no code looks
//! at raw strings from the file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use toml::Spanned;

use crate::error::{Diagnostic, Error, Result};
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
    /// `[lock]`: once per release across replicas, through a PostgreSQL advisory lock.
    pub lock: Option<Lock>,
}

/// `[lock]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// The variable that holds the database URL (the URL itself carries a password).
    pub url_var: String,
    /// The lock's name; the app's name when not given.
    pub key: Option<String>,
    /// How long a replica waits for the lock before it gives up.
    pub timeout: Duration,
    /// Record each release in `release_tasks_runs` and skip one that already succeeded.
    pub once: bool,
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
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(10),
            shell: "/bin/sh".to_owned(),
            heartbeat: Duration::from_secs(60),
            release_timeout: Duration::from_secs(55 * 60),
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
    /// The argv that is exec'd (empty for a notify task).
    #[must_use]
    pub fn argv(&self) -> Vec<&str> {
        match self {
            Command::Shell { shell, script } => vec![shell.as_str(), "-c", script.as_str()],
            Command::Exec(argv) => argv.iter().map(String::as_str).collect(),
            Command::Notify(_) => Vec::new(),
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
    fn parse(raw: &str) -> Result<Template, String> {
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

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a release.toml: [defaults], [require], [lock] and [tasks.NAME] tables"
)]
struct RawConfig {
    defaults: Option<RawDefaults>,
    require: Option<RawRequire>,
    lock: Option<Spanned<RawLock>>,
    #[serde(default)]
    tasks: RawTasks,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [require] table, like env = [\"DATABASE_URL\"]"
)]
struct RawRequire {
    #[serde(default)]
    env: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [lock] table, like postgres = \"DATABASE_URL\""
)]
struct RawLock {
    postgres: Spanned<String>,
    key: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    once: bool,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a notify table, like notify = { url = \"${RELEASE_WEBHOOK_URL}\" }"
)]
struct RawNotify {
    url: Spanned<String>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    format: Option<NotifyFormat>,
    timeout: Option<Spanned<String>>,
    retries: Option<u32>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [defaults] table, like timeout = \"30m\""
)]
struct RawDefaults {
    timeout: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    shell: Option<Spanned<String>>,
    heartbeat: Option<Spanned<String>>,
    release_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a task table, like [tasks.migrate] with run = \"bundle exec rails db:migrate\""
)]
struct RawTask {
    run: Option<Spanned<toml::Value>>,
    notify: Option<Spanned<RawNotify>>,
    on: Option<Spanned<String>>,
    when: Option<Spanned<toml::Value>>,
    unless: Option<Spanned<toml::Value>>,
    timeout: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    after: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    allow_failure: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    dir: Option<Spanned<String>>,
}

/// The `[tasks]` table in file order (a plain map would sort the names).
#[derive(Default)]
struct RawTasks(Vec<(Spanned<String>, Spanned<RawTask>)>);

impl<'de> Deserialize<'de> for RawTasks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = RawTasks;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of tasks, like [tasks.migrate]")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTasks, A::Error> {
                let mut tasks = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    tasks.push(entry);
                }
                Ok(RawTasks(tasks))
            }
        }
        deserializer.deserialize_map(InOrder)
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config> {
    let source = read(path)?;
    parse(path, &source)
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
    let bytes =
        std::fs::read(path).map_err(|err| unreadable(format!("{err}; check its permissions")))?;
    String::from_utf8(bytes).map_err(|err| {
        let offset = err.utf8_error().valid_up_to();
        let source = String::from_utf8_lossy(err.as_bytes());
        let (line, col) = line_col(&source, offset);
        unreadable(format!(
            "line {line}, column {col}: not valid UTF-8; TOML files must be UTF-8, so re-save it as UTF-8"
        ))
    })
}

/// Parses and validates config text; `path` is used for messages and to resolve `dir`.
pub fn parse(path: &Path, source: &str) -> Result<Config> {
    let invalid = |problems| Error::ConfigInvalid {
        path: path.to_owned(),
        problems,
    };
    let raw: RawConfig = toml::from_str(source).map_err(|err| {
        let location = err.span().map(|span| line_col(source, span.start));
        invalid(vec![Diagnostic {
            location,
            message: syntax_message(err.message()),
        }])
    })?;
    let base = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut v = Validator {
        source,
        base: absolute(&base),
        problems: Vec::new(),
    };
    let defaults = v.defaults(raw.defaults);
    let tasks = v.tasks(raw.tasks.0, &defaults);
    let required_env = v.required_env(raw.require);
    let lock = raw.lock.and_then(|l| v.lock(l));
    if v.problems.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            defaults,
            tasks,
            required_env,
            lock,
        })
    } else {
        Err(invalid(v.problems))
    }
}

/// Adds a hint to the TOML library's messages where the user's next step is not obvious.
fn syntax_message(message: &str) -> String {
    let message = message.trim_end();
    let hint = if message.starts_with("unknown field") {
        "check the spelling against the README's release.toml reference"
    } else if message.ends_with("expected a string") {
        "put the value in quotes, like \"3000\""
    } else if message.ends_with("expected a boolean") {
        "write true or false, without quotes"
    } else if message.ends_with("expected u32") {
        "write a whole number, without quotes"
    } else if message.starts_with("missing field") {
        "add it; the README's release.toml reference shows each table's keys"
    } else if message.starts_with("duplicate key") {
        "each key, and each [tasks.NAME], may appear only once"
    } else {
        return message.to_owned();
    };
    format!("{message}; {hint}")
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// 1-based line and column of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source.as_bytes()[..offset.min(source.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

struct Validator<'a> {
    source: &'a str,
    base: PathBuf,
    problems: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn report(&mut self, span: Option<std::ops::Range<usize>>, message: String) {
        let location = span.map(|s| line_col(self.source, s.start));
        self.problems.push(Diagnostic { location, message });
    }

    fn duration(
        &mut self,
        value: Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.report(
                    Some(value.span()),
                    format!("`{key}` is zero; give a positive duration like \"30s\" or \"15m\""),
                );
                default
            }
            Ok(d) => d,
            Err(err) => {
                self.report(
                    Some(value.span()),
                    format!(
                        "`{key} = {:?}` is not a duration ({err}); write a number and a unit, like \"90s\", \"15m\" or \"1h 30m\"",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// `heartbeat`, at least a second: more often would flood the log and busy the run loop.
    fn heartbeat(&mut self, value: Option<Spanned<String>>, default: Duration) -> Duration {
        let span = value.as_ref().map(Spanned::span);
        let heartbeat = self.duration(value, "heartbeat", default);
        if heartbeat < Duration::from_secs(1) {
            self.report(
                span,
                "`heartbeat` is under a second; give at least \"1s\", like \"30s\" or \"1m\""
                    .into(),
            );
        }
        heartbeat
    }

    fn defaults(&mut self, raw: Option<RawDefaults>) -> Defaults {
        let builtin = Defaults::default();
        let Some(raw) = raw else { return builtin };
        let shell = match raw.shell {
            Some(shell) if shell.get_ref().trim().is_empty() => {
                self.report(
                    Some(shell.span()),
                    "`shell` is empty; leave it out to use /bin/sh".into(),
                );
                builtin.shell
            }
            Some(shell) => shell.into_inner(),
            None => builtin.shell,
        };
        Defaults {
            timeout: self.duration(raw.timeout, "timeout", builtin.timeout),
            grace: self.duration(raw.grace, "grace", builtin.grace),
            shell,
            heartbeat: self.heartbeat(raw.heartbeat, builtin.heartbeat),
            release_timeout: self.duration(
                raw.release_timeout,
                "release_timeout",
                builtin.release_timeout,
            ),
        }
    }

    fn lock(&mut self, raw: Spanned<RawLock>) -> Option<Lock> {
        let span = raw.span();
        let raw = raw.into_inner();
        if !cfg!(feature = "postgres") {
            self.report(
                Some(span),
                "[lock] needs PostgreSQL support, and this release-tasks was built without the `postgres` feature; \
                 use the default build"
                    .to_owned(),
            );
            return None;
        }
        if !crate::gate::is_var_name(raw.postgres.get_ref()) {
            self.report(
                Some(raw.postgres.span()),
                format!(
                    "[lock] postgres = {:?} must name the variable that holds the database URL, like postgres = \"DATABASE_URL\"",
                    crate::redact::urls_in(raw.postgres.get_ref())
                ),
            );
            return None;
        }
        let key = match raw.key {
            Some(key) if key.get_ref().trim().is_empty() => {
                self.report(
                    Some(key.span()),
                    "[lock] key is empty; leave it out to use the app's name".into(),
                );
                None
            }
            other => other.map(Spanned::into_inner),
        };
        Some(Lock {
            url_var: raw.postgres.into_inner(),
            key,
            timeout: self.duration(raw.timeout, "timeout", Duration::from_secs(30 * 60)),
            once: raw.once,
        })
    }

    fn required_env(&mut self, raw: Option<RawRequire>) -> Vec<String> {
        let mut names = Vec::new();
        for name in raw.map(|r| r.env).unwrap_or_default() {
            if crate::gate::is_var_name(name.get_ref()) {
                names.push(name.into_inner());
            } else {
                self.report(
                    Some(name.span()),
                    format!(
                        "[require] env: {:?} is not an environment variable name; use letters, digits and _",
                        name.get_ref()
                    ),
                );
            }
        }
        names
    }

    fn tasks(
        &mut self,
        raw: Vec<(Spanned<String>, Spanned<RawTask>)>,
        defaults: &Defaults,
    ) -> Vec<Task> {
        let mut tasks = Vec::with_capacity(raw.len());
        let mut afters = Vec::with_capacity(raw.len());
        for (name, raw_task) in raw {
            let name_span = name.span();
            let name = name.into_inner();
            if !valid_task_name(&name) {
                self.report(
                    Some(name_span.clone()),
                    format!(
                        "task name {name:?} is not allowed; use letters, digits, '-', '_' and '.', like [tasks.cache-clear]"
                    ),
                );
            }
            let task_span = raw_task.span();
            let raw_task = raw_task.into_inner();
            afters.push(raw_task.after.clone().unwrap_or_default());
            tasks.push(self.task(name, task_span, raw_task, defaults));
        }
        self.order(tasks, &afters)
    }

    fn task(
        &mut self,
        name: String,
        span: std::ops::Range<usize>,
        raw: RawTask,
        defaults: &Defaults,
    ) -> Task {
        let command = match (raw.run, raw.notify) {
            (None, None) => {
                self.report(
                    Some(span.clone()),
                    format!(
                        "task `{name}` has no `run`; add the command, like run = \"bundle exec rails db:migrate\" (or `notify` for a webhook)"
                    ),
                );
                Command::Exec(Vec::new())
            }
            (Some(run), Some(_)) => {
                self.report(
                    Some(run.span()),
                    format!("task `{name}` has both `run` and `notify`; a task does one of them, so split it in two"),
                );
                Command::Exec(Vec::new())
            }
            (Some(run), None) => self.command(&name, run, defaults),
            (None, Some(notify)) => self.notify(&name, notify),
        };
        let on = match raw.on {
            None => On::Success,
            Some(on) => match on.get_ref().as_str() {
                "success" => On::Success,
                "failure" => On::Failure,
                "always" => On::Always,
                other => {
                    self.report(
                        Some(on.span()),
                        format!("task `{name}`: `on = {other:?}` is not one of \"success\", \"failure\" or \"always\""),
                    );
                    On::Success
                }
            },
        };
        let when = raw.when.and_then(|g| self.gate(&name, "when", &g));
        let unless = raw.unless.and_then(|g| self.gate(&name, "unless", &g));
        let dir = match raw.dir {
            None => self.base.clone(),
            Some(dir) => {
                let path = self.base.join(dir.get_ref());
                if !path.is_dir() {
                    self.report(
                        Some(dir.span()),
                        format!(
                            "task `{name}`: `dir` {} is not a directory; it is taken relative to the config file",
                            path.display()
                        ),
                    );
                }
                path
            }
        };
        for key in raw.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                self.report(
                    Some(span.clone()),
                    format!("task `{name}`: env name {key:?} is not a valid variable name"),
                );
            }
        }
        Task {
            timeout: self.duration(raw.timeout, "timeout", defaults.timeout),
            grace: self.duration(raw.grace, "grace", defaults.grace),
            name,
            command,
            when,
            unless,
            allow_failure: raw.allow_failure,
            on,
            env: raw.env,
            dir,
        }
    }

    fn command(&mut self, name: &str, run: Spanned<toml::Value>, defaults: &Defaults) -> Command {
        let span = run.span();
        match run.into_inner() {
            toml::Value::String(script) if !script.trim().is_empty() => Command::Shell {
                shell: defaults.shell.clone(),
                script,
            },
            toml::Value::Array(items) if !items.is_empty() => {
                let argv: Option<Vec<String>> = items
                    .into_iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect();
                match argv {
                    Some(argv) if !argv[0].is_empty() => Command::Exec(argv),
                    _ => {
                        self.report(
                            Some(span),
                            format!("task `{name}`: every item of `run` must be a string, the first not empty"),
                        );
                        Command::Exec(Vec::new())
                    }
                }
            }
            toml::Value::String(_) | toml::Value::Array(_) => {
                self.report(
                    Some(span),
                    format!("task `{name}`: `run` is empty; give the command to run"),
                );
                Command::Exec(Vec::new())
            }
            _ => {
                self.report(
                    Some(span),
                    format!("task `{name}`: `run` must be a string (run by the shell) or an array of strings (exec'd)"),
                );
                Command::Exec(Vec::new())
            }
        }
    }

    fn notify(&mut self, name: &str, raw: Spanned<RawNotify>) -> Command {
        let raw = raw.into_inner();
        let url = match Template::parse(raw.url.get_ref()) {
            Ok(url)
                if url.raw.starts_with("http://")
                    || url.raw.starts_with("https://")
                    || url.raw.starts_with("${") =>
            {
                url
            }
            Ok(_) => {
                self.report(
                    Some(raw.url.span()),
                    format!("task `{name}`: notify url must start with http:// or https://, or be a ${{VARIABLE}} that holds one"),
                );
                Template { raw: String::new() }
            }
            Err(message) => {
                self.report(
                    Some(raw.url.span()),
                    format!("task `{name}`: notify url: {message}"),
                );
                Template { raw: String::new() }
            }
        };
        let mut headers = Vec::with_capacity(raw.headers.len());
        for (key, value) in &raw.headers {
            match Template::parse(value.get_ref()) {
                Ok(t) => headers.push((key.clone(), t)),
                Err(message) => self.report(
                    Some(value.span()),
                    format!("task `{name}`: notify header {key}: {message}"),
                ),
            }
        }
        Command::Notify(Notify {
            url,
            headers,
            format: raw.format.unwrap_or(NotifyFormat::Json),
            timeout: self.duration(raw.timeout, "timeout", Duration::from_secs(10)),
            retries: raw.retries.unwrap_or(3).min(10),
        })
    }

    fn gate(&mut self, name: &str, key: &str, value: &Spanned<toml::Value>) -> Option<Gate> {
        match Gate::from_toml(value.get_ref()) {
            Ok(gate) => Some(gate),
            Err(message) => {
                self.report(
                    Some(value.span()),
                    format!("task `{name}`: `{key}`: {message}"),
                );
                None
            }
        }
    }

    /// Puts tasks in run order: file order, except that a task waits for every task in its `after`.
    /// Among the tasks that are free to run, the earliest in the file goes first.
    fn order(&mut self, tasks: Vec<Task>, afters: &[Vec<Spanned<String>>]) -> Vec<Task> {
        let index: HashMap<&str, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut waits_on = vec![0usize; tasks.len()];
        let mut unblocks: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
        let mut problems = Vec::new();
        for (i, after) in afters.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for dep in after {
                match index.get(dep.get_ref().as_str()) {
                    Some(&j) if j == i => problems.push((
                        dep.span(),
                        format!(
                            "task `{}` lists itself in `after`; remove it",
                            tasks[i].name
                        ),
                    )),
                    Some(&j) => {
                        if seen.insert(j) {
                            waits_on[i] += 1;
                            unblocks[j].push(i);
                        }
                    }
                    None => problems.push((
                        dep.span(),
                        format!(
                            "task `{}`: `after` names `{}`, which is not a task; known tasks: {}",
                            tasks[i].name,
                            dep.get_ref(),
                            tasks
                                .iter()
                                .map(|t| t.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )),
                }
            }
        }
        let mut ready: BTreeSet<usize> = (0..tasks.len()).filter(|&i| waits_on[i] == 0).collect();
        let mut order = Vec::with_capacity(tasks.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &k in &unblocks[i] {
                waits_on[k] -= 1;
                if waits_on[k] == 0 {
                    ready.insert(k);
                }
            }
        }
        if order.len() < tasks.len() {
            let stuck: Vec<&str> = (0..tasks.len())
                .filter(|&i| waits_on[i] > 0)
                .map(|i| tasks[i].name.as_str())
                .collect();
            let first = (0..tasks.len())
                .find(|&i| waits_on[i] > 0)
                .and_then(|i| afters[i].first());
            problems.push((
                first.map_or(0..0, Spanned::span),
                format!(
                    "`after` makes a cycle among tasks {}; each task can only wait for tasks that do not wait for it",
                    stuck.join(", ")
                ),
            ));
        }
        for (span, message) in problems {
            self.report(Some(span), message);
        }
        let mut slots: Vec<Option<Task>> = tasks.into_iter().map(Some).collect();
        order.into_iter().filter_map(|i| slots[i].take()).collect()
    }
}

fn valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(src: &str) -> Result<Config> {
        parse(Path::new("release.toml"), src)
    }

    fn problems(src: &str) -> Vec<Diagnostic> {
        match parse_str(src) {
            Err(Error::ConfigInvalid { problems, .. }) => problems,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    fn names(config: &Config) -> Vec<&str> {
        config.tasks.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn keeps_file_order_and_applies_after() {
        let c = parse_str(
            "[tasks.z]\nrun = \"true\"\nafter = [\"m\"]\n[tasks.a]\nrun = \"true\"\n[tasks.m]\nrun = [\"true\"]\n",
        )
        .unwrap();
        assert_eq!(names(&c), ["a", "m", "z"]);
        let c = parse_str("[tasks.z]\nrun = \"true\"\n[tasks.a]\nrun = \"true\"\n").unwrap();
        assert_eq!(names(&c), ["z", "a"]);
    }

    #[test]
    fn defaults_apply_and_tasks_override() {
        let c = parse_str(
            "[defaults]\ntimeout = \"5m\"\ngrace = \"3s\"\nshell = \"/bin/bash\"\n[tasks.a]\nrun = \"x\"\ntimeout = \"1h\"\n",
        )
        .unwrap();
        let t = &c.tasks[0];
        assert_eq!(t.timeout, Duration::from_secs(3600));
        assert_eq!(t.grace, Duration::from_secs(3));
        assert_eq!(t.command.argv(), ["/bin/bash", "-c", "x"]);
        assert_eq!(c.defaults.release_timeout, Duration::from_secs(55 * 60));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let p = problems(
            "[tasks.a]\nrun = \"\"\n[tasks.b]\nrun = \"x\"\ntimeout = \"0s\"\n[tasks.c]\nrun = \"x\"\nafter = [\"nope\"]\n[tasks.d]\nwhen = \"X\"\n",
        );
        let lines: Vec<_> = p.iter().map(|d| d.location.map(|l| l.0)).collect();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].message.contains("`run` is empty"));
        assert!(p[1].message.contains("zero"));
        assert!(p[2].message.contains("has no `run`"));
        assert!(p[3].message.contains("`nope`"));
        assert_eq!(lines, [Some(2), Some(5), Some(9), Some(8)]);
    }

    #[test]
    fn unknown_keys_and_syntax_errors_have_positions() {
        let p = problems("[tasks.a]\nrun = \"x\"\ntimout = \"5m\"\n");
        assert_eq!(p[0].location, Some((3, 1)));
        assert!(p[0].message.contains("timout"), "{}", p[0].message);
        let p = problems("[tasks.a]\nrun = \"x\n");
        assert_eq!(p[0].location.map(|l| l.0), Some(2));
    }

    #[test]
    fn cycles_and_self_references() {
        let p = problems(
            "[tasks.a]\nrun = \"x\"\nafter = [\"b\"]\n[tasks.b]\nrun = \"x\"\nafter = [\"a\"]\n",
        );
        assert!(p[0].message.contains("cycle among tasks a, b"), "{p:?}");
        let p = problems("[tasks.a]\nrun = \"x\"\nafter = [\"a\"]\n");
        assert!(p[0].message.contains("itself"));
    }

    #[test]
    fn bad_durations_say_how_to_write_them() {
        let p = problems("[defaults]\ntimeout = \"30\"\n");
        assert!(p[0].message.contains("\"15m\""), "{}", p[0].message);
        assert_eq!(p[0].location, Some((2, 11)));
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("", 0), (1, 1));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(src in "\\PC{0,400}") {
            let _ = parse_str(&src);
        }

        #[test]
        fn arbitrary_task_tables_are_accepted_or_rejected_cleanly(
            keys in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("run = \"true\"".to_owned()),
                    proptest::strategy::Just("run = []".to_owned()),
                    proptest::strategy::Just("run = [\"\"]".to_owned()),
                    "timeout = \"[0-9a-z ]{0,6}\"",
                    "grace = \"[0-9]{0,3}(ms|s|m|h|x)?\"",
                    "when = \"[A-Z_0-9]{0,5}\"",
                    "when = \\{ env = \"[A-Z]{0,3}\", (equals|in|set) = (\"x\"|true|\\[\"a\"\\]) \\}",
                    "unless = \\[\"[A-Z]{1,3}\"(, \\{ env = \"[A-Z]{1,3}\" \\})?\\]",
                    "after = \\[\"t[0-3]\"\\]",
                    "allow_failure = (true|false|1)",
                    "[a-z_]{1,8} = 1",
                ],
                0..12,
            ),
        ) {
            let mut src = String::new();
            for (i, key) in keys.iter().enumerate() {
                if i % 3 == 0 {
                    src.push_str("[tasks.t");
                    src.push_str(&(i / 3).to_string());
                    src.push_str("]\n");
                }
                src.push_str(key);
                src.push('\n');
            }
            match parse_str(&src) {
                Ok(config) => {
                    for task in &config.tasks {
                        proptest::prop_assert!(!task.command.argv().is_empty());
                        proptest::prop_assert!(!task.timeout.is_zero() && !task.grace.is_zero());
                    }
                }
                Err(Error::ConfigInvalid { problems, .. }) => proptest::prop_assert!(!problems.is_empty()),
                Err(other) => proptest::prop_assert!(false, "unexpected error kind: {other:?}"),
            }
        }
    }
}
