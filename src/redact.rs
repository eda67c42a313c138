//! Redaction: what of a variable's value or a URL may appear in a log, plan or error line.
//!
//! Secrets live in environment variables on every Procfile platform, and release logs are widely
//! readable, so release-tasks redacts by itself instead of trusting each caller to remember: a value
//! whose variable name looks secret is hidden, and a URL keeps only its scheme and host (a Slack hook
//! URL's path *is* the credential; a database URL carries a password).

/// Written in place of a hidden value.
pub const REDACTED: &str = "[redacted]";

/// Name fragments that mark a variable as holding a secret.
const SECRET_WORDS: &[&str] = &[
    "KEY",
    "SECRET",
    "TOKEN",
    "PASSWORD",
    "PASSWD",
    "PASS",
    "PWD",
    "CREDENTIAL",
    "AUTH",
    "PRIVATE",
    "SIGNATURE",
    "SESSION",
    "COOKIE",
    "DATABASE_URL",
    "WEBHOOK",
    "DSN",
];

/// Whether a variable's name says that its value is a secret.
#[must_use]
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    // `PWD` is also the shell's working directory, which is not a secret.
    upper != "PWD" && SECRET_WORDS.iter().any(|w| upper.contains(w))
}

/// The form of `value` that may be shown, given the variable it came from.
#[must_use]
pub fn value(name: &str, value: &str) -> String {
    if value.contains("://") {
        url(value)
    } else if is_secret_name(name) && !value.is_empty() {
        REDACTED.to_owned()
    } else {
        value.to_owned()
    }
}

/// A URL reduced to its scheme and host: user, password, path, query and fragment are hidden.
/// Text that is not a URL is hidden whole.
#[must_use]
pub fn url(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return REDACTED.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let hidden_user = authority.contains('@');
    let hidden_tail = authority_end < rest.len() && &rest[authority_end..] != "/";
    let mut shown = format!("{scheme}://");
    if hidden_user {
        shown.push_str(REDACTED);
        shown.push('@');
    }
    shown.push_str(host);
    if hidden_tail {
        shown.push('/');
        shown.push_str(REDACTED);
    }
    shown
}

/// `text` with every URL in it reduced by [`url`] (for commands and messages that may quote one).
#[must_use]
pub fn urls_in(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ']')
            })
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..start]);
        out.push_str(&url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Hides every occurrence of each secret in `text` (for messages that quote user input).
#[must_use]
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(secret.as_str(), REDACTED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        for name in [
            "SECRET_KEY_BASE",
            "API_TOKEN",
            "DATABASE_URL",
            "db_password",
            "SLACK_WEBHOOK_URL",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "RUN_MIGRATIONS_DURING_RELEASE",
            "APP_ENV",
            "PWD",
            "RAILS_ENV",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn urls_keep_scheme_and_host_only() {
        assert_eq!(
            url("https://hooks.slack.com/services/T000/B000/XXXX"),
            "https://hooks.slack.com/[redacted]"
        );
        assert_eq!(
            url("postgres://user:hunter2@db.example.com:5432/app?sslmode=require"),
            "postgres://[redacted]@db.example.com:5432/[redacted]"
        );
        assert_eq!(url("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("http://127.0.0.1:8080/"), "http://127.0.0.1:8080");
        assert_eq!(url("not a url"), REDACTED);
    }

    #[test]
    fn values() {
        assert_eq!(value("APP_ENV", "production"), "production");
        assert_eq!(value("API_TOKEN", "abc123"), REDACTED);
        assert_eq!(value("API_TOKEN", ""), "");
        assert_eq!(
            value("REDIS", "redis://:pw@h:6379"),
            "redis://[redacted]@h:6379"
        );
    }

    #[test]
    fn urls_inside_text() {
        assert_eq!(
            urls_in("curl -X POST 'https://hooks.slack.com/services/T/B/X' -d ok"),
            "curl -X POST 'https://hooks.slack.com/[redacted]' -d ok"
        );
        assert_eq!(urls_in("no urls here"), "no urls here");
    }

    #[test]
    fn scrub_hides_every_copy() {
        let s = scrub(
            "a hunter2 b hunter2",
            &["hunter2".to_owned(), "x".to_owned()],
        );
        assert_eq!(s, "a [redacted] b [redacted]");
    }
}
