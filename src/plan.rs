//! Config + environment snapshot + `--only`/`--skip` -> [`Plan`]: every task in run order, each with a
//! decision (run or skip) and the reason for it, plus everything the run needs (defaults, `[lock]`,
//! release metadata), so that `run` reads nothing but the plan and the environment.
//!
//! Planning is pure and runs before anything starts, so a gate typo stops the release while nothing
//! has run yet, and `plan` can show exactly what `run` would do ([`print_plan`]).

use std::io::Write;

use crate::changed::{Changed, Inputs, LastSuccess};
use crate::config::{Command, Config, Defaults, Lock, On, Task};
use crate::error::{Error, Result};
use crate::gate::{Env, Verdict};
use crate::log::LogFormat;
use crate::metadata::Metadata;
use crate::notify::Webhook;
use crate::report::SkipReason;

/// Which tasks the user picked on the command line (or through `RELEASE_TASKS_ONLY`/`_SKIP`). An empty
/// list means no selection: `--only ''` and `RELEASE_TASKS_ONLY=""` are the same as leaving them out.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub only: Vec<String>,
    pub skip: Vec<String>,
}

/// Every task in run order with what will happen to it, and what the run needs besides.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// What the environment lacks for `run`: `[require] env` variables, a notify task's `${VAR}`,
    /// `[lock]` settings; each with what to do. `run` refuses to start with any; `check` and `plan`
    /// only warn, since CI rarely has production's secrets.
    pub preflight: Vec<String>,
    /// What may go wrong but need not: a `shell` that is not there. Shown by `check` and `plan`,
    /// logged by `run`.
    pub warnings: Vec<String>,
    /// The release's app, version and commit, read from the same environment.
    pub meta: Metadata,
    /// `[defaults]`: the release's timeout and heartbeat.
    pub defaults: Defaults,
    /// `[lock]`, if the release runs under one.
    pub lock: Option<Lock>,
    /// `--force` or `RELEASE_TASKS_FORCE`: `changed` gates let their tasks run.
    pub force: bool,
}

/// One task and its decision.
#[derive(Debug, Clone)]
pub struct Step {
    pub task: Task,
    pub run: bool,
    /// Why it runs or is skipped, for people: the rule, the variable and its (redacted) value.
    pub reason: String,
    /// Why it is skipped, as data (for the JSON report); `None` when it runs.
    pub skip: Option<SkipReason>,
    /// For a notify task that runs: its webhook, `${VAR}`s expanded.
    pub webhook: Option<Webhook>,
    /// For a task with a `changed` gate, once hashed ([`Plan::hash_inputs`]): its files and their hash.
    pub inputs: Option<Inputs>,
    /// And, once compared with the ledger ([`Plan::apply_ledger`]), what that says.
    pub verdict: Option<Changed>,
}

impl Step {
    /// Why this step is not run (a step that runs has no skip reason; this gives its sentence).
    #[must_use]
    pub fn skip_reason(&self) -> SkipReason {
        self.skip
            .clone()
            .unwrap_or_else(|| SkipReason::Other(self.reason.clone()))
    }
}

/// The `RELEASE_TASKS_*` variables that name the release; they must be text when set.
const METADATA_OVERRIDES: [&str; 3] = [
    "RELEASE_TASKS_APP",
    "RELEASE_TASKS_VERSION",
    "RELEASE_TASKS_COMMIT",
];

impl Plan {
    /// Decides each task of `config`. Fails on a name in the selection that is not a task, and on any
    /// variable it reads holding a value it refuses: a gate value that is not a boolean, or any named
    /// variable that is not UTF-8 (all of them reported at once).
    pub fn new(config: &Config, env: &Env, selection: &Selection) -> Result<Plan> {
        check_selection(config, selection)?;
        let mut bad_values = not_text(config, env);
        let mut preflight = Vec::new();
        for name in &config.required_env {
            match env.get(name) {
                Some(value) if !value.is_empty() => {}
                value => preflight.push(format!(
                    "{name} is required by [require] env in {} but is {}; set it in the app's config vars",
                    config.path.display(),
                    if value.is_some() { "empty" } else { "not set" }
                )),
            }
        }
        let meta = Metadata::from_env(env);
        #[cfg(feature = "postgres")]
        if let Some(lock) = &config.lock {
            if bad_values.is_empty() {
                preflight.extend(crate::lock::preflight(lock, env, &meta));
            }
        }
        let mut steps = Vec::with_capacity(config.tasks.len());
        for task in &config.tasks {
            let mut explain =
                |key: &str, verdict: Result<Verdict, crate::gate::BadValue>| match verdict {
                    Ok(v) => Some(v),
                    Err(bad) => {
                        bad_values.push(format!("task `{}`: `{key}`: {bad}", task.name));
                        None
                    }
                };
            let when = task.when.as_ref().map(|g| explain("when", g.evaluate(env)));
            let unless = task
                .unless
                .as_ref()
                .map(|g| explain("unless", g.evaluate(env)));
            let (skip, reason) = decide(
                task,
                selection,
                when.flatten().as_ref(),
                unless.flatten().as_ref(),
            );
            let run = skip.is_none();
            let webhook = match &task.command {
                // Every notify task is checked, not only the first one with a problem; one whose
                // variable is not UTF-8 is already named by `not_text` (not also as unset).
                Command::Notify(notify) if run && vars_are_text(notify, env) => {
                    match Webhook::resolve(notify, env) {
                        Ok(webhook) => {
                            bad_values.extend(bad_headers(notify, env, &task.name));
                            Some(webhook)
                        }
                        Err(message) => {
                            preflight.push(format!("task `{}`: {message}", task.name));
                            None
                        }
                    }
                }
                _ => None,
            };
            steps.push(Step {
                task: task.clone(),
                run,
                reason,
                skip,
                webhook,
                inputs: None,
                verdict: None,
            });
        }
        if !bad_values.is_empty() {
            return Err(Error::Environment {
                problems: bad_values,
            });
        }
        let mut warnings: Vec<String> = shell_warning(config, env).into_iter().collect();
        let path = env.get("PATH").map(std::ffi::OsStr::new);
        for task in &config.tasks {
            if let Some(dir) = task.program_directory(path) {
                warnings.push(format!(
                    "task `{}`: {} is a directory, not a program; `run` would fail with 126",
                    task.name,
                    dir.display()
                ));
            }
        }
        Ok(Plan {
            steps,
            preflight,
            warnings,
            meta,
            defaults: config.defaults.clone(),
            lock: config.lock.clone(),
            force: false,
        })
    }

    /// The steps that will run.
    pub fn to_run(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.run)
    }

    /// Finds and hashes the files of every task with a `changed` gate (for `run`, `plan` and
    /// `check`; `wait` and `history` do not need them). A pattern that matches nothing is a
    /// warning; a file that cannot be read is an error that names it (nothing has run yet).
    #[cfg(feature = "postgres")]
    pub fn hash_inputs(&mut self, base: &std::path::Path) -> Result<()> {
        let mut problems = Vec::new();
        for step in &mut self.steps {
            if step.task.changed.is_empty() {
                continue;
            }
            match crate::changed::hash(base, &step.task.changed) {
                Ok(inputs) => {
                    for pattern in &inputs.unmatched {
                        self.warnings.push(format!(
                            "task `{}`: `changed` pattern {pattern:?} matches no file below {}; check the path \
                             (patterns are relative to the config file's directory)",
                            step.task.name,
                            base.display()
                        ));
                    }
                    step.inputs = Some(inputs);
                }
                Err(message) => problems.push(format!("task `{}`: {message}", step.task.name)),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Environment { problems })
        }
    }

    /// Decides the `changed` gates from the ledger: `last` holds, per task, what its last
    /// successful run recorded (a task missing from it has none: its first run runs); `force`
    /// runs them all. Only steps whose other gates hold are decided: the others are skipped anyway.
    pub fn apply_ledger(
        &mut self,
        last: &std::collections::HashMap<String, LastSuccess>,
        force: bool,
    ) {
        for step in &mut self.steps {
            let Some(inputs) = &step.inputs else { continue };
            if !step.run {
                continue;
            }
            let verdict = Changed::decide(inputs, last.get(&step.task.name), force);
            let text = verdict.describe(inputs);
            if let Changed::Unchanged { since, hash } = &verdict {
                step.run = false;
                step.skip = Some(SkipReason::Unchanged {
                    patterns: inputs.patterns.clone(),
                    since: since.clone(),
                    hash: hash.clone(),
                });
                step.reason = text;
            } else if step.reason == NO_GATE {
                step.reason = text;
            } else {
                step.reason = format!("{}; {text}", step.reason);
            }
            step.verdict = Some(verdict);
        }
    }

    /// The tasks whose `changed` gate is still to be decided from the ledger.
    #[must_use]
    pub fn undecided_changed(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| s.run && s.inputs.is_some() && s.verdict.is_none())
            .map(|s| s.task.name.clone())
            .collect()
    }

    /// For `plan` where the ledger cannot be read (no database URL in CI): says so in each
    /// undecided `changed` step's reason; `run` decides under the lock.
    pub fn ledger_unread(&mut self, why: &str) {
        for step in &mut self.steps {
            let Some(inputs) = &step.inputs else { continue };
            if !step.run || step.verdict.is_some() {
                continue;
            }
            let text = format!(
                "changed: {} match {} file{} ({}); `run` compares them with the ledger, which cannot be read here ({why})",
                inputs.shown_patterns(),
                inputs.files.len(),
                if inputs.files.len() == 1 { "" } else { "s" },
                inputs.short()
            );
            step.reason = if step.reason == NO_GATE {
                text
            } else {
                format!("{}; {text}", step.reason)
            };
        }
    }
}

/// The reason of a task that runs with no gate.
const NO_GATE: &str = "no gate";

/// Every variable the config names (outside gates, which check their own) and the release metadata
/// overrides, whose value is not UTF-8: each is a problem that names it, so that none is read as unset.
fn not_text(config: &Config, env: &Env) -> Vec<String> {
    let mut named: Vec<(String, &str)> = METADATA_OVERRIDES
        .iter()
        .map(|var| (String::new(), *var))
        .collect();
    named.extend(
        config
            .required_env
            .iter()
            .map(|var| ("[require] env: ".to_owned(), var.as_str())),
    );
    if let Some(lock) = &config.lock {
        named.extend(
            lock.url_vars
                .iter()
                .map(|var| (format!("[lock] {}: ", lock.backend.key()), var.as_str())),
        );
    }
    for task in &config.tasks {
        if let Command::Notify(notify) = &task.command {
            let templates =
                std::iter::once(&notify.url).chain(notify.headers.iter().map(|(_, t)| t));
            for var in templates.flat_map(crate::config::Template::vars) {
                named.push((format!("task `{}`: notify: ", task.name), var));
            }
        }
    }
    named
        .into_iter()
        .filter_map(|(place, var)| env.lookup(var).err().map(|err| format!("{place}{err}")))
        .collect()
}

/// Whether every variable a notify task's URL and headers name is unset or text.
fn vars_are_text(notify: &crate::config::Notify, env: &Env) -> bool {
    std::iter::once(&notify.url)
        .chain(notify.headers.iter().map(|(_, t)| t))
        .flat_map(crate::config::Template::vars)
        .all(|var| env.lookup(var).is_ok())
}

/// The first few `names` and how many more there are.
fn some_names(names: &[&str]) -> String {
    const SHOWN: usize = 10;
    let mut list = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        let _ = std::fmt::Write::write_fmt(
            &mut list,
            format_args!(", and {} more", names.len() - SHOWN),
        );
    }
    list
}

fn check_selection(config: &Config, selection: &Selection) -> Result<()> {
    let names: Vec<&str> = config.tasks.iter().map(|t| t.name.as_str()).collect();
    for (flag, list) in [("--only", &selection.only), ("--skip", &selection.skip)] {
        let unknown: Vec<&str> = list
            .iter()
            .map(String::as_str)
            .filter(|n| !names.contains(n))
            .collect();
        if !unknown.is_empty() {
            // The names come from a flag or a variable, where a URL may have been pasted by mistake;
            // and a file of thousands of tasks gets a line, not a list of thousands.
            return Err(Error::Usage(crate::redact::urls_in(&format!(
                "{flag} names {}, not a task in {}; tasks are: {}",
                some_names(&unknown),
                config.path.display(),
                if names.is_empty() {
                    "(none)".to_owned()
                } else {
                    some_names(&names)
                }
            ))));
        }
    }
    Ok(())
}

/// A URL or header values that HTTP would refuse once their `${VAR}`s are expanded (a secret read
/// from a file often ends in a newline): found now, not as a failed delivery at the end of the
/// release. The values themselves are never shown, only the variables.
fn bad_headers(notify: &crate::config::Notify, env: &Env, task: &str) -> Vec<String> {
    let vars = |t: &crate::config::Template| {
        t.vars()
            .map(|v| format!("${{{v}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let url_refused = notify
        .url
        .expand(env)
        .is_ok_and(|url| url.chars().any(|c| c.is_whitespace() || c.is_control()));
    let url = url_refused.then(|| {
        format!(
            "task `{task}`: notify url has a space or a control character (a trailing newline?) once {} is expanded; \
             HTTP does not allow it, so remove it from the variable",
            vars(&notify.url)
        )
    });
    let headers = notify
        .headers
        .iter()
        .filter(|(_, t)| {
            t.expand(env)
                .is_ok_and(|v| !crate::config::valid_header_value(&v))
        })
        .map(|(name, t)| {
            format!(
                "task `{task}`: notify header {name} has a control character (a trailing newline?) once {} is expanded; \
                 HTTP does not allow it, so remove it from the variable",
                vars(t)
            )
        });
    url.into_iter().chain(headers).collect()
}

/// A warning when the shell that `run = "..."` tasks need is not there (`run` would fail with 127).
fn shell_warning(config: &Config, env: &Env) -> Option<String> {
    let shell = &config.defaults.shell;
    if !config
        .tasks
        .iter()
        .any(|t| matches!(t.command, Command::Shell { .. }))
    {
        return None;
    }
    let found = if shell.contains('/') {
        std::path::Path::new(shell).is_file()
    } else {
        env.get("PATH")
            .is_some_and(|path| std::env::split_paths(path).any(|dir| dir.join(shell).is_file()))
    };
    (!found).then(|| {
        format!(
            "[defaults] shell {shell:?} does not exist{}; tasks with run = \"...\" would fail with 127",
            if shell.contains('/') { "" } else { " on PATH" }
        )
    })
}

/// Whether the task runs; if not, why not (as data), and either way the reason for people.
fn decide(
    task: &Task,
    selection: &Selection,
    when: Option<&Verdict>,
    unless: Option<&Verdict>,
) -> (Option<SkipReason>, String) {
    let skip = |reason: SkipReason| {
        let text = reason.to_string();
        (Some(reason), text)
    };
    if !selection.only.is_empty() && !selection.only.contains(&task.name) {
        return skip(SkipReason::NotInOnly);
    }
    if selection.skip.contains(&task.name) {
        return skip(SkipReason::NamedInSkip);
    }
    if let Some(when) = when {
        if !when.holds {
            return skip(SkipReason::gate("when", when));
        }
    }
    if let Some(unless) = unless {
        if unless.holds {
            return skip(SkipReason::gate("unless", unless));
        }
    }
    let describe = |v: &Verdict| {
        v.reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut why = Vec::new();
    if let Some(when) = when {
        why.push(format!("when: {}", describe(when)));
    }
    if let Some(unless) = unless {
        why.push(format!("unless does not hold: {}", describe(unless)));
    }
    if why.is_empty() {
        why.push(NO_GATE.to_owned());
    }
    (None, why.join("; "))
}

/// Writes what `release-tasks plan` shows: per task, run or skip and why (text), or one JSON object
/// per task. Errors are the writer's (a closed or full stdout), for the caller to act on.
/// `text` as plan's text lines show it: each further line of a multi-line script indented under
/// the first (so that no line of a script reads as a line of the plan), and control characters
/// escaped as the log escapes them (so that a script cannot drive the terminal that shows it).
fn shown_for_a_terminal(text: &str, newline: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => shown.push_str(newline),
            '\t' => shown.push(c),
            c if c.is_control() => shown.push_str(&c.escape_unicode().to_string()),
            c => shown.push(c),
        }
    }
    shown
}

pub fn print_plan(plan: &Plan, format: LogFormat, out: &mut dyn Write) -> std::io::Result<()> {
    if let (Some(lock), LogFormat::Text) = (&plan.lock, format) {
        writeln!(
            out,
            "lock  {} `{}` through {}, waiting up to {}{}",
            match lock.backend {
                crate::config::Backend::Postgres => "PostgreSQL advisory lock",
                crate::config::Backend::Mysql => "MySQL named lock (GET_LOCK)",
            },
            lock.key
                .as_deref()
                .or(plan.meta.app.as_deref())
                .unwrap_or("<unknown: set [lock] key or RELEASE_TASKS_APP>"),
            lock.url_vars.join(" or "),
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
        let command = crate::redact::command(&step.task.command.to_string());
        match format {
            LogFormat::Text => {
                let decision = if step.run { "run " } else { "skip" };
                let command = shown_for_a_terminal(&command, &format!("\n      {:<width$}  ", ""));
                writeln!(out, "{decision}  {:<width$}  {command}", step.task.name)?;
                writeln!(out, "      {:<width$}  because {}", "", step.reason)?;
                match step.task.on {
                    On::Success => {}
                    On::Failure => writeln!(
                        out,
                        "      {:<width$}  only if the release fails (on = \"failure\")",
                        ""
                    )?,
                    On::Always => writeln!(
                        out,
                        "      {:<width$}  also if the release fails (on = \"always\")",
                        ""
                    )?,
                }
            }
            LogFormat::Json => {
                let mut line = serde_json::json!({
                    "task": step.task.name,
                    "run": step.run,
                    "reason": step.reason,
                    "command": command,
                    "timeout_s": step.task.timeout.as_secs(),
                    "allow_failure": step.task.allow_failure,
                    "on": step.task.on.to_string(),
                });
                if let Some(skip) = &step.skip {
                    line["skip"] = skip.to_json();
                }
                if let Some(inputs) = &step.inputs {
                    line["changed"] = serde_json::json!({
                        "patterns": inputs.patterns,
                        "files": inputs.files.len(),
                        "hash": inputs.hash,
                        "decided": step.verdict.is_some(),
                    });
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(src: &str) -> Config {
        crate::config::parse(Path::new("release.toml"), src).expect("valid test config")
    }

    use crate::gate::env_of as env;

    const SRC: &str = "[tasks.migrate]\nrun = \"m\"\nwhen = \"RUN_MIGRATIONS\"\n\
        [tasks.seed]\nrun = \"s\"\nunless = { env = \"APP_ENV\", equals = \"production\" }\n\
        [tasks.notify]\nrun = \"n\"\n";

    #[test]
    fn gates_decide_and_explain() {
        let plan = Plan::new(
            &config(SRC),
            &env(&[("RUN_MIGRATIONS", "true"), ("APP_ENV", "production")]),
            &Selection::default(),
        )
        .unwrap();
        let got: Vec<_> = plan
            .steps
            .iter()
            .map(|s| (s.task.name.as_str(), s.run))
            .collect();
        assert_eq!(got, [("migrate", true), ("seed", false), ("notify", true)]);
        assert!(
            plan.steps[0].reason.contains("RUN_MIGRATIONS=\"true\""),
            "{}",
            plan.steps[0].reason
        );
        assert!(
            plan.steps[1]
                .reason
                .starts_with("unless: APP_ENV=\"production\"")
        );
        assert_eq!(plan.steps[2].reason, "no gate");
    }

    #[test]
    fn selection_filters_and_rejects_unknown_names() {
        let sel = Selection {
            only: vec!["notify".into(), "migrate".into()],
            skip: vec!["migrate".into()],
        };
        let plan = Plan::new(&config(SRC), &env(&[("RUN_MIGRATIONS", "1")]), &sel).unwrap();
        let run: Vec<_> = plan.to_run().map(|s| s.task.name.as_str()).collect();
        assert_eq!(run, ["notify"]);
        let sel = Selection {
            only: vec!["migrat".into()],
            skip: vec![],
        };
        let err = Plan::new(&config(SRC), &env(&[]), &sel).unwrap_err();
        assert!(
            err.to_string().contains("migrat")
                && err.to_string().contains("tasks are: migrate, seed, notify")
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn bad_values_fail_planning_even_for_deselected_tasks() {
        let sel = Selection {
            only: vec!["notify".into()],
            skip: vec![],
        };
        let err = Plan::new(&config(SRC), &env(&[("RUN_MIGRATIONS", "ture")]), &sel).unwrap_err();
        assert_eq!(err.exit_code(), 78);
        assert!(
            err.to_string()
                .contains("task `migrate`: `when`: RUN_MIGRATIONS=\"ture\""),
            "{err}"
        );
    }

    #[test]
    fn skipped_steps_carry_their_reason_as_data() {
        let sel = Selection {
            only: vec![],
            skip: vec!["notify".into()],
        };
        let plan = Plan::new(&config(SRC), &env(&[("APP_ENV", "production")]), &sel).unwrap();
        assert_eq!(
            plan.steps[0].skip,
            Some(SkipReason::Gate {
                gate: "when",
                variable: "RUN_MIGRATIONS".into(),
                value: None,
                needs: "is true".into(),
                source: None,
            })
        );
        assert_eq!(
            plan.steps[1].skip,
            Some(SkipReason::Gate {
                gate: "unless",
                variable: "APP_ENV".into(),
                value: Some("production".into()),
                needs: "equals \"production\"".into(),
                source: None,
            })
        );
        assert_eq!(plan.steps[2].skip, Some(SkipReason::NamedInSkip));
        assert_eq!(
            plan.steps[1].reason,
            plan.steps[1].skip_reason().to_string()
        );
    }

    #[test]
    fn a_named_variable_that_is_not_utf8_is_refused_not_unset() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let src =
            "[require]\nenv = [\"DATABASE_URL\"]\n[tasks.n]\nnotify = { url = \"${HOOK}\" }\n";
        let bad = || OsString::from_vec(b"x\xff".to_vec());
        for var in ["DATABASE_URL", "HOOK", "RELEASE_TASKS_APP"] {
            let env = Env::from_os([(var.into(), bad())]);
            let err = Plan::new(&config(src), &env, &Selection::default()).unwrap_err();
            assert_eq!(err.exit_code(), 78, "{var}");
            assert!(
                err.to_string().contains(var) && err.to_string().contains("not UTF-8"),
                "{err}"
            );
            assert!(!err.to_string().contains("not set"), "{err}");
        }
    }
}
