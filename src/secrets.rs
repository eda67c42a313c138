//! Secrets, by value: the values that are credentials, collected once before anything runs, and
//! hidden wherever release-tasks itself prints or writes text.
//!
//! A secret is a value, not a shape. The values are collected from the environment snapshot (which
//! holds every `--env-file` variable too) as soon as it is complete, and from the config as soon as
//! it is read, before any task runs:
//! - the value of every variable whose name looks secret (`redact::is_secret_name`), from the
//!   environment and from each task's `env` table;
//! - the password of every URL in any variable's value (`REDIS_URL=redis://:pw@host`), so the lock's
//!   database URL's password too;
//! - the whole of every notify URL and every notify header value, expanded.
//!
//! [`Secrets::mask`] replaces each of them with `[redacted]`, in the forms in which release-tasks's
//! output can carry it: as it is, JSON- or logfmt-escaped (a quote, a backslash or a newline in it),
//! XML-escaped (the JUnit file), percent-encoded or percent-decoded (in a URL), and, for a value of
//! several lines (a PEM key, a JSON credential),
//! each of its lines on its own (output is split into lines, and the tail keeps only the last ones).
//! It is applied by the sinks, not by each message: the log writer (every log line, text or JSON,
//! errors included), `tell` (errors and warnings on stderr), `check`'s and `plan`'s stdout, the
//! report files, webhook bodies, the output tail and `history`. Task output that release-tasks only
//! passes through is the task's own business and is not changed.
//!
//! A short value cannot be told from ordinary text: `1` or `true` would turn every `1` in the log
//! into `[redacted]`. So a value is a secret only when it has at least [`MIN_CHARS`] characters, is
//! not all digits, and is not one of a few words that are configuration rather than credentials
//! ([`NOT_SECRET`]: `true`, `false`, `production`, ...). A shorter secret is still hidden by the
//! shape rules (`redact.rs`) where it appears as `NAME=value`, `--password value` or in a URL.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::{Arc, PoisonError, RwLock};

use crate::config::{Command, Config};
use crate::gate::Env;
use crate::redact::{self, REDACTED};

/// The fewest characters a value must have to be hidden wherever it appears.
pub const MIN_CHARS: usize = 6;

/// Values that are never taken for secrets, whatever their variable is called (compared without
/// regard to case): switches and environment names, which variables with secret-looking names
/// (`AUTH_ENABLED`, `SESSION_STORE_ENV`) often hold, and which appear everywhere in logs.
pub const NOT_SECRET: &[&str] = &[
    "true",
    "false",
    "enabled",
    "disabled",
    "production",
    "staging",
    "development",
    "default",
    "required",
    "optional",
];

/// The secret values and the forms in which they are hidden.
#[derive(Debug, Default, Clone)]
pub struct Secrets {
    /// Every form to hide, longest first (so that a secret that holds another is hidden whole).
    needles: Vec<String>,
}

impl Secrets {
    /// The secrets of the environment snapshot: values of secret-looking variables and the
    /// passwords of URLs in any value.
    #[must_use]
    pub fn from_env(env: &Env) -> Secrets {
        let mut secrets = Secrets::default();
        for (name, value) in env.iter() {
            secrets.add_var(name, value);
        }
        secrets
    }

    /// Adds the secrets the config names: each task's secret-looking `env` values, and the whole
    /// of each notify URL and header value, expanded from `env` (an unset `${VAR}` expands to
    /// nothing here; the task itself reports it).
    pub fn add_config(&mut self, config: &Config, env: &Env) {
        for task in &config.tasks {
            for (name, value) in &task.env {
                self.add_var(name, value);
            }
            if let Command::Notify(notify) = &task.command {
                if let Ok(url) = notify.url.expand(env) {
                    self.add(&url);
                    self.add_url_passwords(&url);
                }
                for (_, value) in &notify.headers {
                    if let Ok(value) = value.expand(env) {
                        self.add(&value);
                        // `Bearer TOKEN`: the token alone may appear too.
                        if let Some((_, token)) = value.split_once(' ') {
                            self.add(token);
                        }
                    }
                }
            }
        }
    }

    /// Adds one variable: its value if the name looks secret, and the passwords of URLs in it.
    pub fn add_var(&mut self, name: &str, value: &str) {
        if redact::is_secret_name(name) {
            self.add(value);
        }
        self.add_url_passwords(value);
    }

    /// Adds the password (and the user:password pair) of every URL in `text`.
    fn add_url_passwords(&mut self, text: &str) {
        let mut rest = text;
        while let Some(at) = rest.find("://") {
            let after = &rest[at + 3..];
            let end = after
                .find(|c: char| c.is_ascii_whitespace())
                .unwrap_or(after.len());
            if let Some(credential_end) = after[..end].rfind('@') {
                let credential = &after[..credential_end];
                self.add(credential);
                if let Some((_, password)) = credential.split_once(':') {
                    self.add(password);
                }
            }
            rest = &after[end..];
        }
    }

    /// Adds `value` (when it qualifies, see the module's rule) in every form it may be shown in,
    /// and so the value as a task prints it: without the spaces around it (`echo $X` splits words)
    /// and as a terminal shows it, which the output tail keeps (a carriage return at its end, from
    /// a secret file saved on Windows, and other control characters gone).
    pub fn add(&mut self, value: &str) {
        if !qualifies(value) {
            return;
        }
        let trimmed = value.trim();
        let shown = crate::tail::printable(trimmed);
        // As Rust quotes a string (`{:?}`, a gate's value in a skip reason): a control character is
        // `\u{1}` there, not JSON's `\u0001`.
        let debug = format!("{value:?}");
        let debug = &debug[1..debug.len() - 1];
        for base in [value, trimmed, shown.trim(), debug] {
            self.add_forms(base);
        }
    }

    /// Adds `value` as it is, escaped and encoded (see [`Secrets::add`]).
    fn add_forms(&mut self, value: &str) {
        if !qualifies(value) {
            return;
        }
        let mut forms = vec![value.to_owned()];
        // JSON (and logfmt, which escapes the same characters the same way) escaping.
        if let Ok(json) = serde_json::to_string(value) {
            forms.push(json[1..json.len() - 1].to_owned());
        }
        // The JUnit file's XML escaping.
        forms.push(crate::report::xml_escape(value));
        forms.push(percent_encoded(value, true));
        forms.push(percent_encoded(value, false));
        if let Some(decoded) = percent_decoded(value) {
            forms.push(decoded);
        }
        // Each line of a value of several lines.
        if value.contains('\n') {
            forms.extend(
                value
                    .lines()
                    .map(|l| l.trim_end_matches('\r').trim())
                    .map(str::to_owned),
            );
        }
        for form in forms {
            if qualifies(&form) && !self.needles.contains(&form) {
                self.needles.push(form);
            }
        }
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }

    /// `text` with every secret hidden; borrowed when it holds none.
    #[must_use]
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), REDACTED));
            }
        }
        out
    }

    /// Every form that is hidden, longest first (for a line cut short, whose end may hold the first
    /// part of one).
    #[must_use]
    pub fn needles(&self) -> &[String] {
        &self.needles
    }

    /// Whether nothing is hidden.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }
}

/// Whether `value` is hidden wherever it appears: [`MIN_CHARS`] characters or more (not counting
/// spaces around it), not all digits, and not one of [`NOT_SECRET`].
#[must_use]
pub fn qualifies(value: &str) -> bool {
    let value = value.trim();
    value.chars().count() >= MIN_CHARS
        && !value.bytes().all(|b| b.is_ascii_digit())
        && !NOT_SECRET.iter().any(|w| w.eq_ignore_ascii_case(value))
}

/// `value` with every byte but letters, digits and `-._~` written `%XX` (upper or lower hex).
fn percent_encoded(value: &str, upper: bool) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else if upper {
            let _ = write!(out, "%{b:02X}");
        } else {
            let _ = write!(out, "%{b:02x}");
        }
    }
    out
}

/// `value` with its `%XX` escapes decoded, when it has any and the result is UTF-8.
fn percent_decoded(value: &str) -> Option<String> {
    if !value.contains('%') {
        return None;
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or_default());
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    (decoded != value).then_some(decoded)
}

/// The secrets in force: set once from the environment (`main`), grown once by the config's
/// (`lib::load`). A process-wide value because the panic hook, which has nothing passed to it, must
/// hide them in a panic's message, and so must tracing's subscriber, which is process-wide by
/// tracing's design; every other sink reads the same value, so that a secret is hidden everywhere
/// or nowhere.
static CURRENT: RwLock<Option<Arc<Secrets>>> = RwLock::new(None);

/// Makes `secrets` the ones every sink hides.
pub fn install(secrets: Secrets) {
    *CURRENT.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(secrets));
}

/// The secrets in force (none before [`install`]).
#[must_use]
pub fn current() -> Arc<Secrets> {
    CURRENT
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .unwrap_or_default()
}

/// Adds the config's secrets to those in force (see [`Secrets::add_config`]).
pub fn add_config(config: &Config, env: &Env) {
    let mut secrets = (*current()).clone();
    secrets.add_config(config, env);
    install(secrets);
}

/// `text` with the secrets in force hidden.
#[must_use]
pub fn mask(text: &str) -> Cow<'_, str> {
    let secrets = current();
    match secrets.mask(text) {
        Cow::Borrowed(_) => Cow::Borrowed(text),
        Cow::Owned(masked) => Cow::Owned(masked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(values: &[&str]) -> Secrets {
        let mut s = Secrets::default();
        for v in values {
            s.add(v);
        }
        s
    }

    #[test]
    fn short_values_digits_and_switches_are_not_secrets() {
        for value in [
            "1",
            "true",
            "abc",
            "12345",
            " 1234 ",
            "300000",
            "TRUE",
            "production",
            "False",
        ] {
            assert!(!qualifies(value), "{value:?}");
        }
        for value in [
            "hunter",
            "hunter2",
            "s3cr3t-token",
            "123abc",
            "ünïcød",
            " abcdef ",
        ] {
            assert!(qualifies(value), "{value:?}");
        }
        // Characters are counted, not bytes: five accented letters are ten bytes.
        assert!(!qualifies("ünïcø"));
        assert!(!qualifies("hunte"));
        let s = of(&["1", "true", "production"]);
        assert!(s.is_empty());
        assert!(!of(&["hunter22"]).is_empty());
        assert_eq!(s.mask("exit 1 true production"), "exit 1 true production");
    }

    #[test]
    fn every_copy_in_every_form_is_hidden() {
        let s = of(&["p@ss w\"rd/1"]);
        assert_eq!(s.mask("a p@ss w\"rd/1 b"), "a [redacted] b");
        assert_eq!(s.mask(r#"{"x":"p@ss w\"rd/1"}"#), r#"{"x":"[redacted]"}"#);
        assert_eq!(s.mask("u=p%40ss%20w%22rd%2F1"), "u=[redacted]");
        assert_eq!(s.mask("u=p%40ss%20w%22rd%2f1"), "u=[redacted]");
        assert_eq!(
            s.mask("<x a=\"p@ss w&quot;rd/1\"/>"),
            "<x a=\"[redacted]\"/>"
        );
        assert!(matches!(s.mask("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_value_of_several_lines_is_hidden_whole_and_line_by_line() {
        let pem = "-----BEGIN KEY-----\nMIIEabcdefSECRET\n-----END KEY-----";
        let s = of(&[pem]);
        assert_eq!(s.mask(&format!("x {pem} y")), "x [redacted] y");
        assert_eq!(s.mask("line: MIIEabcdefSECRET"), "line: [redacted]");
        assert_eq!(
            s.mask(r"-----BEGIN KEY-----\nMIIEabcdefSECRET\n-----END KEY-----"),
            "[redacted]"
        );
        // A short line of it (a JSON credential's braces) is not hidden on its own.
        let s = of(&["{\n  \"private_key\": \"k-123456789\"\n}"]);
        assert_eq!(s.mask("{ } ok"), "{ } ok");
        assert_eq!(s.mask("\"private_key\": \"k-123456789\""), "[redacted]");
        assert_eq!(
            s.needles().len(),
            s.needles()
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        );
    }

    #[test]
    fn a_secret_that_holds_another_is_hidden_whole() {
        let s = of(&["abcdef", "abcdefghij"]);
        assert_eq!(s.needles(), ["abcdefghij", "abcdef"]);
        assert_eq!(s.mask("abcdefghij abcdef"), "[redacted] [redacted]");
    }

    #[test]
    fn encoded_secrets_are_hidden_decoded() {
        let s = of(&["p%40ssword"]);
        assert_eq!(s.mask("login p@ssword failed"), "login [redacted] failed");
    }

    #[test]
    fn the_config_gives_notify_urls_header_values_and_task_secrets() {
        let config = crate::config::parse(
            std::path::Path::new("release.toml"),
            "[tasks.t]\nrun = \"true\"\nenv = { DEPLOY_TOKEN = \"task-token-1\", MODE = \"fast-mode\" }\n\
             [tasks.n]\nnotify = { url = \"https://hooks.example/${HOOK}\", headers = { Authorization = \"Bearer ${BEARER}\" } }\n",
        )
        .unwrap();
        let env = crate::gate::env_of(&[("HOOK", "T0/B0/x"), ("BEARER", "bearer-tok-2")]);
        let mut s = Secrets::default();
        s.add_config(&config, &env);
        assert_eq!(
            s.mask("task-token-1 fast-mode https://hooks.example/T0/B0/x bearer-tok-2"),
            "[redacted] fast-mode [redacted] [redacted]"
        );
        assert_eq!(s.mask("Bearer bearer-tok-2"), "[redacted]");
    }

    #[test]
    fn the_environment_gives_secret_names_and_url_passwords() {
        let env = crate::gate::env_of(&[
            ("API_TOKEN", "tok-123456"),
            ("REDIS_URL", "redis://:redis-pw-1@h:6379"),
            ("APP_NAME", "my-application"),
            ("AUTH_ENABLED", "true"),
        ]);
        let s = Secrets::from_env(&env);
        assert_eq!(
            s.mask("tok-123456 redis-pw-1 my-application true"),
            "[redacted] [redacted] my-application true"
        );
    }
}
