//! Whole outputs, word for word: every text a user reads (`plan`, `check`, config errors, the run's
//! log and summary lines, `--help`) compared whole against a file in `tests/cli/snapshots/`, with
//! what varies (timestamps, durations, the temp dir) normalised. A change to any of these texts
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
fn help_is_pinned_word_for_word() {
    let t = Test::new();
    snapshot("help", &whole(&t, &t.run_with(&["--help"])));
    snapshot("help-short", &whole(&t, &t.run_with(&["-h"])));
    snapshot("help-run", &whole(&t, &t.run_with(&["help", "run"])));
    snapshot("usage-error", &whole(&t, &t.run_with(&["--frobnicate"])));
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
}
