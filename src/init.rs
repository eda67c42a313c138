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

/// The database an app uses, as its files say: which `[lock]` key to suggest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    Postgres,
    Mysql,
}

/// Looks at the files in `dir` for the app's database: what the Gemfile, Rails' database.yml, a
/// Laravel `.env`, Django's settings, Prisma's schema, package.json, mix.exs or the Python
/// requirements name. Returns the database and the file and word that said so.
#[must_use]
pub fn detect_database(dir: &Path) -> Option<(Database, String)> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let mut django = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        for candidate in [path.join("settings.py"), path.join("settings/base.py")] {
            if let Ok(text) = std::fs::read_to_string(&candidate) {
                let shown = candidate
                    .strip_prefix(dir)
                    .unwrap_or(&candidate)
                    .display()
                    .to_string();
                django.push((shown, text));
            }
        }
    }
    django.sort();
    // (file, text, MySQL's words, PostgreSQL's words), in the order an app's own choice is most
    // likely to be found.
    let gemfile = read("Gemfile");
    let database_yml = read("config/database.yml");
    let env = read(".env");
    let env_example = read(".env.example");
    let prisma = read("prisma/schema.prisma");
    let package = read("package.json");
    let mix = read("mix.exs");
    let requirements = read("requirements.txt");
    let pyproject = read("pyproject.toml");
    let laravel: &[&str] = &["DB_CONNECTION=mysql", "DB_CONNECTION=mariadb"];
    let python: &[&str] = &[
        "mysqlclient",
        "PyMySQL",
        "pymysql",
        "mysql-connector-python",
    ];
    let mut sources: Vec<(String, &str, &[&str], &[&str])> = vec![
        (
            "config/database.yml".into(),
            &database_yml,
            &["adapter: mysql2", "adapter: trilogy"],
            &["adapter: postgresql"],
        ),
        (
            "Gemfile".into(),
            &gemfile,
            &[
                "gem 'mysql2'",
                "gem \"mysql2\"",
                "gem 'trilogy'",
                "gem \"trilogy\"",
            ],
            &["gem 'pg'", "gem \"pg\""],
        ),
        (".env".into(), &env, laravel, &["DB_CONNECTION=pgsql"]),
        (
            ".env.example".into(),
            &env_example,
            laravel,
            &["DB_CONNECTION=pgsql"],
        ),
        (
            "prisma/schema.prisma".into(),
            &prisma,
            &["provider = \"mysql\""],
            &["provider = \"postgresql\"", "provider = \"postgres\""],
        ),
        ("mix.exs".into(), &mix, &[":myxql"], &[":postgrex"]),
        (
            "package.json".into(),
            &package,
            &["\"mysql2\"", "\"mysql\"", "\"mariadb\""],
            &["\"pg\"", "\"postgres\""],
        ),
        (
            "requirements.txt".into(),
            &requirements,
            python,
            &["psycopg"],
        ),
        ("pyproject.toml".into(), &pyproject, python, &["psycopg"]),
    ];
    for (file, text) in &django {
        sources.insert(
            3,
            (
                file.clone(),
                text,
                &["django.db.backends.mysql"],
                &["django.db.backends.postgresql"],
            ),
        );
    }
    for (file, text, mysql, postgres) in sources {
        if let Some(word) = mysql.iter().find(|w| text.contains(**w)) {
            return Some((Database::Mysql, format!("{file}: {word}")));
        }
        if let Some(word) = postgres.iter().find(|w| text.contains(**w)) {
            return Some((Database::Postgres, format!("{file}: {word}")));
        }
    }
    None
}

/// A commented `[lock]` table for the app's database, to turn on when several replicas run the
/// release at once.
fn lock_section(database: Option<&(Database, String)>) -> String {
    let Some((database, evidence)) = database else {
        return String::new();
    };
    let key = match database {
        Database::Postgres => "postgres",
        Database::Mysql => "mysql",
    };
    format!(
        "\n# Several replicas running the release at once (Kubernetes, ECS, Fly Machines)? Uncomment to let\n\
         # one of them run it, once per version (README, `[lock]`). Detected from {evidence}.\n\
         # [lock]\n\
         # {key} = \"DATABASE_URL\"\n\
         # once = true\n"
    )
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
    /// The app's database and what said so, for the `[lock]` suggestion.
    pub database: Option<(Database, String)>,
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
    let database = detect_database(&dir);
    let text = template(framework) + &lock_section(database.as_ref());
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
        database,
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
        let lock = match &self.database {
            Some((Database::Mysql, evidence)) => format!(
                "\n\nThe app uses MySQL ({evidence}): for several replicas, uncomment [lock] with \
                 mysql = \"DATABASE_URL\" at the end of {}.",
                self.path.display()
            ),
            Some((Database::Postgres, evidence)) => format!(
                "\n\nThe app uses PostgreSQL ({evidence}): for several replicas, uncomment [lock] with \
                 postgres = \"DATABASE_URL\" at the end of {}.",
                self.path.display()
            ),
            None => String::new(),
        };
        format!(
            "wrote {} ({what}){lock}\n\n{}\n\n{procfile}\n\nThen check it with the variables your platform will set:\n\n    \
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
    fn the_database_is_found_where_each_framework_names_it() {
        let cases: &[(&str, &str, Option<Database>)] = &[
            (
                "Gemfile",
                "gem 'rails'\ngem 'mysql2', '~> 0.5'\n",
                Some(Database::Mysql),
            ),
            ("Gemfile", "gem \"trilogy\"\n", Some(Database::Mysql)),
            ("Gemfile", "gem 'pg'\n", Some(Database::Postgres)),
            (
                "config/database.yml",
                "default:\n  adapter: mysql2\n",
                Some(Database::Mysql),
            ),
            (
                ".env.example",
                "DB_CONNECTION=mysql\n",
                Some(Database::Mysql),
            ),
            (".env", "DB_CONNECTION=pgsql\n", Some(Database::Postgres)),
            (
                "shop/settings.py",
                "'ENGINE': 'django.db.backends.mysql',\n",
                Some(Database::Mysql),
            ),
            (
                "prisma/schema.prisma",
                "datasource db {\n  provider = \"mysql\"\n}\n",
                Some(Database::Mysql),
            ),
            (
                "package.json",
                r#"{"dependencies": {"mysql2": "3"}}"#,
                Some(Database::Mysql),
            ),
            ("mix.exs", "{:myxql, \">= 0.0.0\"}", Some(Database::Mysql)),
            (
                "requirements.txt",
                "Django\nmysqlclient==2.2\n",
                Some(Database::Mysql),
            ),
            ("Gemfile", "gem 'sqlite3'\n", None),
        ];
        for (file, text, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            let found = detect_database(dir.path());
            assert_eq!(found.as_ref().map(|f| f.0), *expected, "{file}: {text}");
            if let Some((_, evidence)) = found {
                assert!(
                    evidence.starts_with(file.trim_end_matches(".example")),
                    "{evidence}"
                );
            }
        }
    }

    #[test]
    fn the_lock_suggestion_is_a_valid_config_once_uncommented() {
        let mysql = lock_section(Some(&(Database::Mysql, "Gemfile: gem 'mysql2'".into())));
        assert!(mysql.contains("# mysql = \"DATABASE_URL\"\n"), "{mysql}");
        let text = template(Some(Framework::Rails)) + &mysql;
        crate::config::parse(Path::new("release.toml"), &text).unwrap();
        let uncommented = text
            .replace("# [lock]", "[lock]")
            .replace("# mysql =", "mysql =")
            .replace("# once =", "once =");
        let config = crate::config::parse(Path::new("release.toml"), &uncommented).unwrap();
        assert_eq!(
            config.lock.map(|l| l.backend),
            Some(crate::config::Backend::Mysql)
        );
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
