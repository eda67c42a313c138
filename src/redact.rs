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
    // `PWD` and `OLDPWD` are the shell's working directories, which are not secrets (and hiding the
    // app's directory by value would hide every path in the log).
    upper != "PWD" && upper != "OLDPWD" && SECRET_WORDS.iter().any(|w| upper.contains(w))
}

/// The form of `value` that may be shown, given the variable it came from.
#[must_use]
pub fn value(name: &str, value: &str) -> String {
    // A value that starts with a scheme is one URL, whatever it holds (a password may hold a space).
    if is_url(value) {
        url(value)
    } else if is_secret_name(name) && !value.is_empty() {
        REDACTED.to_owned()
    } else {
        let shown = urls_in(value);
        // A value of megabytes (a file pasted into a variable) is shown by its start.
        match shown.char_indices().nth(SHOWN_CHARS) {
            Some((at, _)) => format!("{}… ({} bytes in all)", &shown[..at], value.len()),
            None => shown,
        }
    }
}

/// How much of a long value [`value`] shows, in characters.
const SHOWN_CHARS: usize = 256;

/// Whether `text` starts with a URL scheme and `://`.
fn is_url(text: &str) -> bool {
    text.split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme_start(scheme) == 0)
}

/// A URL reduced to its scheme and host: user, password, path, query and fragment are hidden.
/// Text that is not a URL is hidden whole.
///
/// The credential is found by the URL's structure: everything between `://` and the *last* `@` is
/// user and password, since a password may itself hold `/`, `?`, `#` or `@` (tokio-postgres and
/// ureq accept them). A path that holds an `@` is hidden with the credential, which shows less,
/// never more.
#[must_use]
pub fn url(text: &str) -> String {
    match text.split_once("://") {
        Some((scheme, rest)) if scheme_start(scheme) == 0 => {
            let mut shown = format!("{scheme}://");
            let tail = push_authority(&mut shown, rest, rest.len());
            if !tail.is_empty() && tail != "/" {
                shown.push('/');
                shown.push_str(REDACTED);
            }
            shown
        }
        _ => REDACTED.to_owned(),
    }
}

/// Appends the shown form of the authority at the start of `rest` (`[redacted]@host`) and returns
/// the rest of the URL after it (path, query, fragment). `token_end` bounds the URL: no `@` past it
/// belongs to this URL's credential.
fn push_authority<'a>(shown: &mut String, rest: &'a str, token_end: usize) -> &'a str {
    let after_credential = match rest[..token_end].rfind('@') {
        Some(at) => {
            shown.push_str(REDACTED);
            shown.push('@');
            at + 1
        }
        None => 0,
    };
    let host_end = after_credential + host_len(&rest[after_credential..token_end]);
    shown.push_str(&rest[after_credential..host_end]);
    &rest[host_end..token_end]
}

/// The length of the host (and port) at the start of `text`. The host ends at the first character
/// no host holds, not only at `/`, `?` or `#`: whatever follows it is hidden as path, so a client
/// that reads `;` or `\` as a path separator cannot make a query show. An IPv6 address keeps its
/// brackets (its `]` does not end the URL).
fn host_len(text: &str) -> usize {
    let mut in_brackets = false;
    text.char_indices()
        .find(|&(_, c)| match c {
            '[' if !in_brackets => {
                in_brackets = true;
                false
            }
            ']' if in_brackets => {
                in_brackets = false;
                false
            }
            _ => !(c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '~' | '%' | ':' | ',')),
        })
        .map_or(text.len(), |(i, _)| i)
}

/// Characters that end a URL quoted in text (a shell quote, a bracket around it).
fn ends_url(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '<' | '>' | '`' | ')' | ']' | '»' | '”' | '’'
    )
}

/// Where the URL scheme that ends `before` (the text just before a `://`) starts: the byte index
/// after the last character that cannot be in a scheme (letters, digits, `+`, `-`, `.`).
fn scheme_start(before: &str) -> usize {
    before
        .char_indices()
        .rev()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |(i, c)| i + c.len_utf8())
}

/// `text` with every URL in it reduced by [`url`] (for commands and messages that may quote one).
///
/// A URL starts at its scheme and ends at ASCII whitespace (which no URL holds unencoded); its credential
/// is everything from `://` to the last `@` before that end, whatever characters it holds. Its path
/// ends earlier, at a quote or closing bracket, so that the text around it stays readable.
#[must_use]
pub fn urls_in(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme is not secret: it goes out with the text before it.
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let token_end = after
            .find(|c: char| c.is_ascii_whitespace())
            .unwrap_or(after.len());
        let tail = push_authority(&mut out, after, token_end);
        // Text redacted before (an error message quoting a shown URL) keeps its `/[redacted]`
        // whole: its `]` is not a closing bracket around the URL.
        let skip = if tail
            .strip_prefix('/')
            .is_some_and(|t| t.starts_with(REDACTED))
        {
            1 + REDACTED.len()
        } else {
            0
        };
        let path_end = tail[skip..].find(ends_url).map_or(tail.len(), |i| skip + i);
        if !tail[..path_end].is_empty() && &tail[..path_end] != "/" {
            out.push('/');
            out.push_str(REDACTED);
        }
        let consumed = token_end - tail.len() + path_end;
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// A command as it may be shown (the log's `command=`, `plan`): URLs reduced as by [`urls_in`],
/// and the value of each `NAME=value` whose name looks secret hidden, whether a shell assignment
/// (`API_TOKEN=abc ./deploy`, an `env` argument) or an option (`--password=abc`); then the
/// space-separated options and headers whose names look secret (`--password X`, `-H 'Authorization: X'`).
///
/// These shape rules are the second net: a secret that is in the environment is hidden by value
/// wherever it appears (`secrets.rs`); these catch one written into release.toml itself.
#[must_use]
pub fn command(text: &str) -> String {
    options_and_headers(&assignments(&urls_in(text)))
}

/// The value of each `NAME=value` whose name looks secret hidden (see [`command`]).
fn assignments(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(c) = text[i..].chars().next() {
        let before = i.checked_sub(1).map(|b| bytes[b]);
        let word_start = before.is_none_or(|b| b.is_ascii_whitespace() || b";&|(\"'".contains(&b));
        if word_start {
            let name_start = i + text[i..].bytes().take_while(|&b| b == b'-').count();
            let name_len = text[name_start..]
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
                .count();
            let eq = name_start + name_len;
            if name_len > 0 && bytes.get(eq) == Some(&b'=') && is_secret_name(&text[name_start..eq])
            {
                let end = value_end(text, eq + 1, before.filter(|b| b"\"'".contains(b)));
                out.push_str(&text[i..=eq]);
                if end > eq + 1 {
                    out.push_str(REDACTED);
                }
                i = end;
                continue;
            }
        }
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Long options whose name looks secret take their value as the next word (`--password hunter2`,
/// `--token X`, `--auth-token X`, `--api-key X`, `--client-secret X`): that word is hidden. An option
/// that says it takes no secret (`--no-password`, `--password-file PATH`, `--key-id ID`) is left
/// alone; so are short options (`-p` is a port to psql and a prompt to mysql). A header whose name
/// looks secret (`Authorization`, `Proxy-Authorization`, `Cookie`, `X-Api-Key`, `X-Auth-Token`,
/// any `*-Key`, `*-Token`, `*-Secret`) has its value hidden, in `-H 'Name: value'`,
/// `--header=Name:value` or `Name: value` form: to the end of the quote it is in, else to the end
/// of the word (and the next word after `Bearer`, `Basic` or `Token`).
fn options_and_headers(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut hide_next_word = false;
    let mut carried_quote = None;
    while i < text.len() {
        let before = i.checked_sub(1).map(|b| bytes[b]);
        let word_start =
            before.is_none_or(|b| b.is_ascii_whitespace() || b"=;&|(\"',[".contains(&b));
        // Inside a quoted word split at its `=` (`"--header=X-Api-Key: a b"`), the quote still holds.
        let quote = before
            .filter(|b| b"\"'".contains(b))
            .or(carried_quote.take());
        if word_start
            && !text[i..]
                .starts_with(|c: char| c.is_whitespace() || c == ',' || c == '"' || c == '\'')
        {
            let end = value_end(text, i, quote);
            let word = &text[i..end];
            if hide_next_word && !word.starts_with('-') {
                hide_next_word = false;
                out.push_str(REDACTED);
                i = end;
                continue;
            }
            hide_next_word = false;
            if let Some(name) = word.strip_prefix("--") {
                // `--header=X-Api-Key:k`: what follows the `=` is a word of its own.
                if let Some(eq) = word.find('=') {
                    out.push_str(&text[i..=i + eq]);
                    i += eq + 1;
                    carried_quote = quote;
                    continue;
                }
                hide_next_word = is_secret_option(name);
            } else if let Some(colon) = header_colon(word) {
                let mut value_start = i + colon + 1;
                value_start += text[value_start..]
                    .bytes()
                    .take_while(|&b| b == b' ' || b == b'\t')
                    .count();
                let value_end = value_end(text, value_start, quote);
                out.push_str(&text[i..value_start]);
                if value_end > value_start {
                    out.push_str(REDACTED);
                    // `Authorization: Bearer TOKEN` unquoted: the scheme is one word, the token the next.
                    let scheme = &text[value_start..value_end];
                    hide_next_word = quote.is_none()
                        && ["bearer", "basic", "token", "digest"]
                            .iter()
                            .any(|s| s.eq_ignore_ascii_case(scheme));
                } else {
                    // `-H 'Authorization:' ...`, `Authorization: Bearer` split by the shell.
                    hide_next_word = quote.is_none();
                }
                i = value_end;
                continue;
            }
        }
        if let Some(c) = text[i..].chars().next() {
            if !(c.is_whitespace() || c == ',' || c == '"' || c == '\'') {
                // Inside a word that is not an option or a header: nothing to decide until it ends.
                let end = i + text[i..]
                    .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
                    .unwrap_or(text.len() - i);
                out.push_str(&text[i..end]);
                i = end;
                continue;
            }
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Whether a long option (without its `--`) takes a secret as its value.
fn is_secret_option(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let not_a_secret = lower.starts_with("no-")
        || [
            "-file", "_file", "-path", "-id", "_id", "-name", "-env", "-url", "-type", "-length",
        ]
        .iter()
        .any(|s| lower.ends_with(s));
    !name.is_empty() && !not_a_secret && is_secret_name(name)
}

/// Where the `:` of `word` is, when `word` starts with a header whose name looks secret: a header
/// name (letters, digits, `-`, `_`) that holds a `-` or is `Authorization`/`Cookie`, or one that is
/// followed by `: ` (a rake task such as `auth:setup` is not a header).
fn header_colon(word: &str) -> Option<usize> {
    let len = word
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        .count();
    if len == 0 || word.as_bytes().get(len) != Some(&b':') {
        return None;
    }
    let name = &word[..len];
    let lower = name.to_ascii_lowercase();
    let header_like = name.contains('-')
        || matches!(lower.as_str(), "authorization" | "cookie")
        || word.len() == len + 1;
    (header_like && is_secret_name(name)).then_some(len)
}

/// Where the value that starts at `start` ends: at whitespace or a shell operator outside quotes,
/// or, inside the quote `quoted` the word started in (an array item `"API_TOKEN=a b"`, a shell word
/// `'two words'`), at its closing quote, whatever it holds before. A backslash escapes the next
/// character (`a\ b`, an array item's `\"`), except inside single quotes, as in the shell.
fn value_end(text: &str, start: usize, quoted: Option<u8>) -> usize {
    let mut open: Option<char> = None;
    let in_single =
        |open: Option<char>| open == Some('\'') || (open.is_none() && quoted == Some(b'\''));
    let mut chars = text[start..].char_indices();
    while let Some((at, c)) = chars.next() {
        if c == '\\' && !in_single(open) {
            chars.next();
            continue;
        }
        match (open, quoted) {
            (Some(q), _) if c == q => open = None,
            (None, Some(q)) if c == char::from(q) => return start + at,
            (None, None) if c.is_whitespace() || ";&|)".contains(c) => return start + at,
            (None, None) if c == '"' || c == '\'' => open = Some(c),
            // Inside a quote, or a character of the value.
            _ => {}
        }
    }
    text.len()
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
    fn secret_assignments_in_commands() {
        for (command, shown) in [
            ("API_TOKEN=tok3 true", "API_TOKEN=[redacted] true"),
            (
                "DB_PASSWORD='a b' ./x; echo ok",
                "DB_PASSWORD=[redacted] ./x; echo ok",
            ),
            (
                "mysql --password=pw -u root",
                "mysql --password=[redacted] -u root",
            ),
            (
                r#"["env", "STRIPE_API_KEY=sk", "srv"]"#,
                r#"["env", "STRIPE_API_KEY=[redacted]", "srv"]"#,
            ),
            // In a quoted word the value runs to the closing quote: an array item is one
            // argument, and a quoted shell word may hold spaces; here that hides `cmd` too.
            (
                "sh -c \"MY_SECRET=s cmd\"",
                "sh -c \"MY_SECRET=[redacted]\"",
            ),
            (
                "RAILS_ENV=production PWD=/app rake",
                "RAILS_ENV=production PWD=/app rake",
            ),
            ("echo a=b TOKEN= x", "echo a=b TOKEN= x"),
            (
                "caf\u{e9} API_KEY=\u{e9}\u{e9} z",
                "caf\u{e9} API_KEY=[redacted] z",
            ),
        ] {
            assert_eq!(super::command(command), shown, "{command}");
        }
    }

    #[test]
    fn secret_options_and_headers_in_commands() {
        for (command, shown) in [
            (
                "tool --password hunter2 -v",
                "tool --password [redacted] -v",
            ),
            (
                "tool --token X --auth-token Y --api-key Z",
                "tool --token [redacted] --auth-token [redacted] --api-key [redacted]",
            ),
            (
                "vault --client-secret abc",
                "vault --client-secret [redacted]",
            ),
            (
                r#"["tool", "--password", "hunter2", "x"]"#,
                r#"["tool", "--password", "[redacted]", "x"]"#,
            ),
            (
                "curl -H 'Authorization: Bearer X1' https://h",
                "curl -H 'Authorization: [redacted]' https://h",
            ),
            (
                "curl -H \"X-Api-Key: k1\" u",
                "curl -H \"X-Api-Key: [redacted]\" u",
            ),
            (
                "curl --header=X-Api-Key:k2 u",
                "curl --header=X-Api-Key:[redacted] u",
            ),
            (
                "curl -H Authorization:Bearer tok3 u",
                "curl -H Authorization:[redacted] [redacted] u",
            ),
            (
                "curl -H X-Auth-Token:t4 -H Cookie:c5 u",
                "curl -H X-Auth-Token:[redacted] -H Cookie:[redacted] u",
            ),
            // Not secrets: a flag, a file, a rake task, a port, an id.
            ("psql --no-password db", "psql --no-password db"),
            (
                "tool --password-file /run/pw x",
                "tool --password-file /run/pw x",
            ),
            (
                "rake auth:setup tokens:prune",
                "rake auth:setup tokens:prune",
            ),
            ("psql -p 5432 db", "psql -p 5432 db"),
            ("aws --access-key-id AKIA x", "aws --access-key-id AKIA x"),
            ("tool --password --verbose", "tool --password --verbose"),
            (
                "curl -H 'Content-Type: json' u",
                "curl -H 'Content-Type: json' u",
            ),
        ] {
            assert_eq!(super::command(command), shown, "{command}");
        }
    }

    #[test]
    fn a_long_value_is_shown_by_its_start() {
        let long = "é".repeat(100_000);
        let shown = value("GATE", &long);
        assert!(shown.starts_with(&"é".repeat(SHOWN_CHARS)), "{shown}");
        assert!(shown.ends_with("… (200000 bytes in all)"), "{shown}");
        assert_eq!(
            shown.chars().count(),
            SHOWN_CHARS + "… (200000 bytes in all)".len() - 2
        );
        let short = "x".repeat(SHOWN_CHARS);
        assert_eq!(value("GATE", &short), short);
    }

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
            "OLDPWD",
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
    fn the_credential_ends_at_the_last_at_sign() {
        for (input, want) in [
            (
                "https://deploy:Ab/cd?e#f@hooks.example.com/x",
                "https://[redacted]@hooks.example.com/[redacted]",
            ),
            (
                "postgres://admin:Pw/x]@db:5432/app",
                "postgres://[redacted]@db:5432/[redacted]",
            ),
            ("redis://u:p@s@s@h", "redis://[redacted]@h"),
            ("https://h/a@b", "https://[redacted]@b"),
        ] {
            assert_eq!(url(input), want, "{input}");
            assert_eq!(urls_in(input), want, "{input}");
            assert_eq!(urls_in(&format!("«{input}» ok")), format!("«{want}» ok"));
        }
        assert_eq!(
            urls_in("[postgres://admin:Pw/]@db/app] and 'https://u:p\"q@h/p' x"),
            "[postgres://[redacted]@db/[redacted]] and 'https://[redacted]@h/[redacted]' x"
        );
    }

    #[test]
    fn a_query_or_path_never_survives_whatever_the_host_looks_like() {
        for (input, want) in [
            (
                "postgres://[::1]:5432/app?password=qpw1",
                "postgres://[::1]:5432/[redacted]",
            ),
            (
                "postgres://u:pw2@[2001:db8::1]/db?sslpassword=qpw3",
                "postgres://[redacted]@[2001:db8::1]/[redacted]",
            ),
            ("https://h;x=qpw7", "https://h/[redacted]"),
            ("https://h\\qpw8", "https://h/[redacted]"),
            ("https://h{qpw9}", "https://h/[redacted]"),
        ] {
            assert_eq!(url(input), want, "{input}");
            assert_eq!(urls_in(input), want, "{input}");
            assert_eq!(
                urls_in(&format!("psql {input} -c x")),
                format!("psql {want} -c x")
            );
        }
        // Multi-host lists and IDN hosts are hosts.
        assert_eq!(
            url("postgres://u:p@h1:5432,h2:5433/db"),
            "postgres://[redacted]@h1:5432,h2:5433/[redacted]"
        );
        assert_eq!(
            url("https://bücher.example/x"),
            "https://bücher.example/[redacted]"
        );
    }

    #[test]
    fn only_ascii_whitespace_ends_a_url_in_text() {
        // A no-break space is no URL delimiter to a client that accepts it: the credential after it
        // is still hidden.
        let shown = urls_in("curl https://user:p\u{a0}wd@h/x ok");
        assert!(!shown.contains("user") && !shown.contains("wd"), "{shown}");
        assert!(shown.ends_with(" ok"), "{shown}");
    }

    #[test]
    fn redacting_twice_changes_nothing() {
        for text in [
            "at postgres://u:p@127.0.0.1:5432/db (from DATABASE_URL): refused",
            "'https://hooks.slack.com/services/T/B/X' -d ok",
            "[postgres://admin:Pw/]@db/app]",
        ] {
            let once = urls_in(text);
            assert_eq!(urls_in(&once), once, "{text}");
            assert_eq!(urls_in(&url(text)), url(text), "{text}");
        }
    }

    #[test]
    fn multibyte_text_around_urls() {
        assert_eq!(
            urls_in("echo «https://example.com»"),
            "echo «https://example.com»"
        );
        assert_eq!(urls_in("é://h ü"), "é://h ü");
        assert_eq!(
            urls_in("日本https://u:p@h/x"),
            "日本https://[redacted]@h/[redacted]"
        );
        assert_eq!(url("«https://h"), REDACTED);
    }

    #[test]
    fn the_scheme_starts_after_the_last_character_a_scheme_cannot_have() {
        assert_eq!(scheme_start("https"), 0);
        assert_eq!(scheme_start(""), 0);
        assert_eq!(scheme_start("x«https"), "x«".len());
        assert_eq!(scheme_start("(git+ssh"), 1);
        assert_eq!(scheme_start("a b.c-d"), 2);
        assert_eq!(scheme_start("é"), 2);
        assert_eq!(scheme_start("ab:c"), 3);
        assert!(is_url("git+ssh://h/x"));
        assert!(!is_url("x y://h"));
        assert!(!is_url("://h"));
        assert!(is_url("https://h x"));
        assert_eq!(url("x y://u:p@h"), REDACTED);
        assert_eq!(value("DATABASE_URL", "not a url"), REDACTED);
        assert_eq!(
            value("DATABASE_URL", "postgres://u:p@h/db"),
            "postgres://[redacted]@h/[redacted]"
        );
        assert_eq!(
            value("NOTE", "see https://u:p@h/x now"),
            "see https://[redacted]@h/[redacted] now"
        );
    }

    /// A password made of `chars`, as it may appear in a URL: raw or percent-encoded.
    fn password_strategy() -> impl proptest::strategy::Strategy<Value = (String, bool)> {
        use proptest::prelude::*;
        (
            proptest::collection::vec(
                prop_oneof![
                    proptest::char::range('!', '~'),
                    proptest::char::any().prop_filter("no whitespace", |c| !c.is_whitespace()),
                    Just('@'),
                    Just('/'),
                    Just('?'),
                    Just('#'),
                ],
                4..24,
            ),
            any::<bool>(),
        )
            .prop_map(|(chars, encode)| {
                let raw: String = chars.into_iter().collect();
                if encode {
                    let mut out = String::new();
                    for b in raw.bytes() {
                        if b.is_ascii_alphanumeric() {
                            out.push(b as char);
                        } else {
                            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("%{b:02X}"));
                        }
                    }
                    (out, true)
                } else {
                    (raw, false)
                }
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1000))]

        #[test]
        fn a_password_never_survives(
            (password, _encoded) in password_strategy(),
            user in "[^\\s:@]{0,8}",
            scheme in "(https?|postgres(ql)?|redis|git\\+ssh)",
            host in "[a-z0-9.-]{1,12}(:[0-9]{1,5})?",
            path in "(/[^\\s]{0,12})?",
            before in "\\PC{0,12}",
            after in "(\\s\\PC{0,12})?",
        ) {
            let url_text = format!("{scheme}://{user}:{password}@{host}{path}");
            let text = format!("{before}{url_text}{after}");
            let shown = urls_in(&text);
            let elsewhere = before.contains(&password) || after.contains(&password)
                || REDACTED.contains(&password) || host.contains(&password);
            if !elsewhere {
                proptest::prop_assert!(!shown.contains(&password), "{text:?} -> {shown:?}");
                proptest::prop_assert_eq!(urls_in(&shown), shown.clone(), "redacting twice changes {:?}", text);
                proptest::prop_assert!(!url(&url_text).contains(&password), "{url_text:?}");
                proptest::prop_assert!(!value("DATABASE_URL", &url_text).contains(&password));
                proptest::prop_assert!(!value("PLAIN", &text).contains(&password));
            }
        }

        #[test]
        fn a_password_never_survives_in_a_value_that_is_one_url(
            password in "\\PC{4,20}",
            user in "\\PC{0,8}",
            host in "[a-z0-9.-]{1,12}",
            path in "(/\\PC{0,12})?",
            name in "(DATABASE_URL|REDIS|HOOK|X)",
        ) {
            let text = format!("postgres://{user}:{password}@{host}{path}");
            if !host.contains(&password) && !REDACTED.contains(&password) && !"postgres://".contains(&password) {
                proptest::prop_assert!(!url(&text).contains(&password), "{text:?}");
                proptest::prop_assert!(!value(&name, &text).contains(&password), "{text:?}");
            }
        }

        #[test]
        fn a_query_never_survives_whatever_the_host(
            secret in "[a-zA-Z0-9]{6,16}",
            scheme in "(https?|postgres(ql)?|redis|amqps|HTTPS)",
            host in "([a-z0-9.-]{1,12}|\\[[0-9a-f:]{2,20}\\])(:[0-9]{1,5})?",
            sep in "[/?#;\\\\{|^]",
            before in "\\PC{0,12}",
        ) {
            let text = format!("{before}{scheme}://{host}{sep}password={secret}");
            if !before.contains(&secret) && !host.contains(&secret) {
                proptest::prop_assert!(!urls_in(&text).contains(&secret), "{text:?} -> {:?}", urls_in(&text));
                proptest::prop_assert!(!value("X", &text).contains(&secret), "{text:?}");
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,60}(://\\PC{0,30})?") {
            let _ = urls_in(&text);
            let _ = url(&text);
            let _ = value("TOKEN", &text);
        }
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
