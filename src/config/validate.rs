//! Validation: the serde mirror (`raw.rs`) -> the typed [`Config`], with every problem in the file
//! reported at once, whatever its kind: unknown keys (with a "did you mean" where one is close), bad
//! durations (out of range included), empty commands, NUL bytes, header names and values HTTP refuses,
//! an `after` that names no task or makes a cycle. A problem here is found by `check`, so `run` never
//! trips on it halfway through a release.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::raw::{
    Expect, Expected, Found, Mismatch, OneOrMany, RawConfig, RawDefaults, RawLock, RawNotify,
    RawRequire, RawTask, Schema, Typed,
};
use super::{
    Backend, Command, Config, Defaults, Glob, Lock, Notify, NotifyFormat, On, Retry, RetryOn, Task,
    Template,
};
use crate::error::{Diagnostic, Error, Result};
use crate::gate::Gate;

/// The longest duration accepted anywhere in the file: far beyond any release (Heroku stops one at an
/// hour), and far from where adding it to the clock could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The most further attempts a notify task makes.
pub const MAX_RETRIES: u32 = 10;

/// The shortest `heartbeat`: a "still running" line more often than this is noise.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);

/// Parses and validates config text; `path` is used for messages and to resolve `dir`.
pub(super) fn validate(path: &Path, source: &str) -> Result<Config> {
    let invalid = |problems| Error::ConfigInvalid {
        path: path.to_owned(),
        problems,
    };
    let syntax = |err: toml::de::Error| Diagnostic {
        location: err.span().map(|span| line_col(source, span.start)),
        message: crate::redact::urls_in(err.message().trim_end()),
    };
    let mut doc = DeTable::parse(source).map_err(|err| {
        let at = err.span().map(|span| line_col(source, span.start));
        // A key or table defined twice is found again from the parser's events, as data, to name
        // it; a duplicate past the place the `toml` crate stopped is not what it stopped on.
        let problem = match super::duplicates::first(source) {
            Some(duplicate)
                if at.is_none_or(|(line, _)| line_col(source, duplicate.at).0 <= line) =>
            {
                Diagnostic {
                    location: Some(line_col(source, duplicate.at)),
                    message: crate::redact::urls_in(&duplicate_message(source, &duplicate)),
                }
            }
            _ => syntax(err),
        };
        invalid(vec![problem])
    })?;
    let base = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut keys = HashMap::new();
    keys_by_value(doc.get_ref(), &mut keys);
    // No key takes a TOML datetime, and serde's mirror cannot hold one where a table's keys are
    // expected: each is read as the text it was written as, and reported where its value is
    // checked, with what the key takes (see `Validator::dated`).
    let mut dated = Vec::new();
    undate(doc.get_mut(), Place::default(), &mut dated);
    let mut v = Validator {
        source,
        base: absolute(&base),
        keys,
        problems: Vec::new(),
        changed_at: Vec::new(),
        task: None,
        dated,
    };
    v.unknown_keys(doc.get_ref(), &Schema::new());
    // Leaf values are `Typed`, so a value of the wrong type is one problem among the rest; only a
    // table of the wrong shape (`tasks = 5`) stops serde, and the unknown keys come with it.
    let raw = match RawConfig::deserialize(toml::de::Deserializer::from(doc)) {
        Ok(raw) => raw,
        Err(err) => {
            // A datetime where a table or a list belongs: said as such, not as the text it was
            // read as.
            let at = err.span().map(|span| span.start);
            match v.dated.iter().position(|d| Some(d.at.start) == at) {
                Some(i) => {
                    let dated = v.dated.swap_remove(i);
                    v.task.clone_from(&dated.task);
                    v.report_dated(&dated, dated.table_or_list);
                }
                None => v.problems.push(syntax(err)),
            }
            v.problems
                .sort_by_key(|p| p.location.unwrap_or((usize::MAX, usize::MAX)));
            return Err(invalid(v.problems));
        }
    };
    let defaults = v.defaults(raw.defaults);
    let tasks = v.tasks(raw.tasks.0, &defaults);
    let required_env = v.required_env(raw.require);
    let lock = raw.lock.and_then(|l| v.lock(l));
    v.changed_needs_once(lock.as_ref());
    // A datetime no check came to (none should be left): never taken silently for text.
    for dated in std::mem::take(&mut v.dated) {
        if !dated.done {
            v.task.clone_from(&dated.task);
            v.report_dated(&dated, Expected::Str);
        }
    }
    // In file order, whichever pass found them; a problem without a place goes last.
    v.problems
        .sort_by_key(|p| p.location.unwrap_or((usize::MAX, usize::MAX)));
    if v.problems.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            defaults,
            tasks,
            required_env,
            lock,
        })
    } else {
        Err(invalid(v.problems))
    }
}

/// The most output lines a task's tail may keep (`[defaults] tail_lines`).
pub const MAX_TAIL_LINES: usize = 1000;

/// The message for a key or table the file defines twice: which, where it was first, and what
/// to do.
fn duplicate_message(source: &str, duplicate: &super::duplicates::Duplicate) -> String {
    use super::duplicates::written;
    let first = line_col(source, duplicate.first).0;
    let (what, todo) = if duplicate.header {
        let mut path = duplicate.table.clone();
        path.push(duplicate.key.clone());
        (
            format!("table [{}]", written(&path)),
            "each table, like each [tasks.NAME], may appear only once: merge the two into one, or rename one",
        )
    } else {
        let place = if duplicate.table.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("in [{}]", written(&duplicate.table))
        };
        (
            format!("key `{}` {place}", duplicate.key),
            "each key may appear only once in its table: remove one of them",
        )
    };
    format!("duplicate {what}, first on line {first}; {todo}")
}

/// The message for a value that is not what its key takes, from what was found and what was
/// expected: serde's wording (`invalid type: integer `5`, expected a string`), a hint at the next
/// step, and the key. The value is left out for a secret-looking key (`API_TOKEN = 12345678`).
fn mismatch_message(mismatch: &Mismatch, key: Option<&str>) -> String {
    let show = !key.is_some_and(crate::redact::is_secret_name);
    let Mismatch { found, expected } = mismatch;
    let what = match (found, expected) {
        (Found::Int(_), Expected::U32) => {
            format!("invalid value: {}, expected u32", shown(found, show))
        }
        (Found::Str(s), Expected::Variant(names)) if show => {
            format!("unknown variant `{s}`, expected {}", one_of(names))
        }
        _ => format!(
            "invalid type: {}, expected {}",
            shown(found, show),
            expecting(*expected)
        ),
    };
    let hint = match (found, expected) {
        (Found::Array, Expected::Str | Expected::Bool | Expected::U32) => {
            Some("this key takes one value, not a list; remove the [ ]")
        }
        // TOML reads `2024-01-01` or `07:32:00` unquoted as a date or time, which no key takes.
        (Found::Datetime(_), Expected::Str | Expected::Described(_)) => Some(
            "TOML reads an unquoted date or time as a datetime, not as text: put it in quotes, like \"2024-01-01\"",
        ),
        (_, Expected::Str) => Some("put the value in quotes, like \"3000\""),
        (_, Expected::Bool) => Some("write true or false, without quotes"),
        (_, Expected::U32) => Some("write a whole number, without quotes"),
        _ => None,
    };
    let mut message = what;
    if let Some(hint) = hint {
        message = format!("{message}; {hint}");
    }
    if let Some(key) = key {
        message = format!("{message} (key `{key}`)");
    }
    message
}

/// A value found, in serde's words, with the value itself when `show`.
fn shown(found: &Found, show: bool) -> String {
    let (kind, value) = match found {
        Found::Str(s) => ("string", Some(format!("{s:?}"))),
        Found::Int(i) => ("integer", Some(format!("`{i}`"))),
        Found::Float(f) => ("floating point", Some(format!("`{f:?}`"))),
        Found::Bool(b) => ("boolean", Some(format!("`{b}`"))),
        Found::Datetime(d) => ("datetime", Some(format!("`{d}`"))),
        Found::Array => ("sequence", None),
        Found::Table => ("map", None),
    };
    match value {
        Some(value) if show => format!("{kind} {value}"),
        _ => kind.to_owned(),
    }
}

fn expecting(expected: Expected) -> String {
    match expected {
        Expected::Str => "a string".to_owned(),
        Expected::Bool => "a boolean".to_owned(),
        Expected::U32 => "u32".to_owned(),
        Expected::Variant(names) => one_of(names),
        Expected::Described(text) | Expected::Container(text) => text.to_owned(),
    }
}

/// `` `json` or `slack` ``, `` `a`, `b` or `c` ``.
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

/// The key of every value in the document, by where the value starts: the key a problem with a
/// value is about, from the parsed tree's spans.
fn keys_by_value(table: &DeTable<'_>, keys: &mut HashMap<usize, String>) {
    for (key, value) in table {
        keys.insert(value.span().start, key.get_ref().as_ref().to_owned());
        if let DeValue::Table(inner) = value.get_ref() {
            keys_by_value(inner, keys);
        }
    }
}

/// A TOML datetime (`2024-01-01`, `07:32:00`, `1979-05-27T07:32:00Z`) in the file, which no key
/// takes: where it is, as written, and under which key (the array's key for an item of an array).
struct Dated {
    at: std::ops::Range<usize>,
    text: String,
    key: Option<String>,
    /// The task it is in, if any.
    task: Option<String>,
    /// What its key takes, where serde needs a table or a list: the only places a datetime read
    /// as text stops it.
    table_or_list: Expected,
    /// Reported, or left out because its key is unknown (that is the problem to fix first).
    done: bool,
}

/// Where in the document a value is: how many keys deep, the task it is in, its key.
#[derive(Clone, Copy, Default)]
struct Place<'k> {
    depth: usize,
    top: Option<&'k str>,
    task: Option<&'k str>,
    key: Option<&'k str>,
}

/// Every datetime in `table`, into `dated`, each replaced by the text it was written as (so serde's
/// mirror reads on, and the validator reports it where the value is checked).
fn undate(table: &mut DeTable<'_>, place: Place<'_>, dated: &mut Vec<Dated>) {
    for (key, value) in table.iter_mut() {
        let key = key.get_ref().as_ref();
        let inner = Place {
            depth: place.depth + 1,
            top: place.top.or(Some(key)),
            task: match (place.depth, place.top) {
                (1, Some("tasks")) => Some(key),
                _ => place.task,
            },
            key: Some(key),
        };
        undate_value(value, inner, dated);
    }
}

fn undate_value(value: &mut Spanned<DeValue<'_>>, place: Place<'_>, dated: &mut Vec<Dated>) {
    let at = value.span();
    match value.get_mut() {
        DeValue::Datetime(datetime) => {
            let text = datetime.to_string();
            dated.push(Dated {
                at,
                text: text.clone(),
                key: place.key.map(str::to_owned),
                task: place.task.map(str::to_owned),
                table_or_list: match (place.depth, place.key) {
                    (_, Some("after")) => {
                        Expected::Container("a list of task names, like [\"migrate\"]")
                    }
                    // `[require] env`; a task's `env` is a table.
                    (2, Some("env")) => {
                        Expected::Container("a list of variable names, like [\"DATABASE_URL\"]")
                    }
                    _ => Expected::Container("a table"),
                },
                done: false,
            });
            *value.get_mut() = DeValue::String(text.into());
        }
        DeValue::Table(inner) => undate(inner, place, dated),
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                undate_value(item, place, dated);
            }
        }
        DeValue::String(_) | DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_) => {}
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source.as_bytes()[..offset.min(source.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// The names, or the first few of them and how many more: a message about a file of thousands of
/// tasks stays a line, not a megabyte (and not one per bad `after`).
fn some_names<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    const SHOWN: usize = 10;
    let total = names.len();
    let mut list: Vec<&str> = names.take(SHOWN).collect();
    let more;
    if total > SHOWN {
        more = format!("and {} more", total - SHOWN);
        list.push(&more);
    }
    list.join(", ")
}

struct Validator<'a> {
    source: &'a str,
    base: PathBuf,
    /// The key of each value, by where the value starts (see [`keys_by_value`]).
    keys: HashMap<usize, String>,
    problems: Vec<Diagnostic>,
    /// The tasks with a `changed` gate and where it is, checked against `[lock]` at the end.
    changed_at: Vec<(String, std::ops::Range<usize>)>,
    /// The task whose keys are being checked: a problem found there names it.
    task: Option<String>,
    /// The datetimes in the file, reported where their values are checked.
    dated: Vec<Dated>,
}

impl Validator<'_> {
    /// Records a problem. Messages quote what the file says, and a URL pasted where a name belongs
    /// (`when = "postgres://..."`) would put its password in the CI log: every message is redacted
    /// here, once, instead of at each place that quotes a value.
    fn report(&mut self, span: Option<std::ops::Range<usize>>, message: String) {
        let location = span.map(|s| line_col(self.source, s.start));
        let message = match &self.task {
            Some(task) if !message.contains(&format!("task `{task}`")) => {
                format!("task `{task}`: {message}")
            }
            _ => message,
        };
        let message = if message.contains("://") {
            crate::redact::urls_in(&message)
        } else {
            message
        };
        self.problems.push(Diagnostic { location, message });
    }

    /// Reports every key the file has that release-tasks does not know, each where it is, with the
    /// closest known key when one is near enough to be a typo.
    fn unknown_keys(&mut self, root: &DeTable<'_>, schema: &Schema) {
        for (key, value) in self.unknown_in(root, schema.root, "at the top level") {
            let kind = match key {
                "defaults" => schema.defaults,
                "require" => schema.require,
                "lock" => schema.lock,
                "tasks" => {
                    if let DeValue::Table(tasks) = value.get_ref() {
                        for (name, task) in tasks {
                            let DeValue::Table(task) = task.get_ref() else {
                                continue;
                            };
                            let place = format!("in task `{}`", name.get_ref());
                            for (key, value) in self.unknown_in(task, schema.task, &place) {
                                if key == "notify" {
                                    if let DeValue::Table(notify) = value.get_ref() {
                                        let place =
                                            format!("in task `{}`'s notify", name.get_ref());
                                        let _ = self.unknown_in(notify, schema.notify, &place);
                                    }
                                }
                            }
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            if let DeValue::Table(table) = value.get_ref() {
                let _ = self.unknown_in(table, kind, &format!("in [{key}]"));
            }
        }
    }

    /// Reports the keys of `table` that are not in `known`; returns the known ones, to look inside.
    fn unknown_in<'t, 'i>(
        &mut self,
        table: &'t DeTable<'i>,
        known: &[&str],
        place: &str,
    ) -> Vec<(&'t str, &'t Spanned<DeValue<'i>>)> {
        let mut found = Vec::new();
        for (key, value) in table {
            if known.contains(&key.get_ref().as_ref()) {
                found.push((key.get_ref().as_ref(), value));
                continue;
            }
            // A datetime under an unknown key is not reported as well: the key is the problem.
            for dated in &mut self.dated {
                dated.done |= value.span().contains(&dated.at.start);
            }
            let hint = match closest(key.get_ref(), known) {
                Some(near) => format!("did you mean `{near}`?"),
                None => format!("known keys here: {}", known.join(", ")),
            };
            self.report(
                Some(key.span()),
                format!("unknown field `{}` {place}; {hint}", key.get_ref()),
            );
        }
        found
    }

    /// A key its table must have; when missing, a problem at the table.
    fn required<T>(
        &mut self,
        field: Option<T>,
        key: &str,
        table: std::ops::Range<usize>,
    ) -> Option<T> {
        if field.is_none() {
            self.report(
                Some(table),
                format!("missing field `{key}`; add it; the README's release.toml reference shows each table's keys"),
            );
        }
        field
    }

    /// The value of a field whose type serde left to this pass; a wrong type is reported here.
    fn typed<T: Expect>(&mut self, field: Option<Typed<T>>) -> Option<Spanned<T>> {
        match field?.0 {
            Ok(value) if !self.dated(&value.span(), T::EXPECTED) => Some(value),
            Ok(_) => None,
            Err((span, mismatch)) => {
                self.mismatch(span, &mismatch);
                None
            }
        }
    }

    /// A value of the wrong type: what was found, or the datetime it holds (kept apart from
    /// [`Validator::typed`], which is made once per type).
    fn mismatch(&mut self, span: std::ops::Range<usize>, mismatch: &Mismatch) {
        if !self.dated(&span, mismatch.expected) {
            let key = self.keys.get(&span.start).map(String::as_str);
            let message = mismatch_message(mismatch, key);
            self.report(Some(span), message);
        }
    }

    /// Whether the value at `span` holds a datetime (read as text, see [`undate`]); if so, the first
    /// is reported as what the key does not take, once, and the value is not checked further.
    fn dated(&mut self, span: &std::ops::Range<usize>, expected: Expected) -> bool {
        let mut first = None;
        for (i, dated) in self.dated.iter_mut().enumerate() {
            if !dated.done && span.contains(&dated.at.start) {
                dated.done = true;
                first.get_or_insert(i);
            }
        }
        let Some(i) = first else { return false };
        let dated = self.dated.remove(i);
        self.report_dated(&dated, expected);
        true
    }

    /// A datetime, as a value of a type its key does not take.
    fn report_dated(&mut self, dated: &Dated, expected: Expected) {
        let mismatch = Mismatch {
            found: Found::Datetime(dated.text.clone()),
            expected,
        };
        let message = mismatch_message(&mismatch, dated.key.as_deref());
        self.report(Some(dated.at.clone()), message);
    }

    fn duration(&mut self, value: Option<Typed<String>>, key: &str, default: Duration) -> Duration {
        let Some(value) = self.typed(value) else {
            return default;
        };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.report(
                    Some(value.span()),
                    format!("`{key}` is zero; give a positive duration like \"30s\" or \"15m\""),
                );
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.report(
                    Some(value.span()),
                    format!(
                        "`{key} = {:?}` is longer than the maximum of 30 days; give a shorter duration like \"15m\" or \"2h\"",
                        value.get_ref()
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(err) => {
                self.report(
                    Some(value.span()),
                    format!(
                        "`{key} = {:?}` is not a duration ({err}); write a number and a unit, like \"90s\", \"15m\" or \"1h 30m\"",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A heartbeat is a log line: one more often than each second would flood the log (at `1ns`, a
    /// line per turn of the run loop) and say nothing new.
    fn heartbeat(&mut self, value: Option<Typed<String>>, default: Duration) -> Duration {
        let Some(value) = self.typed(value) else {
            return default;
        };
        let span = value.span();
        let shown = value.get_ref().clone();
        let before = self.problems.len();
        let beat = self.duration(Some(Typed(Ok(value))), "heartbeat", default);
        if self.problems.len() == before && beat < MIN_HEARTBEAT {
            self.report(
                Some(span),
                format!(
                    "`heartbeat = {shown:?}` is shorter than the minimum of 1s, and would flood the log; give at least 1s, like \"60s\""
                ),
            );
            return default;
        }
        beat
    }

    fn defaults(&mut self, raw: Option<RawDefaults>) -> Defaults {
        let builtin = Defaults::default();
        let Some(raw) = raw else { return builtin };
        let shell = match self.typed(raw.shell) {
            Some(shell) if shell.get_ref().trim().is_empty() => {
                self.report(
                    Some(shell.span()),
                    "`shell` is empty; leave it out to use /bin/sh".into(),
                );
                builtin.shell
            }
            Some(shell) if shell.get_ref().contains('\0') => {
                self.report(
                    Some(shell.span()),
                    "`shell` contains a NUL byte; give the shell's path, like \"/bin/bash\"".into(),
                );
                builtin.shell
            }
            Some(shell) => shell.into_inner(),
            None => builtin.shell,
        };
        Defaults {
            timeout: self.duration(raw.timeout, "timeout", builtin.timeout),
            grace: self.duration(raw.grace, "grace", builtin.grace),
            shell,
            heartbeat: self.heartbeat(raw.heartbeat, builtin.heartbeat),
            release_timeout: self.duration(
                raw.release_timeout,
                "release_timeout",
                builtin.release_timeout,
            ),
            tail_lines: self.tail_lines(raw.tail_lines, builtin.tail_lines),
        }
    }

    /// `tail_lines`, at most [`MAX_TAIL_LINES`]: each kept line may take a kilobyte per task.
    fn tail_lines(&mut self, value: Option<Typed<u32>>, default: usize) -> usize {
        match self.typed(value) {
            None => default,
            Some(n) if *n.get_ref() as usize > MAX_TAIL_LINES => {
                self.report(
                    Some(n.span()),
                    format!("`tail_lines` = {} is more than {MAX_TAIL_LINES}; the full output is in the log", n.get_ref()),
                );
                default
            }
            Some(n) => *n.get_ref() as usize,
        }
    }

    #[allow(clippy::too_many_lines)] // one check per key of [lock], in the table's order
    fn lock(&mut self, raw: Spanned<RawLock>) -> Option<Lock> {
        let span = raw.span();
        let raw = raw.into_inner();
        let (backend, vars) = match (raw.postgres, raw.mysql) {
            (Some(vars), None) => (Backend::Postgres, Some(vars)),
            (None, Some(vars)) => (Backend::Mysql, Some(vars)),
            // One problem among the rest: the other keys of [lock] are still checked.
            (None, None) => {
                self.report(
                    Some(span.clone()),
                    "[lock] needs the database: postgres = \"DATABASE_URL\" for PostgreSQL, or mysql = \"DATABASE_URL\" \
                     for MySQL and MariaDB (the variable that holds the URL)"
                        .to_owned(),
                );
                (Backend::Postgres, None)
            }
            (Some(_), Some(_)) => {
                self.report(
                    Some(span),
                    "[lock] has both postgres and mysql; the lock is taken on one database: keep the one your app uses"
                        .to_owned(),
                );
                return None;
            }
        };
        let built = match backend {
            Backend::Postgres => cfg!(feature = "postgres"),
            Backend::Mysql => cfg!(feature = "mysql"),
        };
        if !built {
            self.report(
                Some(span),
                format!(
                    "[lock] {} = ... needs {} support, and this release-tasks was built without the `{}` feature; \
                     use the default build",
                    backend.key(),
                    backend.product(),
                    backend.key()
                ),
            );
            return None;
        }
        // A bad variable list is one problem; the other keys are still checked.
        let key_name = backend.key();
        let url_vars = self.typed(vars).and_then(|vars| {
            let vars_span = vars.span();
            let url_vars = match vars.into_inner() {
                OneOrMany::One(name) => vec![name],
                OneOrMany::Many(names) => names,
            };
            if url_vars.is_empty() || !url_vars.iter().all(|v| crate::gate::is_var_name(v)) {
                self.report(
                    Some(vars_span),
                    format!(
                        "[lock] {key_name} = {:?} must name the variable that holds the database URL, like {key_name} = \"DATABASE_URL\" \
                         (or a list: [\"DIRECT_URL\", \"DATABASE_URL\"])",
                        crate::redact::urls_in(&url_vars.join(", "))
                    ),
                );
                return None;
            }
            Some(url_vars)
        });
        let key = match self.typed(raw.key) {
            Some(key) if key.get_ref().trim().is_empty() => {
                self.report(
                    Some(key.span()),
                    "[lock] key is empty; leave it out to use the app's name".into(),
                );
                None
            }
            // PostgreSQL's text cannot hold a NUL: the ledger's queries would fail once the release
            // has started.
            Some(key) if key.get_ref().contains('\0') => {
                self.report(
                    Some(key.span()),
                    "[lock] key contains a NUL byte, which PostgreSQL cannot store; remove it"
                        .into(),
                );
                None
            }
            Some(key) if backend == Backend::Mysql && key.get_ref().chars().count() > 255 => {
                self.report(
                    Some(key.span()),
                    "[lock] key is longer than 255 characters, which the MySQL ledger cannot store; shorten it"
                        .into(),
                );
                None
            }
            other => other.map(Spanned::into_inner),
        };
        let timeout = self.duration(raw.timeout, "timeout", Duration::from_secs(30 * 60));
        let once = self.typed(raw.once).is_some_and(Spanned::into_inner);
        let connect_timeout = self.duration(
            raw.connect_timeout,
            "connect_timeout",
            Duration::from_secs(60),
        );
        Some(Lock {
            backend,
            url_vars: url_vars?,
            key,
            timeout,
            once,
            connect_timeout,
        })
    }

    /// A `changed` gate compares with the ledger, which only `[lock]` with `once = true` keeps.
    fn changed_needs_once(&mut self, lock: Option<&Lock>) {
        let why = match lock {
            Some(lock) if lock.once => return,
            Some(_) => {
                "[lock] keeps the release ledger only with once = true; add once = true to [lock]"
            }
            None => {
                "add [lock] with postgres = \"DATABASE_URL\" and once = true (the ledger lives in the app's database)"
            }
        };
        for (name, span) in std::mem::take(&mut self.changed_at) {
            self.report(
                Some(span),
                format!(
                    "task `{name}`: `changed` compares the files with the release ledger's record of the task's last successful run; {why}"
                ),
            );
        }
    }

    fn required_env(&mut self, raw: Option<RawRequire>) -> Vec<String> {
        let mut names = Vec::new();
        for name in raw.map(|r| r.env).unwrap_or_default() {
            let Some(name) = self.typed(Some(name)) else {
                continue;
            };
            if crate::gate::is_var_name(name.get_ref()) {
                names.push(name.into_inner());
            } else {
                self.report(
                    Some(name.span()),
                    format!(
                        "[require] env: {:?} is not an environment variable name; use letters, digits and _",
                        name.get_ref()
                    ),
                );
            }
        }
        names
    }

    fn tasks(
        &mut self,
        raw: Vec<(Spanned<String>, Spanned<RawTask>)>,
        defaults: &Defaults,
    ) -> Vec<Task> {
        let mut tasks = Vec::with_capacity(raw.len());
        let mut afters = Vec::with_capacity(raw.len());
        for (name, raw_task) in raw {
            let name_span = name.span();
            let name = name.into_inner();
            if !valid_task_name(&name) {
                self.report(
                    Some(name_span.clone()),
                    format!(
                        "task name {name:?} is not allowed; use letters, digits, '-', '_' and '.', like [tasks.cache-clear]"
                    ),
                );
            }
            let task_span = raw_task.span();
            self.task = Some(name.clone());
            let mut raw_task = raw_task.into_inner();
            let after = raw_task.after.take().unwrap_or_default();
            afters.push(
                after
                    .into_iter()
                    .filter_map(|name| self.typed(Some(name)))
                    .collect(),
            );
            tasks.push(self.task(name, task_span, raw_task, defaults));
            self.task = None;
        }
        self.order(tasks, &afters)
    }

    fn task(
        &mut self,
        name: String,
        span: std::ops::Range<usize>,
        raw: RawTask,
        defaults: &Defaults,
    ) -> Task {
        let command = match (raw.run, raw.notify) {
            (None, None) => {
                self.report(
                    Some(span.clone()),
                    format!(
                        "task `{name}` has no `run`; add the command, like run = \"bundle exec rails db:migrate\" (or `notify` for a webhook)"
                    ),
                );
                Command::Exec(Vec::new())
            }
            (Some(run), Some(_)) => {
                self.report(
                    Some(run.span()),
                    format!("task `{name}` has both `run` and `notify`; a task does one of them, so split it in two"),
                );
                Command::Exec(Vec::new())
            }
            (Some(run), None) => self.command(&name, run, defaults),
            (None, Some(notify)) => self.notify(&name, notify),
        };
        let on = match self.typed(raw.on) {
            None => On::Success,
            Some(on) => match on.get_ref().as_str() {
                "success" => On::Success,
                "failure" => On::Failure,
                "always" => On::Always,
                other => {
                    self.report(
                        Some(on.span()),
                        format!("task `{name}`: `on = {other:?}` is not one of \"success\", \"failure\" or \"always\""),
                    );
                    On::Success
                }
            },
        };
        let when = raw.when.and_then(|g| self.gate(&name, "when", &g));
        let unless = raw.unless.and_then(|g| self.gate(&name, "unless", &g));
        let dir = match self.typed(raw.dir) {
            None => self.base.clone(),
            Some(dir) => {
                let path = self.base.join(dir.get_ref());
                if !path.is_dir() {
                    self.report(
                        Some(dir.span()),
                        format!(
                            "task `{name}`: `dir` {} is not a directory; it is taken relative to the config file",
                            path.display()
                        ),
                    );
                }
                path
            }
        };
        let env = self.task_env(&name, raw.env);
        let is_notify = matches!(command, Command::Notify(_));
        let changed = raw
            .changed
            .map(|c| self.changed(&name, c))
            .unwrap_or_default();
        let retry = self.retry(
            &name,
            (
                raw.retries,
                raw.retry_delay,
                raw.retry_on,
                raw.attempt_timeout,
            ),
            is_notify,
        );
        Task {
            timeout: self.duration(raw.timeout, "timeout", defaults.timeout),
            grace: self.duration(raw.grace, "grace", defaults.grace),
            changed,
            retry,
            name,
            command,
            when,
            unless,
            allow_failure: self
                .typed(raw.allow_failure)
                .is_some_and(Spanned::into_inner),
            on,
            env,
            dir,
        }
    }

    /// A task's `env`: names and values a process can receive.
    fn task_env(
        &mut self,
        name: &str,
        raw: std::collections::BTreeMap<String, Typed<String>>,
    ) -> std::collections::BTreeMap<String, String> {
        let mut env = std::collections::BTreeMap::new();
        for (key, value) in raw {
            let Some(value) = self.typed(Some(value)) else {
                continue;
            };
            if key.is_empty() || key.contains(['=', '\0']) {
                self.report(
                    Some(value.span()),
                    format!(
                        "task `{name}`: env name {key:?} is not a valid variable name; a name must not be empty or hold `=` or a NUL byte"
                    ),
                );
            }
            if value.get_ref().contains('\0') {
                self.report(
                    Some(value.span()),
                    format!("task `{name}`: env {key} contains a NUL byte, which no process can receive; remove it"),
                );
            }
            env.insert(key, value.into_inner());
        }
        env
    }

    fn command(&mut self, name: &str, run: Spanned<toml::Value>, defaults: &Defaults) -> Command {
        let span = run.span();
        if self.dated(
            &span,
            Expected::Described("a command: a string, or a list of strings"),
        ) {
            return Command::Exec(Vec::new());
        }
        match run.into_inner() {
            toml::Value::String(script) if script.contains('\0') => {
                self.report(
                    Some(span),
                    format!("task `{name}`: `run` contains a NUL byte, which no process can receive; remove it"),
                );
                Command::Exec(Vec::new())
            }
            toml::Value::String(script) if !script.trim().is_empty() => Command::Shell {
                shell: defaults.shell.clone(),
                script,
            },
            toml::Value::Array(items) if !items.is_empty() => {
                let argv: Option<Vec<String>> = items
                    .into_iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect();
                match argv {
                    Some(argv) if argv.iter().any(|a| a.contains('\0')) => {
                        self.report(
                            Some(span),
                            format!("task `{name}`: an item of `run` contains a NUL byte, which no process can receive; remove it"),
                        );
                        Command::Exec(Vec::new())
                    }
                    Some(argv) if !argv[0].is_empty() => Command::Exec(argv),
                    _ => {
                        self.report(
                            Some(span),
                            format!("task `{name}`: every item of `run` must be a string, the first not empty"),
                        );
                        Command::Exec(Vec::new())
                    }
                }
            }
            toml::Value::String(_) | toml::Value::Array(_) => {
                self.report(
                    Some(span),
                    format!("task `{name}`: `run` is empty; give the command to run"),
                );
                Command::Exec(Vec::new())
            }
            _ => {
                self.report(
                    Some(span),
                    format!("task `{name}`: `run` must be a string (run by the shell) or an array of strings (exec'd)"),
                );
                Command::Exec(Vec::new())
            }
        }
    }

    fn notify(&mut self, name: &str, raw: Spanned<RawNotify>) -> Command {
        let span = raw.span();
        let raw = raw.into_inner();
        let url = self.required(raw.url, "url", span);
        // A url of the wrong type is one problem among the others, like any other value.
        let url = match self.typed(url) {
            None => Err(None),
            Some(url) => match Template::parse(url.get_ref()) {
                Ok(template) => Ok((template, url)),
                Err(message) => Err(Some((message, url.span()))),
            },
        };
        let url = match url {
            Err(None) => Template { raw: String::new() },
            Ok((_, raw_url))
                if !valid_header_value(raw_url.get_ref()) || raw_url.get_ref().contains(' ') =>
            {
                self.report(
                    Some(raw_url.span()),
                    format!("task `{name}`: notify url has a space or a control character (a newline?); remove it"),
                );
                Template { raw: String::new() }
            }
            Ok((url, _))
                if url.raw.starts_with("http://")
                    || url.raw.starts_with("https://")
                    || url.raw.starts_with("${") =>
            {
                url
            }
            Ok((_, raw_url)) => {
                self.report(
                    Some(raw_url.span()),
                    format!("task `{name}`: notify url must start with http:// or https://, or be a ${{VARIABLE}} that holds one"),
                );
                Template { raw: String::new() }
            }
            Err(Some((message, span))) => {
                self.report(Some(span), format!("task `{name}`: notify url: {message}"));
                Template { raw: String::new() }
            }
        };
        let mut headers = Vec::with_capacity(raw.headers.len());
        for (key, value) in raw.headers {
            let Some(value) = self.typed(Some(value)) else {
                continue;
            };
            if !valid_header_name(&key) {
                self.report(
                    Some(value.span()),
                    format!("task `{name}`: notify header name {key:?} is not a valid HTTP header name; use letters, digits and -"),
                );
            }
            if !valid_header_value(value.get_ref()) {
                self.report(
                    Some(value.span()),
                    format!("task `{name}`: notify header {key} has a control character (a newline?) that HTTP does not allow in a header value; remove it"),
                );
                continue;
            }
            match Template::parse(value.get_ref()) {
                Ok(t) => headers.push((key.clone(), t)),
                Err(message) => self.report(
                    Some(value.span()),
                    format!("task `{name}`: notify header {key}: {message}"),
                ),
            }
        }
        Command::Notify(Notify {
            url,
            headers,
            format: self
                .typed(raw.format)
                .map_or(NotifyFormat::Json, Spanned::into_inner),
            timeout: self.duration(raw.timeout, "timeout", Duration::from_secs(10)),
            retries: match self.typed(raw.retries) {
                None => 3,
                Some(n) if *n.get_ref() > MAX_RETRIES => {
                    self.report(
                        Some(n.span()),
                        format!(
                            "task `{name}`: notify `retries = {}` is more than the maximum of {MAX_RETRIES}; \
                             with the backoff doubling to 8s, 10 already wait over a minute",
                            n.get_ref()
                        ),
                    );
                    MAX_RETRIES
                }
                Some(n) => n.into_inner(),
            },
        })
    }

    /// `changed = "glob"` or a list of globs. The span is kept: whether `[lock]` keeps the ledger
    /// that the gate compares with is known once `[lock]` is read.
    fn changed(&mut self, name: &str, value: Spanned<toml::Value>) -> Vec<Glob> {
        let span = value.span();
        if self.dated(&span, Expected::Described("a glob, or a list of globs")) {
            return Vec::new();
        }
        let items = match value.into_inner() {
            toml::Value::String(one) => vec![toml::Value::String(one)],
            toml::Value::Array(items) if !items.is_empty() => items,
            _ => {
                self.report(
                    Some(span),
                    format!(
                        "task `{name}`: `changed` must be a glob or a list of globs, like changed = [\"db/migrate/**\"]"
                    ),
                );
                return Vec::new();
            }
        };
        let mut globs = Vec::new();
        for item in items {
            let Some(text) = item.as_str() else {
                self.report(
                    Some(span.clone()),
                    format!("task `{name}`: every item of `changed` must be a string, like \"db/migrate/**\""),
                );
                continue;
            };
            match Glob::parse(text) {
                Ok(glob) => globs.push(glob),
                Err(message) => self.report(
                    Some(span.clone()),
                    format!("task `{name}`: `changed`: {message}"),
                ),
            }
        }
        if !globs.is_empty() {
            self.changed_at.push((name.to_owned(), span));
        }
        globs
    }

    /// `retries`, `retry_delay`, `retry_on` and `attempt_timeout`.
    #[allow(clippy::type_complexity)] // the four keys as the raw task has them
    fn retry(
        &mut self,
        name: &str,
        (retries, retry_delay, retry_on, attempt_timeout): (
            Option<Typed<u32>>,
            Option<Typed<String>>,
            Option<Spanned<toml::Value>>,
            Option<Typed<String>>,
        ),
        is_notify: bool,
    ) -> Retry {
        let builtin = Retry::default();
        let span_of = |t: &Option<Typed<String>>| {
            t.as_ref()
                .and_then(|t| t.0.as_ref().ok())
                .map(Spanned::span)
        };
        let given = [
            ("retry_delay", span_of(&retry_delay)),
            ("retry_on", retry_on.as_ref().map(Spanned::span)),
            ("attempt_timeout", span_of(&attempt_timeout)),
        ];
        let retries_given = retries.is_some();
        let retries = match self.typed(retries) {
            None => 0,
            Some(n) if is_notify => {
                self.report(
                    Some(n.span()),
                    format!(
                        "task `{name}`: a notify task retries with notify's own `retries` (notify = {{ url = ..., retries = 3 }}); move it there"
                    ),
                );
                0
            }
            Some(n) if *n.get_ref() > MAX_RETRIES => {
                self.report(
                    Some(n.span()),
                    format!(
                        "task `{name}`: `retries = {}` is more than the maximum of {MAX_RETRIES}; a task that fails that often needs fixing, not retrying",
                        n.get_ref()
                    ),
                );
                MAX_RETRIES
            }
            Some(n) => n.into_inner(),
        };
        if !retries_given && !is_notify {
            for (key, span) in given {
                if let Some(span) = span {
                    self.report(
                        Some(span),
                        format!(
                            "task `{name}`: `{key}` has no effect without `retries`; add retries = 2 (further attempts after a failed one)"
                        ),
                    );
                }
            }
        }
        let delay = self.duration(retry_delay, "retry_delay", builtin.delay);
        let attempt_timeout = attempt_timeout
            .map(|t| self.duration(Some(t), "attempt_timeout", Duration::MAX))
            .filter(|t| *t != Duration::MAX);
        let on = retry_on
            .map(|on| self.retry_on(name, &on))
            .unwrap_or_default();
        Retry {
            retries,
            delay,
            on,
            attempt_timeout,
        }
    }

    /// `retry_on = [75, 1, "timeout"]`: exit statuses from 1 to 255, and `"timeout"`.
    fn retry_on(&mut self, name: &str, value: &Spanned<toml::Value>) -> RetryOn {
        let mut on = RetryOn::default();
        if self.dated(
            &value.span(),
            Expected::Described("exit statuses from 1 to 255 and \"timeout\""),
        ) {
            return on;
        }
        let bad = |v: &mut Self| {
            v.report(
                Some(value.span()),
                format!(
                    "task `{name}`: `retry_on` must list exit statuses from 1 to 255 and, to retry an attempt that ran past attempt_timeout, \"timeout\"; like retry_on = [75, \"timeout\"]"
                ),
            );
        };
        let toml::Value::Array(items) = value.get_ref() else {
            bad(self);
            return on;
        };
        if items.is_empty() {
            bad(self);
        }
        for item in items {
            match item {
                toml::Value::Integer(code) if (1..=255).contains(code) => {
                    on.statuses.push(*code as i32);
                }
                toml::Value::String(word) if word == "timeout" => on.timeout = true,
                _ => {
                    bad(self);
                    return on;
                }
            }
        }
        on
    }

    fn gate(&mut self, name: &str, key: &str, value: &Spanned<toml::Value>) -> Option<Gate> {
        if self.dated(&value.span(), Expected::Str) {
            return None;
        }
        match Gate::from_toml(value.get_ref()) {
            Ok(gate) => Some(gate),
            Err(message) => {
                self.report(
                    Some(value.span()),
                    format!("task `{name}`: `{key}`: {message}"),
                );
                None
            }
        }
    }

    /// Puts tasks in run order: file order, except that a task waits for every task in its `after`.
    /// Among the tasks that are free to run, the earliest in the file goes first.
    fn order(&mut self, tasks: Vec<Task>, afters: &[Vec<Spanned<String>>]) -> Vec<Task> {
        let index: HashMap<&str, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut waits_on = vec![0usize; tasks.len()];
        let mut unblocks: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
        let mut problems = Vec::new();
        for (i, after) in afters.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for dep in after {
                match index.get(dep.get_ref().as_str()) {
                    Some(&j) if j == i => problems.push((
                        dep.span(),
                        format!(
                            "task `{}` lists itself in `after`; remove it",
                            tasks[i].name
                        ),
                    )),
                    Some(&j) => {
                        if seen.insert(j) {
                            waits_on[i] += 1;
                            unblocks[j].push(i);
                        }
                    }
                    None => problems.push((
                        dep.span(),
                        format!(
                            "task `{}`: `after` names `{}`, which is not a task; known tasks: {}",
                            tasks[i].name,
                            dep.get_ref(),
                            some_names(tasks.iter().map(|t| t.name.as_str()))
                        ),
                    )),
                }
            }
        }
        let mut ready: BTreeSet<usize> = (0..tasks.len()).filter(|&i| waits_on[i] == 0).collect();
        let mut order = Vec::with_capacity(tasks.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &k in &unblocks[i] {
                waits_on[k] -= 1;
                if waits_on[k] == 0 {
                    ready.insert(k);
                }
            }
        }
        if order.len() < tasks.len() {
            let stuck: Vec<&str> = (0..tasks.len())
                .filter(|&i| waits_on[i] > 0)
                .map(|i| tasks[i].name.as_str())
                .collect();
            let first = (0..tasks.len())
                .find(|&i| waits_on[i] > 0)
                .and_then(|i| afters[i].first());
            problems.push((
                first.map_or(0..0, Spanned::span),
                format!(
                    "`after` makes a cycle among tasks {}; each task can only wait for tasks that do not wait for it",
                    some_names(stuck.iter().copied())
                ),
            ));
        }
        for (span, message) in problems {
            self.report(Some(span), message);
        }
        let mut slots: Vec<Option<Task>> = tasks.into_iter().map(Some).collect();
        order.into_iter().filter_map(|i| slots[i].take()).collect()
    }
}

/// The known key nearest to `key`, if it is close enough to be a typo of it.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, counting characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Whether `value` can be sent as an HTTP header value: no control characters but tab (a trailing
/// newline from a secret made with `echo > file` is the usual culprit), no DEL.
#[must_use]
pub fn valid_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn parse_str(src: &str) -> Result<Config> {
        parse(Path::new("release.toml"), src)
    }

    #[test]
    fn changed_and_retries_are_read_and_checked() {
        let ok = parse_str(
            "[lock]\npostgres = \"DATABASE_URL\"\nonce = true\n\
             [tasks.m]\nrun = \"m\"\nchanged = [\"db/migrate/**\", \"prisma/*.sql\"]\n\
             retries = 2\nretry_delay = \"2s\"\nretry_on = [75, \"timeout\"]\nattempt_timeout = \"1m\"\n\
             [tasks.s]\nrun = \"s\"\nchanged = \"db/seeds.rb\"\n",
        );
        let config = ok.unwrap();
        let m = &config.tasks[0];
        assert_eq!(m.changed.len(), 2);
        assert_eq!(m.retry.retries, 2);
        assert_eq!(m.retry.delay, Duration::from_secs(2));
        assert_eq!(m.retry.on.statuses, [75]);
        assert!(m.retry.on.timeout);
        assert_eq!(m.retry.attempt_timeout, Some(Duration::from_secs(60)));
        assert_eq!(config.tasks[1].changed[0].raw, "db/seeds.rb");
        assert_eq!(config.tasks[1].retry, crate::config::Retry::default());
    }

    #[test]
    fn changed_needs_lock_once_and_says_why() {
        let without = problems("[tasks.m]\nrun = \"m\"\nchanged = [\"db/**\"]\n");
        assert_eq!(without.len(), 1);
        assert_eq!(without[0].location, Some((3, 11)));
        assert_eq!(
            without[0].message,
            "task `m`: `changed` compares the files with the release ledger's record of the task's last successful run; \
             add [lock] with postgres = \"DATABASE_URL\" and once = true (the ledger lives in the app's database)"
        );
        let not_once = problems(
            "[lock]\npostgres = \"DATABASE_URL\"\n[tasks.m]\nrun = \"m\"\nchanged = \"db/**\"\n",
        );
        assert!(
            not_once[0].message.ends_with("add once = true to [lock]"),
            "{not_once:?}"
        );
    }

    #[test]
    fn bad_changed_and_retry_values() {
        let found = problems(
            "[lock]\npostgres = \"DATABASE_URL\"\nonce = true\n\
             [tasks.a]\nrun = \"a\"\nchanged = [\"../x\", 5]\n\
             [tasks.b]\nrun = \"b\"\nretries = 11\nretry_on = [0, \"never\"]\n\
             [tasks.c]\nrun = \"c\"\nretry_delay = \"5s\"\n\
             [tasks.d]\nnotify = { url = \"https://x\" }\nretries = 1\n\
             [tasks.e]\nrun = \"e\"\nchanged = []\n",
        );
        let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 7, "{messages:#?}");
        for (i, says) in [
            "goes up with `..`",
            "every item of `changed` must be a string",
            "`retries = 11` is more than the maximum of 10",
            "`retry_on` must list exit statuses from 1 to 255",
            "`retry_delay` has no effect without `retries`",
            "a notify task retries with notify's own `retries`",
            "`changed` must be a glob or a list of globs",
        ]
        .iter()
        .enumerate()
        {
            assert!(messages[i].contains(says), "{i}: {}", messages[i]);
        }
    }

    fn mismatch(found: Found, expected: Expected, key: Option<&str>) -> String {
        mismatch_message(&Mismatch { found, expected }, key)
    }

    #[test]
    fn a_mismatch_is_worded_from_what_was_found_and_expected() {
        assert_eq!(
            mismatch(Found::Int(5), Expected::Str, Some("grace")),
            "invalid type: integer `5`, expected a string; put the value in quotes, like \"3000\" (key `grace`)"
        );
        assert_eq!(
            mismatch(Found::Int(5), Expected::Str, Some("API_TOKEN")),
            "invalid type: integer, expected a string; put the value in quotes, like \"3000\" (key `API_TOKEN`)"
        );
        assert_eq!(
            mismatch(Found::Array, Expected::Str, None),
            "invalid type: sequence, expected a string; this key takes one value, not a list; remove the [ ]"
        );
        assert_eq!(
            mismatch(Found::Str("yes".into()), Expected::Bool, Some("once")),
            "invalid type: string \"yes\", expected a boolean; write true or false, without quotes (key `once`)"
        );
        assert_eq!(
            mismatch(Found::Int(-1), Expected::U32, None),
            "invalid value: integer `-1`, expected u32; write a whole number, without quotes"
        );
        assert_eq!(
            mismatch(Found::Float(1.0), Expected::U32, None),
            "invalid type: floating point `1.0`, expected u32; write a whole number, without quotes"
        );
        assert_eq!(
            mismatch(
                Found::Str("xml".into()),
                Expected::Variant(&["json", "slack"]),
                Some("format")
            ),
            "unknown variant `xml`, expected `json` or `slack` (key `format`)"
        );
        assert_eq!(
            mismatch(Found::Bool(true), Expected::Variant(&["a", "b", "c"]), None),
            "invalid type: boolean `true`, expected `a`, `b` or `c`"
        );
        assert_eq!(
            mismatch(Found::Table, Expected::Described("a name"), None),
            "invalid type: map, expected a name"
        );
        assert_eq!(
            mismatch(Found::Datetime("2024-01-01".into()), Expected::Str, None),
            "invalid type: datetime `2024-01-01`, expected a string; TOML reads an unquoted date or time as a datetime, \
             not as text: put it in quotes, like \"2024-01-01\""
        );
        assert_eq!(
            mismatch(
                Found::Datetime("07:32:00".into()),
                Expected::Str,
                Some("API_KEY")
            ),
            "invalid type: datetime, expected a string; TOML reads an unquoted date or time as a datetime, \
             not as text: put it in quotes, like \"2024-01-01\" (key `API_KEY`)"
        );
        assert_eq!(
            mismatch(
                Found::Datetime("2024-01-01".into()),
                Expected::U32,
                Some("retries")
            ),
            "invalid type: datetime `2024-01-01`, expected u32; write a whole number, without quotes (key `retries`)"
        );
        assert_eq!(
            mismatch(
                Found::Datetime("2024-01-01".into()),
                Expected::Container("a table"),
                Some("env")
            ),
            "invalid type: datetime `2024-01-01`, expected a table (key `env`)"
        );
    }

    // Without the feature, [lock] is refused whole.
    #[cfg(feature = "postgres")]
    #[test]
    fn a_missing_required_key_is_one_problem_among_the_rest() {
        let Err(Error::ConfigInvalid { problems, .. }) = parse_str(
            "[lock]\nkey = \"x\"\n[tasks.n]\nnotify = { format = \"json\" }\n[tasks.a]\nrun = 5\n",
        ) else {
            panic!("a config without [lock] postgres/mysql and notify url is invalid");
        };
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages[0].starts_with(
                "[lock] needs the database: postgres = \"DATABASE_URL\" for PostgreSQL, or mysql = "
            ),
            "{messages:?}"
        );
        assert!(
            messages[1].starts_with("task `n`: missing field `url`; add it"),
            "{messages:?}"
        );
        assert_eq!(messages.len(), 3, "{messages:?}");
    }

    fn problems(src: &str) -> Vec<Diagnostic> {
        match parse_str(src) {
            Err(Error::ConfigInvalid { problems, .. }) => problems,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn a_duplicate_is_named_only_when_it_is_what_the_reader_stopped_on() {
        let p = problems("[tasks.a]\nrun = \"x\"\nrun = \"y\"\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].location, Some((3, 1)));
        assert!(
            p[0].message
                .starts_with("duplicate key `run` in [tasks.a], first on line 2;")
        );
        // A syntax error before it is what stopped the reader: its own message, at its own place.
        let p = problems("[tasks.a]\nrun = \"x\" junk\nrun = \"y\"\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].location.map(|(line, _)| line), Some(2));
        assert!(!p[0].message.contains("duplicate"), "{}", p[0].message);
    }

    #[test]
    fn a_datetime_is_reported_once_where_its_value_is_checked() {
        let p = problems(
            "[defaults]\ntimeout = 2024-01-01\n[tasks.a]\nrun = \"x\"\nwhen = [\"A\", 2024-01-01, 07:32:00]\nnope = 2024-01-01\n",
        );
        let text: Vec<(Option<(usize, usize)>, &str)> =
            p.iter().map(|d| (d.location, d.message.as_str())).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert_eq!(text[0].0, Some((2, 11)));
        assert!(
            text[0]
                .1
                .starts_with("invalid type: datetime `2024-01-01`, expected a string;")
        );
        // One problem for the list, at its first datetime.
        assert_eq!(text[1].0, Some((5, 14)));
        assert!(text[1].1.ends_with("(key `when`)"), "{}", text[1].1);
        // Under an unknown key, the key is the problem.
        assert!(
            text[2].1.starts_with("unknown field `nope`"),
            "{}",
            text[2].1
        );
        // Nothing is taken for text: a datetime alone is still a problem.
        assert_eq!(
            problems("[tasks.a]\nrun = \"x\"\ndir = 2024-01-01\n").len(),
            1
        );
    }

    fn names(config: &Config) -> Vec<&str> {
        config.tasks.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn keeps_file_order_and_applies_after() {
        let c = parse_str(
            "[tasks.z]\nrun = \"true\"\nafter = [\"m\"]\n[tasks.a]\nrun = \"true\"\n[tasks.m]\nrun = [\"true\"]\n",
        )
        .unwrap();
        assert_eq!(names(&c), ["a", "m", "z"]);
        let c = parse_str("[tasks.z]\nrun = \"true\"\n[tasks.a]\nrun = \"true\"\n").unwrap();
        assert_eq!(names(&c), ["z", "a"]);
    }

    #[test]
    fn defaults_apply_and_tasks_override() {
        let c = parse_str(
            "[defaults]\ntimeout = \"5m\"\ngrace = \"3s\"\nshell = \"/bin/bash\"\n[tasks.a]\nrun = \"x\"\ntimeout = \"1h\"\n",
        )
        .unwrap();
        let t = &c.tasks[0];
        assert_eq!(t.timeout, Duration::from_secs(3600));
        assert_eq!(t.grace, Duration::from_secs(3));
        assert_eq!(t.command.argv(), ["/bin/bash", "-c", "x"]);
        assert_eq!(c.defaults.release_timeout, Duration::from_secs(55 * 60));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let p = problems(
            "[tasks.a]\nrun = \"\"\n[tasks.b]\nrun = \"x\"\ntimeout = \"0s\"\n[tasks.c]\nrun = \"x\"\nafter = [\"nope\"]\n[tasks.d]\nwhen = \"X\"\n",
        );
        let lines: Vec<_> = p.iter().map(|d| d.location.map(|l| l.0)).collect();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].message.contains("`run` is empty"));
        assert!(p[1].message.contains("zero"));
        assert!(p[2].message.contains("`nope`"));
        assert!(p[3].message.contains("has no `run`"));
        assert_eq!(lines, [Some(2), Some(5), Some(8), Some(9)], "in file order");
    }

    #[test]
    fn unknown_keys_and_syntax_errors_have_positions() {
        let p = problems("[tasks.a]\nrun = \"x\"\ntimout = \"5m\"\n");
        assert_eq!(p[0].location, Some((3, 1)));
        assert!(p[0].message.contains("timout"), "{}", p[0].message);
        let p = problems("[tasks.a]\nrun = \"x\n");
        assert_eq!(p[0].location.map(|l| l.0), Some(2));
    }

    #[test]
    fn unknown_keys_come_with_every_other_problem() {
        let p = problems(
            "[tasks.a]\nrun = \"x\"\ntimout = \"5m\"\n[tasks.b]\nrun = \"x\"\ngrase = \"1s\"\n\
             [tasks.c]\nrun = \"\"\nafter = [\"nope\"]\n[defaults]\nzzz = 1\n[tasks.d]\nrun = \"x\"\nnotify = { url = \"http://h\", retires = 1 }\n",
        );
        let text: Vec<String> = p
            .iter()
            .map(|d| format!("{:?} {}", d.location, d.message))
            .collect();
        assert_eq!(p.len(), 7, "{text:#?}");
        assert!(
            text[0].starts_with(
                "Some((3, 1)) unknown field `timout` in task `a`; did you mean `timeout`?"
            ),
            "{text:#?}"
        );
        assert!(
            text[1].starts_with(
                "Some((6, 1)) unknown field `grase` in task `b`; did you mean `grace`?"
            ),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("unknown field `retires`") && t.contains("`retries`")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with(
                "Some((11, 1)) unknown field `zzz` in [defaults]; known keys here: timeout"
            )),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.contains("`run` is empty")),
            "{text:#?}"
        );
        assert!(text.iter().any(|t| t.contains("`nope`")), "{text:#?}");
        assert!(
            text.iter().any(|t| t.contains("both `run` and `notify`")),
            "{text:#?}"
        );
    }

    #[test]
    fn durations_are_bounded() {
        for key in ["timeout", "grace", "heartbeat", "release_timeout"] {
            for value in ["500000000000y", "18446744073709551615s", "31days"] {
                let p = problems(&format!("[defaults]\n{key} = \"{value}\"\n"));
                assert!(
                    p[0].message.contains("30 days") || p[0].message.contains("not a duration"),
                    "{key}={value}: {p:?}"
                );
            }
            assert!(parse_str(&format!("[defaults]\n{key} = \"30days\"\n")).is_ok());
        }
        let p = problems(
            "[tasks.a]\nrun = \"x\"\ntimeout = \"18446744073709551615s\"\ngrace = \"999999h\"\n",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter().all(|d| d.message.contains("maximum of 30 days")),
            "{p:?}"
        );
        let p = problems("[tasks.a]\nnotify = { url = \"http://h\", timeout = \"40days\" }\n");
        assert!(p[0].message.contains("30 days"), "{p:?}");
    }

    #[test]
    fn what_run_would_trip_on_is_found_here() {
        for (src, needle) in [
            ("[tasks.a]\nrun = \"echo a\\u0000b\"\n", "NUL"),
            ("[tasks.a]\nrun = [\"echo\", \"a\\u0000\"]\n", "NUL"),
            ("[tasks.a]\nrun = \"x\"\nenv = { A = \"\\u0000\" }\n", "NUL"),
            ("[defaults]\nshell = \"/bin/sh\\u0000\"\n", "NUL"),
            (
                "[tasks.a]\nnotify = { url = \"http://h\", headers = { X = \"v\\n\" } }\n",
                "control character",
            ),
            (
                "[tasks.a]\nnotify = { url = \"http://h\", headers = { \"X Y\" = \"v\" } }\n",
                "header name",
            ),
        ] {
            let p = problems(src);
            assert!(p.iter().any(|d| d.message.contains(needle)), "{src}: {p:?}");
        }
    }

    #[test]
    fn cycles_and_self_references() {
        let p = problems(
            "[tasks.a]\nrun = \"x\"\nafter = [\"b\"]\n[tasks.b]\nrun = \"x\"\nafter = [\"a\"]\n",
        );
        assert!(p[0].message.contains("cycle among tasks a, b"), "{p:?}");
        let p = problems("[tasks.a]\nrun = \"x\"\nafter = [\"a\"]\n");
        assert!(p[0].message.contains("itself"));
    }

    #[test]
    fn bad_durations_say_how_to_write_them() {
        let p = problems("[defaults]\ntimeout = \"30\"\n");
        assert!(p[0].message.contains("\"15m\""), "{}", p[0].message);
        assert_eq!(p[0].location, Some((2, 11)));
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("", 0), (1, 1));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(src in "\\PC{0,400}") {
            let _ = parse_str(&src);
        }

        #[test]
        fn arbitrary_task_tables_are_accepted_or_rejected_cleanly(
            keys in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("run = \"true\"".to_owned()),
                    proptest::strategy::Just("run = []".to_owned()),
                    proptest::strategy::Just("run = [\"\"]".to_owned()),
                    "timeout = \"[0-9a-z ]{0,6}\"",
                    "grace = \"[0-9]{0,3}(ms|s|m|h|x)?\"",
                    "when = \"[A-Z_0-9]{0,5}\"",
                    "when = \\{ env = \"[A-Z]{0,3}\", (equals|in|set) = (\"x\"|true|\\[\"a\"\\]) \\}",
                    "unless = \\[\"[A-Z]{1,3}\"(, \\{ env = \"[A-Z]{1,3}\" \\})?\\]",
                    "after = \\[\"t[0-3]\"\\]",
                    "allow_failure = (true|false|1)",
                    "[a-z_]{1,8} = 1",
                ],
                0..12,
            ),
        ) {
            let mut src = String::new();
            for (i, key) in keys.iter().enumerate() {
                if i % 3 == 0 {
                    src.push_str("[tasks.t");
                    src.push_str(&(i / 3).to_string());
                    src.push_str("]\n");
                }
                src.push_str(key);
                src.push('\n');
            }
            match parse_str(&src) {
                Ok(config) => {
                    for task in &config.tasks {
                        proptest::prop_assert!(!task.command.argv().is_empty());
                        proptest::prop_assert!(!task.timeout.is_zero() && !task.grace.is_zero());
                    }
                }
                Err(Error::ConfigInvalid { problems, .. }) => proptest::prop_assert!(!problems.is_empty()),
                Err(other) => proptest::prop_assert!(false, "unexpected error kind: {other:?}"),
            }
        }
    }
}
