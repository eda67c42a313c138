//! Secrets, by value: a secret from the environment, an `--env-file` or the config is hidden in
//! everything release-tasks prints or writes, in every form, while short values are not.

use std::time::Duration;

use crate::harness::Test;
use crate::webhook::Server;

const TOKEN: &str = "tok-3f9a7c1e5b";
const PEM: &str =
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----";

/// A failing task that prints the secrets (task output is its own business; what release-tasks
/// copies of it is not), and a notify task that reports the failure.
fn config(port: u16) -> String {
    format!(
        r#"
[tasks.leak]
run = "printf '%s\n' \"$API_TOKEN\" \"$SIGNING_KEY\" \"$(printf %s \"$API_TOKEN\" | od -An -c | tr -d ' \n')\"; echo \"url=https://x.example/?t=$ENCODED\"; exit 3"
[tasks.tell]
notify = {{ url = "http://127.0.0.1:{port}/hooks/${{HOOK_PATH}}", headers = {{ Authorization = "Bearer ${{HOOK_TOKEN}}" }} }}
on = "always"
"#
    )
}

#[test]
fn a_secret_value_is_hidden_in_logs_reports_junit_webhooks_and_the_tail() {
    let server = Server::start(&[200], Duration::ZERO);
    let t = Test::new()
        .config(&config(server.port))
        .file(
            ".env",
            &format!("SIGNING_KEY=\"{PEM}\"\nHOOK_PATH=hook-path-77x\n"),
        )
        .env("API_TOKEN", TOKEN)
        .env("ENCODED", "tok-3f9a7c1e5b%2Fextra")
        .env("HOOK_TOKEN", "hook-bearer-91")
        .env("RETRIES", "1")
        .args(&[
            "--env-file",
            ".env",
            "--report",
            "r.json",
            "--junit",
            "j.xml",
        ]);
    let out = t.run();
    out.status(3);
    let report = std::fs::read_to_string(t.path("r.json")).unwrap();
    let junit = std::fs::read_to_string(t.path("j.xml")).unwrap();
    let sent = server.received();
    assert_eq!(sent.len(), 1);
    let body = String::from_utf8_lossy(&sent[0].body).into_owned();
    // The task's own output went through as it was.
    assert!(out.stdout().contains(TOKEN), "{}", out.stdout());
    for (what, text) in [
        ("stderr", out.stderr.as_str()),
        ("report", &report),
        ("junit", &junit),
        ("webhook body", &body),
    ] {
        for secret in [
            TOKEN,
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
            "hook-path-77x",
            "hook-bearer-91",
        ] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
        assert!(text.contains("[redacted]"), "{what}:\n{text}");
    }
    // The tail is there, with the secrets hidden line by line.
    assert!(report.contains("[redacted]"), "{report}");
    // A short value is not a secret: exit codes and counts stay readable.
    assert!(out.stderr.contains("exit_code=3"), "{}", out.stderr);
}

#[test]
fn check_plan_and_errors_hide_secrets_from_the_environment() {
    let t = Test::new()
        .config(
            "[tasks.gated]\nrun = \"true\"\nwhen = { env = \"DEPLOY_WHEN\", equals = \"go\" }\n\
             [tasks.deploy]\nrun = \"./deploy --user admin --password hunter2-literal x\"\n",
        )
        .env("DB_PASSWORD", "s3cr3t-pw-value")
        .env("DEPLOY_WHEN", "s3cr3t-pw-value");
    // DEPLOY_WHEN is not secret-looking, but its value is DB_PASSWORD's: hidden by value.
    let out = t.run_with(&["plan"]);
    out.status(0)
        .stdout_lacks("s3cr3t-pw-value")
        .stdout_lacks("hunter2-literal")
        .stdout_has("--password [redacted] x");
    let out = t.run_with(&["run"]);
    out.status(127)
        .stderr_has("task skipped task=gated")
        .stderr_lacks("s3cr3t-pw-value")
        .stderr_lacks("hunter2-literal")
        .stderr_has("command=\"./deploy --user admin --password [redacted] x\"");
}

#[test]
fn a_short_or_plain_value_of_a_secret_looking_variable_masks_nothing() {
    Test::new()
        .config("[tasks.t]\nrun = \"sh -c 'exit 1'\"\n")
        .env("AUTH_ENABLED", "true")
        .env("SESSION_TTL", "1")
        .env("API_KEY", "abc")
        .run()
        .status(1)
        .stderr_has("exit_code=1")
        .stderr_has("task=t")
        .stderr_lacks("[redacted]");
}

#[test]
fn env_files_layer_as_a_shell_sources_them() {
    Test::new()
        .config("[tasks.t]\nrun = [\"sh\", \"-c\", \"echo $DATABASE_HOST_URL $A $B\"]\n")
        .file(".env", "DB_HOST=db.internal\nA=first\nA=second\nB=${A}\n")
        .file(
            ".env.local",
            "DATABASE_HOST_URL=postgres://${DB_HOST}/app\nA=local\n",
        )
        .args(&["--env-file", ".env", "--env-file", ".env.local"])
        .run()
        .status(0)
        .stdout_has("postgres://db.internal/app local second\n");
}

#[test]
fn an_env_file_error_never_quotes_a_multi_line_secret() {
    Test::new()
        .config("[tasks.t]\nrun = \"true\"\n")
        .file(
            ".env",
            "A=1\nAPI_TOKEN=\"first line\nrest-of-the-SECRET-9\" x\n",
        )
        .args(&["--env-file", ".env"])
        .run()
        .status(78)
        .stderr_has(".env:3:23: unexpected text after the value of API_TOKEN")
        .stderr_lacks("SECRET-9")
        .stderr_lacks("first line");
}

#[test]
fn an_env_file_that_is_a_device_is_refused_unread() {
    Test::new()
        .config("[tasks.t]\nrun = \"true\"\n")
        .args(&["--env-file", "/dev/zero"])
        .run()
        .status(2)
        .stderr_has("--env-file /dev/zero: it is not a regular file");
}

/// A line cut at the tail's length limit in the middle of a secret shows none of it: here a URL's
/// password (not a secret-looking name), which only the collected values know.
#[test]
fn a_tail_line_cut_inside_a_secret_shows_no_part_of_it() {
    let t = Test::new()
        .config(
            "[tasks.t]\nrun = [\"sh\", \"-c\", \"printf '%1015s%s\\\\n' x \\\"$PW\\\"; exit 1\"]\n",
        )
        .env("REDIS_URL", "redis://:pw-abcdefgh-123@cache:6379")
        .env("PW", "pw-abcdefgh-123")
        .args(&["--report", "r.json"]);
    t.run().status(1);
    let report = std::fs::read_to_string(t.path("r.json")).unwrap();
    assert!(report.contains("…"), "the line was cut: {report}");
    assert!(!report.contains("pw-a"), "{report}");
}

/// The shape rules hide a quoted value whole: the word after `--password` is the shell's word
/// (`'two words'`), an array item is one argument (`"--password", "pw two"`, `"API_TOKEN=a b"`), and
/// an escaped quote inside it (`q\"uote`, as an array item is shown) does not end it.
#[test]
fn a_quoted_secret_in_a_command_is_hidden_whole() {
    let t = Test::new().config(
        r#"
[tasks.shell]
run = "./tool --password 'first-half second-half' --token \"dq-one dq-two\" -H 'X-Api-Key: hk\" hk-tail' --password=a\\ b-escaped"
[tasks.array]
run = ["env", "API_TOKEN=arr-one arr-two", "./tool", "--password", "pw-one pw-two", "--password=eq-one eq-two", "--token", "q\"uote-tail secret-tail", "-H", "X-Api-Key: h\"1 h-tail"]
"#,
    );
    let plan = t.run_with(&["plan"]);
    plan.status(0);
    let run = t.run();
    run.status(127);
    for (what, text) in [("plan", plan.stdout()), ("run", run.stderr.clone())] {
        for leak in [
            "second-half",
            "dq-two",
            "hk-tail",
            "b-escaped",
            "arr-two",
            "pw-two",
            "eq-two",
            "uote-tail",
            "secret-tail",
            "h-tail",
        ] {
            assert!(!text.contains(leak), "{what} shows {leak}:\n{text}");
        }
    }
    plan.stdout_has("./tool --password '[redacted]' --token \"[redacted]\"")
        .stdout_has(r#"["env", "API_TOKEN=[redacted]", "./tool", "--password", "[redacted]", "--password=[redacted]", "--token", "[redacted]", "-H", "X-Api-Key: [redacted]"]"#);
}

/// A secret with a carriage return at its end (a secret file saved on Windows) or with spaces
/// around it is printed without them (the tail keeps what a terminal shows, and `echo $X` splits
/// words): it is hidden in that form too, in the tail, the `release failed` line and the report.
#[test]
fn a_secret_with_a_carriage_return_or_spaces_around_it_is_hidden_as_printed() {
    let t = Test::new()
        .config("[tasks.leak]\nrun = \"printf 't=%s\\\\n' \\\"$API_TOKEN\\\"; echo u=$DB_PASSWORD; exit 1\"\n")
        .env("API_TOKEN", "crlf-secret-41\r")
        .env("DB_PASSWORD", "  spaced-secret-42  ")
        .args(&["--report", "r.json"]);
    let out = t.run();
    out.status(1);
    let report = std::fs::read_to_string(t.path("r.json")).unwrap();
    for (what, text) in [("stderr", out.stderr.as_str()), ("report", &report)] {
        for leak in ["crlf-secret-41", "spaced-secret-42"] {
            assert!(!text.contains(leak), "{what} shows {leak}:\n{text}");
        }
    }
    assert!(
        report.contains(r#""output_tail":["t=[redacted]","u= [redacted]"]"#),
        "{report}"
    );
}

/// A NUL byte in a `.env` value (a binary file named by mistake, a secret pasted with one) cannot
/// be put in the environment: a config error naming the place, not a panic that prints the value.
#[test]
fn an_env_file_with_a_nul_byte_is_an_error_that_never_quotes_it() {
    for command in ["check", "run"] {
        Test::new()
            .config("[tasks.t]\nrun = \"true\"\n")
            .file(".env", "A=1\nAPI_TOKEN=ab\0nul-SECRET-7\n")
            .args(&["--env-file", ".env"])
            .run_with(&[command])
            .status(78)
            .stderr_has(".env:2:13: a NUL byte")
            .stderr_lacks("SECRET-7")
            .stderr_lacks("panicked");
    }
}

/// A gate's value is quoted as Rust writes a string (`"a\u{1}b"`), which escapes a control
/// character unlike JSON (`\u0001`): a secret holding one is hidden in that form too, in `plan`, the
/// log and the report.
#[test]
fn a_secret_with_a_control_character_is_hidden_where_a_gate_quotes_it() {
    let secret = "ctl-\u{1}-secret-\u{7f}-end";
    let t = Test::new()
        .config(
            "[tasks.gated]\nrun = \"true\"\nwhen = { env = \"DEPLOY_WHEN\", equals = \"go\" }\n",
        )
        .env("API_TOKEN", secret)
        .env("DEPLOY_WHEN", secret)
        .args(&["--report", "r.json", "--junit", "j.xml"]);
    let plan = t.run_with(&["plan"]);
    plan.status(0).stdout_has("DEPLOY_WHEN=\"[redacted]\"");
    let run = t.run();
    run.status(0);
    let report = std::fs::read_to_string(t.path("r.json")).unwrap();
    let junit = std::fs::read_to_string(t.path("j.xml")).unwrap();
    for (what, text) in [
        ("plan", plan.stdout()),
        ("log", run.stderr.clone()),
        ("report", report),
        ("junit", junit),
    ] {
        assert!(
            !text.contains("-secret-"),
            "{what} shows the secret:\n{text}"
        );
    }
}

/// A panic (a bug) may quote a value, as `std::env::set_var` once quoted a `.env` value: its message
/// goes through the same masking as every other line. The debug build's test panic says
/// "`RELEASE_TASKS_TEST_PANIC` is set"; here that name is also a secret's value.
#[test]
fn a_panic_message_is_masked_too() {
    Test::new()
        .config("[tasks.t]\nrun = \"true\"\n")
        .env("RELEASE_TASKS_TEST_PANIC", "1")
        .env("API_TOKEN", "RELEASE_TASKS_TEST_PANIC")
        .run()
        .status(70)
        .stderr_has("panicked")
        .stderr_has("[redacted] is set")
        .stderr_lacks("RELEASE_TASKS_TEST_PANIC is set");
}
