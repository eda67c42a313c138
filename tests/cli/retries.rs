//! Task retries: `retries`, `retry_delay` (doubling), `retry_on` and `attempt_timeout`, with every
//! attempt logged and counted, all of them within the task's `timeout`, and a stop signal that ends
//! the pause between two attempts at once.

use std::time::Duration;

use crate::harness::Test;

/// A task that fails with `code` until it has run `fails` times, then succeeds; each run appends a
/// line to `runs`.
fn flaky(fails: u32, code: i32, keys: &str) -> Test {
    Test::new().config(&format!(
        "[tasks.purge]\nrun = \"echo run >> runs; test $(wc -l < runs) -gt {fails} || {{ echo 'HTTP 503'; exit {code}; }}\"\n{keys}\n"
    ))
}

fn runs(t: &Test) -> usize {
    std::fs::read_to_string(t.path("runs"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn a_flaky_task_succeeds_on_a_later_attempt_and_the_attempts_are_counted() {
    let t = flaky(2, 1, "retries = 2\nretry_delay = \"100ms\"");
    let out = t.run_with(&["--report", "report.json"]);
    out.status(0);
    assert_eq!(runs(&t), 3);
    let warned: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("attempt failed; trying again"))
        .collect();
    assert_eq!(warned.len(), 2, "{}", out.stderr);
    assert!(
        warned[0].contains("attempt=1 of=3 outcome=failed exit_code=1 retry_in_ms=100"),
        "{}",
        warned[0]
    );
    assert!(
        warned[1].contains("attempt=2 of=3 outcome=failed exit_code=1 retry_in_ms=200"),
        "{}",
        warned[1]
    );
    assert_eq!(
        out.stderr.matches("task started task=purge").count(),
        3,
        "each attempt is logged"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["tasks"][0]["attempts"], 3);
    assert_eq!(report["tasks"][0]["outcome"], "succeeded");
}

#[test]
fn attempts_run_out_and_the_last_ones_status_is_the_tasks() {
    let t = flaky(9, 7, "retries = 1\nretry_delay = \"50ms\"");
    let out = t.run_with(&["--report", "report.json"]);
    out.status(7);
    assert_eq!(runs(&t), 2);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["tasks"][0]["attempts"], 2);
    assert_eq!(
        report["tasks"][0]["output_tail"],
        serde_json::json!(["HTTP 503"])
    );
}

#[test]
fn retry_on_limits_the_statuses_that_are_tried_again() {
    let t = flaky(
        9,
        2,
        "retries = 3\nretry_delay = \"50ms\"\nretry_on = [75, 1]",
    );
    t.run().status(2);
    assert_eq!(runs(&t), 1, "exit 2 is not in retry_on");
    let t = flaky(
        1,
        75,
        "retries = 3\nretry_delay = \"50ms\"\nretry_on = [75, 1]",
    );
    t.run().status(0);
    assert_eq!(runs(&t), 2);
}

#[test]
fn all_attempts_stay_within_the_tasks_timeout() {
    let t = flaky(
        99,
        1,
        "retries = 10\nretry_delay = \"400ms\"\ntimeout = \"2s\"",
    );
    let out = t.run();
    out.status(1)
        .stderr_has("before another attempt would pass the task's timeout (or the release's)");
    // 0.4 + 0.8 (+ 1.6 would pass 2 s): three attempts; two on a machine so loaded that a start
    // takes 0.4 s. Never the eleven that `retries` allows.
    assert!((2..=3).contains(&runs(&t)), "{} runs", runs(&t));
    assert!(out.elapsed < Duration::from_secs(10), "{:?}", out.elapsed);
    // A task that times out as a whole is not tried again.
    let t = Test::new().config(
        "[tasks.slow]\nrun = \"echo run >> runs; sleep 30\"\ntimeout = \"1s\"\nretries = 3\nretry_delay = \"10ms\"\ngrace = \"1s\"\n",
    );
    t.run().status(124);
    assert_eq!(runs(&t), 1);
}

#[test]
fn a_timed_out_attempt_is_retried_only_when_retry_on_says_timeout() {
    let task = "[tasks.slow]\nrun = \"echo run >> runs; test $(wc -l < runs) -gt 1 || sleep 30\"\n\
                retries = 2\nretry_delay = \"10ms\"\nattempt_timeout = \"1s\"\ngrace = \"1s\"\n";
    let t = Test::new().config(task);
    t.run()
        .status(124)
        .stderr_has("task started task=slow command=\"echo run >> runs; test $(wc -l < runs) -gt 1 || sleep 30\" timeout_s=1\n")
        .stderr_has("task timed out; sending SIGTERM to its process group, SIGKILL after the grace period task=slow bound=attempt_timeout limit=1s grace_s=1")
        .stderr_has("not trying again: the attempt ran past attempt_timeout, and retry_on does not list \"timeout\"");
    assert_eq!(runs(&t), 1);
    // The second attempt gets what is left of the timeout, less than a second: said as it is, not
    // as 0, and its timeout named by the timeout's own value.
    let t = Test::new().config(
        "[tasks.slow]\nrun = \"sleep 30\"\ntimeout = \"3s\"\nretries = 1\nretry_delay = \"10ms\"\n\
         attempt_timeout = \"2s\"\nretry_on = [\"timeout\"]\ngrace = \"100ms\"\n",
    );
    let out = t.run();
    out.status(124)
        .stderr_has("timeout_s=2\n")
        .stderr_has("bound=attempt_timeout limit=2s grace_s=0.1")
        .stderr_has("bound=timeout limit=3s grace_s=0.1")
        .stderr_lacks("timeout_s=0\n");
    let second = out
        .stderr
        .lines()
        .filter(|l| l.contains("task started"))
        .nth(1);
    assert!(
        second.is_some_and(|l| l.contains(" timeout_s=0.")),
        "{}",
        out.stderr
    );
    let t = Test::new().config(&format!("{task}retry_on = [\"timeout\"]\n"));
    t.run().status(0);
    assert_eq!(runs(&t), 2);
}

#[test]
fn a_stop_signal_ends_the_pause_between_attempts_at_once() {
    let t = flaky(99, 1, "retries = 3\nretry_delay = \"30s\"");
    let running = t.spawn();
    running.wait_for("attempt failed; trying again", Duration::from_secs(20));
    let sent = std::time::Instant::now();
    running.signal("TERM");
    let out = running.wait();
    out.status(143)
        .stderr_has("received signal; no further attempt or task will start");
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(runs(&t), 1);
}

/// A bad value of a task's key names the task as well as the key and the line, as `retries = 11`
/// does: in a file with twenty tasks, "`retry_delay` is zero" alone leaves the reader counting
/// lines.
#[test]
fn a_bad_retry_delay_or_attempt_timeout_names_the_task_and_the_key() {
    let out = Test::new()
        .config(
            "[tasks.purge]\nrun = \"p\"\nretries = 2\nretry_delay = \"0s\"\nattempt_timeout = \"soon\"\n\
             [tasks.warm]\nrun = \"w\"\nretries = 1\nretry_delay = 5\ntimeout = \"-1s\"\ngrace = \"100000h\"\n",
        )
        .run_with(&["check"]);
    out.status(78);
    assert_eq!(
        out.stderr,
        "release-tasks: error: release.toml has 5 problems; nothing was run
  release.toml:4:15: task `purge`: `retry_delay` is zero; give a positive duration like \"30s\" or \"15m\"
  release.toml:5:19: task `purge`: `attempt_timeout = \"soon\"` is not a duration (expected number at 0); write a number and a unit, like \"90s\", \"15m\" or \"1h 30m\"
  release.toml:9:15: task `warm`: invalid type: integer `5`, expected a string; put the value in quotes, like \"3000\" (key `retry_delay`)
  release.toml:10:11: task `warm`: `timeout = \"-1s\"` is not a duration (expected number at 0); write a number and a unit, like \"90s\", \"15m\" or \"1h 30m\"
  release.toml:11:9: task `warm`: `grace = \"100000h\"` is longer than the maximum of 30 days; give a shorter duration like \"15m\" or \"2h\"
"
    );
}
