//! Telling people: `on` failure/always, the notify task against a real HTTP server on loopback,
//! release metadata, report files, preflight, and redaction of secrets everywhere.

use std::time::Duration;

use crate::harness::Test;
use crate::webhook::Server;

const SECRET_PATH: &str = "/services/T0SECRET/B0SECRET/xoxbSECRETSECRET";

fn notify_config(extra: &str, first: &str) -> String {
    format!(
        r#"
[tasks.migrate]
run = "{first}"
[tasks.notify]
notify = {{ url = "${{RELEASE_WEBHOOK_URL}}", headers = {{ Authorization = "Bearer ${{HOOK_TOKEN}}" }} {extra} }}
on = "always"
"#
    )
}

fn heroku(t: Test, server: &Server) -> Test {
    t.env("RELEASE_WEBHOOK_URL", &server.url(SECRET_PATH))
        .env("HOOK_TOKEN", "tok-SECRET-123")
        .env("HEROKU_APP_NAME", "shop")
        .env("HEROKU_RELEASE_VERSION", "v42")
        .env(
            "HEROKU_SLUG_COMMIT",
            "2c3a0b24069af49b3de35b8e8c26765c1dba9ff0",
        )
}

#[test]
fn a_successful_release_is_reported_as_json() {
    let server = Server::start(&[200], Duration::ZERO);
    let t = heroku(
        Test::new().config(&notify_config("", "echo migrated")),
        &server,
    );
    t.run()
        .status(0)
        .stderr_has("the webhook took the report")
        .stderr_has("app=shop version=v42");
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, SECRET_PATH);
    assert_eq!(
        got[0].header("authorization"),
        Some("Bearer tok-SECRET-123")
    );
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    let report = got[0].json();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["app"], "shop");
    assert_eq!(report["version"], "v42");
    assert_eq!(report["commit"], "2c3a0b24069af49b3de35b8e8c26765c1dba9ff0");
    assert_eq!(report["platform"], "heroku");
    assert_eq!(report["tasks"][0]["name"], "migrate");
    assert_eq!(report["tasks"][0]["outcome"], "succeeded");
    assert!(
        report["started_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );
    assert!(report["duration_ms"].is_u64());
}

#[test]
fn a_failed_release_is_reported_and_keeps_its_exit_code() {
    let server = Server::start(&[200], Duration::ZERO);
    let t = heroku(Test::new().config(&notify_config("", "exit 3")), &server);
    t.run().status(3);
    let report = server.received()[0].json();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["failed_task"], "migrate");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["tasks"][0]["exit_code"], 3);
}

#[test]
fn a_503_is_retried_with_backoff() {
    let server = Server::start(&[503, 200], Duration::ZERO);
    let t = heroku(Test::new().config(&notify_config("", "true")), &server);
    t.run()
        .status(0)
        .stderr_has("webhook not reached; retrying")
        .stderr_has("HTTP 503");
    assert_eq!(server.received().len(), 2);
}

#[test]
fn a_400_is_not_retried_and_fails_the_task() {
    let server = Server::start(&[400, 200], Duration::ZERO);
    let t = heroku(Test::new().config(&notify_config("", "true")), &server);
    t.run()
        .status(1)
        .stderr_has("the webhook answered HTTP 400")
        .stderr_has("task=notify outcome=failed");
    assert_eq!(server.received().len(), 1);

    let server = Server::start(&[400], Duration::ZERO);
    let t = heroku(
        Test::new().config(&format!(
            "{}allow_failure = true\n",
            notify_config("", "true")
        )),
        &server,
    );
    t.run().status(0).stderr_has("allow_failure=true");
}

#[test]
fn a_slow_webhook_times_out() {
    let server = Server::start(&[200], Duration::from_secs(10));
    let t = heroku(
        Test::new().config(&notify_config(", timeout = \"1s\", retries = 0", "true")),
        &server,
    );
    let out = t.run();
    out.status(1)
        .stderr_has("cannot reach the webhook")
        .stderr_has("task=notify outcome=failed");
    assert!(out.elapsed < Duration::from_secs(8), "{:?}", out.elapsed);
}

#[test]
fn an_unreachable_webhook_fails_after_its_retries() {
    // A port that was just free: connection refused, the retryable kind of error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Test::new()
        .config(&notify_config(", retries = 1", "true"))
        .env(
            "RELEASE_WEBHOOK_URL",
            &format!("http://127.0.0.1:{port}{SECRET_PATH}"),
        )
        .env("HOOK_TOKEN", "x");
    t.run().status(1).stderr_has("after 2 attempts");
}

#[test]
fn slack_format_sends_readable_text() {
    let server = Server::start(&[200], Duration::ZERO);
    let t = heroku(
        Test::new().config(&notify_config(", format = \"slack\"", "exit 3")),
        &server,
    );
    t.run().status(3);
    let body = server.received()[0].json();
    let text = body["text"].as_str().expect("text");
    assert!(text.starts_with(":x: shop v42 (2c3a0b2) failed"), "{text}");
    assert!(
        text.contains("task `migrate` failed with exit code 3"),
        "{text}"
    );
    assert!(
        text.contains("• migrate: failed with exit code 3"),
        "{text}"
    );
}

#[test]
fn on_failure_and_always_run_after_a_failure_without_hiding_its_code() {
    let config = r#"
[tasks.maintenance-on]
run = "echo on >> log"
[tasks.migrate]
run = "echo migrate >> log; exit 3"
[tasks.seed]
run = "echo seed >> log"
[tasks.rollback]
run = "echo rollback >> log; exit 5"
on = "failure"
[tasks.maintenance-off]
run = "echo off >> log"
on = "always"
"#;
    let t = Test::new().config(config);
    t.run()
        .status(3)
        .stderr_has("task=rollback outcome=failed exit_code=5");
    assert_eq!(
        std::fs::read_to_string(t.path("log")).unwrap(),
        "on\nmigrate\nrollback\noff\n"
    );

    let t = Test::new().config(&config.replace("; exit 3", ""));
    t.run()
        .status(0)
        .stderr_has("on = \\\"failure\\\" and the release has not failed");
    assert_eq!(
        std::fs::read_to_string(t.path("log")).unwrap(),
        "on\nmigrate\nseed\noff\n"
    );

    // An `always` task that fails after a successful release fails it.
    let t = Test::new()
        .config("[tasks.a]\nrun = \"true\"\n[tasks.b]\nrun = \"exit 6\"\non = \"always\"\n");
    t.run().status(6);
}

#[test]
fn on_always_runs_after_a_timeout_and_after_sigterm() {
    let t = Test::new().config(
        "[tasks.slow]\nrun = \"sleep 30\"\ntimeout = \"1s\"\ngrace = \"1s\"\n[tasks.off]\nrun = \"touch off\"\non = \"always\"\n",
    );
    t.run().status(124);
    assert!(t.path("off").exists());

    let t = Test::new().config(
        "[tasks.slow]\nrun = \"echo ready; sleep 30\"\ngrace = \"1s\"\n[tasks.off]\nrun = \"touch off\"\non = \"always\"\n[tasks.never]\nrun = \"touch never\"\n",
    );
    let running = t.spawn_until("| ready");
    running.signal("TERM");
    running.wait().status(143);
    assert!(t.path("off").exists());
    assert!(!t.path("never").exists());
}

#[test]
fn report_files_in_json_and_junit() {
    let t = Test::new()
        .config(
            "[tasks.a]\nrun = \"true\"\n[tasks.b]\nrun = \"exit 2\"\n[tasks.c]\nrun = \"true\"\n",
        )
        .env("RELEASE_TASKS_JUNIT", "junit.xml")
        .args(&["--report", "report.json"]);
    t.run().status(2);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(report["tasks"][2]["outcome"], "not-run");
    let junit = std::fs::read_to_string(t.path("junit.xml")).unwrap();
    assert!(
        junit.contains("tests=\"3\" failures=\"1\" skipped=\"1\""),
        "{junit}"
    );
    assert!(
        junit.contains("<testcase classname=\"release-tasks\" name=\"b\""),
        "{junit}"
    );

    Test::new()
        .config("[tasks.a]\nrun = \"touch a\"\n")
        .args(&["--report", "no/such/dir/r.json"])
        .run()
        .status(2)
        .stderr_has("cannot create the file");
}

#[test]
fn preflight_names_every_missing_variable_before_anything_runs() {
    let t = Test::new()
        .config("[require]\nenv = [\"DATABASE_URL\", \"SECRET_KEY_BASE\", \"PRESENT\"]\n[tasks.a]\nrun = \"touch a\"\n")
        .env("SECRET_KEY_BASE", "")
        .env("PRESENT", "yes");
    t.run()
        .status(78)
        .stderr_has("DATABASE_URL is required by [require] env in release.toml but is not set")
        .stderr_has("SECRET_KEY_BASE is required by [require] env in release.toml but is empty")
        .stderr_lacks("PRESENT is required");
    assert!(!t.path("a").exists());
}

#[test]
fn check_warns_of_what_run_would_lack_in_the_log_format_asked_for() {
    let t = Test::new().config("[require]\nenv = [\"DATABASE_URL\"]\n[tasks.a]\nrun = \"true\"\n");
    t.run_with(&["check"])
        .status(0)
        .stderr_has("warning: DATABASE_URL is required by [require] env");
    let out = t.run_with(&["check", "--log-format", "json"]);
    out.status(0);
    let events: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["level"], "WARN");
    assert!(
        events[0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("DATABASE_URL"))
    );
}

#[test]
fn an_unset_webhook_variable_is_an_error_naming_it() {
    let t = Test::new()
        .config(&notify_config("", "touch ran"))
        .env("HOOK_TOKEN", "x");
    t.run()
        .status(78)
        .stderr_has("notify url uses ${RELEASE_WEBHOOK_URL}, which is not set");
    assert!(!t.path("ran").exists());
}

#[test]
fn secrets_never_reach_any_output() {
    let server = Server::start(&[503, 400], Duration::ZERO);
    let secrets = [
        "T0SECRET",
        "xoxbSECRETSECRET",
        "tok-SECRET-123",
        "hunter2-SECRET",
        "sk_live_SECRET",
        "gatevalue-SECRET",
    ];
    let config = format!(
        r#"
[tasks.migrate]
run = "echo migrating"
when = {{ env = "API_TOKEN", equals = "gatevalue-SECRET" }}
[tasks.notify]
notify = {{ url = "${{RELEASE_WEBHOOK_URL}}", headers = {{ Authorization = "Bearer ${{HOOK_TOKEN}}" }} }}
on = "always"
[tasks.literal]
notify = {{ url = "{}" }}
on = "always"
"#,
        server.url(SECRET_PATH)
    );
    let base = || {
        heroku(Test::new().config(&config), &server)
            .env(
                "DATABASE_URL",
                "postgres://app:hunter2-SECRET@db.internal:5432/app",
            )
            .env("STRIPE_SECRET_KEY", "sk_live_SECRET")
            .env("API_TOKEN", "gatevalue-SECRET")
    };
    for format in ["text", "json"] {
        for cmd in ["run", "plan", "check"] {
            let out = base().args(&[cmd, "--log-format", format]).run();
            let all = format!("{}{}", out.stdout(), out.stderr);
            for secret in secrets {
                assert!(
                    !all.contains(secret),
                    "`{cmd}` ({format}) printed {secret}:\n{all}"
                );
            }
            assert!(
                all.contains("127.0.0.1") || cmd == "check",
                "the host stays visible:\n{all}"
            );
        }
    }
    // An invalid gate value of a secret variable is not echoed either.
    let out = base()
        .env("API_TOKEN", "ture")
        .config("[tasks.a]\nrun = \"x\"\nwhen = \"API_TOKEN\"\n")
        .run();
    out.status(78).stderr_has("API_TOKEN=\"[redacted]\"");
}

#[test]
fn sigterm_during_a_hung_webhook_ends_the_notify_task_within_the_grace() {
    let server = Server::start(&[200], Duration::from_secs(60));
    let t = heroku(
        Test::new().config(&format!(
            "[defaults]\ngrace = \"2s\"\n{}[tasks.off]\nrun = \"touch off\"\non = \"always\"\n",
            notify_config("", "true")
        )),
        &server,
    );
    let running = t.spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.received().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no request came:\n{}",
            running.seen()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // No process runs during a notify task: SIGUSR1 reaches nobody, and the log does not pretend.
    running.signal("USR1");
    running.wait_for("no task process is running", Duration::from_secs(10));
    running.signal("TERM");
    let sent = std::time::Instant::now();
    let out = running.wait();
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} after SIGTERM:\n{}",
        out.stderr
    );
    out.status(143)
        .stderr_has("cancelling the webhook delivery")
        .stderr_has("task=notify outcome=interrupted")
        .stderr_lacks("retrying")
        .stderr_lacks("signal forwarded");
    assert!(t.path("off").exists(), "the always task did not run");
    assert_eq!(server.received().len(), 1);
}

#[test]
fn a_timed_out_notify_task_sends_nothing_more() {
    let server = Server::start(&[503], Duration::ZERO);
    let t = heroku(
        Test::new().config(&format!(
            "{}timeout = \"1s\"\n[tasks.later]\nrun = \"sleep 5\"\non = \"always\"\n",
            notify_config(", retries = 6", "true")
        )),
        &server,
    );
    let running = t.spawn_until("task=notify outcome=timed-out");
    std::thread::sleep(Duration::from_millis(300));
    let at_timeout = server.received().len();
    let out = running.wait();
    out.status(124);
    std::thread::sleep(Duration::from_millis(500));
    assert!(at_timeout >= 1);
    assert_eq!(
        server.received().len(),
        at_timeout,
        "requests after the notify task timed out:\n{}",
        out.stderr
    );
    let after = out
        .stderr
        .split("task=notify outcome=timed-out")
        .nth(1)
        .unwrap();
    assert!(!after.contains("retrying"), "{}", out.stderr);
}
