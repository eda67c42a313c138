//! `--env-file`: variables for local runs from `.env` files, read the way a shell reads them.
//!
//! Only files named on the command line (or in `RELEASE_TASKS_ENV_FILE`) are read: a stray `.env`
//! left in a slug must never change a production release.
//!
//! One rule covers precedence and expansion alike: the files are read as `set -a; . .env; . .env.local`
//! would read them, in order and top to bottom, except that a variable the process environment sets
//! is never changed by a file. So a later assignment wins over an earlier one (in one file or across
//! files), and `${NAME}` (or `$NAME`) is the value `NAME` has at that point: the process
//! environment's if it sets it, else the last assignment above it (in this file or an earlier one),
//! else empty. What is loaded joins the environment snapshot that gates, `[require]` and `${VAR}`
//! read, and the environment every task inherits; each variable remembers the file that set it last,
//! so `plan` can say where a gate's value came from.
//!
//! The syntax is dotenv's, which is the shell's for assignments: `NAME=value`, `export NAME=value`,
//! `# comments`, single quotes (literal, may span lines), double quotes (`\n`, `\"`, `\\`, `\$` and
//! expansion; may span lines), and unquoted values (a backslash escapes the next character, a space
//! ends the value, `#` after a space starts a comment). An error names the file, the line and what is
//! wrong, and never quotes the text: a `.env` file is where the secrets live.

use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use crate::error::{Diagnostic, Error, Result};

/// The largest `.env` file read, as for release.toml: a path that names a device or a huge file is
/// refused before it is read.
const MAX_ENV_FILE_BYTES: u64 = 1024 * 1024;

/// One variable the files set (and the process environment did not), with its final value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub name: String,
    pub value: String,
    /// The file that set it last, as named on the command line.
    pub file: PathBuf,
}

/// Reads `files` in order; `process` gives the process environment's value of a variable (then
/// the files never change it, and `${NAME}` expands to it). A path that names no readable regular
/// file (missing, a directory, a device other than /dev/null, over 1 MiB, no permission; a pipe is
/// read) is a usage error (2); a file that
/// cannot be parsed is a config error (78) with its line and column.
/// `from` is where the files were named (`--env-file` or `RELEASE_TASKS_ENV_FILE`), for messages.
pub fn load(
    files: &[PathBuf],
    from: &str,
    process: impl Fn(&str) -> Option<String>,
) -> Result<Vec<Loaded>> {
    let mut loaded: Vec<Loaded> = Vec::new();
    for file in files {
        let text = read(file, from)?;
        let mut parser = Parser {
            text: &text,
            at: 0,
            file,
            expanded: 0,
        };
        while let Some((name, value)) = parser.assignment(|name| {
            process(name).or_else(|| {
                loaded
                    .iter()
                    .find(|l| l.name == name)
                    .map(|l| l.value.clone())
            })
        })? {
            if process(&name).is_some() {
                continue;
            }
            match loaded.iter_mut().find(|l| l.name == name) {
                Some(earlier) => {
                    earlier.value = value;
                    earlier.file.clone_from(file);
                }
                None => loaded.push(Loaded {
                    name,
                    value,
                    file: file.clone(),
                }),
            }
        }
    }
    Ok(loaded)
}

/// The text of one file: a regular file of at most [`MAX_ENV_FILE_BYTES`], UTF-8, without a byte
/// order mark.
fn read(file: &Path, from: &str) -> Result<String> {
    let usage = |problem: String| {
        // The path on the command line names no usable file: a usage error, like a missing one.
        Error::Usage(format!(
            "{from} {}: {problem}; name a readable .env file (a relative path is taken from the current directory)",
            file.display()
        ))
    };
    let opened = std::fs::File::open(file).map_err(|err| {
        if let Some(limit) = crate::limits::explain(&err) {
            return Error::Limit(format!(
                "{from} {}: cannot read it: {limit}",
                file.display()
            ));
        }
        usage(match err.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_owned(),
            _ => format!("cannot read it ({err})"),
        })
    })?;
    // The opened file itself is looked at, so that what is checked is what is read.
    let meta = opened
        .metadata()
        .map_err(|err| usage(format!("cannot read it ({err})")))?;
    if meta.is_dir() {
        return Err(usage("is a directory, not a file".to_owned()));
    }
    // A pipe is read, within the bound (`--env-file <(sops -d .env)`), and /dev/null is empty
    // (`--env-file ${ENV_FILE:-/dev/null}`); any other device or a socket is refused unread.
    let file_type = meta.file_type();
    let is_dev_null = || {
        file_type.is_char_device()
            && std::fs::metadata("/dev/null").is_ok_and(|null| null.rdev() == meta.rdev())
    };
    if !(meta.is_file() || file_type.is_fifo() || is_dev_null()) {
        return Err(usage(
            "it is not a regular file (a device or a socket); name the .env file itself".to_owned(),
        ));
    }
    if meta.len() > MAX_ENV_FILE_BYTES {
        return Err(usage(format!(
            "it is {} bytes, over the {MAX_ENV_FILE_BYTES}-byte limit for a .env file; is this the right file?",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows after the check.
    opened
        .take(MAX_ENV_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| usage(format!("cannot read it ({err})")))?;
    if bytes.len() as u64 > MAX_ENV_FILE_BYTES {
        return Err(usage(format!(
            "it is over the {MAX_ENV_FILE_BYTES}-byte limit for a .env file; is this the right file?"
        )));
    }
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
    // No variable can hold a NUL byte (exec's environment is C strings): found here, with its place,
    // rather than where the value would be put into the environment.
    if let Some(at) = text.find('\0') {
        let (line, col) = position(&text, at);
        return Err(invalid(
            file,
            line,
            col,
            "a NUL byte is in the file, and no variable can hold one; is this the right file?"
                .into(),
        ));
    }
    Ok(text)
}

/// Reads assignments from one file's text, in order.
struct Parser<'a> {
    text: &'a str,
    /// The byte offset of the next character to read.
    at: usize,
    file: &'a Path,
    /// Bytes that `${}` expansions have added so far, bounded by [`MAX_EXPANDED_BYTES`].
    expanded: usize,
}

/// The most that expansions may add in one file: more than exec takes in all, so no real file
/// reaches it, while `B=$A$A$A...` lines cannot make gigabytes out of a small file.
const MAX_EXPANDED_BYTES: usize = 4 * 1024 * 1024;

/// What every syntax error tells the user to do.
const HOW: &str =
    "write NAME=value, quote a value that has spaces or `#` (NAME=\"a b\"), and close every quote";

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    /// A syntax error at byte `at`: its line and column and `problem`, never the text.
    fn error(&self, at: usize, problem: &str) -> Error {
        let (line, col) = position(self.text, at);
        invalid(self.file, line, col, format!("{problem}; {HOW}"))
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.at += 1;
        }
    }

    /// Skips blank lines and comments; then the rest of the line must be blank or a comment.
    fn skip_to_line_end(&mut self, what: &str) -> Result<()> {
        self.skip_blanks();
        match self.peek() {
            None | Some('\n') => Ok(()),
            Some('\r') if self.text[self.at..].starts_with("\r\n") => Ok(()),
            Some('#') => {
                self.at += self.text[self.at..]
                    .find('\n')
                    .unwrap_or(self.text.len() - self.at);
                Ok(())
            }
            Some(_) => Err(self.error(self.at, what)),
        }
    }

    /// The next `NAME=value`, with `value` expanded through `lookup`; `None` at the end.
    fn assignment(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(String, String)>> {
        loop {
            match self.peek() {
                None => return Ok(None),
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('#') => self.skip_to_line_end("")?,
                Some(_) => break,
            }
        }
        let start = self.at;
        let mut name = self.name();
        if name == "export" && matches!(self.peek(), Some(' ' | '\t')) {
            self.skip_blanks();
            name = self.name();
        }
        if name.is_empty() {
            return Err(self.error(
                self.at,
                "a line must start with a variable name (letters, digits, `_` or `.`, not starting with a digit)",
            ));
        }
        self.skip_blanks();
        if self.peek() != Some('=') {
            // The "name" may be a secret pasted on a line of its own: it is not shown.
            return Err(self.error(start, "this line has no `=` after its name"));
        }
        self.bump();
        self.skip_blanks();
        let value = self.value(&lookup)?;
        self.skip_to_line_end(&format!(
            "unexpected text after the value of {name} (a space ends an unquoted value)"
        ))?;
        Ok(Some((name, value)))
    }

    fn name(&mut self) -> String {
        let first_ok = self
            .peek()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok {
            return String::new();
        }
        let len = self.text[self.at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(self.text.len() - self.at);
        let name = self.text[self.at..self.at + len].to_owned();
        self.at += len;
        name
    }

    /// The value up to the end of its line (or of its last quote), quotes removed, escapes and
    /// expansions done.
    fn value(&mut self, lookup: &impl Fn(&str) -> Option<String>) -> Result<String> {
        let mut out = String::new();
        loop {
            match self.peek() {
                None | Some(' ' | '\t' | '\n') => return Ok(out),
                Some('\r') if self.text[self.at..].starts_with("\r\n") => return Ok(out),
                Some('\'') => {
                    let open = self.at;
                    self.bump();
                    let Some(len) = self.text[self.at..].find('\'') else {
                        return Err(self.error(open, "a single quote opened here is never closed"));
                    };
                    out.push_str(&self.text[self.at..self.at + len]);
                    self.at += len + 1;
                }
                Some('"') => {
                    let open = self.at;
                    self.bump();
                    loop {
                        match self.bump() {
                            None => {
                                return Err(
                                    self.error(open, "a double quote opened here is never closed")
                                );
                            }
                            Some('"') => break,
                            Some('\\') => match self.bump() {
                                Some('n') => out.push('\n'),
                                Some('\n') => {}
                                Some(c @ ('\\' | '"' | '$' | '`')) => out.push(c),
                                Some(c) => {
                                    out.push('\\');
                                    out.push(c);
                                }
                                None => {
                                    return Err(self.error(
                                        open,
                                        "a double quote opened here is never closed",
                                    ));
                                }
                            },
                            Some('$') => self.expand(&mut out, lookup)?,
                            Some(c) => out.push(c),
                        }
                    }
                }
                Some('\\') => {
                    self.bump();
                    match self.bump() {
                        Some('\n') | None => {}
                        Some(c) => out.push(c),
                    }
                }
                Some('$') => {
                    self.bump();
                    self.expand(&mut out, lookup)?;
                }
                Some(c) => {
                    self.bump();
                    out.push(c);
                }
            }
        }
    }

    /// After a `$`: `${NAME}` or `$NAME` expanded, or the `$` itself when no name follows.
    fn expand(&mut self, out: &mut String, lookup: &impl Fn(&str) -> Option<String>) -> Result<()> {
        let dollar = self.at - 1;
        if self.peek() == Some('{') {
            self.bump();
            let name = self.name();
            if name.is_empty() || self.peek() != Some('}') {
                return Err(self.error(
                    dollar,
                    "`${` must hold a variable name and end with `}` (only ${NAME} and $NAME are expanded, with no default)",
                ));
            }
            self.bump();
            self.push_expanded(out, lookup(&name), dollar)?;
        } else if self
            .peek()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        {
            let len = self.text[self.at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(self.text.len() - self.at);
            let name = &self.text[self.at..self.at + len];
            self.at += len;
            self.push_expanded(out, lookup(name), dollar)?;
        } else {
            out.push('$');
        }
        Ok(())
    }

    /// Appends an expansion's value, within [`MAX_EXPANDED_BYTES`] for the file.
    fn push_expanded(&mut self, out: &mut String, value: Option<String>, at: usize) -> Result<()> {
        let value = value.unwrap_or_default();
        self.expanded += value.len();
        if self.expanded > MAX_EXPANDED_BYTES {
            let (line, col) = position(self.text, at);
            return Err(invalid(
                self.file,
                line,
                col,
                "the expansions in this file add up to more than 4 MiB, more than exec could hand \
                 on to a task; expand less (each ${NAME} copies the whole value)"
                    .to_owned(),
            ));
        }
        out.push_str(&value);
        Ok(())
    }
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

    /// What `files` load to, as (name, value, file name) triples, with `process` set.
    fn loaded(files: &[PathBuf], process: &[(&str, &str)]) -> Vec<(String, String, String)> {
        load(files, "--env-file", |name| {
            process
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap()
        .into_iter()
        .map(|l| {
            let file = l.file.file_name().unwrap().to_string_lossy().into_owned();
            (l.name, l.value, file)
        })
        .collect()
    }

    fn triple(name: &str, value: &str, file: &str) -> (String, String, String) {
        (name.to_owned(), value.to_owned(), file.to_owned())
    }

    #[test]
    fn files_are_read_as_a_shell_sources_them_and_the_process_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.env",
            "# comment\nA=from-a\nB=\"from a\"\nexport C=c\nDB_HOST=db\nSHELL_SET=x\n",
        );
        let b = write(
            dir.path(),
            "b.env",
            "A=from-b\nD=d\nURL=postgres://${DB_HOST}/app\nS=$SHELL_SET\nSHELL_SET=y\n",
        );
        assert_eq!(
            loaded(&[a, b], &[("SHELL_SET", "env")]),
            [
                triple("A", "from-b", "b.env"),
                triple("B", "from a", "a.env"),
                triple("C", "c", "a.env"),
                triple("DB_HOST", "db", "a.env"),
                triple("D", "d", "b.env"),
                triple("URL", "postgres://db/app", "b.env"),
                triple("S", "env", "b.env"),
            ]
        );
    }

    #[test]
    fn within_a_file_the_last_assignment_wins_for_values_and_expansion_alike() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            ".env",
            "A=first\nB=${A}\nA=second\nC=${A}\nD=$A-x\n",
        );
        assert_eq!(
            loaded(&[f], &[]),
            [
                triple("A", "second", ".env"),
                triple("B", "first", ".env"),
                triple("C", "second", ".env"),
                triple("D", "second-x", ".env"),
            ]
        );
    }

    #[test]
    fn quoting_escapes_and_comments_as_in_dotenv() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            ".env",
            concat!(
                "X=1\n",
                "SQ='a $X \\n b'\n",
                "DQ=\"a $X \\n \\\" \\$X\"\n",
                "UQ=a\\ b#not-a-comment # a comment\n",
                "ML=\"line1\nline2\"\n",
                "EMPTY=\n",
                "  SPACED = v  \r\n",
                "DOTTED.NAME=v\n",
                "CAT=\"a\"'b'c\n",
                "DOLLAR=a$\n",
            ),
        );
        let got = loaded(&[f], &[]);
        let value = |name: &str| got.iter().find(|(n, _, _)| n == name).unwrap().1.clone();
        assert_eq!(value("SQ"), "a $X \\n b");
        assert_eq!(value("DQ"), "a 1 \n \" $X");
        assert_eq!(value("UQ"), "a b#not-a-comment");
        assert_eq!(value("ML"), "line1\nline2");
        assert_eq!(value("EMPTY"), "");
        assert_eq!(value("SPACED"), "v");
        assert_eq!(value("DOTTED.NAME"), "v");
        assert_eq!(value("CAT"), "abc");
        assert_eq!(value("DOLLAR"), "a$");
    }

    /// The error's text for `text`.
    fn error_of(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), ".env", text);
        let err = load(&[f], "--env-file", |_| None).unwrap_err();
        assert_eq!(err.exit_code(), 78, "{err}");
        err.to_string()
    }

    #[test]
    fn a_syntax_error_names_the_file_line_and_problem_and_never_the_text() {
        for (text, at, problem) in [
            (
                "A=1\n\nB=2\nC=\"never closed\nD=4\n",
                ":4:3:",
                "a double quote opened here is never closed",
            ),
            (
                "A=1\nB C=2\n",
                ":2:1:",
                "this line has no `=` after its name",
            ),
            (
                "sk_live_SECRETVALUE\n",
                ":1:1:",
                "this line has no `=` after its name",
            ),
            (
                "API_TOKEN=\"first line\nrest-of-the-SECRETVALUE\" x\n",
                ":2:26:",
                "unexpected text after the value of API_TOKEN",
            ),
            (
                "K='SECRETVALUE\n",
                ":1:3:",
                "a single quote opened here is never closed",
            ),
            (
                "K=${SECRETVALUE:-x}\n",
                ":1:3:",
                "`${` must hold a variable name",
            ),
            (
                "=SECRETVALUE\n",
                ":1:1:",
                "a line must start with a variable name",
            ),
            (
                "A=1\nK=ab\0SECRETVALUE\n",
                ":2:5:",
                "a NUL byte is in the file",
            ),
        ] {
            let shown = error_of(text);
            assert!(
                shown.contains(&format!(".env{at} {problem}")),
                "{text:?}: {shown}"
            );
            assert!(!shown.contains("SECRETVALUE"), "{text:?}: {shown}");
        }
    }

    #[test]
    fn a_path_that_is_no_usable_file_is_a_usage_error_that_names_it() {
        for (path, problem) in [
            ("/nonexistent/.env.local", "no such file"),
            ("/dev/zero", "it is not a regular file"),
            ("/", "is a directory"),
        ] {
            let err = load(&[PathBuf::from(path)], "--env-file", |_| None).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let shown = err.to_string();
            assert!(shown.contains(path) && shown.contains(problem), "{shown}");
        }
        let dir = tempfile::tempdir().unwrap();
        let big = write(dir.path(), "big.env", &"A=1\n".repeat(300_000));
        let shown = load(&[big], "--env-file", |_| None)
            .unwrap_err()
            .to_string();
        assert!(shown.contains("over the 1048576-byte limit"), "{shown}");
    }

    #[test]
    fn expansions_cannot_blow_a_small_file_up() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("A={}\n{}", "x".repeat(100_000), "A=$A$A\n".repeat(10));
        let f = write(dir.path(), ".env", &text);
        let shown = load(&[f], "--env-file", |_| None).unwrap_err().to_string();
        assert!(shown.contains("add up to more than 4 MiB"), "{shown}");
        assert!(!shown.contains("xxxx"), "{shown}");
    }

    #[test]
    fn positions_count_characters_and_clamp() {
        assert_eq!(position("ab\ncdé f", 9), (2, 6));
        assert_eq!(position("ab", 99), (1, 3));
        assert_eq!(position("é", 1), (1, 1));
    }
}
