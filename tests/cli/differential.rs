//! Direct exec is `sh -c`, in every error path: each way a PATH search and an exec can fail is run
//! through `sh -c` (dash is /bin/sh here), through release-tasks's direct path (a plain string) and
//! its shell path (the same string with a quote), which must all give the same exit status; and a
//! `run` array and `exec`'s command must give what execvp gives (`env PROGRAM`, which uses it).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::harness::BIN;

/// The exit status of `argv` run in `dir` with only `PATH` set, as user `uid` when given.
fn status_of(dir: &Path, path: &str, argv: &[&str], uid: Option<u32>) -> (i32, String) {
    let mut cmd = if let Some(uid) = uid {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ])
        .args(argv);
        c
    } else {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        c
    };
    let out = cmd
        .current_dir(dir)
        .env_clear()
        .env("PATH", path)
        .output()
        .expect("run");
    let code = out.status.code().expect("exited");
    (
        code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The status of a release whose one task is `run = RUN` (a TOML value).
fn release_status(dir: &Path, path: &str, run: &str, uid: Option<u32>) -> (i32, String) {
    std::fs::write(
        dir.join("release.toml"),
        format!("[tasks.t]\nrun = {run}\n"),
    )
    .unwrap();
    status_of(dir, path, &[BIN, "run"], uid)
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Checks one command word under one PATH: direct string, quoted string, `sh -c` and, for arrays,
/// `env`. Returns a line for the failure report, if any.
fn compare(dir: &Path, path: &str, word: &str, uid: Option<u32>) -> Option<String> {
    let (sh, sh_said) = status_of(dir, path, &["sh", "-c", word], uid);
    let (direct, direct_said) = release_status(dir, path, &toml_string(word), uid);
    let (quoted, quoted_said) = release_status(dir, path, &toml_string(&format!("'{word}'")), uid);
    let (env, env_said) = status_of(dir, path, &["env", word], uid);
    let (array, array_said) = release_status(dir, path, &format!("[{}]", toml_string(word)), uid);
    // `exec`'s command follows execvp's rules too (a release with no task runs first).
    std::fs::write(dir.join("release.toml"), "").unwrap();
    let (exec, exec_said) = status_of(dir, path, &[BIN, "exec", "--", word], uid);
    let short: String = word.chars().take(40).collect();
    (sh != direct || sh != quoted || env != array || env != exec).then(|| {
        format!(
            "{short} (PATH={path}): sh -c {sh}, direct {direct}, quoted {quoted}; env {env}, array {array}, exec {exec}\n\
             sh: {sh_said}\ndirect: {direct_said}\nquoted: {quoted_said}\nenv: {env_said}\narray: {array_said}\nexec: {exec_said}\n"
        )
    })
}

#[test]
fn every_error_path_of_a_path_search_and_an_exec_agrees_with_sh_c_and_execvp() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let d = dir.to_str().unwrap();
    std::fs::create_dir(dir.join("bin")).unwrap();
    std::fs::create_dir(dir.join("bin/adir")).unwrap();
    write(&dir.join("bin/noexec"), "#!/bin/sh\necho ran\n", 0o644);
    write(
        &dir.join("bin/noshebang"),
        "echo noshebang-ran \"$@\"\n",
        0o755,
    );
    write(&dir.join("bin/empty"), "", 0o755);
    write(
        &dir.join("bin/badinterp"),
        "#!/nonexistent/interp\necho x\n",
        0o755,
    );
    write(&dir.join("bin/relprog"), "#!/bin/sh\necho rel\n", 0o755);
    write(&dir.join("here"), "#!/bin/sh\necho here\n", 0o755);
    std::os::unix::fs::symlink("loop2", dir.join("bin/loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", dir.join("bin/loop2")).unwrap();
    std::fs::copy("/bin/true", dir.join("bin/busy")).unwrap();
    // Held open for writing while it is run: ETXTBSY.
    let _writer = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("bin/busy"))
        .unwrap();
    let system = "/usr/local/bin:/usr/bin:/bin";
    let path = format!("{d}/bin:{system}");
    let long = "a".repeat(300);
    let mut cases: Vec<(String, String)> = Vec::new();
    for word in [
        "missing",
        "adir",
        "noexec",
        "noshebang",
        "empty",
        "badinterp",
        "loop1",
        "busy",
        &long,
    ] {
        cases.push((path.clone(), word.to_owned()));
        cases.push((path.clone(), format!("./bin/{word}")));
    }
    // Empty and relative PATH entries.
    cases.push((format!(":{system}"), "here".to_owned()));
    cases.push((format!("{system}:"), "here".to_owned()));
    cases.push((format!("bin:{system}"), "relprog".to_owned()));
    cases.push((format!("nowhere:{system}"), "relprog".to_owned()));
    cases.push((format!("bin:{system}"), "noshebang".to_owned()));
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(path, word)| compare(dir, path, word, None))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// EACCES on a PATH directory needs a user that root's permissions do not cover.
#[test]
fn a_path_directory_without_permission_agrees_with_sh_c_and_execvp() {
    // SAFETY: geteuid only reads this process's user id.
    if unsafe { nix::libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root to run as a user of its own"
        );
        eprintln!("skipped: needs root to run as a user that a directory can refuse");
        return;
    }
    let uid = 40_000 + (std::process::id() + 7) % 20_000;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let d = dir.to_str().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for sub in ["locked", "open"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    write(&dir.join("locked/prog"), "#!/bin/sh\necho locked\n", 0o755);
    write(&dir.join("open/prog"), "#!/bin/sh\necho open\n", 0o755);
    std::fs::set_permissions(dir.join("locked"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let system = "/usr/local/bin:/usr/bin:/bin";
    let mut failures = Vec::new();
    for path in [
        format!("{d}/locked:{d}/open:{system}"),
        format!("{d}/locked:{system}"),
    ] {
        failures.extend(compare(dir, &path, "prog", Some(uid)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A variable whose name is not a shell identifier (Kubernetes allows `spring.profiles.active`)
/// reaches a string exec'd directly, as it reaches an array and as bash hands it on; dash drops it
/// from a string it runs (README, "Running a task").
#[test]
fn a_variable_that_is_not_a_shell_name_reaches_a_direct_string_and_an_array() {
    crate::harness::Test::new()
        .config(
            "[tasks.direct]\nrun = \"printenv spring.profiles.active\"\n\
             [tasks.array]\nrun = [\"printenv\", \"spring.profiles.active\"]\n",
        )
        .env("spring.profiles.active", "prod")
        .run()
        .status(0)
        .stdout_has("direct | prod\n")
        .stdout_has("array  | prod\n");
}
