//! MySQL URLs as platforms and ORMs hand them out (`mysql://`, Rails' `mysql2://`, `mariadb://`) ->
//! where to connect, who to log in as, and what TLS to use.
//!
//! The credential is split off at the URL's last `@`, as for PostgreSQL (`../url.rs`): a password may
//! hold `/`, `?`, `#` or `@`. TLS follows MySQL's `--ssl-mode` (`DISABLED`, `PREFERRED` (the default),
//! `REQUIRED`, `VERIFY_CA`, `VERIFY_IDENTITY`, any case; also Go's `tls=`), with the CA file in
//! `ssl-ca`/`sslca`. Parameters that ORMs and drivers add for themselves are ignored; any other is an
//! error naming it. No message from here contains the password.

use std::path::PathBuf;
use std::time::Duration;

use super::super::url::{Roots, SslMode, Tls, decode, split_host_port};

/// Parameters that ORMs and drivers put in the URL for themselves (Rails, Prisma, Go, `SQLAlchemy`,
/// Laravel): they mean nothing to the lock's connection.
const IGNORED: &[&str] = &[
    "encoding",
    "charset",
    "collation",
    "pool",
    "reconnect",
    "timeout",
    "variables",
    "reaping_frequency",
    "checkout_timeout",
    "prepared_statements",
    "connection_limit",
    "pool_timeout",
    "socket_timeout",
    "statement_cache_size",
    "schema",
    "parseTime",
    "loc",
    "readTimeout",
    "writeTimeout",
    "sslaccept",
];

/// A parsed MySQL URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: Option<String>,
    pub tls: Tls,
    /// `connect_timeout` (seconds) from the URL: how long one connection attempt may take.
    pub connect_timeout: Option<Duration>,
}

/// Whether `url` is one of the MySQL schemes.
#[must_use]
pub fn is_mysql(url: &str) -> bool {
    ["mysql://", "mysql2://", "mariadb://"]
        .iter()
        .any(|s| url.starts_with(s))
}

/// Reads `url`. The error says which part or parameter is wrong and never contains the password.
#[allow(clippy::too_many_lines)] // one arm per parameter reads best as one match
pub fn parse(url: &str) -> Result<Target, String> {
    let Some(rest) = ["mysql://", "mysql2://", "mariadb://"]
        .iter()
        .find_map(|s| url.strip_prefix(s))
    else {
        return Err(
            "it must be a mysql://, mysql2:// or mariadb:// URL, like mysql://user:password@host:3306/database"
                .into(),
        );
    };
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut target = Target {
        host: "localhost".into(),
        port: 3306,
        user: String::new(),
        password: String::new(),
        database: None,
        tls: Tls {
            mode: SslMode::Prefer,
            roots: Roots::System,
            client: None,
        },
        connect_timeout: None,
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        target.user = decode(user, "the user name")?;
        target.password = decode(password, "the password")?;
    }
    if hostport.contains(',') {
        return Err(
            "several hosts are not supported for [lock] on MySQL; give the one primary server"
                .into(),
        );
    }
    if !hostport.is_empty() {
        let (host, port) = split_host_port(hostport)?;
        if !host.is_empty() {
            target.host = decode(host, "the host")?;
        }
        if let Some(port) = port.filter(|p| !p.is_empty()) {
            target.port = port
                .parse()
                .map_err(|_| format!("port {port:?} is not a port number"))?;
        }
    }
    let path = path.trim_end_matches('/');
    if !path.is_empty() {
        target.database = Some(decode(path, "the database name")?);
    }
    let mut mode_given = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name, "a parameter name")?;
        let value = decode(value, &format!("the value of {name}"))?;
        let bad = |expected: &str| format!("parameter {name}={value:?}: {expected}");
        match name.as_str() {
            "ssl-mode" | "sslmode" | "ssl_mode" => {
                mode_given = true;
                target.tls.mode = match value.to_ascii_uppercase().replace('-', "_").as_str() {
                    "DISABLED" | "DISABLE" => SslMode::Disable,
                    "PREFERRED" | "PREFER" => SslMode::Prefer,
                    "REQUIRED" | "REQUIRE" => SslMode::Require,
                    "VERIFY_CA" => SslMode::VerifyCa,
                    "VERIFY_IDENTITY" | "VERIFY_FULL" => SslMode::VerifyFull,
                    _ => {
                        return Err(bad(
                            "use DISABLED, PREFERRED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY",
                        ));
                    }
                };
            }
            // go-sql-driver/mysql's form.
            "tls" => {
                mode_given = true;
                target.tls.mode = match value.as_str() {
                    "false" => SslMode::Disable,
                    "preferred" => SslMode::Prefer,
                    "skip-verify" => SslMode::Require,
                    "true" => SslMode::VerifyFull,
                    _ => return Err(bad("use false, preferred, skip-verify or true")),
                };
            }
            "ssl-ca" | "sslca" | "ssl_ca" | "sslrootcert" => {
                target.tls.roots = Roots::File(PathBuf::from(value));
            }
            "connect_timeout" | "connect-timeout" | "connectTimeout" => {
                let seconds: f64 = value
                    .trim_end_matches('s')
                    .parse()
                    .map_err(|_| bad("use seconds"))?;
                if seconds > 0.0 && seconds.is_finite() {
                    target.connect_timeout = Some(Duration::from_secs_f64(seconds.max(1.0)));
                }
            }
            other if IGNORED.contains(&other) => {
                tracing::debug!(
                    parameter = other,
                    "ignoring a database URL parameter meant for an ORM"
                );
            }
            other => {
                return Err(format!(
                    "parameter {other} is not one release-tasks knows (it reads ssl-mode (or sslmode), \
                     ssl-ca (or sslca), connect_timeout, and ignores {}); remove it from the URL, or use a \
                     URL without it for [lock]",
                    IGNORED.join(", ")
                ));
            }
        }
    }
    // As MySQL's client: a CA file without a mode, or with REQUIRED, checks the chain.
    if matches!(target.tls.roots, Roots::File(_))
        && (!mode_given || target.tls.mode == SslMode::Require)
    {
        target.tls.mode = SslMode::VerifyCa;
    }
    if target.user.is_empty() {
        return Err("the URL has no user name; write mysql://user:password@host/database".into());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rails_prisma_and_laravel_urls_are_usable() {
        let t = parse(
            "mysql2://app:p%40ss@db.example.com:3307/shop?encoding=utf8mb4&pool=5&reconnect=true",
        )
        .unwrap();
        assert_eq!(
            (
                t.user.as_str(),
                t.password.as_str(),
                t.host.as_str(),
                t.port
            ),
            ("app", "p@ss", "db.example.com", 3307)
        );
        assert_eq!(t.database.as_deref(), Some("shop"));
        assert_eq!(t.tls.mode, SslMode::Prefer);
        let t =
            parse("mysql://u:p@h/db?connection_limit=5&pool_timeout=2&sslaccept=strict").unwrap();
        assert_eq!(t.port, 3306);
        let t = parse("mariadb://u@[::1]:3310").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.database), ("::1", 3310, None));
    }

    #[test]
    fn a_password_with_delimiters_is_the_credential_whole() {
        let t = parse("mysql://admin:Pw/x?y#z@127.0.0.1:1/db?ssl-mode=disabled").unwrap();
        assert_eq!(t.user, "admin");
        assert_eq!(t.password, "Pw/x?y#z");
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.database.as_deref(), Some("db"));
        assert_eq!(t.tls.mode, SslMode::Disable);
        let err = parse("mysql://admin:Pw/x?y#z@h/db?bogus=1").unwrap_err();
        assert!(!err.contains("Pw") && !err.contains("y#z"), "{err}");
        assert!(err.contains("parameter bogus is not one"), "{err}");
    }

    #[test]
    fn ssl_modes_in_any_case_and_a_ca_file() {
        for (value, mode) in [
            ("DISABLED", SslMode::Disable),
            ("preferred", SslMode::Prefer),
            ("Required", SslMode::Require),
            ("verify_ca", SslMode::VerifyCa),
            ("VERIFY_IDENTITY", SslMode::VerifyFull),
        ] {
            for key in ["ssl-mode", "sslmode"] {
                assert_eq!(
                    parse(&format!("mysql://u@h/d?{key}={value}"))
                        .unwrap()
                        .tls
                        .mode,
                    mode
                );
            }
        }
        let t = parse("mysql://u@h/d?sslca=/ca.pem").unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyCa);
        assert_eq!(t.tls.roots, Roots::File("/ca.pem".into()));
        let t = parse("mysql://u@h/d?ssl-ca=%2Fca.pem&ssl-mode=VERIFY_IDENTITY").unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        let err = parse("mysql://u@h/d?ssl-mode=sometimes").unwrap_err();
        assert!(err.contains("ssl-mode=\"sometimes\""), "{err}");
        assert!(parse("postgres://u@h/d").is_err());
        assert!(parse("mysql://h/d").is_err(), "no user");
        assert_eq!(
            parse("mysql://u@h/d?connect_timeout=7")
                .unwrap()
                .connect_timeout,
            Some(Duration::from_secs(7))
        );
    }
}
