//! Output formats for log pipelines: `--output-format json` (task lines as JSON objects) and what
//! `check` and `plan` print in JSON log mode, checked by parsing every line of both streams.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::Test;

/// Every line of `text`, each of which must be one JSON object.
#[track_caller]
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| panic!("not a JSON object: {line:?}\nin:\n{text}"))
        })
        .collect()
}

/// The task output objects among `lines` (log events carry a `level`).
fn task_lines(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l.get("level").is_none())
        .cloned()
        .collect()
}

const TASKS: &str = r#"
[tasks.migrate]
run = '''printf 'one\n\ntwo "quoted"\n'; printf 'bad \377 byte\n' >&2; printf 'no newline at the end' '''

[tasks.seed]
run = "echo seeded >&2"
"#;

#[test]
fn with_json_output_and_logs_every_line_of_both_streams_is_json() {
    let out = Test::new()
        .config(TASKS)
        .args(&["--log-format", "json", "--output-format", "json"])
        .run();
    out.status(0);
    let stdout = json_lines(&out.stdout());
    let stderr = json_lines(&out.stderr);
    let line = |task: &str, stream: &str, line: &str| json!({"task": task, "stream": stream, "line": line});
    assert_eq!(
        stdout,
        [
            line("migrate", "stdout", "one"),
            line("migrate", "stdout", ""),
            line("migrate", "stdout", "two \"quoted\""),
            line("migrate", "stdout", "no newline at the end"),
        ]
    );
    assert_eq!(
        task_lines(&stderr),
        [
            line("migrate", "stderr", "bad \u{fffd} byte"),
            line("seed", "stderr", "seeded"),
        ]
    );
    assert!(stderr.iter().any(|e| e["message"] == "release succeeded"));
}

#[test]
fn the_output_format_is_a_setting_of_its_own() {
    // Set by variable, with text logs: task lines are JSON, log lines stay text.
    let out = Test::new()
        .config(TASKS)
        .env("RELEASE_TASKS_OUTPUT_FORMAT", "json")
        .run();
    out.status(0).stderr_has("INFO  release succeeded");
    assert_eq!(json_lines(&out.stdout()).len(), 4);
    assert!(
        out.stderr
            .contains(r#"{"task":"seed","stream":"stderr","line":"seeded"}"#),
        "{}",
        out.stderr
    );
    // JSON logs alone leave task output as it is: a task that logs JSON itself stays parseable.
    Test::new()
        .config(TASKS)
        .args(&["--log-format", "json"])
        .run()
        .status(0)
        .stdout_has("migrate | one\n")
        .stderr_has("seed    | seeded\n");
    // A bad setting beside JSON logs is a JSON event.
    let out = Test::new()
        .config(TASKS)
        .env("RELEASE_TASKS_OUTPUT_FORMAT", "yaml")
        .env("RELEASE_TASKS_LOG_FORMAT", "json")
        .run();
    out.status(2);
    let events = json_lines(&out.stderr);
    assert!(
        events[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("RELEASE_TASKS_OUTPUT_FORMAT"))
    );
    // The flag wins over the variable; a bad value names the variable.
    Test::new()
        .config(TASKS)
        .env("RELEASE_TASKS_OUTPUT_FORMAT", "json")
        .args(&["--output-format", "text"])
        .run()
        .status(0)
        .stdout_has("migrate | one\n");
    Test::new()
        .config(TASKS)
        .env("RELEASE_TASKS_OUTPUT_FORMAT", "yaml")
        .run()
        .status(2)
        .stderr_has(
            "RELEASE_TASKS_OUTPUT_FORMAT=\"yaml\" is not an output format; use `text` or `json`",
        );
}

#[test]
fn a_waiting_prompt_is_flushed_as_a_partial_object() {
    let t = Test::new()
        .config("[tasks.ask]\nrun = \"printf 'Continue? '; sleep 3; echo y\"\n")
        .args(&["--output-format", "json"]);
    let running = t.spawn_until(r#""line":"Continue? ","partial":true}"#);
    let out = running.wait();
    out.status(0);
    assert_eq!(
        json_lines(&out.stdout()),
        [
            json!({"task": "ask", "stream": "stdout", "line": "Continue? ", "partial": true}),
            json!({"task": "ask", "stream": "stdout", "line": "y"}),
        ]
    );
    assert!(out.elapsed >= Duration::from_secs(3));
}

#[test]
fn check_and_plan_speak_json_in_json_log_mode() {
    let t = Test::new().config(
        "[tasks.migrate]\nrun = \"true\"\nwhen = \"RUN_MIGRATIONS\"\n\n[tasks.cache]\nrun = \"true\"\n",
    );
    let out = t.run_with(&["check", "--log-format", "json"]);
    out.status(0);
    assert_eq!(
        json_lines(&out.stdout()),
        [json!({"config": "release.toml", "ok": true, "tasks": 2, "would_run": 1})]
    );
    json_lines(&out.stderr);
    t.run_with(&["check"])
        .status(0)
        .stdout_has("release.toml: ok, 2 tasks (1 would run with this environment)\n");
    let out = t.run_with(&["plan", "--log-format", "json"]);
    out.status(0);
    assert!(!json_lines(&out.stdout()).is_empty());
    json_lines(&out.stderr);
    // A config error is a JSON event too.
    let bad = Test::new().config("[tasks.a]\nrun = \"\"\n");
    let out = bad.run_with(&["check", "--log-format", "json"]);
    assert_eq!(out.code, Some(78), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert!(
        json_lines(&out.stderr)
            .iter()
            .any(|e| e["level"] == "ERROR")
    );
}

#[test]
fn format_flags_take_any_case_as_their_variables_do() {
    for args in [
        ["--log-format", "JSON", "--output-format", "Json"],
        ["--log-format", "json", "--output-format", "JSON"],
    ] {
        let out = Test::new().config(TASKS).args(&args).run();
        out.status(0);
        assert!(!json_lines(&out.stdout()).is_empty());
        assert!(!json_lines(&out.stderr).is_empty());
    }
    Test::new()
        .config(TASKS)
        .env("RELEASE_TASKS_LOG_FORMAT", "JSON")
        .run()
        .status(0);
}
