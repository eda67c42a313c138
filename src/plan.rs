//! Config + environment snapshot + `--only`/`--skip` -> [`Plan`]: every task in run order, each with a
//! decision (run or skip) and the reason for it.
//!
//! Planning is pure and runs before anything starts, so a gate typo stops the release while nothing
//! has run yet, and `plan` can show exactly what `run` would do.

use crate::config::{Command, Config, Task};
use crate::error::{Error, Result};
use crate::gate::{Env, Verdict};
use crate::metadata::Metadata;
use crate::notify::Webhook;

/// Which tasks the user picked on the command line (or through `RELEASE_TASKS_ONLY`/`_SKIP`).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub only: Vec<String>,
    pub skip: Vec<String>,
}

/// Every task in run order with what will happen to it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// What the environment lacks for `run`: `[require] env` variables, a notify task's `${VAR}`,
    /// `[lock]` settings; each with what to do. `run` refuses to start with any; `check` and `plan`
    /// only warn, since CI rarely has production's secrets.
    pub preflight: Vec<String>,
    /// The release's app, version and commit, read from the same environment.
    pub meta: Metadata,
}

/// One task and its decision.
#[derive(Debug, Clone)]
pub struct Step {
    pub task: Task,
    pub run: bool,
    /// Why it runs or is skipped, for people: the rule, the variable and its (redacted) value.
    pub reason: String,
    /// For a notify task that runs: its webhook, `${VAR}`s expanded.
    pub webhook: Option<Webhook>,
}

impl Plan {
    /// Decides each task of `config`. Fails on a name in the selection that is not a task, and on any
    /// gate variable holding a value that is not a boolean (all of them reported at once).
    pub fn new(config: &Config, env: &Env, selection: &Selection) -> Result<Plan> {
        let names: Vec<&str> = config.tasks.iter().map(|t| t.name.as_str()).collect();
        for (flag, list) in [("--only", &selection.only), ("--skip", &selection.skip)] {
            let unknown: Vec<&str> = list
                .iter()
                .map(String::as_str)
                .filter(|n| !names.contains(n))
                .collect();
            if !unknown.is_empty() {
                return Err(Error::Usage(format!(
                    "{flag} names {}, not a task in {}; tasks are: {}",
                    unknown.join(", "),
                    config.path.display(),
                    if names.is_empty() {
                        "(none)".to_owned()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        }

        let mut preflight: Vec<String> = config
            .required_env
            .iter()
            .filter(|name| env.get(name.as_str()).is_none_or(String::is_empty))
            .map(|name| {
                format!(
                    "{name} is required by [require] env in {} but is {}; set it in the app's config vars",
                    config.path.display(),
                    if env.contains_key(name.as_str()) { "empty" } else { "not set" }
                )
            })
            .collect();
        let meta = Metadata::from_env(env);
        #[cfg(feature = "postgres")]
        if let Some(lock) = &config.lock {
            preflight.extend(crate::lock::preflight(lock, env, &meta));
        }
        let mut bad_values = Vec::new();
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
            let (run, reason) = decide(
                task,
                selection,
                when.flatten().as_ref(),
                unless.flatten().as_ref(),
            );
            let webhook = match &task.command {
                Command::Notify(notify) if run => match Webhook::resolve(notify, env) {
                    Ok(webhook) => Some(webhook),
                    Err(message) => {
                        preflight.push(format!("task `{}`: {message}", task.name));
                        None
                    }
                },
                _ => None,
            };
            steps.push(Step {
                task: task.clone(),
                run,
                reason,
                webhook,
            });
        }
        if bad_values.is_empty() {
            Ok(Plan {
                steps,
                preflight,
                meta,
            })
        } else {
            Err(Error::Environment {
                problems: bad_values,
            })
        }
    }

    /// The steps that will run.
    pub fn to_run(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.run)
    }
}

fn decide(
    task: &Task,
    selection: &Selection,
    when: Option<&Verdict>,
    unless: Option<&Verdict>,
) -> (bool, String) {
    if !selection.only.is_empty() && !selection.only.contains(&task.name) {
        return (false, "not in --only".to_owned());
    }
    if selection.skip.contains(&task.name) {
        return (false, "named in --skip".to_owned());
    }
    let describe = |v: &Verdict| {
        v.reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(when) = when {
        if !when.holds {
            return (false, format!("when: {}", describe(when)));
        }
    }
    if let Some(unless) = unless {
        if unless.holds {
            return (false, format!("unless: {}", describe(unless)));
        }
    }
    let mut why = Vec::new();
    if let Some(when) = when {
        why.push(format!("when: {}", describe(when)));
    }
    if let Some(unless) = unless {
        why.push(format!("unless does not hold: {}", describe(unless)));
    }
    if why.is_empty() {
        why.push("no gate".to_owned());
    }
    (true, why.join("; "))
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
}
