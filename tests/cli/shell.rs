//! A `run` string without shell syntax is exec'd directly: the differential test runs a corpus of
//! commands both ways (as `run = "..."` and as `run = ["/bin/sh", "-c", "..."]`) and compares what a
//! user sees; another test proves the shell really is skipped.

use crate::harness::{Output, Test, strip_prefix};

/// The task's own stderr lines (release-tasks's log lines are left out: they carry times).
fn task_stderr(out: &Output) -> Vec<u8> {
    let lines: Vec<&str> = out
        .stderr
        .split_inclusive('\n')
        .filter(|l| l.starts_with("t | "))
        .collect();
    strip_prefix(lines.concat().as_bytes(), "t")
}

fn task_stdout(out: &Output) -> Vec<u8> {
    strip_prefix(&out.stdout, "t")
}

/// A directory with the files the corpus runs: a script without `#!`, one that is not executable,
/// one that kills itself, and a symlink to a subdirectory.
fn fixture(config: &str) -> Test {
    let test = Test::new()
        .config(config)
        .file(
            "noshebang",
            "echo from a script without a shebang line\nexit 7\n",
        )
        .file("notexec", "#!/bin/sh\necho never\n")
        .file("killself", "#!/bin/sh\necho dying\nkill -TERM $$\n")
        .file(
            "args",
            "#!/bin/sh\nfor a in \"$@\"; do echo \"<$a>\"; done\necho \"pwd=$PWD\"\n",
        );
    for name in ["noshebang", "killself", "args"] {
        chmod_x(&test.path(name));
    }
    std::fs::create_dir(test.path("real")).expect("mkdir");
    std::os::unix::fs::symlink(test.path("real"), test.path("link")).expect("symlink");
    test
}

fn chmod_x(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

#[test]
fn plain_commands_behave_exactly_as_under_sh_c() {
    // (command, extra task keys, whether stderr is the shell's own wording and is not compared)
    let corpus: &[(&str, &str, bool)] = &[
        ("./args one  two\tthree", "", false),
        ("./args ünïcödé «quoted» a=b --flag=x:y", "", false),
        ("../args", "dir = \"link\"", false),
        ("../args from-real", "dir = \"real\"", false),
        ("./args", "env = { PWD = \"/\" }", false),
        ("printenv PWD", "dir = \"link\"", false),
        ("cat does-not-exist", "", false),
        ("ls -d .", "", false),
        ("expr 6 + 7", "", false),
        ("expr 0", "", false),
        // The shell waits for it and says "Terminated" itself; the status is 143 either way.
        ("./killself", "", true),
        ("./noshebang", "", false),
        ("./notexec", "", true),
        ("./real", "", true),
        ("no-such-command-anywhere --flag", "", true),
        ("./no-such-file", "", true),
    ];
    for &(command, extra, own_wording) in corpus {
        let run = |config: String| {
            let test = fixture(&config);
            let out = test.run();
            // Each run has its own temp dir: compare with it written as `DIR`.
            let dir = std::fs::canonicalize(test.dir.path()).expect("temp dir");
            let dir = dir.to_str().expect("utf-8 temp path");
            let normal = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).replace(dir, "DIR");
            (
                out.code,
                normal(task_stdout(&out)),
                normal(task_stderr(&out)),
            )
        };
        let direct = run(format!(
            "[tasks.t]\nrun = {}\n{extra}\n",
            toml_string(command)
        ));
        let shell = run(format!(
            "[tasks.t]\nrun = [\"/bin/sh\", \"-c\", {}]\n{extra}\n",
            toml_string(command)
        ));
        assert_eq!(
            direct.0, shell.0,
            "exit status of {command:?}: {direct:?} {shell:?}"
        );
        assert_eq!(direct.1, shell.1, "stdout of {command:?}");
        if !own_wording {
            assert_eq!(direct.2, shell.2, "stderr of {command:?}");
        }
    }
}

#[test]
fn the_shell_is_started_only_for_shell_syntax() {
    // A shell named `sh` that leaves a mark each time it starts, then behaves as /bin/sh.
    let test = Test::new();
    std::fs::create_dir(test.path("bin")).expect("mkdir");
    let shell = test.path("bin/sh");
    let test = test
        .file(
            "bin/sh",
            "#!/bin/sh\necho started >> \"$SHELL_MARKS\"\nexec /bin/sh \"$@\"\n",
        )
        .config(&format!(
            "[defaults]\nshell = {}\n\
             [tasks.plain]\nrun = \"expr 1 + 1\"\n\
             [tasks.piped]\nrun = \"expr 2 + 2 | cat\"\n",
            toml_string(shell.to_str().expect("utf-8 temp path"))
        ));
    chmod_x(&test.path("bin/sh"));
    let marks = test.path("marks");
    let test = test.env("SHELL_MARKS", marks.to_str().expect("utf-8 temp path"));
    let out = test.run();
    out.status(0)
        .stdout_has("plain | 2\n")
        .stdout_has("piped | 4\n");
    let started = std::fs::read_to_string(&marks).unwrap_or_default();
    assert_eq!(
        started.lines().count(),
        1,
        "the shell ran for the piped task only"
    );
    // The log still shows the command as written.
    out.stderr_has("expr 1 + 1");
}

#[test]
fn a_not_found_plain_command_is_127_and_named() {
    Test::new()
        .config("[tasks.t]\nrun = \"no-such-command-anywhere migrate\"\n")
        .run()
        .status(127)
        .stderr_has("no-such-command-anywhere");
}
