//! Which `run = "..."` strings need a shell at all.
//!
//! Most release commands are a program and its arguments (`bundle exec rails db:migrate`). Starting
//! `/bin/sh -c` for them costs a whole extra process per task and buys nothing, so, as GNU make does,
//! a string with none of the shell's syntax is exec'd directly. The rule is conservative by design:
//! anything the shell would treat specially (quoting, expansion, redirection, globbing, comments,
//! assignments, reserved words, builtins) keeps the shell, so the result is the same as `sh -c`: the
//! same argv, the same PATH lookup, the same exit status, the same `PWD` (see [`shell_pwd`]).
//!
//! This module only decides; spawning (and the fallback for a file without a `#!` line, which the
//! shell would run as a script) belongs to `process.rs`.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes that make a string shell syntax somewhere in it: quoting, expansion, redirection, pipes and
/// lists, grouping, globbing, tilde expansion, comments, history and (for old shells) `^` as a pipe.
/// A newline separates commands; any other control character is left to the shell to interpret.
const SPECIAL: &[u8] = b"\"'`$\\;&|<>(){}*?[]~#!^";

/// Words that mean something else in command position: POSIX reserved words, and the builtins of
/// dash and bash, whose behaviour may differ from a program of the same name on PATH (`echo -e`,
/// `test`, `kill %1`) or which only make sense inside a shell (`cd`, `export`, `exec`, `set`).
const SHELL_WORDS: &[&str] = &[
    // Reserved words.
    "!",
    "{",
    "}",
    "case",
    "do",
    "done",
    "elif",
    "else",
    "esac",
    "fi",
    "for",
    "function",
    "if",
    "in",
    "select",
    "then",
    "time",
    "until",
    "while",
    "[[",
    "]]",
    // Builtins (dash, bash, POSIX special builtins).
    ".",
    ":",
    "[",
    "alias",
    "bg",
    "bind",
    "break",
    "builtin",
    "caller",
    "cd",
    "chdir",
    "command",
    "compgen",
    "complete",
    "compopt",
    "continue",
    "declare",
    "dirs",
    "disown",
    "echo",
    "enable",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fc",
    "fg",
    "getopts",
    "hash",
    "help",
    "history",
    "jobs",
    "kill",
    "let",
    "local",
    "logout",
    "mapfile",
    "popd",
    "printf",
    "pushd",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "set",
    "shift",
    "shopt",
    "source",
    "suspend",
    "test",
    "times",
    "trap",
    "true",
    "type",
    "typeset",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "wait",
];

/// The argv to exec instead of `shell -c script`, when that is certain to behave the same: `shell`
/// is a POSIX `sh` (its non-interactive `-c` reads no start-up file, unlike bash with `BASH_ENV`),
/// and `script` is plain words separated by spaces or tabs.
#[must_use]
pub fn direct_argv<'a>(shell: &str, script: &'a str) -> Option<Vec<&'a str>> {
    let name = Path::new(shell).file_name().and_then(OsStr::to_str);
    if !matches!(name, Some("sh" | "dash")) {
        return None;
    }
    let plain = |b: u8| b == b' ' || b == b'\t' || !(b.is_ascii_control() || SPECIAL.contains(&b));
    if !script.bytes().all(plain) {
        return None;
    }
    let words: Vec<&str> = script
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    let first = *words.first()?;
    // `NAME=value cmd` is an assignment; a builtin or reserved word is not a program.
    if first.contains('=') || SHELL_WORDS.contains(&first) {
        return None;
    }
    Some(words)
}

/// The `PWD` a POSIX shell would export to its command when started in `dir` with `inherited` as
/// its `PWD`: the inherited value when it is an absolute path naming `dir` (a logical path through a
/// symlink is kept), otherwise `dir` itself with symlinks resolved. Programs and scripts that read
/// `$PWD` instead of calling getcwd see the same value as under `sh -c`.
#[must_use]
pub fn shell_pwd(dir: &Path, inherited: Option<&OsStr>) -> Option<PathBuf> {
    let here = std::fs::metadata(dir).ok()?;
    if let Some(pwd) = inherited.map(Path::new) {
        let names_dir = std::fs::metadata(pwd)
            .is_ok_and(|there| there.dev() == here.dev() && there.ino() == here.ino());
        let clean = pwd.is_absolute()
            && pwd.components().all(|c| {
                !matches!(
                    c,
                    std::path::Component::CurDir | std::path::Component::ParentDir
                )
            });
        if names_dir && clean {
            return Some(pwd.to_path_buf());
        }
    }
    std::fs::canonicalize(dir).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(script: &str) -> Option<Vec<&str>> {
        direct_argv("/bin/sh", script)
    }

    #[test]
    fn plain_words_are_exec_d() {
        assert_eq!(
            direct("bundle exec rails db:migrate"),
            Some(vec!["bundle", "exec", "rails", "db:migrate"])
        );
        assert_eq!(
            direct("  python\tmanage.py  migrate --noinput "),
            Some(vec!["python", "manage.py", "migrate", "--noinput"])
        );
        assert_eq!(direct("./bin/release"), Some(vec!["./bin/release"]));
        assert_eq!(
            direct("npx prisma migrate deploy"),
            Some(vec!["npx", "prisma", "migrate", "deploy"])
        );
        assert_eq!(
            direct("env A=b printenv A"),
            Some(vec!["env", "A=b", "printenv", "A"])
        );
        assert_eq!(
            direct("grüße.sh ünïcode"),
            Some(vec!["grüße.sh", "ünïcode"])
        );
        assert_eq!(direct_argv("/usr/bin/dash", "x y"), Some(vec!["x", "y"]));
    }

    #[test]
    fn shell_syntax_keeps_the_shell() {
        for script in [
            "echo \"a b\"",
            "echo 'a'",
            "echo $HOME",
            "echo `id`",
            "a\\ b",
            "a; b",
            "a && b",
            "a | b",
            "a > f",
            "a < f",
            "(a)",
            "{ a; }",
            "ls *",
            "ls ?",
            "ls [ab]",
            "ls ~",
            "a # c",
            "! a",
            "a\nb",
            "a\rb",
            "FOO=bar a",
            "a ^ b",
            "a\u{7f}",
        ] {
            assert_eq!(direct(script), None, "{script:?}");
        }
    }

    #[test]
    fn builtins_and_reserved_words_keep_the_shell() {
        for script in [
            "cd /tmp",
            "export A",
            "exec a",
            "set -e",
            "echo hi",
            "true",
            "[ -f x ]",
            ". x",
            "if",
            "while",
            "time a",
            "source x",
            "kill 1",
            "test -f x",
            "printf x",
        ] {
            assert_eq!(direct(script), None, "{script:?}");
        }
        // Only the first word is in command position.
        assert_eq!(
            direct("bundle exec echo"),
            Some(vec!["bundle", "exec", "echo"])
        );
    }

    #[test]
    fn only_a_posix_sh_is_bypassed() {
        assert_eq!(direct_argv("/bin/bash", "a b"), None);
        assert_eq!(direct_argv("/bin/zsh", "a b"), None);
        assert_eq!(direct_argv("/bin/sh", "   "), None);
        assert_eq!(direct_argv("", "a"), None);
    }

    #[test]
    fn pwd_keeps_a_logical_path_and_replaces_a_stale_one() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let canonical = std::fs::canonicalize(&real).unwrap();
        assert_eq!(shell_pwd(&real, Some(link.as_os_str())), Some(link.clone()));
        assert_eq!(
            shell_pwd(&real, Some(OsStr::new("/"))),
            Some(canonical.clone())
        );
        assert_eq!(shell_pwd(&real, None), Some(canonical.clone()));
        assert_eq!(
            shell_pwd(&real, Some(OsStr::new("relative"))),
            Some(canonical.clone())
        );
        let dotted = link.join("..").join("real");
        assert_eq!(shell_pwd(&real, Some(dotted.as_os_str())), Some(canonical));
    }
}
