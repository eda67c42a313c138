//! `release-tasks init`: templates per framework, never overwriting, and a real Django project whose
//! migrations release-tasks then runs.

use std::path::Path;
use std::process::Command;

use crate::harness::Test;

#[test]
fn init_without_a_framework_writes_a_generic_template() {
    let t = Test::new();
    t.run_with(&["init"])
        .status(0)
        .stdout_has("no framework recognised")
        .stdout_has("release: release-tasks");
    t.run_with(&["check"]).status(0);
}

#[test]
fn init_never_overwrites_without_force() {
    let t = Test::new()
        .config("# mine\n[tasks.a]\nrun = \"true\"\n")
        .file("Gemfile", "gem 'rails'\n");
    t.run_with(&["init"])
        .status(2)
        .stderr_has("already exists")
        .stderr_has("--force");
    assert!(
        std::fs::read_to_string(t.path("release.toml"))
            .unwrap()
            .starts_with("# mine")
    );
    t.run_with(&["init", "--force"])
        .status(0)
        .stdout_has("detected Rails");
    let written = std::fs::read_to_string(t.path("release.toml")).unwrap();
    assert!(
        written.contains("bundle exec rails db:migrate"),
        "{written}"
    );
}

#[test]
fn init_points_at_an_existing_procfile_release_line() {
    let t = Test::new()
        .file(
            "Procfile",
            "web: php-fpm\nrelease: bash ./release-tasks.sh\n",
        )
        .file("artisan", "#!/usr/bin/env php\n");
    t.run_with(&["init"])
        .status(0)
        .stdout_has("detected Laravel")
        .stdout_has("Replace the Procfile's `release: bash ./release-tasks.sh`");
    assert!(
        std::fs::read_to_string(t.path("release.toml"))
            .unwrap()
            .contains("php artisan migrate --force")
    );
}

/// The whole of what `init` prints: what it wrote, how to install release-tasks the way the app
/// installs its tools, the Procfile line with the command that installer puts on PATH, and the check.
fn init_says(t: &Test, install: &str, procfile: &str, command: &str) {
    let out = t.run_with(&["init"]);
    out.status(0);
    assert_eq!(
        out.stdout(),
        format!(
            "wrote release.toml ({detected})\n\n{install}\n\n{procfile}\n\n\
             Then check it with the variables your platform will set:\n\n    \
             RUN_MIGRATIONS_DURING_RELEASE=true {command} plan\n",
            detected = detected(t),
        )
    );
}

/// The framework part of the first line, from the file init wrote.
fn detected(t: &Test) -> String {
    let written = std::fs::read_to_string(t.path("release.toml")).unwrap();
    match written
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# release.toml for "))
        .and_then(|l| l.strip_suffix(", written by `release-tasks init`."))
    {
        Some(name) => format!("detected {name}"),
        None => "no framework recognised: edit the placeholder commands".to_owned(),
    }
}

#[test]
fn init_on_a_rails_app_says_gem_and_bundle_exec() {
    // A Rails app with a package.json for its JavaScript still installs its tools with Bundler.
    let t = Test::new()
        .file(
            "Gemfile",
            "source \"https://rubygems.org\"\ngem \"rails\", \"~> 7.1\"\n",
        )
        .file(
            "package.json",
            "{\"dependencies\": {\"esbuild\": \"0.20\"}}\n",
        );
    init_says(
        &t,
        "Install it with the app's gems: add this line to the Gemfile:\n\n    gem \"release-tasks\"\n\n\
         then run `bundle install` (or run `bundle add release-tasks`, which does both)",
        "Add this line to your Procfile:\n\n    release: bundle exec release-tasks",
        "bundle exec release-tasks",
    );
    assert_eq!(detected(&t), "detected Rails");
}

#[test]
fn init_on_a_django_app_with_requirements_txt_says_pip() {
    let t = Test::new()
        .file("manage.py", "")
        .file("requirements.txt", "django==5.0\n")
        .file(
            "Procfile",
            "web: gunicorn mysite.wsgi\nrelease: python manage.py migrate\n",
        );
    init_says(
        &t,
        &format!(
            "Install it with the app's packages: add this line to requirements.txt:\n\n    \
             release-tasks=={}",
            env!("CARGO_PKG_VERSION")
        ),
        "Replace the Procfile's `release: python manage.py migrate` with:\n\n    release: release-tasks",
        "release-tasks",
    );
    assert_eq!(detected(&t), "detected Django");
}

#[test]
fn init_on_a_pyproject_app_says_its_dependencies() {
    let t = Test::new()
        .file("manage.py", "")
        .file("pyproject.toml", "[project]\nname = \"shop\"\n");
    init_says(
        &t,
        &format!(
            "Install it with the app's packages: add it to [project] dependencies in pyproject.toml:\n\n    \
             \"release-tasks=={}\"\n\n(or `uv add release-tasks`, `poetry add release-tasks`)",
            env!("CARGO_PKG_VERSION")
        ),
        "Add this line to your Procfile:\n\n    release: release-tasks",
        "release-tasks",
    );
}

#[test]
fn init_on_a_node_app_says_npm_and_npx() {
    let t = Test::new().file("package.json", "{\"dependencies\": {\"knex\": \"3\"}}\n");
    init_says(
        &t,
        "Install it with the app's packages (package.json):\n\n    npm install release-tasks",
        "Add this line to your Procfile:\n\n    release: npx release-tasks",
        "npx release-tasks",
    );
    assert_eq!(detected(&t), "detected Node.js with Knex");

    // A Procfile that already runs it through npx is left alone.
    let t = t
        .file(
            "Procfile",
            "web: node server.js\nrelease: npx release-tasks\n",
        )
        .file("release.toml", "");
    t.run_with(&["init", "--force"])
        .status(0)
        .stdout_has("\n\nYour Procfile already runs release-tasks.\n\n");
}

#[test]
fn init_on_an_app_without_a_package_manager_of_ours_says_buildpack_or_binary() {
    let t = Test::new()
        .file("artisan", "#!/usr/bin/env php\n")
        .file("composer.json", "{}\n");
    init_says(
        &t,
        "Install it: on Heroku or Dokku, add the release-tasks buildpack in front of the app's own \
         (README, \"Heroku buildpack\"); elsewhere, put the static binary on PATH (README, \"Static binary\").",
        "Add this line to your Procfile:\n\n    release: release-tasks",
        "release-tasks",
    );
    assert_eq!(detected(&t), "detected Laravel");
}

/// A PATH whose `python` and `python3` can import Django: the system's, or else one that starts with
/// a virtualenv under `target/` that this test makes and installs Django into (once; later runs reuse
/// it). `None` when neither can be had.
fn django_path() -> Option<String> {
    let system = std::env::var("PATH").unwrap_or_default();
    let imports = |python: &str, path: &str| {
        Command::new(python)
            .args(["-c", "import django"])
            .env("PATH", path)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if imports("python3", &system) && imports("python", &system) {
        return Some(system);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-django-venv");
    let path = format!("{}:{system}", venv.join("bin").display());
    if !imports("python", &path) {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "django",
                ])
                .status()
                .is_ok_and(|s| s.success());
        if !made || !imports("python", &path) {
            return None;
        }
    }
    Some(path)
}

fn sh(t: &Test, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(t.dir.path())
        .env("PATH", t.env_var("PATH").unwrap_or_default())
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn init_on_a_real_django_project_then_migrate_for_real() {
    let Some(path) = django_path() else {
        // Only where Django can be neither found nor installed (no python3, no network to PyPI).
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the Django test, but Django could not be installed"
        );
        eprintln!(
            "SKIPPED: Django is not installed and could not be installed into target/test-django-venv"
        );
        return;
    };
    // For this test's shell commands and for release-tasks's tasks alike.
    let t = Test::new().env("PATH", &path);
    sh(
        &t,
        "python3 -m django startproject mysite . && python3 manage.py startapp shop && \
         printf 'from django.db import models\\n\\nclass Item(models.Model):\\n    name = models.CharField(max_length=20)\\n' > shop/models.py && \
         printf '\\nINSTALLED_APPS.append(\"shop\")\\n' >> mysite/settings.py && \
         python3 manage.py makemigrations shop",
    );
    t.run_with(&["init"])
        .status(0)
        .stdout_has("detected Django");
    let config = std::fs::read_to_string(t.path("release.toml")).unwrap();
    assert!(
        config.contains("python manage.py migrate --noinput"),
        "{config}"
    );

    let tables = "python3 -c \"import sqlite3; c = sqlite3.connect('db.sqlite3'); \
                  n = c.execute(\\\"select count(*) from sqlite_master where name = 'shop_item'\\\").fetchone()[0]; \
                  exit(0 if n == int('$WANT') else 1)\"";

    // Migrations are gated off by default: the table is not created.
    let t = t.env("DATABASE_URL", "sqlite:///db.sqlite3");
    t.run().status(0).stderr_has("task=migrate outcome=skipped");
    sh(&t, &tables.replace("$WANT", "0"));

    let t = t.env("RUN_MIGRATIONS_DURING_RELEASE", "true");
    t.run()
        .status(0)
        .stdout_has("Applying shop.0001_initial... OK")
        .stderr_has("task=migrate outcome=succeeded");
    sh(&t, &tables.replace("$WANT", "1"));
}

#[test]
fn init_suggests_a_mysql_lock_for_a_mysql_app() {
    let t = Test::new().file("artisan", "#!/usr/bin/env php\n").file(
        ".env.example",
        "APP_NAME=shop\nDB_CONNECTION=mysql\nDB_HOST=127.0.0.1\n",
    );
    let out = t.run_with(&["init"]);
    out.status(0);
    assert_eq!(
        out.stdout(),
        "wrote release.toml (detected Laravel)\n\n\
         The app uses MySQL (.env.example: DB_CONNECTION=mysql): for several replicas, uncomment [lock] \
         with mysql = \"DATABASE_URL\" at the end of release.toml.\n\n\
         Install it: on Heroku or Dokku, add the release-tasks buildpack in front of the app's own \
         (README, \"Heroku buildpack\"); elsewhere, put the static binary on PATH (README, \"Static binary\").\n\n\
         Add this line to your Procfile:\n\n    release: release-tasks\n\n\
         Then check it with the variables your platform will set:\n\n    \
         RUN_MIGRATIONS_DURING_RELEASE=true release-tasks plan\n"
    );
    let written = std::fs::read_to_string(t.path("release.toml")).unwrap();
    assert!(
        written.ends_with(
            "# one of them run it, once per version (README, `[lock]`). Detected from .env.example: DB_CONNECTION=mysql.\n\
             # [lock]\n# mysql = \"DATABASE_URL\"\n# once = true\n"
        ),
        "{written}"
    );
    t.run_with(&["check"]).status(0);
}
