//! Hostile inputs: output that cannot be written, durations past any sane bound, multibyte text,
//! passwords full of delimiters, values that are not UTF-8, files with many problems of many kinds,
//! characters other formats forbid, and a property test over the whole command line. Whatever comes
//! in, the exit status is one the README documents (never 101, a panic), secrets stay hidden, and
//! nothing is left running.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::time::Duration;

use proptest::prelude::*;

use crate::harness::{Test, gone_within};

/// Writes fail with ENOSPC.
fn full() -> Stdio {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full")
        .into()
}

/// Writes fail with EPIPE: nobody will ever read (as `release-tasks check | true`).
fn closed_pipe() -> Stdio {
    // Close-on-exec, so that no release-tasks started by a test beside this one keeps the read
    // end open (the writes would then block instead of failing).
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    drop(reader);
    writer.into()
}

const TWO_TASKS: &str = "[tasks.a]\nrun = \"touch a-ran\"\n[tasks.b]\nrun = \"touch b-ran\"\n";

#[test]
fn check_and_plan_exit_74_when_stdout_cannot_be_written() {
    let t = Test::new().config(TWO_TASKS);
    for args in [&["check"][..], &["plan"], &["plan", "--log-format", "json"]] {
        assert_eq!(
            t.run_into(args, full(), Stdio::piped()),
            Some(74),
            "{args:?} >/dev/full"
        );
        assert_eq!(
            t.run_into(args, closed_pipe(), Stdio::piped()),
            Some(74),
            "{args:?} | closed"
        );
        assert_eq!(
            t.run_into(args, closed_pipe(), full()),
            Some(74),
            "{args:?} with neither stdout nor stderr"
        );
    }
    let out = t.run_with(&["check"]);
    out.status(0);
}

#[test]
fn help_version_and_completions_exit_74_when_stdout_cannot_be_written() {
    let t = Test::new().config(TWO_TASKS);
    for args in [
        &["--help"][..],
        &["--version"],
        &["completions", "bash"],
        &["plan", "--help"],
    ] {
        assert_eq!(
            t.run_into(args, full(), Stdio::piped()),
            Some(74),
            "{args:?} >/dev/full"
        );
        assert_eq!(
            t.run_into(args, closed_pipe(), Stdio::piped()),
            Some(74),
            "{args:?} | closed"
        );
    }
    // A usage error stays 2 when stderr is gone too.
    assert_eq!(t.run_into(&["--bogus"], full(), full()), Some(2));
    assert_eq!(
        t.run_into(&["wait", "--timeout", "0s"], Stdio::piped(), Stdio::piped()),
        Some(2)
    );
    assert_eq!(
        t.run_into(
            &["wait", "--timeout", "31days"],
            Stdio::piped(),
            Stdio::piped()
        ),
        Some(2)
    );
}

#[test]
fn report_paths_that_meet_through_a_link_are_refused() {
    let t = Test::new().config(TWO_TASKS);
    std::os::unix::fs::symlink(t.path("x.json"), t.path("y.json")).expect("symlink");
    t.run_with(&["--report", "x.json", "--junit", "y.json"])
        .status(2)
        .stderr_has("give each report its own file");
    assert!(!t.path("a-ran").exists(), "nothing ran");
}

#[test]
fn init_writes_the_file_then_exits_74_when_it_cannot_say_so() {
    for stdout in [full(), closed_pipe()] {
        let t = Test::new().file("manage.py", "");
        assert_eq!(t.run_into(&["init"], stdout, Stdio::piped()), Some(74));
        assert!(t.path("release.toml").exists());
    }
}

#[test]
fn run_goes_on_without_its_stdout_and_exits_with_the_release_status() {
    let config = "[tasks.chatty]\nrun = \"i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done\"\n\
                  [tasks.next]\nrun = \"touch next-ran\"\n[tasks.fails]\nrun = \"exit 3\"\n";
    for (stdout, stderr) in [
        (closed_pipe(), Stdio::null()),
        (full(), Stdio::null()),
        (closed_pipe(), closed_pipe()),
        (full(), full()),
    ] {
        let t = Test::new().config(config);
        assert_eq!(t.run_into(&[], stdout, stderr), Some(3));
        assert!(t.path("next-ran").exists(), "the release stopped early");
    }
}

/// A config, the arguments, the environment, and the exit status expected.
type Case = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    i32,
);

#[test]
fn error_paths_keep_their_exit_status_when_stderr_is_gone() {
    let gated = "[tasks.a]\nrun = \"touch ran\"\nwhen = \"GO\"\n";
    let cases: &[Case] = &[
        ("[tasks.a]\nrun = \"\"\n", &[], &[], 78),
        (
            "[tasks.a]\nrun = \"\"\n",
            &["--log-format", "json"],
            &[],
            78,
        ),
        (gated, &["check"], &[("GO", "ture")], 78),
        (gated, &["--bogus"], &[], 2),
        (gated, &["--only", "nope"], &[], 2),
        (gated, &[], &[("RELEASE_TASKS_LOG_FORMAT", "xml")], 2),
        (gated, &["plan"], &[("GO", "1")], 0),
    ];
    for (config, args, env, code) in cases {
        let mut t = Test::new().config(config);
        for (k, v) in *env {
            t = t.env(k, v);
        }
        for stderr in [full(), closed_pipe()] {
            assert_eq!(
                t.run_into(args, Stdio::null(), stderr),
                Some(*code),
                "{config} {args:?} {env:?}"
            );
        }
    }
    let t = Test::new();
    assert_eq!(t.run_into(&["check"], Stdio::null(), full()), Some(78));
}

#[test]
fn durations_past_30_days_are_found_by_check_before_anything_runs() {
    let mut places = vec![
        "[tasks.a]\nrun = \"true\"\ntimeout = \"{}\"\n".to_owned(),
        "[tasks.a]\nrun = \"true\"\ngrace = \"{}\"\n".to_owned(),
        "[defaults]\ntimeout = \"{}\"\n".to_owned(),
        "[defaults]\ngrace = \"{}\"\n".to_owned(),
        "[defaults]\nheartbeat = \"{}\"\n".to_owned(),
        "[defaults]\nrelease_timeout = \"{}\"\n".to_owned(),
        "[tasks.n]\nnotify = { url = \"http://127.0.0.1:9/\", timeout = \"{}\" }\n".to_owned(),
    ];
    if cfg!(feature = "postgres") {
        places.push("[lock]\npostgres = \"DATABASE_URL\"\ntimeout = \"{}\"\n".to_owned());
    }
    for place in &places {
        for value in ["500000000000y", "18446744073709551615s", "31days"] {
            let t = Test::new().config(&format!(
                "[tasks.first]\nrun = \"touch first\"\n{}",
                place.replace("{}", value)
            ));
            for args in [&["check"][..], &[]] {
                t.run_with(args).status(78).stderr_has("maximum of 30 days");
            }
            assert!(!t.path("first").exists(), "{place} {value}");
        }
    }
}

#[test]
fn multibyte_text_around_a_url_is_shown_and_run() {
    let t = Test::new().config("[tasks.a]\nrun = \"echo «https://example.com»\"\n");
    t.run_with(&["plan"])
        .status(0)
        .stdout_has("echo «https://example.com»");
    t.run_with(&["plan", "--log-format", "json"]).status(0);
    let out = t.run();
    out.status(0).stdout_has("«https://example.com»");
}

#[test]
fn a_password_with_delimiters_never_reaches_plan_log_or_errors() {
    let password = "Ab/c?d#e@f";
    let config = format!(
        "[tasks.a]\nrun = \"true https://deploy:{password}@hooks.example.com/x postgres://admin:{password}]@db/app\"\n"
    );
    let t = Test::new().config(&config);
    for args in [&["plan"][..], &["plan", "--log-format", "json"], &[]] {
        let out = t.run_with(args);
        out.status(0);
        for leak in ["deploy", "admin", "Ab/", "c?d", "e@f"] {
            out.stdout_lacks(leak).stderr_lacks(leak);
        }
        if args.is_empty() {
            out.stderr_has("https://[redacted]@hooks.example.com/[redacted]");
        }
    }
}

/// Configs that name a variable, each with a marker task that must not run.
fn naming(var: &str) -> Vec<String> {
    let marker = "[tasks.first]\nrun = \"touch first\"\n";
    vec![
        format!("{marker}[tasks.a]\nrun = \"true\"\nwhen = \"{var}\"\n"),
        format!("{marker}[tasks.a]\nrun = \"true\"\nunless = \"{var}\"\n"),
        format!("{marker}[tasks.a]\nrun = \"true\"\nwhen = {{ env = \"{var}\", set = true }}\n"),
        format!("{marker}[require]\nenv = [\"{var}\"]\n"),
        format!(
            "{marker}[tasks.n]\nnotify = {{ url = \"http://127.0.0.1:9/\", headers = {{ X = \"${{{var}}}\" }} }}\n"
        ),
        format!("{marker}[tasks.n]\nnotify = {{ url = \"${{{var}}}\" }}\n"),
    ]
}

#[test]
fn a_value_that_is_not_utf8_is_an_error_naming_the_variable_never_unset() {
    for value in [&b"\xff"[..], b"tr\xffue", b"postgres://u:p\xff@h/db"] {
        for config in naming("SOME_VAR") {
            let t = Test::new().config(&config).env_bytes("SOME_VAR", value);
            for args in [&[][..], &["check"], &["plan"]] {
                t.run_with(args)
                    .status(78)
                    .stderr_has("SOME_VAR")
                    .stderr_has("not UTF-8")
                    .stderr_lacks("is unset")
                    .stderr_lacks("not set");
            }
            assert!(!t.path("first").exists(), "{config}");
        }
    }
    for var in [
        "RELEASE_TASKS_ONLY",
        "RELEASE_TASKS_SKIP",
        "RELEASE_TASKS_LOG_FORMAT",
        "RELEASE_TASKS_APP",
        "RELEASE_TASKS_VERSION",
    ] {
        let t = Test::new().config(TWO_TASKS).env_bytes(var, b"a\xff");
        for args in [&[][..], &["check"]] {
            t.run_with(args)
                .status(78)
                .stderr_has(var)
                .stderr_has("not UTF-8");
        }
        assert!(!t.path("a-ran").exists(), "{var}");
    }
}

/// Flags win over variables: with `--only`, `--skip`, `--log-format` or `--output-format` given, its
/// variable is not read, so one that is not UTF-8 is no more an error than one that is not valid.
#[test]
fn a_flag_wins_over_its_variable_even_one_that_is_not_utf8() {
    for (var, flag) in [
        ("RELEASE_TASKS_ONLY", &["--only", "a"][..]),
        ("RELEASE_TASKS_SKIP", &["--skip", "b"]),
        ("RELEASE_TASKS_LOG_FORMAT", &["--log-format", "text"]),
        ("RELEASE_TASKS_OUTPUT_FORMAT", &["--output-format", "text"]),
    ] {
        let t = Test::new().config(TWO_TASKS).env_bytes(var, b"a\xff");
        t.run_with(flag).status(0).stderr_lacks("not UTF-8");
        assert!(t.path("a-ran").exists(), "{var}");
    }
}

#[test]
fn paths_from_the_environment_need_not_be_utf8() {
    let t = Test::new().config("[tasks.wrong]\nrun = \"touch wrong\"\n");
    let name = OsStr::from_bytes(b"conf\xff.toml");
    std::fs::write(
        t.dir.path().join(name),
        "[tasks.right]\nrun = \"touch right\"\n",
    )
    .expect("write config");
    let t = t
        .env_bytes("RELEASE_TASKS_CONFIG", b"conf\xff.toml")
        .env_bytes("RELEASE_TASKS_REPORT", b"report\xff.json");
    t.run().status(0);
    assert!(t.path("right").exists() && !t.path("wrong").exists());
    let report = std::fs::read(t.dir.path().join(OsStr::from_bytes(b"report\xff.json")))
        .expect("the report file");
    let report: serde_json::Value = serde_json::from_slice(&report).expect("JSON");
    assert_eq!(report["tasks"][0]["name"], "right");
}

#[test]
fn every_problem_at_once_unknown_keys_included() {
    let config = "[tasks.a]\nrun = \"true\"\ntimout = \"5m\"\n\
                  [tasks.b]\nrun = \"true\"\ngrase = \"5s\"\n\
                  [tasks.c]\nrun = \"\"\nafter = [\"nope\"]\n";
    let t = Test::new().config(config);
    for args in [&[][..], &["check"], &["plan"]] {
        t.run_with(args)
            .status(78)
            .stderr_has("4 problems")
            .stderr_has(
                "release.toml:3:1: unknown field `timout` in task `a`; did you mean `timeout`?",
            )
            .stderr_has(
                "release.toml:6:1: unknown field `grase` in task `b`; did you mean `grace`?",
            )
            .stderr_has("release.toml:8:7: task `c`: `run` is empty")
            .stderr_has("`after` names `nope`");
    }
}

#[test]
fn a_value_of_the_wrong_type_hides_no_other_problem() {
    let config = "[defaults]\ntimeout = 5\n\
                  [tasks.a]\nrun = \"true\"\nallow_failure = \"yes\"\ntimout = \"1m\"\n\
                  [tasks.b]\nrun = \"\"\nafter = [\"nope\"]\ngrace = 10\n\
                  [tasks.c]\nrun = \"true\"\non = \"sometimes\"\ntimeout = \"31d\"\n\
                  [tasks.n]\nnotify = { url = \"http://127.0.0.1:9/\", retries = 4294967296, timeout = \"0s\" }\n";
    let t = Test::new().config(config);
    for args in [&["check"][..], &[]] {
        t.run_with(args)
            .status(78)
            .stderr_has("10 problems")
            .stderr_has("release.toml:2:11: invalid type: integer `5`, expected a string")
            .stderr_has(
                "release.toml:5:17: task `a`: invalid type: string \"yes\", expected a boolean",
            )
            .stderr_has("release.toml:6:1: unknown field `timout`")
            .stderr_has("release.toml:8:7: task `b`: `run` is empty")
            .stderr_has("`after` names `nope`")
            .stderr_has(
                "release.toml:10:9: task `b`: invalid type: integer `10`, expected a string",
            )
            .stderr_has("`on = \"sometimes\"`")
            .stderr_has("maximum of 30 days")
            .stderr_has(
                "release.toml:16:51: task `n`: invalid value: integer `4294967296`, expected u32",
            )
            .stderr_has("`timeout` is zero");
    }
}

/// A notify `url`, a `[lock] postgres` or an item of `after` or `[require] env` of the wrong type is
/// one problem among the others, as any value of the wrong type: it does not stop the reader and hide the rest of the file.
#[test]
fn a_notify_url_or_lock_postgres_of_the_wrong_type_hides_no_other_problem() {
    let t = Test::new().config(
        "[tasks.n]\nnotify = { url = 5 }\n[tasks.a]\nrun = \"\"\n\
         [lock]\npostgres = 5\nonce = \"yes\"\n",
    );
    let out = t.run_with(&["check"]);
    out.status(78)
        .stderr_has("release.toml:2:18: task `n`: invalid type: integer `5`, expected a string")
        .stderr_has("(key `url`)")
        .stderr_has("release.toml:4:7: task `a`: `run` is empty");
    // So is an item of the wrong type in `after` or `[require] env`.
    Test::new()
        .config(
            "[require]\nenv = [5]\n[tasks.a]\nrun = \"x\"\nafter = [7]\n[tasks.b]\nrun = \"\"\n",
        )
        .args(&["check"])
        .run()
        .status(78)
        .stderr_has("release.toml:2:8: invalid type: integer `5`")
        .stderr_has("release.toml:5:10: task `a`: invalid type: integer `7`")
        .stderr_has("release.toml:7:7: task `b`: `run` is empty");
    if cfg!(feature = "postgres") {
        out.stderr_has("release.toml:6:12:")
            .stderr_has("(key `postgres`)")
            .stderr_has("release.toml:7:8: invalid type: string \"yes\", expected a boolean");
    }
}

/// A value of the wrong type names its key (serde's message does not), and a secret-looking key's
/// value is not shown: `API_TOKEN = 12345678` in a task's `env` is a secret written in the file.
#[test]
fn a_value_of_the_wrong_type_names_its_key_and_hides_a_secret() {
    Test::new()
        .config(
            "[defaults]\ntimeout = 5\n[tasks.a]\nrun = \"true\"\n\
             env = { API_TOKEN = 12345678, \"PLAIN\" = 7 }\nallow_failure = \"yes\"\n",
        )
        .args(&["check"])
        .run()
        .status(78)
        .stderr_has("release.toml:2:11: invalid type: integer `5`, expected a string")
        .stderr_has("(key `timeout`)")
        .stderr_has("invalid type: integer, expected a string; put the value in quotes, like \"3000\" (key `API_TOKEN`)")
        .stderr_lacks("12345678")
        .stderr_has("integer `7`, expected a string; put the value in quotes, like \"3000\" (key `PLAIN`)")
        .stderr_has("(key `allow_failure`)");
}

#[test]
fn problems_are_listed_in_file_order() {
    let mut config = "[tasks.a]\nrun = \"true\"\ntimeout = \"zz\"\n".to_owned();
    if cfg!(feature = "postgres") {
        config.push_str("[lock]\npostgres = \"DATABASE_URL\"\ntimeout = \"31d\"\n");
    }
    config.push_str("[defaults]\ngrace = \"0s\"\n");
    let out = Test::new().config(&config).run_with(&["check"]);
    out.status(78);
    let lines: Vec<(usize, usize)> = out
        .stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("release.toml:"))
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect();
    assert!(lines.len() >= 2, "{}", out.stderr);
    let mut sorted = lines.clone();
    sorted.sort_unstable();
    assert_eq!(lines, sorted, "{}", out.stderr);
}

#[test]
fn a_heartbeat_shorter_than_a_second_is_refused_not_a_flood() {
    for value in ["1ns", "10ms", "999ms"] {
        let t = Test::new().config(&format!(
            "[defaults]\nheartbeat = \"{value}\"\n[tasks.first]\nrun = \"touch first\"\n"
        ));
        for args in [&["check"][..], &[]] {
            t.run_with(args)
                .status(78)
                .stderr_has("release.toml:2:13: `heartbeat")
                .stderr_has("at least 1s");
        }
        assert!(!t.path("first").exists(), "{value}");
    }
    Test::new()
        .config("[defaults]\nheartbeat = \"1s\"\n[tasks.a]\nrun = \"true\"\n")
        .run_with(&["check"])
        .status(0);
}

#[test]
fn a_query_after_an_ipv6_host_never_shows() {
    let t = Test::new().config(
        "[tasks.a]\nrun = \"psql postgres://[::1]:5432/app?password=qpw1 postgres://u:pw2@[2001:db8::1]/db?sslpassword=qpw3 https://h;x=qpw4\"\n",
    );
    for args in [&["plan"][..], &["plan", "--log-format", "json"], &[]] {
        let out = t.run_with(args);
        for leak in ["qpw1", "pw2", "qpw3", "qpw4"] {
            out.stdout_lacks(leak).stderr_lacks(leak);
        }
    }
    t.run_with(&["plan"])
        .stdout_has("postgres://[::1]:5432/[redacted]")
        .stdout_has("postgres://[redacted]@[2001:db8::1]/[redacted]");
}

#[test]
fn thousands_of_tasks_with_bad_after_give_messages_of_bounded_size() {
    let mut config = String::new();
    for i in 0..3000 {
        let prev = if i == 0 { 2999 } else { i - 1 };
        let _ = std::fmt::Write::write_fmt(
            &mut config,
            format_args!("[tasks.t{i}]\nrun = \"true\"\nafter = [\"t{prev}\", \"missing{i}\"]\n"),
        );
    }
    let out = Test::new().config(&config).run_with(&["check"]);
    out.status(78)
        .stderr_has("`after` makes a cycle among tasks t0, t1,")
        .stderr_has("and 2990 more")
        .stderr_has("`after` names `missing7`, which is not a task; known tasks: t0,");
    for line in out.stderr.lines() {
        assert!(line.len() < 400, "a line of {} bytes", line.len());
    }
}

#[test]
fn a_notify_url_variable_that_http_refuses_stops_run_before_the_first_task() {
    let config = "[tasks.first]\nrun = \"touch first\"\n\
                  [tasks.n]\nnotify = { url = \"${HOOK}\", headers = { Authorization = \"Bearer ${TOK}\" } }\n";
    for hook in [
        "http://u:hookpw@127.0.0.1:9/x\n",
        "http://u:hookpw@127.0.0.1:9/x y",
        "http://127.0.0.1:9/\tx",
    ] {
        let t = Test::new()
            .config(config)
            .env("HOOK", hook)
            .env("TOK", "tokpw");
        t.run()
            .status(78)
            .stderr_has("task `n`: notify url has a space or a control character")
            .stderr_has("${HOOK}")
            .stderr_lacks("hookpw")
            .stderr_lacks("tokpw");
        assert!(!t.path("first").exists(), "{hook:?}");
        t.run_with(&["check"]).status(78).stderr_has("${HOOK}");
    }
    Test::new()
        .config(config)
        .env("HOOK", "http://127.0.0.1:9/x")
        .env("TOK", "tok\n")
        .run()
        .status(78)
        .stderr_has("once ${TOK} is expanded; HTTP does not allow it");
}

/// Every notify task's refused values are named at once, also after another task's problem (a
/// gate typo, the first notify task's newline): the user fixes them in one round.
#[test]
fn every_notify_task_with_a_refused_value_is_named_at_once() {
    Test::new()
        .config(
            "[tasks.a]\nrun = \"true\"\nwhen = \"GATE\"\n\
             [tasks.n]\nnotify = { url = \"${HOOK}\" }\n\
             [tasks.m]\nnotify = { url = \"http://127.0.0.1:9/\", headers = { X-Key = \"${MY_SECRET}\" } }\n",
        )
        .env("GATE", "ture")
        .env("HOOK", "http://127.0.0.1:9/a\n")
        .env("MY_SECRET", "hunter2\n")
        .args(&["check"])
        .run()
        .status(78)
        .stderr_has("GATE")
        .stderr_has("once ${HOOK} is expanded")
        .stderr_has("once ${MY_SECRET} is expanded")
        .stderr_lacks("hunter2");
}

/// A line longer than the tail keeps (1 KiB) is cut there; a secret or a database URL that the cut
/// splits must not show its first part in the report, the JUnit file or the `release failed` line.
#[test]
fn a_secret_cut_at_the_tail_line_limit_is_not_shown_in_part() {
    let t = Test::new()
        .config(
            "[tasks.a]\nrun = [\"sh\", \"-c\", \"printf '%01000d postgres://admin:supersecretpw@db/app\\\\n' 0; \
             printf '%01015d pw=%s\\\\n' 0 \\\"$DB_PASSWORD\\\"; exit 1\"]\n",
        )
        .env("DB_PASSWORD", "hunter2hunter2")
        .args(&["--report", "report.json", "--junit", "junit.xml"]);
    t.run()
        .status(1)
        .stderr_lacks("hunte")
        .stderr_lacks("admin:");
    for file in ["report.json", "junit.xml"] {
        let text = std::fs::read_to_string(t.path(file)).unwrap();
        assert!(text.contains("pw="), "{file}: {text}");
        assert!(!text.contains("hunte"), "{file}: {text}");
        assert!(!text.contains("admin:"), "{file}: {text}");
    }
}

/// `check` finds a `--report` or `--junit` path that `run` could not create (exit 2 before its
/// first task), without creating anything.
#[test]
fn check_finds_a_report_path_that_run_could_not_create() {
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\n");
    t.run_with(&["check", "--report", "missing/report.json"])
        .status(2)
        .stderr_has("--report missing/report.json: `run` could not create the file: its directory missing does not exist");
    std::fs::create_dir(t.path("out")).unwrap();
    t.run_with(&["check", "--junit", "out"])
        .status(2)
        .stderr_has("--junit out: `run` could not create the file: it is a directory");
    t.run_with(&[
        "check",
        "--report",
        "out/report.json",
        "--junit",
        "junit.xml",
    ])
    .status(0);
    assert!(!t.path("out/report.json").exists() && !t.path("junit.xml").exists());
    t.run_with(&["--report", "missing/report.json"]).status(2);
}

/// A task's `env` name that no process can take is reported on its own line, not the task's.
#[test]
fn a_bad_env_name_is_reported_where_it_is() {
    Test::new()
        .config("[tasks.m]\nrun = \"true\"\n\nenv = { \"A=B\" = \"y\" }\n")
        .args(&["check"])
        .run()
        .status(78)
        .stderr_has("release.toml:4:")
        .stderr_has("env name \"A=B\" is not a valid variable name; a name must not");
}

/// A secret-looking variable set in the command itself (`API_TOKEN=... ./deploy`, an `env` argument,
/// `--password=...`) is shown redacted in the log, in `plan` and in `exec`'s line, as any value of it.
#[test]
fn a_secret_assigned_in_a_command_is_never_logged() {
    let t = Test::new().config(
        "[tasks.a]\nrun = \"API_TOKEN=tok3secret true\"\n\
         [tasks.b]\nrun = [\"env\", \"DB_PASSWORD=pw4secret\", \"true\"]\n\
         [tasks.c]\nrun = \"true --password=pw5secret\"\n",
    );
    let out = t.run();
    out.status(0).stderr_has("API_TOKEN=[redacted] true");
    for secret in ["tok3secret", "pw4secret", "pw5secret"] {
        out.stderr_lacks(secret);
    }
    for args in [&["plan"][..], &["plan", "--log-format", "json"]] {
        let out = t.run_with(args);
        out.status(0).stdout_has("[redacted]");
        for secret in ["tok3secret", "pw4secret", "pw5secret"] {
            out.stdout_lacks(secret);
        }
    }
    t.run_with(&["exec", "--", "env", "MY_SECRET=s6secret", "true"])
        .status(0)
        .stderr_has("MY_SECRET=[redacted]")
        .stderr_lacks("s6secret");
}

#[test]
fn a_url_pasted_where_a_name_belongs_is_redacted_in_every_config_error() {
    let config = "[require]\nenv = [\"https://u:reqpw@h/x\"]\n\
                  [tasks.a]\nrun = \"true\"\nwhen = \"https://u:whenpw@h/x\"\n\
                  unless = { env = \"postgres://u:unlpw@h/x\", equals = \"y\" }\n\
                  on = \"https://u:onpw@h/x\"\ndir = \"https://u:dirpw@h/x\"\ntimeout = \"https://u:toutpw@h/x\"\n\
                  after = [\"https://u:afterpw@h/x\"]\nenv = { \"https://u:envkpw@h\" = \"1\" }\n\
                  [tasks.n]\nnotify = { url = \"ftp://u:urlpw@h/x\", headers = { \"https://u:hdrkpw@h\" = \"x\", X = \"${https://u:tplpw@h}\" } }\n\
                  [tasks.\"https://u:namepw@h\"]\nrun = \"true\"\n";
    let out = Test::new().config(config).run_with(&["check"]);
    out.status(78).stderr_has("https://[redacted]@h/[redacted]");
    for leak in [
        "reqpw", "whenpw", "unlpw", "onpw", "dirpw", "toutpw", "afterpw", "envkpw", "urlpw",
        "hdrkpw", "tplpw", "namepw",
    ] {
        out.stderr_lacks(leak);
    }
}

#[test]
fn an_unknown_only_name_gets_a_short_redacted_message() {
    let mut config = String::new();
    for i in 0..500 {
        let _ =
            std::fmt::Write::write_fmt(&mut config, format_args!("[tasks.t{i}]\nrun = \"true\"\n"));
    }
    let t = Test::new().config(&config);
    let out = t.run_with(&["plan", "--only", "https://u:onlypw@h/x,t1"]);
    out.status(2)
        .stderr_lacks("onlypw")
        .stderr_has("--only names https://[redacted]@h/[redacted]")
        .stderr_has("t0, t1,")
        .stderr_has("and 490 more");
    let out = Test::new()
        .config(&config)
        .env("RELEASE_TASKS_SKIP", "postgres://u:skippw@h/db")
        .run_with(&["plan"]);
    out.status(2).stderr_lacks("skippw");
}

#[test]
fn a_nul_byte_in_the_lock_key_is_found_by_check() {
    if !cfg!(feature = "postgres") {
        return;
    }
    let t = Test::new()
        .config(
            "[lock]\npostgres = \"DATABASE_URL\"\nkey = \"a\\u0000b\"\n[tasks.first]\nrun = \"touch first\"\n",
        )
        .env("DATABASE_URL", "postgres://u:p@127.0.0.1:1/db");
    for args in [&["check"][..], &[]] {
        t.run_with(args)
            .status(78)
            .stderr_has("release.toml:3:7: [lock] key contains a NUL byte");
    }
    assert!(!t.path("first").exists());
}

#[test]
fn a_multiline_command_cannot_forge_plan_lines_or_drive_the_terminal() {
    let t = Test::new().config(
        "[tasks.a]\nrun = \"true\\nrun   b  forged\\n\\u001b[2J\\u009b31m done\"\n[tasks.b]\nrun = \"true\"\n",
    );
    let out = t.run_with(&["plan"]);
    out.status(0).stdout_has("\\u{1b}[2J");
    let stdout = out.stdout();
    assert!(!stdout.contains(['\u{1b}', '\u{9b}']), "{stdout:?}");
    let starts: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| &l[..4])
        .collect();
    assert_eq!(starts, ["run ", "run "], "{stdout}");
}

#[test]
fn retries_past_the_maximum_are_an_error_not_quietly_cut() {
    for n in ["11", "1000", "4294967295"] {
        Test::new()
            .config(&format!(
                "[tasks.n]\nnotify = {{ url = \"http://127.0.0.1:9/\", retries = {n} }}\n"
            ))
            .run_with(&["check"])
            .status(78)
            .stderr_has(&format!("`retries = {n}` is more than the maximum of 10"));
    }
    Test::new()
        .config("[tasks.n]\nnotify = { url = \"http://127.0.0.1:9/\", retries = 10 }\n")
        .run_with(&["check"])
        .status(0);
}

#[test]
fn check_finds_what_run_would_trip_on_halfway() {
    let marker = "[tasks.first]\nrun = \"touch first\"\n";
    for (config, needle) in [
        ("[tasks.a]\nrun = \"echo a\\u0000b\"\n", "NUL"),
        ("[tasks.a]\nrun = [\"echo\", \"a\\u0000b\"]\n", "NUL"),
        (
            "[tasks.a]\nrun = \"true\"\nenv = { A = \"x\\u0000\" }\n",
            "NUL",
        ),
        (
            "[tasks.n]\nnotify = { url = \"http://127.0.0.1:9/\", headers = { X = \"a\\nb\" } }\n",
            "notify header X",
        ),
    ] {
        let t = Test::new().config(&format!("{marker}{config}"));
        for args in [&["check"][..], &[]] {
            t.run_with(args).status(78).stderr_has(needle);
        }
        assert!(!t.path("first").exists(), "{config}");
    }
    // A secret made from a file, with its trailing newline, in a header.
    let t = Test::new()
        .config(&format!(
            "{marker}[tasks.n]\nnotify = {{ url = \"http://127.0.0.1:9/\", headers = {{ Authorization = \"Bearer ${{HOOK_TOKEN}}\" }} }}\n"
        ))
        .env("HOOK_TOKEN", "tok-SECRET\n");
    for args in [&["check"][..], &[]] {
        t.run_with(args)
            .status(78)
            .stderr_has("notify header Authorization")
            .stderr_has("${HOOK_TOKEN}")
            .stderr_lacks("tok-SECRET");
    }
    assert!(!t.path("first").exists());
}

#[test]
fn a_shell_that_is_not_there_is_a_warning() {
    let t =
        Test::new().config("[defaults]\nshell = \"/nonexistent/sh\"\n[tasks.a]\nrun = \"true\"\n");
    for args in [&["check"][..], &["plan"]] {
        t.run_with(args)
            .status(0)
            .stderr_has("warning")
            .stderr_has("\"/nonexistent/sh\" does not exist");
    }
    Test::new()
        .config("[defaults]\nshell = \"no-such-shell-here\"\n[tasks.a]\nrun = \"true\"\n")
        .args(&["check"])
        .run()
        .status(0)
        .stderr_has("does not exist on PATH");
    Test::new()
        .config("[defaults]\nshell = \"sh\"\n[tasks.a]\nrun = \"true\"\n")
        .args(&["check"])
        .run()
        .status(0)
        .stderr_lacks("warning");
}

#[test]
fn a_directory_as_a_command_is_named_as_one_not_told_to_chmod() {
    std::fs::create_dir_all("/tmp").ok();
    let t = Test::new().config("[tasks.a]\nrun = [\"/tmp\"]\n");
    let bin = t.path("bin");
    std::fs::create_dir_all(bin.join("subdir")).expect("dir on PATH");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let t = t.env("PATH", &path);
    t.run_with(&["check"])
        .status(0)
        .stderr_has("task `a`: /tmp is a directory, not a program");
    t.run()
        .status(126)
        .stderr_has("`/tmp` is a directory (/tmp), not a program")
        .stderr_lacks("chmod");
    let t = Test::new()
        .config("[tasks.a]\nrun = [\"subdir\"]\n")
        .env("PATH", &path);
    t.run()
        .status(126)
        .stderr_has("`subdir` is a directory")
        .stderr_lacks("chmod");
    // The PATH the task is given is where it is looked up, and where the directory is found.
    let t = Test::new().config(&format!(
        "[tasks.a]\nrun = [\"subdir\"]\nenv = {{ PATH = \"{path}\" }}\n"
    ));
    t.run()
        .status(126)
        .stderr_has("`subdir` is a directory")
        .stderr_lacks("chmod");
}

#[test]
fn junit_holds_only_characters_xml_allows() {
    let t = Test::new().config("[tasks.a]\nrun = [\"nope\\uFFFE\\uFFFF\\u0001\\u001b[31m\"]\n");
    t.run_with(&["--junit", "j.xml", "--report", "r.json"])
        .status(127);
    let xml = std::fs::read_to_string(t.path("j.xml")).expect("junit file");
    for bad in ['\u{fffe}', '\u{ffff}', '\u{1}', '\u{1b}'] {
        assert!(!xml.contains(bad), "{bad:?} in {xml}");
    }
    assert!(xml.contains("nope\u{fffd}"), "{xml}");
}

#[test]
fn the_json_and_junit_reports_need_two_files() {
    let t = Test::new().config(TWO_TASKS);
    for args in [
        &["--report", "r", "--junit", "r"][..],
        &["--report", "r", "--junit", "./r"],
    ] {
        t.run_with(args)
            .status(2)
            .stderr_has("--report and --junit both name");
    }
    let t = t.env("RELEASE_TASKS_JUNIT", "r");
    t.run_with(&["--report", "r"]).status(2);
    assert!(!t.path("a-ran").exists());
}

#[test]
fn a_skipped_task_says_why_as_data_in_the_json_report() {
    let config = "[tasks.migrate]\nrun = \"true\"\nwhen = \"RUN_MIGRATIONS\"\n\
                  [tasks.seed]\nrun = \"true\"\nunless = { env = \"APP_ENV\", equals = \"production\" }\n\
                  [tasks.other]\nrun = \"true\"\n[tasks.last]\nrun = \"true\"\n";
    let t = Test::new()
        .config(config)
        .env("RUN_MIGRATIONS", "false")
        .env("APP_ENV", "production");
    t.run_with(&["--report", "r.json", "--skip", "other"])
        .status(0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("r.json")).expect("report"))
            .expect("JSON");
    let tasks = &report["tasks"];
    assert_eq!(
        tasks[0]["reason"],
        serde_json::json!({"gate": "when", "variable": "RUN_MIGRATIONS", "value": "false", "needs": "is true"})
    );
    assert_eq!(
        tasks[1]["reason"],
        serde_json::json!({"gate": "unless", "variable": "APP_ENV", "value": "production", "needs": "equals \"production\""})
    );
    assert_eq!(tasks[2]["reason"], serde_json::json!({"selection": "skip"}));
    assert!(tasks[3].get("reason").is_none(), "{report}");
    let t = Test::new().config(config);
    t.run_with(&["--report", "r.json"]).status(0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("r.json")).expect("report"))
            .expect("JSON");
    assert_eq!(
        report["tasks"][0]["reason"]["value"],
        serde_json::Value::Null
    );
}

#[test]
fn an_empty_only_means_no_selection_from_the_flag_and_the_variable_alike() {
    for (args, env) in [
        (&["--only", ""][..], None),
        (&[][..], Some("")),
        (&["--only", ","][..], None),
    ] {
        let mut t = Test::new().config(TWO_TASKS);
        if let Some(value) = env {
            t = t.env("RELEASE_TASKS_ONLY", value);
        }
        t.run_with(args).status(0);
        assert!(
            t.path("a-ran").exists() && t.path("b-ran").exists(),
            "{args:?} {env:?}"
        );
    }
}

// ---- the whole command line, as a property ----

/// Exit statuses the README documents that the generated configs can produce: release-tasks's own,
/// and the generated tasks' own (`false` is 1, `exit 3` is 3).
const DOCUMENTED: &[i32] = &[0, 1, 2, 3, 69, 70, 74, 75, 78, 124, 126, 127];

/// A task's command, harmless to run: `true`, `false`, `echo`, `exit 3`, a background `sleep` (left
/// for release-tasks to clean up), a webhook on a closed port; and some that are refused.
fn command_key(marker: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("run = \"true\"".to_owned()),
        2 => Just("run = \"false\"".to_owned()),
        2 => Just("run = \"exit 3\"".to_owned()),
        2 => Just("run = [\"echo\", \"«https://u:p@h/x»\"]".to_owned()),
        4 => Just(format!("run = \"sleep 300.{marker} & echo started\"")),
        1 => Just("run = \"\"".to_owned()),
        1 => Just("run = [\"/tmp\"]".to_owned()),
        1 => Just("run = [\"no-such-command\"]".to_owned()),
        1 => Just("run = \"echo \\u0000\"".to_owned()),
        1 => Just("notify = { url = \"http://127.0.0.1:9/x\", retries = 0, timeout = \"2s\" }".to_owned()),
        1 => Just("notify = { url = \"${HOOK}\", retries = 0, timeout = \"2s\", headers = { X = \"${V1}\" } }".to_owned()),
    ]
}

/// The other keys of a task, each present or not.
fn other_keys() -> impl Strategy<Value = Vec<String>> {
    use proptest::option::weighted;
    let gate = prop_oneof![
        "\"V[0-3]\"",
        "\\{ env = \"V[0-3]\", equals = \"x\" \\}",
        "\\[\"V[0-3]\", \\{ env = \"V[0-3]\", set = (true|false) \\}\\]",
    ];
    (
        weighted(0.4, gate.clone().prop_map(|g| format!("when = {g}"))),
        weighted(0.2, gate.prop_map(|g| format!("unless = {g}"))),
        weighted(0.3, duration().prop_map(|d| format!("timeout = {d:?}"))),
        weighted(0.2, duration().prop_map(|d| format!("grace = {d:?}"))),
        weighted(0.1, "after = \\[\"t[0-3]\"\\]"),
        weighted(0.2, Just("allow_failure = true".to_owned())),
        (
            weighted(0.2, "on = \"(success|failure|always)\""),
            weighted(0.02, Just("on = \"sometimes\"".to_owned())),
        ),
        weighted(0.05, Just("tiemout = \"1s\"".to_owned())),
        weighted(0.1, Just("env = { A = \"x\" }".to_owned())),
        weighted(0.1, Just("dir = \"sub\"".to_owned())),
    )
        .prop_map(|(a, b, c, d, e, f, (g, g2), h, i, j)| {
            [a, b, c, d, e, f, g, g2, h, i, j]
                .into_iter()
                .flatten()
                .collect()
        })
}

/// A duration, mostly one that is accepted.
fn duration() -> impl Strategy<Value = String> {
    let refused = prop_oneof![
        Just("0s".to_owned()),
        Just("31days".to_owned()),
        Just("500000000000y".to_owned()),
        Just("18446744073709551615s".to_owned()),
        "\\PC{0,5}",
    ];
    prop_oneof![
        5 => Just("1s".to_owned()),
        4 => "[1-9][0-9]{0,2}(s|m)",
        1 => Just("30days".to_owned()),
        1 => refused,
    ]
}

fn config_text(marker: u32) -> impl Strategy<Value = String> {
    let task = (command_key(marker), other_keys())
        .prop_map(|(command, keys)| format!("{command}\n{}\n", keys.join("\n")));
    let defaults = proptest::option::weighted(
        0.3,
        (
            duration(),
            duration(),
            prop_oneof![Just("/bin/sh"), Just("sh"), Just("/nonexistent")],
        )
            .prop_map(|(release, heartbeat, shell)| {
                format!(
                    "[defaults]\nrelease_timeout = {release:?}\nheartbeat = {heartbeat:?}\nshell = {shell:?}\n"
                )
            }),
    );
    let require = proptest::option::weighted(0.1, Just("[require]\nenv = [\"V2\"]\n".to_owned()));
    (defaults, require, proptest::collection::vec(task, 0..4)).prop_map(|(d, r, tasks)| {
        let mut text = String::new();
        for (i, t) in tasks.iter().enumerate() {
            text.push_str("[tasks.t");
            text.push_str(&i.to_string());
            text.push_str("]\n");
            text.push_str(t);
        }
        let tasks = text;
        format!("{}{}{tasks}", d.unwrap_or_default(), r.unwrap_or_default())
    })
}

fn env_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"true".to_vec()),
        2 => Just(b"false".to_vec()),
        1 => Just(b"ture".to_vec()),
        1 => Just(b"x".to_vec()),
        1 => Just(Vec::new()),
        1 => Just(b"http://127.0.0.1:9/hook".to_vec()),
        1 => Just(b"t0,t1".to_vec()),
        2 => proptest::collection::vec(1..=255u8, 0..8),
    ]
}

fn env_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        3 => Just("V0"),
        3 => Just("V1"),
        3 => Just("V2"),
        3 => Just("V3"),
        2 => Just("HOOK"),
        1 => Just("RELEASE_TASKS_ONLY"),
        1 => Just("RELEASE_TASKS_SKIP"),
        1 => Just("RELEASE_TASKS_LOG_FORMAT"),
        1 => Just("RELEASE_TASKS_CONFIG"),
        1 => Just("RELEASE_TASKS_APP"),
    ]
}

/// Processes whose command line holds `needle` (the marker of one case's background `sleep`).
fn running_with(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .filter(|&pid| crate::harness::alive(pid))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_input_gets_a_documented_exit_status_and_leaves_nothing_running(
        marker in 1000u32..1_000_000,
        structured in proptest::bool::weighted(0.8),
        noise in "\\PC{0,120}",
        command in prop_oneof![Just("check"), Just("plan"), Just("run")],
        json in any::<bool>(),
        env in proptest::collection::vec((env_name(), env_value()), 0..5),
        config in config_text(0),
    ) {
        // Arbitrary text only where nothing runs; `run` gets generated configs, whose commands are
        // harmless.
        let config = if structured || command == "run" {
            config.replace("sleep 300.0 ", &format!("sleep 300.{marker} "))
        } else {
            noise
        };
        let t = Test::new().config(&config);
        std::fs::create_dir(t.path("sub")).expect("sub dir");
        let mut t = t;
        for (name, value) in &env {
            t = t.env_bytes(name, value);
        }
        let mut args = vec![command];
        if json {
            args.extend(["--log-format", "json"]);
        }
        let out = t.run_with(&args);
        let code = out.code.expect("exited");
        prop_assert!(
            DOCUMENTED.contains(&code),
            "exit {code} for {command} with config\n{config}\nenv {env:?}\nstderr:\n{}", out.stderr
        );
        prop_assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        let left: Vec<i32> = running_with(&format!("sleep 300.{marker}"))
            .into_iter()
            .filter(|&pid| !gone_within(pid, Duration::from_secs(5)))
            .collect();
        prop_assert!(left.is_empty(), "left running: {left:?}\nconfig\n{config}");
    }
}

#[test]
fn a_gate_value_of_100_kb_is_shown_by_its_start() {
    let huge = "y".repeat(100_000);
    let t = Test::new()
        .config("[tasks.a]\nrun = \"true\"\nwhen = \"GATE\"\n")
        .env("GATE", &huge);
    for args in [&[][..], &["plan"][..], &["check"][..]] {
        let out = t.run_with(args);
        out.status(78)
            .stderr_has("GATE=\"yyyy")
            .stderr_has("(100000 bytes in all)")
            .stderr_has("is not a boolean");
        assert!(out.stderr.len() < 4096, "{} bytes", out.stderr.len());
    }
}
