//! Whole outputs, word for word: every text a user reads (`plan`, `check`, config errors, the run's
//! log and summary lines, `history` on a real ledger, `--help`) compared whole against a file in
//! `tests/cli/snapshots/`, with what varies (timestamps, durations, the temp dir; for `history` the
//! lock's name, pids and column padding) normalised. A change to any of these texts
//! shows up here as a diff to review; `UPDATE_SNAPSHOTS=1 cargo test --test cli exact::` rewrites
//! the files after a change that was meant.

use std::path::Path;

use crate::harness::{Output, Test};

/// Compares `actual` with the snapshot `name`, or writes it under `UPDATE_SNAPSHOTS=1`.
#[track_caller]
fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cli/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).expect("write the snapshot");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|err| {
        panic!(
            "no snapshot {} ({err}); UPDATE_SNAPSHOTS=1 writes it. Output:\n{actual}",
            path.display()
        )
    });
    if want != actual {
        let first = want
            .lines()
            .zip(actual.lines())
            .position(|(w, a)| w != a)
            .unwrap_or_else(|| want.lines().count().min(actual.lines().count()));
        panic!(
            "{name}: differs from {} from line {}:\n--- want\n{want}\n--- got\n{actual}",
            path.display(),
            first + 1
        );
    }
}

/// `text` with what varies from run to run replaced: the temp dir by `$DIR`, a log line's
/// timestamp by `TIME` (text and JSON), and the digits of `duration_ms=`, `"duration_ms":` and
/// `elapsed=` by `N`.
fn normalise(text: &str, dir: &Path) -> String {
    let dir = dir.display().to_string();
    let mut out = String::new();
    for line in text.replace(&dir, "$DIR").lines() {
        let line = match line.split_once(' ') {
            Some((first, rest)) if is_timestamp(first) => format!("TIME {rest}"),
            _ => line.to_owned(),
        };
        let line = json_timestamp(&line);
        let line = digits_after(&digits_after(&line, "duration_ms="), "\"duration_ms\":");
        out.push_str(&digits_after(&line, "elapsed="));
        out.push('\n');
    }
    out
}

/// A JSON log line's `"timestamp":"..."` as `"timestamp":"TIME"`.
fn json_timestamp(line: &str) -> String {
    const KEY: &str = "{\"timestamp\":\"";
    match line.strip_prefix(KEY).and_then(|rest| rest.split_once('"')) {
        Some((_, rest)) => format!("{KEY}TIME\"{rest}"),
        None => line.to_owned(),
    }
}

/// `2026-12-07T13:17:16.765Z`
fn is_timestamp(word: &str) -> bool {
    word.len() == 24
        && word.ends_with('Z')
        && word.as_bytes()[10] == b'T'
        && word.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// `line` with the digits that follow each `key` replaced by `N`.
fn digits_after(line: &str, key: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find(key) {
        let (head, tail) = rest.split_at(at + key.len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            out.push('N');
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

// Task output goes to stdout in these configs: a task's stderr line and a log line come from two
// threads, in whichever order they are scheduled, while log lines keep their order among themselves.

/// The whole of what a run printed: its status, stdout and stderr, normalised.
fn whole(t: &Test, out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.code,
        normalise(&out.stdout(), t.dir.path()),
        normalise(&out.stderr, t.dir.path())
    )
}

const RELEASE: &str = r#"[defaults]
timeout = "10m"

[tasks.migrate]
run = "echo migrating"
when = "RUN_MIGRATIONS"

[tasks.seed]
run = ["sh", "-c", "echo seeded; echo 'seed: 3 rows'; exit 3"]
after = ["migrate"]
allow_failure = true

[tasks.cleanup]
run = "echo clean"
on = "failure"
"#;

#[test]
fn plan_says_what_would_run_and_why() {
    let t = Test::new().config(RELEASE);
    snapshot("plan", &whole(&t, &t.run_with(&["plan"])));
    let t = t.env("RUN_MIGRATIONS", "true");
    snapshot("plan-gate-on", &whole(&t, &t.run_with(&["plan"])));
    snapshot(
        "plan-json",
        &whole(&t, &t.run_with(&["plan", "--log-format", "json"])),
    );
}

#[test]
fn check_says_ok_and_how_many_would_run() {
    let t = Test::new().config(RELEASE).env("RUN_MIGRATIONS", "true");
    snapshot("check", &whole(&t, &t.run_with(&["check"])));
    snapshot(
        "check-json",
        &whole(&t, &t.run_with(&["check", "--log-format", "json"])),
    );
    let t = Test::new().config(
        "[require]\nenv = [\"DATABASE_URL\"]\n[tasks.a]\nrun = [\"/tmp\"]\n[tasks.b]\nrun = \"true\"\nwhen = \"GO\"\n",
    );
    snapshot("check-warnings", &whole(&t, &t.run_with(&["check"])));
}

#[test]
fn a_run_logs_each_task_and_a_summary() {
    let t = Test::new().config(RELEASE).env("RUN_MIGRATIONS", "true");
    snapshot("run", &whole(&t, &t.run()));
    let t = Test::new().config(
        "[tasks.ok]\nrun = \"true\"\n[tasks.fails]\nrun = [\"sh\", \"-c\", \"echo 'cannot connect'; exit 4\"]\n[tasks.never]\nrun = \"true\"\n[tasks.tell]\nrun = \"echo told\"\non = \"failure\"\n",
    );
    snapshot("run-failed", &whole(&t, &t.run()));
    snapshot(
        "run-failed-json",
        &whole(&t, &t.run_with(&["--log-format", "json"])),
    );
}

#[test]
fn config_errors_are_listed_whole_with_their_places() {
    let t = Test::new().config(
        r#"[defaults]
timeout = "soon"
grace = 5
colour = "blue"

[require]
env = ["not a name"]

[tasks.a]
run = ""
when = "lower case"
on = "sometimes"
after = ["b", "nope"]
tmeout = "1m"

[tasks.b]
run = ["true"]
after = ["a"]
allow_failure = "yes"
env = { API_TOKEN = 12345678 }

[tasks.c]
notify = { url = "ftp://example.com/hook", retries = 99, format = "xml" }
"#,
    );
    snapshot("config-errors", &whole(&t, &t.run_with(&["check"])));
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\nrun = \"false\"\n");
    snapshot("config-duplicate-key", &whole(&t, &t.run_with(&["check"])));
    let t = Test::new().config(
        "[tasks.a]\nrun = \"true\"\n\n[tasks.b]\nrun = \"true\"\n\n[tasks.a]\nrun = \"false\"\n",
    );
    snapshot(
        "config-duplicate-table",
        &whole(&t, &t.run_with(&["check"])),
    );
    let t = Test::new().config("[tasks.a\nrun = \"true\"\n");
    snapshot("config-syntax", &whole(&t, &t.run_with(&["check"])));
    let t = Test::new().config("tasks = 5\n");
    snapshot("config-shape", &whole(&t, &t.run_with(&["check"])));
    let t = Test::new();
    snapshot("config-missing", &whole(&t, &t.run_with(&["check"])));
}

#[test]
fn a_datetime_where_another_type_belongs_is_one_problem_among_the_rest() {
    let t = Test::new().config(
        r#"[defaults]
timeout = 2024-01-01
tail_lines = 2024-01-01T10:00:00
colour = "blue"

[lock]
postgres = "DATABASE_URL"
key = 07:32:00
once = 2024-01-01

[tasks.a]
run = 1979-05-27T07:32:00Z
dir = 2024-01-01
env = { STAMP = 2024-01-01, API_TOKEN = 1979-05-27 }
after = [2024-01-01]
when = { env = "A", equals = 2024-01-01 }

[tasks.b]
run = ["echo", 1979-05-27]
allow_failure = 2024-01-01
retries = 2024-01-01
retry_on = [1, 2024-01-01]
timeout = "soon"

[tasks.c]
notify = { url = "https://example.com/hook", headers = { X-Day = 2024-01-01 }, timeout = 2024-01-01, format = 2024-01-01 }
"#,
    );
    snapshot("config-datetime", &whole(&t, &t.run_with(&["check"])));
    // Where a table or a list belongs, the TOML reader stops, as for `env = 5`.
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\nenv = 2024-01-01\ntmeout = \"1m\"\n");
    snapshot("config-datetime-table", &whole(&t, &t.run_with(&["check"])));
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\nafter = 2024-01-01\n");
    snapshot("config-datetime-list", &whole(&t, &t.run_with(&["check"])));
}

#[test]
fn a_timed_out_task_is_stopped_and_summed_up_word_for_word() {
    let t = Test::new().config(
        "[tasks.slow]\nrun = \"echo started; sleep 30\"\ntimeout = \"1s\"\ngrace = \"2s\"\n\
         [tasks.after]\nrun = \"true\"\n[tasks.tell]\nrun = \"echo told\"\non = \"failure\"\n",
    );
    snapshot("run-timeout", &whole(&t, &t.run()));
    // A task that ignores SIGTERM is killed when the grace period ends.
    let t = Test::new().config(
        "[tasks.stubborn]\nrun = [\"sh\", \"-c\", \"trap '' TERM; echo started; while true; do sleep 0.1; done\"]\n\
         timeout = \"1s\"\ngrace = \"1s\"\n",
    );
    snapshot("run-timeout-killed", &whole(&t, &t.run()));
}

#[test]
fn a_stop_signal_ends_the_release_word_for_word() {
    let t = Test::new().config(
        "[tasks.slow]\nrun = \"echo started; sleep 30\"\n[tasks.after]\nrun = \"true\"\n\
         [tasks.tell]\nrun = \"echo told\"\non = \"failure\"\n",
    );
    let running = t.spawn_until("slow  | started");
    running.signal("TERM");
    snapshot("run-stopped", &whole(&t, &running.wait()));
}

#[test]
fn exec_errors_are_pinned_word_for_word() {
    let t = Test::new()
        .config("[tasks.a]\nrun = \"echo hi\"\n")
        .file("notes.txt", "not a program\n");
    snapshot("exec-usage", &whole(&t, &t.run_with(&["exec"])));
    snapshot(
        "exec-not-found",
        &whole(&t, &t.run_with(&["exec", "--", "no-such-command"])),
    );
    snapshot(
        "exec-not-executable",
        &whole(&t, &t.run_with(&["exec", "--", "./notes.txt"])),
    );
    let t = Test::new().config("[tasks.a]\nrun = \"echo failing; exit 4\"\n");
    snapshot(
        "exec-after-a-failure",
        &whole(&t, &t.run_with(&["exec", "--", "echo", "never"])),
    );
}

#[test]
fn environment_and_selection_errors_are_pinned_word_for_word() {
    let t = Test::new()
        .config("[require]\nenv = [\"DATABASE_URL\"]\n[tasks.a]\nrun = \"true\"\nwhen = \"GO\"\n")
        .env("GO", "ture");
    snapshot("run-gate-invalid", &whole(&t, &t.run()));
    let t = Test::new().config(
        "[require]\nenv = [\"DATABASE_URL\", \"SECRET_KEY_BASE\"]\n[tasks.a]\nrun = \"true\"\n",
    );
    snapshot("run-require-missing", &whole(&t, &t.run()));
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\n[tasks.b]\nrun = \"true\"\n");
    snapshot(
        "run-only-unknown",
        &whole(&t, &t.run_with(&["--only", "a,nope"])),
    );
    // The ledger's commands without [lock].
    snapshot(
        "history-without-lock",
        &whole(&t, &t.run_with(&["history"])),
    );
    snapshot("wait-without-lock", &whole(&t, &t.run_with(&["wait"])));
}

/// `init`'s whole output and the release.toml it wrote.
fn init_whole(t: &Test, args: &[&str]) -> String {
    let out = t.run_with(args);
    let written = std::fs::read_to_string(t.path("release.toml")).unwrap_or_default();
    format!("{}--- release.toml\n{written}", whole(t, &out))
}

#[test]
fn init_output_and_the_file_it_writes_are_pinned_word_for_word() {
    let t = Test::new();
    snapshot("init-generic", &init_whole(&t, &["init"]));
    snapshot("init-exists", &whole(&t, &t.run_with(&["init"])));
    let t = Test::new().file(
        "Gemfile",
        "source \"https://rubygems.org\"\ngem \"rails\", \"~> 7.1\"\n",
    );
    snapshot("init-rails", &init_whole(&t, &["init"]));
    let t = Test::new().file("artisan", "#!/usr/bin/env php\n").file(
        ".env.example",
        "APP_NAME=shop\nDB_CONNECTION=mysql\nDB_HOST=127.0.0.1\n",
    );
    snapshot("init-laravel-mysql", &init_whole(&t, &["init"]));
}

#[test]
fn help_is_pinned_word_for_word() {
    let t = Test::new();
    snapshot("help", &whole(&t, &t.run_with(&["--help"])));
    snapshot("help-short", &whole(&t, &t.run_with(&["-h"])));
    snapshot("help-run", &whole(&t, &t.run_with(&["help", "run"])));
    snapshot("usage-error", &whole(&t, &t.run_with(&["--frobnicate"])));
}

/// `history`'s whole output (status, stdout, stderr) with, on top of [`normalise`], what a ledger
/// holds that varies from run to run, replaced in this one place: the lock's name (`APP`: the
/// tests' key ends with their pid), timestamps anywhere on a line (`TIME`), durations as
/// `history` writes them (`1s 5ms` -> `DUR`), `"duration_s":` numbers (`N`), the holder's pid
/// (`pid PID`; its host is fixed with `DYNO`); and the padding of table columns made two spaces,
/// since a column is as wide as its widest duration (history.rs's unit tests pin the alignment).
#[cfg(feature = "postgres")]
fn whole_history(t: &Test, out: &Output, app: &str) -> String {
    let history = |text: &str| {
        let mut lines = String::new();
        for line in normalise(text, t.dir.path()).replace(app, "APP").lines() {
            let line = number_after(&timestamps(line), "\"duration_s\":");
            let line = pid_after(&line, "pid ");
            lines.push_str(&collapse_padding(&durations(&line)));
            lines.push('\n');
        }
        lines
    };
    format!(
        "status: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.code,
        history(&out.stdout()),
        history(&out.stderr)
    )
}

/// Every `2026-12-07T15:45:55Z` (fractions of a second included) in `line` as `TIME`.
fn timestamps(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.char_indices().map(|(i, _)| i).find(|&i| {
        let b = rest.as_bytes();
        b.len() >= i + 20
            && b[i..i + 4].iter().all(u8::is_ascii_digit)
            && b[i + 4] == b'-'
            && b[i + 7] == b'-'
            && b[i + 10] == b'T'
            && b[i + 13] == b':'
    }) {
        let end = rest[at..]
            .find(|c: char| !(c.is_ascii_digit() || "-:.TZ".contains(c)))
            .map_or(rest.len(), |n| at + n);
        out.push_str(&rest[..at]);
        out.push_str("TIME");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `line` with the number (digits and a point) after each `key` as `N`.
fn number_after(line: &str, key: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find(key) {
        let (head, tail) = rest.split_at(at + key.len());
        out.push_str(head);
        let len = tail
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if len > 0 {
            out.push('N');
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// `line` with the digits after each `key` as `PID`.
fn pid_after(line: &str, key: &str) -> String {
    digits_after(line, key).replace(&format!("{key}N"), &format!("{key}PID"))
}

/// Words that are a duration as humantime writes one (`0s`, `5ms`, `1m 3s 20ms`) as `DUR`.
fn durations(line: &str) -> String {
    const UNITS: [&str; 10] = ["ns", "us", "µs", "ms", "s", "m", "h", "d", "months", "y"];
    let is_duration = |word: &str| {
        let word = word.trim_end_matches(',');
        let digits = word.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && UNITS.contains(&&word[digits..])
    };
    let mut out: Vec<String> = Vec::new();
    for (i, word) in line.split(' ').enumerate() {
        if is_duration(word) {
            let comma = if word.ends_with(',') { "," } else { "" };
            // The parts of one duration are one `DUR`.
            if i > 0 && out.last().is_some_and(|w| w == "DUR") {
                out.pop();
            }
            out.push(format!("DUR{comma}"));
        } else {
            out.push(word.to_owned());
        }
    }
    out.join(" ")
}

/// Runs of two or more spaces as two.
fn collapse_padding(line: &str) -> String {
    let mut out = String::new();
    let mut spaces = 0;
    for c in line.chars() {
        if c == ' ' {
            spaces += 1;
            if spaces <= 2 {
                out.push(c);
            }
        } else {
            spaces = 0;
            out.push(c);
        }
    }
    out
}

/// Two releases on the ledger: v1 (commit abc123) fails in `seed`, whose output holds a secret;
/// v2 succeeds.
#[cfg(feature = "postgres")]
const LEDGER_TASKS: &str = r#"
[tasks.migrate]
run = "echo migrated"
[tasks.seed]
run = "echo ready; echo 'PG::LockNotAvailable: lock timeout'; echo token=$SEED_TOKEN; exit $SEED_EXIT"
env = { SEED_TOKEN = "hunter2" }
[tasks.cache]
run = "echo cleared"
"#;

/// `history` and `history --show`, text and JSON, after two releases on `backend`; the same
/// snapshots for every backend, since a person reads the same ledger whichever database holds it.
// `locked_on` lives in the PostgreSQL tests' module, which the MySQL tests use too.
#[cfg(feature = "postgres")]
fn history_is_pinned_on(backend: &str, url: &str, name: &str) {
    let app = format!("{name}-{}", std::process::id());
    let t = crate::lock::locked_on(backend, url, name, "once = true", LEDGER_TASKS)
        .env("DYNO", "web.1")
        .env("RELEASE_TASKS_VERSION", "v1")
        .env("RELEASE_TASKS_COMMIT", "abc123")
        .env("SEED_EXIT", "3");
    t.run().status(3);
    let t = t
        .env("RELEASE_TASKS_VERSION", "v2")
        .env("RELEASE_TASKS_COMMIT", "def456")
        .env("SEED_EXIT", "0");
    t.run().status(0);
    let pinned = |snapshot_name: &str, args: &[&str]| {
        snapshot(snapshot_name, &whole_history(&t, &t.run_with(args), &app));
    };
    pinned("history", &["history"]);
    pinned("history-json", &["history", "--log-format", "json"]);
    pinned("history-show", &["history", "--show", "v1"]);
    pinned(
        "history-show-json",
        &["history", "--show", "v1", "--log-format", "json"],
    );
    pinned("history-not-recorded", &["history", "--show", "v9"]);
    pinned("history-usage", &["history", "-n", "0"]);
    // A key with no release recorded.
    let none = format!("{name}-none");
    let t = crate::lock::locked_on(backend, url, &none, "once = true", LEDGER_TASKS);
    let app = format!("{none}-{}", std::process::id());
    snapshot(
        "history-none",
        &whole_history(&t, &t.run_with(&["history"]), &app),
    );
}

/// `wait`'s messages: a release that succeeded, one that failed (with and without `--fail-fast`),
/// one not recorded, and no version to wait for.
#[cfg(feature = "postgres")]
fn wait_is_pinned_on(backend: &str, url: &str, name: &str) {
    let app = format!("{name}-{}", std::process::id());
    let release = |tasks: &str, version: &str| {
        crate::lock::locked_on(backend, url, name, "once = true", tasks)
            .env("DYNO", "web.1")
            .env("RELEASE_TASKS_VERSION", version)
    };
    let t = release("[tasks.migrate]\nrun = \"true\"\n", "v1");
    t.run().status(0);
    let pinned = |snapshot_name: &str, t: &Test, args: &[&str]| {
        snapshot(snapshot_name, &whole_history(t, &t.run_with(args), &app));
    };
    pinned("wait-succeeded", &t, &["wait"]);
    let t = release("[tasks.migrate]\nrun = \"exit 4\"\n", "v2");
    t.run().status(4);
    pinned("wait-failed-fail-fast", &t, &["wait", "--fail-fast"]);
    pinned("wait-failed-timeout", &t, &["wait", "--timeout", "1s"]);
    let t = release("[tasks.migrate]\nrun = \"true\"\n", "v3");
    pinned("wait-not-recorded", &t, &["wait", "--timeout", "1s"]);
    let t = crate::lock::locked_on(
        backend,
        url,
        name,
        "once = true",
        "[tasks.a]\nrun = \"true\"\n",
    );
    pinned("wait-no-version", &t, &["wait"]);
}

#[cfg(feature = "postgres")]
#[test]
fn wait_is_pinned_word_for_word_on_postgres() {
    let Some(url) = crate::lock::database_url() else {
        return;
    };
    wait_is_pinned_on("postgres", url, "exact-wait");
}

#[cfg(all(feature = "postgres", feature = "mysql"))]
#[test]
fn wait_is_pinned_word_for_word_on_mysql() {
    let Some(url) = crate::lock_mysql::mysql_url() else {
        return;
    };
    wait_is_pinned_on("mysql", url, "exact-wait-my");
}

#[cfg(feature = "postgres")]
#[test]
fn history_is_pinned_word_for_word_on_postgres() {
    let Some(url) = crate::lock::database_url() else {
        return;
    };
    history_is_pinned_on("postgres", url, "exact-history");
}

#[cfg(all(feature = "postgres", feature = "mysql"))]
#[test]
fn history_is_pinned_word_for_word_on_mysql() {
    let Some(url) = crate::lock_mysql::mysql_url() else {
        return;
    };
    history_is_pinned_on("mysql", url, "exact-history-my");
}

#[test]
fn normalising_replaces_only_what_varies() {
    let dir = Path::new("/tmp/.tmpAbc");
    assert_eq!(
        normalise(
            "2026-12-07T13:17:16.765Z INFO  task finished task=a duration_ms=32 x=1\nplain /tmp/.tmpAbc/release.toml elapsed=3s\n",
            dir
        ),
        "TIME INFO  task finished task=a duration_ms=N x=1\nplain $DIR/release.toml elapsed=Ns\n"
    );
    assert_eq!(normalise("2026 is a year\n", dir), "2026 is a year\n");
    assert_eq!(
        normalise(
            "{\"timestamp\":\"2026-12-07T13:55:26.687310Z\",\"level\":\"INFO\",\"duration_ms\":5}\n",
            dir
        ),
        "{\"timestamp\":\"TIME\",\"level\":\"INFO\",\"duration_ms\":N}\n"
    );
    // What a ledger holds.
    assert_eq!(
        timestamps("v1  2026-12-07T15:45:55Z  \"2026-12-07T15:45:55.123Z\" 2026 T"),
        "v1  TIME  \"TIME\" 2026 T"
    );
    assert_eq!(
        number_after("{\"duration_s\":0.0287,\"x\":1}", "\"duration_s\":"),
        "{\"duration_s\":N,\"x\":1}"
    );
    assert_eq!(
        pid_after("release-tasks pid 17904 on web.1", "pid "),
        "release-tasks pid PID on web.1"
    );
    assert_eq!(
        durations("migrate  0  5ms  1s 3ms  took 2m 1s, 30 tasks s"),
        "migrate  0  DUR  DUR  took DUR, 30 tasks s"
    );
    assert_eq!(collapse_padding("a     b  c d"), "a  b  c d");
}
