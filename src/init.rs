//! `release-tasks init`: detects the app's framework and writes a commented release.toml with its
//! migrate / seed / cache-clear commands behind the usual gates, then says what to put in the Procfile.
//!
//! Detection only reads files in the app's directory; it never runs the framework. What it writes is
//! checked by the same parser as every other config before it is written.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A framework release-tasks knows the release commands of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framework {
    Rails,
    Django,
    Laravel,
    Phoenix,
    Prisma,
    Knex,
    Sequelize,
}

impl Framework {
    fn name(self) -> &'static str {
        match self {
            Framework::Rails => "Rails",
            Framework::Django => "Django",
            Framework::Laravel => "Laravel",
            Framework::Phoenix => "Phoenix",
            Framework::Prisma => "Node.js with Prisma",
            Framework::Knex => "Node.js with Knex",
            Framework::Sequelize => "Node.js with Sequelize",
        }
    }

    /// The migrate, seed and cache-clear commands, as TOML values (a cache clear is not universal).
    fn commands(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            Framework::Rails => (
                r#""bundle exec rails db:migrate""#,
                r#""bundle exec rails db:seed""#,
                Some(r#"["bundle", "exec", "rails", "runner", "Rails.cache.clear"]"#),
            ),
            Framework::Django => (
                r#""python manage.py migrate --noinput""#,
                r#""python manage.py loaddata initial_data""#,
                Some(
                    r#"["python", "manage.py", "shell", "-c", "from django.core.cache import cache; cache.clear()"]"#,
                ),
            ),
            Framework::Laravel => (
                r#""php artisan migrate --force""#,
                r#""php artisan db:seed --force""#,
                Some(r#""php artisan cache:clear""#),
            ),
            Framework::Phoenix => (
                r#""mix ecto.migrate""#,
                r#""mix run priv/repo/seeds.exs""#,
                None,
            ),
            Framework::Prisma => (
                r#""npx prisma migrate deploy""#,
                r#""npx prisma db seed""#,
                None,
            ),
            Framework::Knex => (
                r#""npx knex migrate:latest""#,
                r#""npx knex seed:run""#,
                None,
            ),
            Framework::Sequelize => (
                r#""npx sequelize-cli db:migrate""#,
                r#""npx sequelize-cli db:seed:all""#,
                None,
            ),
        }
    }
}

/// Looks at the files in `dir` and names the framework, if one is recognised.
#[must_use]
pub fn detect(dir: &Path) -> Option<Framework> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let gemfile = read("Gemfile");
    if gemfile.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("gem \"rails\"") || l.starts_with("gem 'rails'")
    }) {
        return Some(Framework::Rails);
    }
    if dir.join("manage.py").is_file() {
        return Some(Framework::Django);
    }
    if dir.join("artisan").is_file() {
        return Some(Framework::Laravel);
    }
    if read("mix.exs").contains(":phoenix") {
        return Some(Framework::Phoenix);
    }
    let package = read("package.json");
    if package.contains("\"prisma\"")
        || package.contains("\"@prisma/client\"")
        || dir.join("prisma/schema.prisma").is_file()
    {
        return Some(Framework::Prisma);
    }
    if package.contains("\"knex\"") {
        return Some(Framework::Knex);
    }
    if package.contains("\"sequelize\"") {
        return Some(Framework::Sequelize);
    }
    None
}

/// The release.toml for `framework` (a generic one with placeholders when none was detected).
#[must_use]
pub fn template(framework: Option<Framework>) -> String {
    let Some(framework) = framework else {
        return GENERIC.to_owned();
    };
    let (migrate, seed, cache) = framework.commands();
    let mut out = format!(
        "# release.toml for {name}, written by `release-tasks init`.\n{HEADER}\n\
         [tasks.migrate]\n\
         run = {migrate}\n\
         when = \"RUN_MIGRATIONS_DURING_RELEASE\"\n\
         timeout = \"15m\"\n\
         \n\
         [tasks.seed]\n\
         run = {seed}\n\
         when = \"SEED_DB_DURING_RELEASE\"\n\
         after = [\"migrate\"]\n",
        name = framework.name()
    );
    if let Some(cache) = cache {
        let _ = write!(
            out,
            "\n[tasks.cache-clear]\nrun = {cache}\nwhen = \"CLEAR_CACHE_DURING_RELEASE\"\nafter = [\"migrate\"]\n\
             allow_failure = true   # a cache that cannot be cleared should not block the deploy\n"
        );
    }
    out.push_str(FOOTER);
    out
}

const HEADER: &str = r#"#
# Each task runs only when its variable is true (true/1/yes/on), e.g.
#   heroku config:set RUN_MIGRATIONS_DURING_RELEASE=true
# and a typo such as `ture` stops the release before anything runs. Try it locally with the same
# variables: `RUN_MIGRATIONS_DURING_RELEASE=true release-tasks plan`. Reference: release-tasks README.

[defaults]
timeout = "30m"   # per task; past it the task's whole process group gets SIGTERM...
grace = "10s"     # ...and SIGKILL this much later

# Fail before anything runs if the database is not configured.
[require]
env = ["DATABASE_URL"]
"#;

const FOOTER: &str = r#"
# Tell someone about every release, good or failed (set RELEASE_WEBHOOK_URL, e.g. a Slack hook):
# [tasks.notify]
# notify = { url = "${RELEASE_WEBHOOK_URL}", format = "slack" }
# on = "always"
# allow_failure = true
"#;

const GENERIC: &str = r#"# release.toml written by `release-tasks init`: no framework was recognised, so the commands
# below are placeholders; replace them with your app's own.
#
# Each task runs only when its variable is true (true/1/yes/on). Reference: release-tasks README.

[defaults]
timeout = "30m"
grace = "10s"

[tasks.migrate]
run = "echo 'replace with your migration command'"
when = "RUN_MIGRATIONS_DURING_RELEASE"

[tasks.seed]
run = "echo 'replace with your seed command'"
when = "SEED_DB_DURING_RELEASE"
after = ["migrate"]
"#;

/// What `init` did, for the message to the user.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    pub framework: Option<Framework>,
    /// The Procfile's current `release:` line, if it has one.
    pub procfile_release: Option<String>,
    /// How the app installs its tools, and so release-tasks.
    pub installer: Installer,
}

/// Writes `release.toml` at `config` for the app in its directory. Refuses to overwrite an existing
/// file unless `force`.
pub fn write(config: &Path, force: bool) -> Result<Written> {
    let dir = match config.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if config.exists() && !force {
        return Err(Error::Usage(format!(
            "{} already exists; not overwriting it. Use `release-tasks init --force` to replace it",
            config.display()
        )));
    }
    let framework = detect(&dir);
    let text = template(framework);
    // The template must be a valid config; a failure here is a bug in release-tasks, not the user's.
    crate::config::parse(config, &text)
        .map_err(|e| anyhow::anyhow!("the generated config is invalid: {e}"))?;
    std::fs::write(config, text).map_err(|e| {
        Error::Usage(format!(
            "cannot write {}: {e}; check that the directory is writable",
            config.display()
        ))
    })?;
    let procfile_release = std::fs::read_to_string(dir.join("Procfile"))
        .ok()
        .and_then(|p| {
            p.lines()
                .find(|l| l.starts_with("release:"))
                .map(str::to_owned)
        });
    Ok(Written {
        path: config.to_owned(),
        framework,
        procfile_release,
        installer: Installer::detect(&dir),
    })
}

/// How an app installs its tools, by the files its platform reads at build time: release-tasks is
/// published as a gem, a wheel and an npm package, each carrying the static binary (README,
/// "Install").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installer {
    /// A Gemfile: `gem "release-tasks"`, `bundle exec release-tasks`.
    Gem,
    /// requirements.txt: a `release-tasks==VERSION` line; the command is on the environment's PATH.
    Requirements,
    /// pyproject.toml: a dependency in `[project]`.
    Pyproject,
    /// package.json: `npm install release-tasks`, `npx release-tasks`.
    Npm,
    /// None of these (Laravel, Phoenix, anything else): the buildpack or the static binary.
    Other,
}

impl Installer {
    /// The installer of the app in `dir`. A Rails app often has a package.json too, and a Django app
    /// may: the Gemfile, then the Python files, come first.
    #[must_use]
    pub fn detect(dir: &Path) -> Installer {
        if dir.join("Gemfile").is_file() {
            Installer::Gem
        } else if dir.join("requirements.txt").is_file() {
            Installer::Requirements
        } else if dir.join("pyproject.toml").is_file() {
            Installer::Pyproject
        } else if dir.join("package.json").is_file() {
            Installer::Npm
        } else {
            Installer::Other
        }
    }

    /// The command that runs release-tasks where this installer put it.
    #[must_use]
    pub fn command(self) -> &'static str {
        match self {
            Installer::Gem => "bundle exec release-tasks",
            Installer::Npm => "npx release-tasks",
            Installer::Requirements | Installer::Pyproject | Installer::Other => "release-tasks",
        }
    }

    /// How to install it: a sentence and the line to type or add.
    fn how(self) -> String {
        let version = env!("CARGO_PKG_VERSION");
        match self {
            Installer::Gem => "Install it with the app's gems: add this line to the Gemfile:\n\n    \
                 gem \"release-tasks\"\n\nthen run `bundle install` (or run `bundle add release-tasks`, which does both)"
                .to_owned(),
            Installer::Requirements => {
                format!("Install it with the app's packages: add this line to requirements.txt:\n\n    release-tasks=={version}")
            }
            Installer::Pyproject => format!(
                "Install it with the app's packages: add it to [project] dependencies in pyproject.toml:\n\n    \
                 \"release-tasks=={version}\"\n\n(or `uv add release-tasks`, `poetry add release-tasks`)"
            ),
            Installer::Npm => {
                "Install it with the app's packages (package.json):\n\n    npm install release-tasks".to_owned()
            }
            Installer::Other => "Install it: on Heroku or Dokku, add the release-tasks buildpack in front of the \
                 app's own (README, \"Heroku buildpack\"); elsewhere, put the static binary on PATH \
                 (README, \"Static binary\")."
                .to_owned(),
        }
    }
}

impl Written {
    /// What to tell the user: what was written, how to install release-tasks the way this app
    /// installs its tools, and the Procfile line to add.
    #[must_use]
    pub fn message(&self) -> String {
        let what = self.framework.map_or(
            "no framework recognised: edit the placeholder commands".to_owned(),
            |f| format!("detected {}", f.name()),
        );
        let command = self.installer.command();
        let procfile = match &self.procfile_release {
            Some(line) if runs_release_tasks(line) => {
                "Your Procfile already runs release-tasks.".to_owned()
            }
            Some(line) => {
                format!("Replace the Procfile's `{line}` with:\n\n    release: {command}")
            }
            None => format!("Add this line to your Procfile:\n\n    release: {command}"),
        };
        format!(
            "wrote {} ({what})\n\n{}\n\n{procfile}\n\nThen check it with the variables your platform will set:\n\n    \
             RUN_MIGRATIONS_DURING_RELEASE=true {command} plan\n",
            self.path.display(),
            self.installer.how(),
        )
    }
}

/// Whether a Procfile `release:` line runs this binary (not, say, `bash ./release-tasks.sh`), directly
/// or through the launcher of a package manager (`bundle exec`, `npx`).
fn runs_release_tasks(line: &str) -> bool {
    let command = line.split_once(':').map_or("", |(_, c)| c);
    for word in command.split_whitespace() {
        if word.rsplit('/').next() == Some("release-tasks") {
            return true;
        }
        let launcher = matches!(
            word,
            "bundle" | "exec" | "npx" | "npm" | "uv" | "run" | "poetry" | "pipenv"
        );
        if !launcher && !word.starts_with('-') {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_is_a_valid_config() {
        let all = [
            None,
            Some(Framework::Rails),
            Some(Framework::Django),
            Some(Framework::Laravel),
            Some(Framework::Phoenix),
            Some(Framework::Prisma),
            Some(Framework::Knex),
            Some(Framework::Sequelize),
        ];
        for f in all {
            let config = crate::config::parse(Path::new("release.toml"), &template(f))
                .unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert!(config.tasks.iter().any(|t| t.name == "migrate"), "{f:?}");
        }
    }

    #[test]
    fn procfile_lines() {
        assert!(runs_release_tasks("release: release-tasks"));
        assert!(runs_release_tasks(
            "release: ./bin/release-tasks --log-format json"
        ));
        assert!(!runs_release_tasks("release: bash ./release-tasks.sh"));
        assert!(!runs_release_tasks("release: bundle exec rails db:migrate"));
        assert!(runs_release_tasks("release: bundle exec release-tasks"));
        assert!(runs_release_tasks(
            "release: npx --no-install release-tasks"
        ));
        assert!(runs_release_tasks(
            "release: node_modules/.bin/release-tasks"
        ));
        assert!(!runs_release_tasks("release: npx prisma migrate deploy"));
        assert!(!runs_release_tasks("release:"));
    }

    #[test]
    fn installers() {
        let at = |names: &[&str]| {
            let d = tempfile::tempdir().unwrap();
            for name in names {
                std::fs::write(d.path().join(name), "").unwrap();
            }
            Installer::detect(d.path())
        };
        assert_eq!(at(&[]), Installer::Other);
        assert_eq!(at(&["composer.json", "artisan"]), Installer::Other);
        assert_eq!(at(&["Gemfile", "package.json"]), Installer::Gem);
        assert_eq!(
            at(&["requirements.txt", "pyproject.toml", "package.json"]),
            Installer::Requirements
        );
        assert_eq!(
            at(&["pyproject.toml", "package.json"]),
            Installer::Pyproject
        );
        assert_eq!(at(&["package.json"]), Installer::Npm);
    }

    #[test]
    fn detection() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str, text: &str| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(name), text).unwrap();
            detect(d.path())
        };
        assert_eq!(detect(dir.path()), None);
        assert_eq!(
            at("Gemfile", "source 'x'\ngem 'rails', '~> 7.1'\n"),
            Some(Framework::Rails)
        );
        assert_eq!(at("Gemfile", "gem 'sinatra'\n"), None);
        assert_eq!(at("manage.py", ""), Some(Framework::Django));
        assert_eq!(at("artisan", ""), Some(Framework::Laravel));
        assert_eq!(
            at("mix.exs", "{:phoenix, \"~> 1.7\"}"),
            Some(Framework::Phoenix)
        );
        assert_eq!(
            at(
                "package.json",
                r#"{"dependencies": {"@prisma/client": "5"}}"#
            ),
            Some(Framework::Prisma)
        );
        assert_eq!(
            at("package.json", r#"{"dependencies": {"knex": "3"}}"#),
            Some(Framework::Knex)
        );
        assert_eq!(
            at("package.json", r#"{"dependencies": {"sequelize": "6"}}"#),
            Some(Framework::Sequelize)
        );
    }
}
