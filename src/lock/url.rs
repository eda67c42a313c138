//! Database URLs as platforms and ORMs hand them out -> the driver's config and the TLS settings.
//!
//! release-tasks reads the URL itself instead of handing it to tokio-postgres, whose parser refuses
//! every parameter it does not know (Prisma's `schema`, `pgbouncer`, ...) with a message that names
//! none, and knows nothing of `sslrootcert` or `sslcert`. libpq's parameters that matter are honoured,
//! those ORMs add for themselves are ignored with a debug line, and any other is an error naming it.
//! `check` and `run` both go through [`parse`], so they agree on which URLs are usable. No message
//! from here contains the password.

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::config::{
    ChannelBinding, LoadBalanceHosts, SslMode as DriverSslMode, TargetSessionAttrs,
};

/// Parameters that ORMs and drivers put in the URL for themselves; they mean nothing to libpq.
const IGNORED: &[&str] = &[
    "schema",
    "pgbouncer",
    "connection_limit",
    "pool_timeout",
    "statement_cache_size",
    "socket_timeout",
];

/// `sslmode`, as libpq reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `allow` and `prefer`: TLS if the server offers it, the certificate unchecked.
    Prefer,
    /// TLS, the certificate unchecked (what libpq does; Heroku's certificates are self-signed).
    Require,
    /// The certificate must chain to a trusted root; the host name is not checked.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must be issued for the host connected to.
    VerifyFull,
}

/// Where trusted roots come from when the certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The Mozilla roots built in (`sslrootcert=system`, or no `sslrootcert`).
    System,
    /// A PEM file of certificates (`sslrootcert=PATH`).
    File(PathBuf),
}

/// What TLS the URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    pub roots: Roots,
    /// `sslcert` and `sslkey`: a client certificate and its key, both PEM.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// TCP keepalives on every connection unless the URL says otherwise (libpq's `keepalives_idle`,
/// `keepalives_interval`, `keepalives_count`): a network that goes silent (no RST, no FIN) is noticed
/// after about 10 + 3 x 5 = 25 s without an answer, not after the system's two hours and more.
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVES_COUNT: u32 = 3;

/// A parsed database URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// Every parameter and every host, as the URL gives them.
    pub config: tokio_postgres::Config,
    /// What to connect with, tried in order: `config` itself, or, when the hosts mix Unix-socket
    /// directories with TCP hosts and TLS is required, one config per host (a Unix socket never
    /// gets TLS, as in libpq, while the TCP hosts keep the `sslmode` asked for).
    pub attempts: Vec<tokio_postgres::Config>,
    pub tls: Tls,
    /// `application_name` from the URL, kept beside release-tasks's own name for the session.
    pub application_name: Option<String>,
}

/// Reads `url`: a `postgres://` or `postgresql://` URL, or libpq's `key=value` pairs. The error says
/// which part or parameter is wrong and never contains the password.
#[allow(clippy::too_many_lines)] // one arm per libpq parameter reads best as one match
pub fn parse(url: &str) -> Result<Target, String> {
    let pairs = match url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        Some(rest) => uri_pairs(rest)?,
        None if url.contains('=') => keyword_pairs(url)?,
        None => {
            return Err(
                "it must be a postgres:// or postgresql:// URL (or libpq's key=value pairs)".into(),
            );
        }
    };
    let mut config = tokio_postgres::Config::new();
    let mut hosts = Vec::new();
    let mut ports: Vec<Option<String>> = Vec::new();
    let mut tls = Tls {
        mode: SslMode::Prefer,
        roots: Roots::System,
        client: None,
    };
    let (mut cert, mut key) = (None, None);
    let mut application_name = None;
    // libpq's keepalive settings, in seconds; 0 means the system's default.
    let (mut idle, mut interval, mut count) = (None, None, None);
    for (name, value) in pairs {
        let bad = |expected: &str| {
            if name == "password" {
                format!("parameter password: {expected}")
            } else {
                format!("parameter {name}={value:?}: {expected}")
            }
        };
        match name.as_str() {
            "host" => hosts = value.split(',').map(str::to_owned).collect(),
            "port" => ports = value.split(',').map(|p| Some(p.to_owned())).collect(),
            "user" => drop(config.user(value)),
            "password" => drop(config.password(value)),
            "dbname" => drop(config.dbname(value)),
            "sslmode" => {
                tls.mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(bad(
                            "use disable, allow, prefer, require, verify-ca or verify-full",
                        ));
                    }
                };
            }
            "sslrootcert" if value == "system" => tls.roots = Roots::System,
            "sslrootcert" => tls.roots = Roots::File(PathBuf::from(value)),
            "sslcert" => cert = Some(PathBuf::from(value)),
            "sslkey" => key = Some(PathBuf::from(value)),
            "channel_binding" => {
                config.channel_binding(match value.as_str() {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    _ => return Err(bad("use disable, prefer or require")),
                });
            }
            "connect_timeout" => {
                let seconds: i64 = value.parse().map_err(|_| bad("use whole seconds"))?;
                // libpq: zero or less waits forever; anything below 2 s counts as 2 s.
                if seconds > 0 {
                    config.connect_timeout(Duration::from_secs(seconds.max(2) as u64));
                }
            }
            "application_name" | "fallback_application_name" => application_name = Some(value),
            "options" => drop(config.options(value)),
            "target_session_attrs" => {
                config.target_session_attrs(match value.as_str() {
                    "any" => TargetSessionAttrs::Any,
                    "read-write" => TargetSessionAttrs::ReadWrite,
                    "read-only" => TargetSessionAttrs::ReadOnly,
                    _ => return Err(bad("use any, read-write or read-only")),
                });
            }
            "load_balance_hosts" => {
                config.load_balance_hosts(match value.as_str() {
                    "disable" => LoadBalanceHosts::Disable,
                    "random" => LoadBalanceHosts::Random,
                    _ => return Err(bad("use disable or random")),
                });
            }
            "keepalives" => drop(config.keepalives(value.trim() != "0")),
            "keepalives_idle" => {
                idle = Some(value.parse::<u64>().map_err(|_| bad("use whole seconds"))?);
            }
            "keepalives_interval" => {
                interval = Some(value.parse::<u64>().map_err(|_| bad("use whole seconds"))?);
            }
            "keepalives_count" => {
                count = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| bad("use a whole number"))?,
                );
            }
            "tcp_user_timeout" => {
                let millis: u64 = value.parse().map_err(|_| bad("use whole milliseconds"))?;
                if millis > 0 {
                    config.tcp_user_timeout(Duration::from_millis(millis));
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
                    "parameter {other} is not one release-tasks knows (it reads libpq's sslmode, sslrootcert, \
                     sslcert, sslkey, channel_binding, connect_timeout, keepalives, keepalives_idle, \
                     keepalives_interval, keepalives_count, tcp_user_timeout, application_name, options, \
                     target_session_attrs, load_balance_hosts, host, port, user, password, dbname, and ignores {}); remove it \
                     from the URL, or use a URL without it for [lock]",
                    IGNORED.join(", ")
                ));
            }
        }
    }
    // 0 leaves the system's default, as in libpq.
    match idle {
        Some(0) => {}
        Some(seconds) => drop(config.keepalives_idle(Duration::from_secs(seconds))),
        None => drop(config.keepalives_idle(KEEPALIVES_IDLE)),
    }
    match interval {
        Some(0) => {}
        Some(seconds) => drop(config.keepalives_interval(Duration::from_secs(seconds))),
        None => drop(config.keepalives_interval(KEEPALIVES_INTERVAL)),
    }
    match count {
        Some(0) => {}
        Some(n) => drop(config.keepalives_retries(n)),
        None => drop(config.keepalives_retries(KEEPALIVES_COUNT)),
    }
    if hosts.is_empty() {
        hosts.push("localhost".to_owned());
    }
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(format!(
            "{} hosts and {} ports; give one port for all hosts or one per host",
            hosts.len(),
            ports.len()
        ));
    }
    let mut port_numbers = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().enumerate() {
        port_numbers.push(match port.as_deref() {
            None | Some("") => 5432,
            Some(port) => port
                .parse()
                .map_err(|_| format!("port {port:?} of host {} is not a port number", i + 1))?,
        });
    }
    // Everything but the hosts, for the per-host configs below.
    let base = config.clone();
    for host in &hosts {
        add_host(&mut config, host);
    }
    for port in &port_numbers {
        config.port(*port);
    }
    match (cert, key) {
        (Some(cert), Some(key)) => tls.client = Some((cert, key)),
        (None, None) => {}
        _ => return Err("sslcert and sslkey go together; give both or neither".into()),
    }
    // libpq: with a root certificate file, `require` checks the chain as `verify-ca` does.
    if tls.mode == SslMode::Require && matches!(tls.roots, Roots::File(_)) {
        tls.mode = SslMode::VerifyCa;
    }
    if tls.mode == SslMode::Disable && config.get_channel_binding() == ChannelBinding::Require {
        return Err(
            "channel_binding=require needs TLS, and sslmode=disable turns it off; drop one of them"
                .into(),
        );
    }
    let mode = match tls.mode {
        SslMode::Disable => DriverSslMode::Disable,
        SslMode::Prefer => DriverSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
    };
    config.ssl_mode(mode);
    // libpq never uses TLS over a Unix socket, whatever sslmode says (`require` is accepted and
    // simply has no TLS there). The driver has one sslmode for all hosts: one socket gets
    // `disable`. A list gets one config per host, tried in order, so that each host has its own
    // `connect_timeout` (a host that accepts and then says nothing must not use up the others'
    // time) and its own sslmode; `load_balance_hosts=random` leaves the list to the driver.
    let sockets = hosts.iter().filter(|h| is_socket_directory(h)).count();
    let random = config.get_load_balance_hosts() == LoadBalanceHosts::Random;
    let attempts = if hosts.len() == 1 || (random && sockets == 0) {
        let mut one = config.clone();
        if sockets > 0 {
            one.ssl_mode(DriverSslMode::Disable);
        }
        vec![one]
    } else {
        hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let mut one = base.clone();
                add_host(&mut one, host);
                if let Some(port) = port_numbers.get(i).or(port_numbers.first()) {
                    one.port(*port);
                }
                one.ssl_mode(if is_socket_directory(host) {
                    DriverSslMode::Disable
                } else {
                    mode
                });
                one
            })
            .collect()
    };
    Ok(Target {
        config,
        attempts,
        tls,
        application_name,
    })
}

/// libpq's rule: a host that is an absolute path is the directory of a Unix socket
/// (`.s.PGSQL.<port>` in it); anything else is a TCP host name or address.
fn is_socket_directory(host: &str) -> bool {
    host.starts_with('/')
}

fn add_host(config: &mut tokio_postgres::Config, host: &str) {
    if is_socket_directory(host) {
        config.host_path(host);
    } else {
        config.host(host);
    }
}

/// The parts of a URL after its scheme, as libpq's parameters: user, password, host, port and dbname
/// first, then the query's parameters (which win).
///
/// The credential is split off first, at the URL's last `@` (the README's structural rule, which
/// redaction follows too): a password may hold `/`, `?`, `#` or `@`, and none of it may be read as a
/// host, a path or a parameter (an error would quote it). An `@` in the query must be written `%40`.
fn uri_pairs(rest: &str) -> Result<Vec<(String, String)>, String> {
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (hostlist, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut pairs = Vec::new();
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            pairs.push(("user".to_owned(), decode(user, "the user name")?));
        }
        if let Some(password) = password {
            pairs.push(("password".to_owned(), decode(password, "the password")?));
        }
    }
    if !hostlist.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for entry in hostlist.split(',') {
            let (host, port) = split_host_port(entry)?;
            hosts.push(decode(host, "a host")?);
            ports.push(port.unwrap_or_default().to_owned());
        }
        pairs.push(("host".to_owned(), hosts.join(",")));
        pairs.push(("port".to_owned(), ports.join(",")));
    }
    if !path.is_empty() {
        pairs.push(("dbname".to_owned(), decode(path, "the database name")?));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name, "a parameter name")?;
        let value = decode(value, &format!("the value of {name}"))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// libpq's `host=db port=5432 password='it''s'` form: values may be single-quoted, with `\'` and `\\`.
fn keyword_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("{name} has no =value; write key=value pairs"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("the value of {name} has no closing quote")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((name, value));
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
pub(super) fn split_host_port(entry: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 host in [ has no closing ]")?;
        return match after {
            "" => Ok((host, None)),
            _ => Ok((
                host,
                Some(after.strip_prefix(':').ok_or("after ] comes :port")?),
            )),
        };
    }
    Ok(match entry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (entry, None),
    })
}

/// Percent-decoding, as in URLs (`%2F` in a host is a socket directory's `/`).
pub(super) fn decode(text: &str, what: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("{what} has a % not followed by two hex digits; write % as %25")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::Host;

    #[test]
    fn prisma_and_supabase_urls_are_usable() {
        let t = parse("postgresql://app:p%40ss@db.example.com:6543/shop?schema=public&pgbouncer=true&connection_limit=1&pool_timeout=10&statement_cache_size=0&socket_timeout=5").unwrap();
        assert_eq!(t.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(t.config.get_dbname(), Some("shop"));
        assert_eq!(t.config.get_ports(), [6543]);
        assert_eq!(t.tls.mode, SslMode::Prefer);
    }

    #[test]
    fn a_password_with_delimiters_is_the_credential_whole() {
        let t = parse("postgres://admin:Pw/x?y#z@127.0.0.1:1/db?sslmode=disable").unwrap();
        assert_eq!(t.config.get_user(), Some("admin"));
        assert_eq!(t.config.get_password(), Some(&b"Pw/x?y#z"[..]));
        assert_eq!(t.config.get_hosts(), [Host::Tcp("127.0.0.1".into())]);
        assert_eq!(t.config.get_dbname(), Some("db"));
        // Whatever is wrong after it, no part of the password is quoted.
        let err = parse("postgres://admin:Pw/x?y#z@h/db?bogus=1").unwrap_err();
        assert!(!err.contains("Pw") && !err.contains("y#z"), "{err}");
    }

    #[test]
    fn unknown_parameters_are_named() {
        let err = parse("postgres://u:secret@h/db?sslmod=require").unwrap_err();
        assert!(err.contains("parameter sslmod is not one"), "{err}");
        assert!(!err.contains("secret"));
        let err = parse("postgres://u@h/db?sslmode=sometimes").unwrap_err();
        assert!(err.contains("sslmode=\"sometimes\""), "{err}");
        assert!(parse("mysql://h/db").is_err());
    }

    #[test]
    fn libpq_parameters_are_honoured() {
        let t = parse(
            "postgres://u@a:1,b,[::1]:3/db?sslmode=require&sslrootcert=/ca.pem&connect_timeout=7\
             &application_name=web&options=-c%20search_path%3Dx&target_session_attrs=read-write\
             &channel_binding=require&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(
            t.config.get_hosts(),
            [
                Host::Tcp("a".into()),
                Host::Tcp("b".into()),
                Host::Tcp("::1".into())
            ]
        );
        assert_eq!(t.config.get_ports(), [1, 5432, 3]);
        assert_eq!(t.tls.mode, SslMode::VerifyCa, "require + sslrootcert");
        assert_eq!(t.tls.roots, Roots::File("/ca.pem".into()));
        assert!(t.tls.client.is_some());
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
        assert_eq!(t.config.get_options(), Some("-c search_path=x"));
        assert_eq!(t.application_name.as_deref(), Some("web"));
        assert_eq!(
            t.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(t.config.get_channel_binding(), ChannelBinding::Require);
        assert!(parse("postgres://h/db?sslmode=disable&channel_binding=require").is_err());
        assert!(parse("postgres://h/db?sslcert=/c.pem").is_err());
        let t = parse(
            "host=db port=6543 user=app password='it\\'s secret' dbname=shop sslmode=require",
        )
        .unwrap();
        assert_eq!(t.config.get_password(), Some(&b"it's secret"[..]));
        assert_eq!(t.config.get_ports(), [6543]);
        assert_eq!(t.tls.mode, SslMode::Require);
        let t = parse("postgres://u@%2Fvar%2Frun/db").unwrap();
        assert_eq!(t.config.get_hosts().len(), 1);
        assert!(matches!(t.config.get_hosts()[0], Host::Unix(_)));
    }

    #[test]
    fn keepalives_notice_a_silent_network_within_half_a_minute_unless_the_url_says() {
        let t = parse("postgres://u@h/db").unwrap();
        assert!(t.config.get_keepalives());
        assert_eq!(t.config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(
            t.config.get_keepalives_interval(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(t.config.get_keepalives_retries(), Some(3));
        let t = parse(
            "postgres://u@h/db?keepalives_idle=30&keepalives_interval=2&keepalives_count=7&tcp_user_timeout=9000",
        )
        .unwrap();
        assert_eq!(t.config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            t.config.get_keepalives_interval(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(t.config.get_keepalives_retries(), Some(7));
        assert_eq!(
            t.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(9))
        );
        // 0 is the system's default, as in libpq.
        let t = parse("host=h keepalives=0 keepalives_idle=0 keepalives_count=0").unwrap();
        assert!(!t.config.get_keepalives());
        assert_eq!(
            t.config.get_keepalives_idle(),
            Duration::from_secs(2 * 3600)
        );
        assert_eq!(t.config.get_keepalives_retries(), None);
        let err = parse("postgres://u@h/db?keepalives_interval=soon").unwrap_err();
        assert!(err.contains("keepalives_interval=\"soon\""), "{err}");
    }

    #[test]
    fn a_unix_socket_never_gets_tls() {
        for url in [
            "postgresql://u:p@/db?host=/cloudsql/project:region:instance",
            "postgresql://u:p@/db?host=/cloudsql/project:region:instance&sslmode=require",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql:6432/db?sslmode=require",
            "host=/var/run/postgresql port=6432 dbname=db sslmode=verify-full",
        ] {
            let t = parse(url).unwrap();
            assert_eq!(t.attempts.len(), 1, "{url}");
            assert!(
                matches!(t.attempts[0].get_hosts()[0], Host::Unix(_)),
                "{url}"
            );
            assert_eq!(
                t.attempts[0].get_ssl_mode(),
                DriverSslMode::Disable,
                "{url}"
            );
        }
        let t = parse("host=/var/run/postgresql port=6432").unwrap();
        assert_eq!(t.attempts[0].get_ports(), [6432]);
        // A mix: the socket without TLS, the TCP host with the TLS asked for, each on its own port.
        let t = parse("host=/run/pg,db.example.com port=6432,5433 sslmode=require").unwrap();
        assert_eq!(t.attempts.len(), 2);
        assert_eq!(t.attempts[0].get_hosts(), [Host::Unix("/run/pg".into())]);
        assert_eq!(t.attempts[0].get_ports(), [6432]);
        assert_eq!(t.attempts[0].get_ssl_mode(), DriverSslMode::Disable);
        assert_eq!(
            t.attempts[1].get_hosts(),
            [Host::Tcp("db.example.com".into())]
        );
        assert_eq!(t.attempts[1].get_ports(), [5433]);
        assert_eq!(t.attempts[1].get_ssl_mode(), DriverSslMode::Require);
        // A list of TCP hosts: one config per host, each with its own port and the sslmode asked
        // for; with load_balance_hosts=random, the driver's list.
        let t = parse("postgres://u@a:1,b:2/db?sslmode=require").unwrap();
        assert_eq!(t.attempts.len(), 2);
        assert_eq!(t.attempts[1].get_hosts(), [Host::Tcp("b".into())]);
        assert_eq!(t.attempts[1].get_ports(), [2]);
        assert_eq!(t.attempts[1].get_ssl_mode(), DriverSslMode::Require);
        let t = parse("postgres://u@a,b/db?load_balance_hosts=random").unwrap();
        assert_eq!(t.attempts.len(), 1);
        assert_eq!(t.attempts[0].get_hosts().len(), 2);
    }
}
