//! `release-tasks init`: templates per framework, never overwriting, and a real Django project whose
//! migrations release-tasks then runs.

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

fn django_available() -> bool {
    Command::new("python3")
        .args(["-c", "import django"])
        .status()
        .is_ok_and(|s| s.success())
}

fn sh(t: &Test, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(t.dir.path())
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
    if !django_available() {
        // CI installs Django (`.ci/run`); a developer without it gets a clear skip, not a silent pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "Django is not installed, but CI must run this test"
        );
        eprintln!("SKIPPED: Django is not installed (pip install django)");
        return;
    }
    let t = Test::new();
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
