//! Release metadata: which app, which release version, which commit, read from the variables each
//! platform sets, with `RELEASE_TASKS_APP` / `_VERSION` / `_COMMIT` as overrides.

use std::time::Duration;

use serde::Serialize;

use crate::gate::Env;

/// What is known about the release being run. Every field is optional: a local run has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub app: Option<String>,
    pub version: Option<String>,
    pub commit: Option<String>,
    /// The platform the values came from: heroku, render, fly, dokku, or none.
    pub platform: Option<&'static str>,
}

/// Per platform: its name, the variable that tells it is present, and where app, version and commit are.
struct Source {
    platform: &'static str,
    marker: &'static str,
    app: &'static [&'static str],
    version: &'static [&'static str],
    commit: &'static [&'static str],
}

/// Heroku's values come from dyno metadata (`heroku labs:enable runtime-dyno-metadata`); Render,
/// Fly.io (the deployment tag of `FLY_IMAGE_REF`) and Dokku (`GIT_REV`) set theirs on every deploy.
const SOURCES: &[Source] = &[
    Source {
        platform: "heroku",
        marker: "HEROKU_APP_NAME",
        app: &["HEROKU_APP_NAME"],
        version: &["HEROKU_RELEASE_VERSION"],
        commit: &["HEROKU_SLUG_COMMIT"],
    },
    Source {
        platform: "render",
        marker: "RENDER",
        app: &["RENDER_SERVICE_NAME"],
        version: &[],
        commit: &["RENDER_GIT_COMMIT"],
    },
    Source {
        platform: "fly",
        marker: "FLY_APP_NAME",
        app: &["FLY_APP_NAME"],
        // registry.fly.io/app:deployment-01H...: the tag names the deployment.
        version: &["FLY_IMAGE_REF"],
        commit: &[],
    },
    Source {
        platform: "dokku",
        marker: "GIT_REV",
        app: &[],
        version: &[],
        commit: &["GIT_REV"],
    },
];

impl Metadata {
    /// Reads the metadata from an environment snapshot; the first platform whose marker is set wins,
    /// and each `RELEASE_TASKS_*` override wins over it.
    #[must_use]
    pub fn from_env(env: &Env) -> Metadata {
        // Values are only shown, so bytes that are not UTF-8 are shown as U+FFFD rather than taken
        // for unset (`plan.rs` refuses such bytes in the RELEASE_TASKS_* overrides).
        let get = |names: &[&str]| {
            names.iter().find_map(|n| {
                env.get_lossy(n)
                    .filter(|v| !v.is_empty())
                    .map(std::borrow::Cow::into_owned)
            })
        };
        let source = SOURCES
            .iter()
            .find(|s| env.get_lossy(s.marker).is_some_and(|v| !v.is_empty()));
        let mut meta = Metadata {
            platform: source.map(|s| s.platform),
            app: source.and_then(|s| get(s.app)),
            version: source.and_then(|s| get(s.version)).map(|v| {
                v.rsplit_once(':')
                    .map_or(v.clone(), |(_, tag)| tag.to_owned())
            }),
            commit: source.and_then(|s| get(s.commit)),
        };
        if let Some(app) = get(&["RELEASE_TASKS_APP"]) {
            meta.app = Some(app);
        }
        if let Some(version) = get(&["RELEASE_TASKS_VERSION"]) {
            meta.version = Some(version);
        }
        if let Some(commit) = get(&["RELEASE_TASKS_COMMIT"]) {
            meta.commit = Some(commit);
        }
        meta
    }

    /// The release's name for people: `myapp v42 (abc1234)`, with whatever is known.
    #[must_use]
    pub fn title(&self) -> String {
        let mut parts = vec![self.app.clone().unwrap_or_else(|| "release".to_owned())];
        if let Some(version) = &self.version {
            parts.push(version.clone());
        }
        if let Some(commit) = &self.commit {
            let short: String = commit.chars().take(7).collect();
            parts.push(format!("({short})"));
        }
        parts.join(" ")
    }
}

/// How long Fly lets a `release_command` run unless fly.toml raises `[deploy] release_command_timeout`.
pub const FLY_RELEASE_COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Whether this is Fly's release command: Fly runs it in a temporary Machine that carries
/// `RELEASE_COMMAND` (and `FLY_PROCESS_GROUP=fly_app_release_command`) besides `FLY_APP_NAME`.
#[must_use]
pub fn is_fly_release_command(env: &Env) -> bool {
    let set = |name: &str| env.get(name).is_some_and(|v| !v.is_empty());
    set("FLY_APP_NAME")
        && (set("RELEASE_COMMAND")
            || env.get("FLY_PROCESS_GROUP").map(String::as_str) == Some("fly_app_release_command"))
}

/// Warns at the start of a release when Fly would stop it before `release_timeout` does: then Fly's
/// kill, not release-tasks, ends an overlong release, and `on = "always"` tasks and the summary
/// may not get their turn. fly.toml is not in the Machine to read, so the default is what is compared.
pub fn warn_if_fly_stops_first(env: &Env, release_timeout: Duration) {
    if is_fly_release_command(env) && release_timeout > FLY_RELEASE_COMMAND_TIMEOUT {
        tracing::warn!(
            release_timeout = %humantime::format_duration(release_timeout),
            fly_release_command_timeout = %humantime::format_duration(FLY_RELEASE_COMMAND_TIMEOUT),
            "release_timeout is longer than Fly's limit on a release command (5m unless \
             release_command_timeout in fly.toml's [deploy] raises it): Fly would kill the release \
             first, without its summary or on = \"always\" tasks; set release_timeout in \
             release.toml's [defaults] below Fly's limit"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::gate::env_of as env;

    #[test]
    fn heroku_dyno_metadata() {
        let m = Metadata::from_env(&env(&[
            ("HEROKU_APP_NAME", "shop"),
            ("HEROKU_RELEASE_VERSION", "v42"),
            (
                "HEROKU_SLUG_COMMIT",
                "2c3a0b24069af49b3de35b8e8c26765c1dba9ff0",
            ),
        ]));
        assert_eq!(m.platform, Some("heroku"));
        assert_eq!(m.title(), "shop v42 (2c3a0b2)");
    }

    #[test]
    fn other_platforms_and_overrides() {
        let m = Metadata::from_env(&env(&[
            ("RENDER", "true"),
            ("RENDER_SERVICE_NAME", "api"),
            ("RENDER_GIT_COMMIT", "abc"),
        ]));
        assert_eq!(
            (m.platform, m.app.as_deref(), m.commit.as_deref()),
            (Some("render"), Some("api"), Some("abc"))
        );
        let m = Metadata::from_env(&env(&[
            ("FLY_APP_NAME", "f"),
            ("FLY_IMAGE_REF", "registry.fly.io/f:deployment-01H"),
        ]));
        assert_eq!(
            (m.app.as_deref(), m.version.as_deref()),
            (Some("f"), Some("deployment-01H"))
        );
        let m = Metadata::from_env(&env(&[
            ("FLY_APP_NAME", "f"),
            ("RELEASE_TASKS_VERSION", "7"),
            ("RELEASE_TASKS_APP", ""),
        ]));
        assert_eq!(
            (m.app.as_deref(), m.version.as_deref()),
            (Some("f"), Some("7"))
        );
        let m = Metadata::from_env(&env(&[("GIT_REV", "deadbeef")]));
        assert_eq!(m.platform, Some("dokku"));
        assert_eq!(Metadata::from_env(&env(&[])), Metadata::default());
        assert_eq!(Metadata::default().title(), "release");
    }

    #[test]
    fn fly_release_command_is_told_apart_from_the_app_machines() {
        assert!(is_fly_release_command(&env(&[
            ("FLY_APP_NAME", "f"),
            ("RELEASE_COMMAND", "1"),
        ])));
        assert!(is_fly_release_command(&env(&[
            ("FLY_APP_NAME", "f"),
            ("FLY_PROCESS_GROUP", "fly_app_release_command"),
        ])));
        assert!(!is_fly_release_command(&env(&[
            ("FLY_APP_NAME", "f"),
            ("FLY_PROCESS_GROUP", "app"),
        ])));
        assert!(!is_fly_release_command(&env(&[("RELEASE_COMMAND", "1")])));
        assert!(!is_fly_release_command(&env(&[
            ("FLY_APP_NAME", ""),
            ("RELEASE_COMMAND", "1"),
        ])));
    }
}
