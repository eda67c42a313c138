//! `--env-file`: variables for local runs from `.env` files, as foreman, `heroku local` and dbmate
//! read them (parsed by dotenvy).
//!
//! Only files named on the command line (or in `RELEASE_TASKS_ENV_FILE`) are read: a stray `.env`
//! left in a slug must never change a production release. The process environment wins over every
//! file, and between files the first that sets a variable wins. What is loaded joins the environment
//! snapshot that gates, `[require]` and `${VAR}` read, and the environment every task inherits; each
//! variable remembers its file, so `plan` can say where a gate's value came from.

use std::path::{Path, PathBuf};

use crate::error::{Diagnostic, Error, Result};

/// One variable a file set (and the process environment did not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub name: String,
    pub value: String,
    /// The file it came from, as named on the command line.
    pub file: PathBuf,
}

/// Reads `files` in order; `is_set` tells whether the process environment already has a variable
/// (then the file's value is not used). A path that names no readable file (missing, a directory,
/// no permission) is a usage error (2), a file that cannot be parsed is a config error (78) with its
/// line and column.
/// `from` is where the files were named (`--env-file` or `RELEASE_TASKS_ENV_FILE`), for messages.
pub fn load(files: &[PathBuf], from: &str, is_set: impl Fn(&str) -> bool) -> Result<Vec<Loaded>> {
    let mut loaded: Vec<Loaded> = Vec::new();
    for file in files {
        for (name, value) in parse(file, from)? {
            if !is_set(&name) && !loaded.iter().any(|l| l.name == name) {
                loaded.push(Loaded {
                    name,
                    value,
                    file: file.clone(),
                });
            }
        }
    }
    Ok(loaded)
}

/// Every `NAME=value` of one file, in file order (a name set twice keeps its first value).
fn parse(file: &Path, from: &str) -> Result<Vec<(String, String)>> {
    let mut bytes = std::fs::read(file).map_err(|err| {
        let problem = match err.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_owned(),
            std::io::ErrorKind::IsADirectory => "is a directory, not a file".to_owned(),
            _ => format!("cannot read it ({err})"),
        };
        // The path on the command line names no readable file: a usage error, like a missing one.
        Error::Usage(format!(
            "{from} {}: {problem}; name a readable .env file (a relative path is taken from the current directory)",
            file.display()
        ))
    })?;
    // Windows editors start UTF-8 files with a byte order mark, which is not part of the first name.
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    let text = String::from_utf8(bytes).map_err(|err| {
        let (line, col) = position(
            &String::from_utf8_lossy(err.as_bytes()),
            err.utf8_error().valid_up_to(),
        );
        invalid(
            file,
            line,
            col,
            "the file is not UTF-8 text; save it as UTF-8".into(),
        )
    })?;
    let mut vars = Vec::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok(var) => vars.push(var),
            Err(dotenvy::Error::LineParse(snippet, at)) => {
                let first = snippet.lines().next().unwrap_or_default();
                // dotenvy gives the snippet's end for a quote that is never closed: point at its start.
                let (at, problem) = if at >= snippet.trim_end().len() && first.contains(['"', '\''])
                {
                    (0, "a quote opened here is never closed")
                } else {
                    (at.min(snippet.trim_end().len()), "cannot parse this line")
                };
                let (line, col) = locate(&text, &snippet, at);
                // The line as the file has it, with a secret-looking variable's value hidden: the
                // snippet may be only the value, and a .env file is where the secrets live.
                let first = shown(text.lines().nth(line - 1).unwrap_or(first));
                return Err(invalid(
                    file,
                    line,
                    col,
                    format!(
                        "{problem}: `{first}`; write NAME=value, quote a value that has spaces or `#` (NAME=\"a b\"), and close every quote"
                    ),
                ));
            }
            Err(err) => {
                return Err(Error::ConfigUnreadable {
                    path: file.to_path_buf(),
                    reason: err.to_string(),
                });
            }
        }
    }
    Ok(vars)
}

/// The 1-based line and column, in `text`, of byte `at` of `snippet` (the logical line dotenvy
/// could not parse, which may span several lines of the file). dotenvy reports only the offset
/// within its snippet, so the snippet is found in the file to count the lines before it.
fn locate(text: &str, snippet: &str, at: usize) -> (usize, usize) {
    let start = text
        .find(snippet.trim_end_matches(['\n', '\r']))
        .unwrap_or(0);
    position(text, start + at.min(snippet.len()))
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// One line of a `.env` file as an error may show it: `NAME=value` with the value redacted as any
/// value of that variable would be; a line without a name has only its URLs' credentials hidden.
fn shown(line: &str) -> String {
    match line.split_once('=') {
        Some((head, value)) => {
            let name = head.trim();
            let name = name.strip_prefix("export").map_or(name, str::trim_start);
            format!("{head}={}", crate::redact::value(name, value))
        }
        None => crate::redact::urls_in(line),
    }
}

fn invalid(file: &Path, line: usize, col: usize, message: String) -> Error {
    Error::ConfigInvalid {
        path: file.to_path_buf(),
        problems: vec![Diagnostic {
            location: Some((line, col)),
            message,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_process_environment_wins_then_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.env",
            "# comment\nA=from-a\nB=\"from a\"\nexport C=c\n",
        );
        let b = write(dir.path(), "b.env", "A=from-b\nD=d\nSHELL_SET=x\n");
        let loaded = load(&[a.clone(), b.clone()], "--env-file", |name| {
            name == "SHELL_SET"
        })
        .unwrap();
        let got: Vec<_> = loaded
            .iter()
            .map(|l| (l.name.as_str(), l.value.as_str(), l.file.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("A", "from-a", a.clone()),
                ("B", "from a", a.clone()),
                ("C", "c", a),
                ("D", "d", b)
            ]
        );
    }

    #[test]
    fn a_syntax_error_names_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), ".env", "A=1\n\nB=2\nC=\"never closed\nD=4\n");
        let err = load(&[file], "--env-file", |_| false).unwrap_err();
        assert_eq!(err.exit_code(), 78);
        let shown = err.to_string();
        assert!(
            shown.contains(".env:4:1: a quote opened here is never closed"),
            "{shown}"
        );
        let file = write(dir.path(), "bad.env", "A=1\nB C=2\n");
        let shown = load(&[file], "--env-file", |_| false)
            .unwrap_err()
            .to_string();
        assert!(shown.contains("bad.env:2:"), "{shown}");
    }

    #[test]
    fn a_missing_file_is_a_usage_error_that_names_it() {
        let err = load(
            &[PathBuf::from("/nonexistent/.env.local")],
            "--env-file",
            |_| false,
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("/nonexistent/.env.local"));
    }

    #[test]
    fn positions_count_characters_and_clamp() {
        assert_eq!(position("ab\ncdé f", 9), (2, 6));
        assert_eq!(position("ab", 99), (1, 3));
        assert_eq!(position("é", 1), (1, 1));
    }
}
