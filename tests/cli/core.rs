//! The core contract: gates, order, abort, exit codes, timeouts, output, config errors, plan and check.

use std::time::Duration;

use crate::harness::{Test, alive, gone_within, read_pid, strip_prefix};

const GATED: &str = r#"
[tasks.migrate]
run = "echo migrated > migrated"
when = "RUN_MIGRATIONS_DURING_RELEASE"
"#;

#[test]
fn true_values_run_the_task() {
    for value in ["true", "TRUE", "1", "yes", "on", "On"] {
        let t = Test::new()
            .config(GATED)
            .env("RUN_MIGRATIONS_DURING_RELEASE", value);
        t.run().status(0);
        assert!(t.path("migrated").exists(), "{value} should run the task");
    }
}

#[test]
fn false_empty_and_unset_values_skip_the_task() {
    for value in [
        Some("false"),
        Some("0"),
        Some("no"),
        Some("OFF"),
        Some(""),
        None,
    ] {
        let mut t = Test::new().config(GATED);
        if let Some(v) = value {
            t = t.env("RUN_MIGRATIONS_DURING_RELEASE", v);
        }
        t.run().status(0).stderr_has("task skipped");
        assert!(
            !t.path("migrated").exists(),
            "{value:?} should skip the task"
        );
    }
}

#[test]
fn a_typo_in_a_gate_value_stops_everything_before_it_starts() {
    let t = Test::new()
        .config(&format!("[tasks.first]\nrun = \"touch first\"\n{GATED}"))
        .env("RUN_MIGRATIONS_DURING_RELEASE", "ture");
    t.run()
        .status(78)
        .stderr_has("RUN_MIGRATIONS_DURING_RELEASE=\"ture\" is not a boolean")
        .stderr_has("task `migrate`")
        .stderr_has("nothing was run");
    assert!(!t.path("first").exists());
    Test::new()
        .config(GATED)
        .env("RUN_MIGRATIONS_DURING_RELEASE", "2")
        .args(&["check"])
        .run()
        .status(78);
}

#[test]
fn equals_in_set_arrays_and_unless() {
    let config = r#"
[tasks.prod]
run = "touch prod"
when = { env = "APP_ENV", equals = "production" }
[tasks.staged]
run = "touch staged"
when = { env = "APP_ENV", in = ["staging", "production"] }
[tasks.hooked]
run = "touch hooked"
when = { env = "HOOK", set = true }
[tasks.both]
run = "touch both"
when = ["MIGRATE", { env = "APP_ENV", equals = "production" }]
[tasks.seed]
run = "touch seed"
unless = { env = "APP_ENV", equals = "production" }
"#;
    let t = Test::new()
        .config(config)
        .env("APP_ENV", "production")
        .env("MIGRATE", "yes")
        .env("HOOK", "");
    t.run().status(0);
    let made: Vec<bool> = ["prod", "staged", "hooked", "both", "seed"]
        .iter()
        .map(|f| t.path(f).exists())
        .collect();
    assert_eq!(made, [true, true, false, true, false]);

    let t = Test::new()
        .config(config)
        .env("APP_ENV", "staging")
        .env("HOOK", "x");
    t.run().status(0);
    let made: Vec<bool> = ["prod", "staged", "hooked", "both", "seed"]
        .iter()
        .map(|f| t.path(f).exists())
        .collect();
    assert_eq!(made, [false, true, true, false, true]);
}

#[test]
fn tasks_run_in_file_order_with_after() {
    let t = Test::new().config(
        r#"
[tasks.notify]
run = "echo notify >> order"
after = ["cache"]
[tasks.migrate]
run = "echo migrate >> order"
[tasks.cache]
run = "echo cache >> order"
after = ["migrate"]
[tasks.last]
run = "echo last >> order"
"#,
    );
    t.run().status(0);
    let order = std::fs::read_to_string(t.path("order")).unwrap();
    assert_eq!(order, "migrate\ncache\nnotify\nlast\n");
}

#[test]
fn a_failure_aborts_with_its_own_exit_code() {
    let t = Test::new().config(
        r#"
[tasks.one]
run = "touch one"
[tasks.two]
run = "exit 3"
[tasks.three]
run = "touch three"
"#,
    );
    t.run()
        .status(3)
        .stderr_has("release failed")
        .stderr_has("failed_task=two")
        .stderr_has("task=three outcome=not-run");
    assert!(t.path("one").exists());
    assert!(!t.path("three").exists());
}

#[test]
fn allow_failure_reports_and_goes_on() {
    let t = Test::new().config(
        r#"
[tasks.flaky]
run = "exit 9"
allow_failure = true
[tasks.after]
run = "touch after"
"#,
    );
    t.run()
        .status(0)
        .stderr_has("task=flaky outcome=failed exit_code=9")
        .stderr_has("allow_failure=true");
    assert!(t.path("after").exists());
}

#[test]
fn exit_codes_for_signals_missing_and_unrunnable_commands() {
    Test::new()
        .config("[tasks.a]\nrun = \"kill -9 $$\"\n")
        .run()
        .status(137)
        .stderr_has("killed by SIGKILL");
    Test::new()
        .config("[tasks.a]\nrun = [\"no-such-command-xyz\"]\n")
        .run()
        .status(127)
        .stderr_has("command not found: `no-such-command-xyz`");
    Test::new()
        .config("[tasks.a]\nrun = \"no-such-command-xyz\"\n")
        .run()
        .status(127);
    let t = Test::new()
        .config("[tasks.a]\nrun = [\"./script\"]\n")
        .file("script", "#!/bin/sh\necho hi\n");
    t.run().status(126).stderr_has("is it executable");
}

#[test]
fn env_and_dir_apply_to_the_task() {
    let t = Test::new().config(
        "[tasks.a]\nrun = \"echo $GREETING > greeting; pwd > where\"\nenv = { GREETING = \"hello\" }\ndir = \"sub\"\n",
    );
    std::fs::create_dir(t.path("sub")).unwrap();
    t.run().status(0);
    assert_eq!(
        std::fs::read_to_string(t.path("sub/greeting")).unwrap(),
        "hello\n"
    );
    let where_ = std::fs::read_to_string(t.path("sub/where")).unwrap();
    assert!(where_.trim_end().ends_with("/sub"), "{where_}");
}

#[test]
fn a_timeout_kills_the_whole_group_grandchildren_too() {
    let t = Test::new().config(
        r#"
[tasks.stuck]
run = "sh -c 'sleep 300 & echo $! > grandchild; wait' & wait"
timeout = "1s"
grace = "2s"
[tasks.never]
run = "touch never"
"#,
    );
    let out = t.run();
    out.status(124)
        .stderr_has("task timed out")
        .stderr_has("outcome=timed-out");
    let grandchild = read_pid(&t.path("grandchild"));
    assert!(
        gone_within(grandchild, Duration::from_secs(5)),
        "grandchild {grandchild} survived the timeout"
    );
    assert!(!t.path("never").exists());
    assert!(
        out.elapsed < Duration::from_secs(20),
        "took {:?}",
        out.elapsed
    );
}

#[test]
fn grace_escalates_to_sigkill_for_a_task_that_ignores_sigterm() {
    let t = Test::new().config(
        r#"
[tasks.stubborn]
run = "trap '' TERM; echo $$ > pid; while true; do sleep 0.1; done"
timeout = "1s"
grace = "1s"
"#,
    );
    let out = t.run();
    out.status(124).stderr_has("sending SIGKILL");
    assert!(
        out.elapsed >= Duration::from_secs(2),
        "SIGKILL came before the grace period: {:?}",
        out.elapsed
    );
    assert!(!alive(read_pid(&t.path("pid"))));
}

#[test]
fn a_background_process_holding_stdout_does_not_hang_the_release() {
    let t = Test::new().config(
        r#"
[tasks.leaky]
run = "sleep 300 & echo $! > bg; echo started"
grace = "2s"
[tasks.next]
run = "echo next"
"#,
    );
    let out = t.run();
    out.status(0)
        .stderr_has("left processes running")
        .stdout_has("next  | next");
    let bg = read_pid(&t.path("bg"));
    assert!(!alive(bg), "the background sleep {bg} outlived its task");
}

#[test]
fn output_passes_through_byte_for_byte() {
    // A 3 MB line, bytes that are not UTF-8, and a last line without a newline.
    let t = Test::new().config(
        r#"
[tasks.noisy]
run = "head -c 3000000 /dev/zero | tr '\\0' x; echo; printf '\\377\\376 latin1 \\351\\n'; printf 'no newline'"
"#,
    );
    let out = t.run();
    out.status(0);
    let mut want = vec![b'x'; 3_000_000];
    want.extend_from_slice(b"\n\xff\xfe latin1 \xe9\nno newline\n");
    let got = strip_prefix(&out.stdout, "noisy");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "output differs");
}

#[test]
fn stdout_and_stderr_keep_their_streams_and_prefix() {
    let t = Test::new().config(
        "[tasks.mixed]\nrun = \"echo to-out; echo to-err >&2\"\n[tasks.b]\nrun = \"echo b\"\n",
    );
    let out = t.run();
    out.status(0)
        .stdout_has("mixed | to-out\n")
        .stdout_has("b     | b\n")
        .stdout_lacks("to-err");
    out.stderr_has("mixed | to-err\n");
}

#[test]
fn config_errors_exit_78_with_file_line_and_a_hint() {
    let cases = [
        (
            "[tasks.a]\nrun = \"true\"\ntimout = \"5m\"\n",
            "release.toml:3:1: unknown field `timout` in task `a`; did you mean `timeout`?",
        ),
        ("[tasks.a]\nrun = \"true\n", "release.toml:2:"),
        (
            "[tasks.a]\nrun = \"\"\n",
            "release.toml:2:7: task `a`: `run` is empty",
        ),
        ("[tasks.a]\nwhen = \"X\"\n", "task `a` has no `run`"),
        (
            "[tasks.a]\nrun = \"x\"\ntimeout = \"soon\"\n",
            "is not a duration",
        ),
        (
            "[tasks.a]\nrun = \"x\"\ngrace = \"0s\"\n",
            "`grace` is zero",
        ),
        (
            "[tasks.a]\nrun = \"x\"\nafter = [\"b\"]\n",
            "`after` names `b`, which is not a task",
        ),
        (
            "[tasks.a]\nrun = \"x\"\nafter = [\"b\"]\n[tasks.b]\nrun = \"x\"\nafter = [\"a\"]\n",
            "makes a cycle among tasks a, b",
        ),
        (
            "[tasks.a]\nrun = \"x\"\nwhen = { env = \"A\", equal = \"x\" }\n",
            "unknown key `equal`",
        ),
        ("[default]\ntimeout = \"1m\"\n", "unknown field `default`"),
        (
            "[tasks.a]\nrun = \"x\"\nenv = { PORT = 3000 }\n",
            "release.toml:3:16: task `a`: invalid type: integer `3000`, expected a string; put the value in quotes",
        ),
        (
            "[tasks.a]\nrun = \"x\"\n[tasks.a]\nrun = \"y\"\n",
            "release.toml:3:8: duplicate table [tasks.a], first on line 1; each table, like each [tasks.NAME], \
             may appear only once: merge the two into one, or rename one",
        ),
        (
            "[tasks.a]\nrun = \"x\"\nenv = { A = \"1\" }\n\"run\" = \"y\"\n",
            "release.toml:4:1: duplicate key `run` in [tasks.a], first on line 2; each key may appear only once \
             in its table: remove one of them",
        ),
        (
            "[tasks]\na = 1\n",
            "expected a task table, like [tasks.migrate]",
        ),
        (
            "[lock]\nkey = \"x\"\n",
            "release.toml:1:1: [lock] needs the database: postgres = \"DATABASE_URL\" for PostgreSQL, or \
             mysql = \"DATABASE_URL\" for MySQL and MariaDB (the variable that holds the URL)",
        ),
        (
            "[lock]\npostgres = \"DATABASE_URL\"\nmysql = \"DATABASE_URL\"\n",
            "[lock] has both postgres and mysql; the lock is taken on one database: keep the one your app uses",
        ),
    ];
    for (config, needle) in cases {
        let t = Test::new().config(&format!(
            "{config}\n[tasks.zz-marker]\nrun = \"touch ran\"\n"
        ));
        for cmd in [&[][..], &["check"], &["plan"]] {
            t.run_with(cmd)
                .status(78)
                .stderr_has(needle)
                .stderr_has("nothing was run");
        }
        assert!(!t.path("ran").exists(), "a task ran despite: {needle}");
    }
}

#[test]
fn a_missing_config_says_how_to_write_one() {
    for cmd in [&[][..], &["plan"], &["check"]] {
        Test::new()
            .args(cmd)
            .run()
            .status(78)
            .stderr_has("no config file at release.toml")
            .stderr_has("release-tasks init");
    }
    Test::new()
        .args(&["-c", "elsewhere.toml"])
        .run()
        .status(78)
        .stderr_has("elsewhere.toml");
}

#[test]
fn plan_explains_each_decision_and_runs_nothing() {
    let t = Test::new()
        .config(
            r#"
[tasks.migrate]
run = "touch migrated"
when = "RUN_MIGRATIONS_DURING_RELEASE"
[tasks.seed]
run = "touch seeded"
when = "SEED_DB_DURING_RELEASE"
[tasks.hook]
run = "touch hooked"
when = { env = "API_TOKEN", equals = "s3cr3t-value" }
"#,
        )
        .env("RUN_MIGRATIONS_DURING_RELEASE", "true")
        .env("API_TOKEN", "s3cr3t-value");
    let out = t.run_with(&["plan"]);
    out.status(0)
        .stdout_has("run   migrate")
        .stdout_has("RUN_MIGRATIONS_DURING_RELEASE=\"true\"")
        .stdout_has("skip  seed")
        .stdout_has("SEED_DB_DURING_RELEASE is unset")
        .stdout_has("API_TOKEN=\"[redacted]\"")
        .stdout_lacks("s3cr3t-value");
    assert!(!t.path("migrated").exists() && !t.path("hooked").exists());

    let json = t.run_with(&["plan", "--log-format", "json"]);
    let lines: Vec<serde_json::Value> = json
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).expect("plan line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["task"], "migrate");
    assert_eq!(lines[0]["run"], true);
    assert_eq!(lines[1]["run"], false);
}

#[test]
fn check_validates_without_running() {
    let t = Test::new().config("[tasks.a]\nrun = \"touch ran\"\n");
    t.run_with(&["check"]).status(0).stdout_has("ok, 1 task");
    assert!(!t.path("ran").exists());
}

#[test]
fn only_and_skip_from_flags_and_variables_flags_win() {
    let config = "[tasks.a]\nrun = \"touch a\"\n[tasks.b]\nrun = \"touch b\"\n[tasks.c]\nrun = \"touch c\"\n";
    let ran = |t: &Test| ["a", "b", "c"].map(|f| t.path(f).exists());

    let t = Test::new().config(config).args(&["--only", "a,c"]);
    t.run().status(0);
    assert_eq!(ran(&t), [true, false, true]);

    let t = Test::new().config(config).env("RELEASE_TASKS_SKIP", "b");
    t.run().status(0);
    assert_eq!(ran(&t), [true, false, true]);

    let t = Test::new()
        .config(config)
        .env("RELEASE_TASKS_ONLY", "a")
        .args(&["--only", "b"]);
    t.run().status(0);
    assert_eq!(ran(&t), [false, true, false]);

    Test::new()
        .config(config)
        .args(&["--only", "nope"])
        .run()
        .status(2)
        .stderr_has("tasks are: a, b, c");
}

#[test]
fn config_path_from_flag_and_variable() {
    let t = Test::new().file("custom.toml", "[tasks.a]\nrun = \"touch a\"\n");
    t.run_with(&["check"]).status(78);
    t.run_with(&["check", "--config", "custom.toml"]).status(0);
    let t = t.env("RELEASE_TASKS_CONFIG", "custom.toml");
    t.run_with(&["check"]).status(0);
}

#[test]
fn help_version_and_bad_usage() {
    let out = Test::new().args(&["--help"]).run();
    out.status(0)
        .stdout_has("Usage: release-tasks")
        .stdout_has("plan")
        .stdout_has("--log-format");
    Test::new()
        .args(&["--version"])
        .run()
        .status(0)
        .stdout_has(env!("CARGO_PKG_VERSION"));
    Test::new().args(&["--bogus"]).run().status(2);
    Test::new().args(&["--log-format", "xml"]).run().status(2);
}

#[test]
fn json_logs_are_one_object_per_line_with_fields() {
    let t = Test::new()
        .config("[tasks.a]\nrun = \"exit 4\"\n")
        .args(&["--log-format", "json"]);
    let out = t.run();
    out.status(4);
    let events: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let finished = events
        .iter()
        .find(|e| e["message"] == "task finished")
        .expect("task finished event");
    assert_eq!(finished["task"], "a");
    assert_eq!(finished["exit_code"], 4);
    assert_eq!(finished["outcome"], "failed");
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "release failed" && e["exit_code"] == 4)
    );
}

#[test]
fn the_repos_own_examples_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "release.toml",
        "examples/demo/release.toml",
        "examples/production/release.toml",
    ] {
        let path = format!("{root}/{file}");
        Test::new()
            .args(&["check", "--config", &path])
            .run()
            .status(0);
    }
}

/// The stderr of a release run on a terminal (`script` gives release-tasks one, as a person running
/// it locally has) with only PATH and `vars` set.
fn stderr_on_a_terminal(vars: &[(&str, &str)]) -> String {
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\n");
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", crate::harness::BIN, "/dev/null"])
        .current_dir(t.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars.iter().copied());
    String::from_utf8_lossy(&cmd.output().expect("script runs").stdout).into_owned()
}

#[test]
fn colour_only_on_a_terminal_without_no_color() {
    let coloured = |vars: &[(&str, &str)]| stderr_on_a_terminal(vars).contains("\x1b[32mINFO");
    assert!(
        coloured(&[("TERM", "xterm")]),
        "{}",
        stderr_on_a_terminal(&[])
    );
    assert!(!coloured(&[("TERM", "xterm"), ("NO_COLOR", "1")]));
    // no-color.org: an empty NO_COLOR is as good as unset.
    assert!(coloured(&[("TERM", "xterm"), ("NO_COLOR", "")]));
    assert!(!coloured(&[("TERM", "dumb")]));
    assert!(!stderr_on_a_terminal(&[("TERM", "dumb")]).contains('\x1b'));
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\n");
    t.run().status(0).stderr_lacks("\x1b[");
}

#[test]
fn colour_forced_off_a_terminal_unless_no_color() {
    for force in ["CLICOLOR_FORCE", "FORCE_COLOR"] {
        let run = |vars: &[(&str, &str)]| {
            let mut test = Test::new().config("[tasks.a]\nrun = \"true\"\n");
            for (k, v) in vars {
                test = test.env(k, v);
            }
            test.run()
        };
        run(&[(force, "1")]).status(0).stderr_has("\x1b[32mINFO");
        run(&[(force, "0")]).status(0).stderr_lacks("\x1b[");
        run(&[(force, "")]).status(0).stderr_lacks("\x1b[");
        run(&[(force, "1"), ("NO_COLOR", "1")])
            .status(0)
            .stderr_lacks("\x1b[");
        // JSON lines never carry colour.
        run(&[(force, "1"), ("RELEASE_TASKS_LOG_FORMAT", "json")])
            .status(0)
            .stderr_lacks("\x1b[");
    }
}
