//! The first key or table that `release.toml` defines twice, found from the TOML parser's events
//! (`toml_parser`, the lexer and push parser under the `toml` crate), so the message can name it and
//! say what to do. The `toml` crate refuses such a file too, but its error says only "duplicate key"
//! and where, as prose; this pass gives the same finding as data (which key, where it was first).
//!
//! It follows TOML's rules for what defines a key: `a = 1`, a dotted `a.b = 1`, a `[table]` header
//! (an implicit parent such as `[tasks]` of `[tasks.a]` may still be written once), an inline
//! table (closed once written), and `[[array]]` tables (each header starts a new element). It is
//! consulted only for a file the `toml` crate has already refused, so a rule it does not know can
//! at worst leave the crate's own message without the hint, never refuse a valid file.

use std::collections::HashMap;

use toml_parser::Source;
use toml_parser::parser::{Event, EventKind, RecursionGuard};

/// A key or table defined a second time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Duplicate {
    /// The table the key is in, as keys from the top (`["tasks", "a"]`); empty at the top level.
    pub(super) table: Vec<String>,
    /// The key defined twice.
    pub(super) key: String,
    /// A `[header]` (or `[[header]]`) defines it the second time, rather than `key = value`.
    pub(super) header: bool,
    /// Where the second definition's key starts (a byte offset).
    pub(super) at: usize,
    /// Where the first definition's key starts.
    pub(super) first: usize,
}

impl Duplicate {
    /// `[tasks.a]`, or `run` in `[tasks.a]`, in TOML's own notation.
    pub(super) fn path(&self) -> String {
        let mut keys: Vec<&str> = self.table.iter().map(String::as_str).collect();
        keys.push(&self.key);
        keys.iter()
            .map(|key| quoted_if_needed(key))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The table the key is in, as a header (`[tasks.a]`), or "the top level".
    pub(super) fn place(&self) -> String {
        if self.table.is_empty() {
            "at the top level".to_owned()
        } else {
            let keys: Vec<String> = self.table.iter().map(|k| quoted_if_needed(k)).collect();
            format!("in [{}]", keys.join("."))
        }
    }
}

/// A key as TOML needs it written: bare when it can be, quoted otherwise.
fn quoted_if_needed(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// The first key or table `source` defines twice, if any (in the order of the file).
pub(super) fn first(source: &str) -> Option<Duplicate> {
    let source = Source::new(source);
    let tokens = source.lex().into_vec();
    let mut events = Vec::new();
    let mut receiver = |event: Event| {
        if !matches!(
            event.kind(),
            EventKind::Whitespace | EventKind::Comment | EventKind::Newline
        ) {
            events.push(event);
        }
    };
    // Nesting as deep as the `toml` crate allows, and no deeper: `a = [[[[...` ten thousand deep
    // must not take the stack.
    let mut guarded = RecursionGuard::new(&mut receiver, MAX_DEPTH);
    toml_parser::parser::parse_document(&tokens, &mut guarded, &mut ());
    Scan {
        source,
        events: events.into_iter().peekable(),
    }
    .document()
    .err()
    .flatten()
}

/// The deepest nesting of arrays and inline tables followed (the `toml` crate's own limit).
const MAX_DEPTH: u32 = 80;

/// How a key came to be defined, which decides what may define it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `key = value` (an inline table included: it is closed once written).
    Value,
    /// A table made by a dotted key (`a.b = 1` makes `a`): more dotted keys may add to it.
    Dotted,
    /// A table named only as the parent in a header (`[tasks]` of `[tasks.a]`): one header may still
    /// define it.
    Implicit,
    /// A table a `[header]` defined.
    Explicit,
    /// A `[[header]]` array of tables; its `keys` are the last element's.
    Array,
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// Where the key that defined it starts.
    at: usize,
    keys: Table,
}

type Table = HashMap<String, Entry>;

/// A key as written, decoded (`"run"` and `run` are one key), and where it starts.
type Key = (String, usize);

struct Scan<'s> {
    source: Source<'s>,
    events: std::iter::Peekable<std::vec::IntoIter<Event>>,
}

/// Why the scan stopped early: the first duplicate, or an event it cannot follow (the file does not
/// parse: the `toml` crate's message says why).
type Stop = Option<Duplicate>;

impl Scan<'_> {
    fn document(&mut self) -> Result<(), Stop> {
        let mut root = Table::new();
        let mut section: Vec<String> = Vec::new();
        while let Some(event) = self.events.next() {
            match event.kind() {
                EventKind::StdTableOpen | EventKind::ArrayTableOpen => {
                    let array = event.kind() == EventKind::ArrayTableOpen;
                    let keys = self.keys_until(if array {
                        EventKind::ArrayTableClose
                    } else {
                        EventKind::StdTableClose
                    })?;
                    section = header(&mut root, &keys, array)?;
                }
                EventKind::SimpleKey => {
                    let keys = self.dotted(event)?;
                    let table = walk(&mut root, &section).ok_or(None)?;
                    self.key_value(table, &section, &keys, 0)?;
                }
                _ => return Err(None),
            }
        }
        Ok(())
    }

    /// The decoded key of a `SimpleKey` event.
    fn key(&self, event: Event) -> Result<Key, Stop> {
        let raw = self.source.get(event).ok_or(None)?;
        let mut key = String::new();
        raw.decode_key(&mut key, &mut ());
        Ok((key, event.span().start()))
    }

    /// The keys of a header, up to its closing bracket(s).
    fn keys_until(&mut self, close: EventKind) -> Result<Vec<Key>, Stop> {
        let mut keys = Vec::new();
        while let Some(event) = self.events.next() {
            match event.kind() {
                EventKind::SimpleKey => keys.push(self.key(event)?),
                EventKind::KeySep => {}
                kind if kind == close && !keys.is_empty() => return Ok(keys),
                _ => return Err(None),
            }
        }
        Err(None)
    }

    /// A dotted key that starts with `first`, up to and including its `=`.
    fn dotted(&mut self, first: Event) -> Result<Vec<Key>, Stop> {
        let mut keys = vec![self.key(first)?];
        while let Some(event) = self.events.next() {
            match event.kind() {
                EventKind::KeySep => {
                    let next = self.events.next().ok_or(None)?;
                    if next.kind() != EventKind::SimpleKey {
                        return Err(None);
                    }
                    keys.push(self.key(next)?);
                }
                EventKind::KeyValSep => return Ok(keys),
                _ => return Err(None),
            }
        }
        Err(None)
    }

    /// `keys = value` in `table` (which is at `path`), the value included.
    fn key_value(
        &mut self,
        table: &mut Table,
        path: &[String],
        keys: &[Key],
        depth: u32,
    ) -> Result<(), Stop> {
        let (last, parents) = keys.split_last().ok_or(None)?;
        let mut table = table;
        let mut path = path.to_vec();
        for (key, at) in parents {
            let entry = table.entry(key.clone()).or_insert(Entry {
                kind: Kind::Dotted,
                at: *at,
                keys: Table::new(),
            });
            // A dotted key may add to a table that dotted keys made, or that a header named only
            // as a parent; not to one a header defined, nor to a value.
            if matches!(entry.kind, Kind::Value | Kind::Explicit | Kind::Array) {
                return Err(Some(Duplicate {
                    table: path,
                    key: key.clone(),
                    header: false,
                    at: *at,
                    first: entry.at,
                }));
            }
            path.push(key.clone());
            table = &mut entry.keys;
        }
        let (key, at) = last;
        if let Some(entry) = table.get(key) {
            return Err(Some(Duplicate {
                table: path,
                key: key.clone(),
                header: false,
                at: *at,
                first: entry.at,
            }));
        }
        path.push(key.clone());
        self.value(&path, depth)?;
        table.insert(
            key.clone(),
            Entry {
                kind: Kind::Value,
                at: *at,
                keys: Table::new(),
            },
        );
        Ok(())
    }

    /// One value: a scalar, an array (of values), or an inline table, whose keys are checked
    /// among themselves. `path` names it in a message; `depth` is how deep it is nested.
    fn value(&mut self, path: &[String], depth: u32) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(None);
        }
        let event = self.events.next().ok_or(None)?;
        match event.kind() {
            EventKind::Scalar => Ok(()),
            EventKind::ArrayOpen => loop {
                match self.events.peek().map(Event::kind) {
                    Some(EventKind::ArrayClose) => {
                        self.events.next();
                        return Ok(());
                    }
                    Some(EventKind::ValueSep) => {
                        self.events.next();
                    }
                    Some(_) => self.value(path, depth + 1)?,
                    None => return Err(None),
                }
            },
            EventKind::InlineTableOpen => {
                let mut inline = Table::new();
                loop {
                    let event = self.events.next().ok_or(None)?;
                    match event.kind() {
                        EventKind::InlineTableClose => return Ok(()),
                        EventKind::ValueSep => {}
                        EventKind::SimpleKey => {
                            let keys = self.dotted(event)?;
                            self.key_value(&mut inline, path, &keys, depth + 1)?;
                        }
                        _ => return Err(None),
                    }
                }
            }
            _ => Err(None),
        }
    }
}

/// The table a section's path leads to (through the last element of an array of tables).
fn walk<'t>(root: &'t mut Table, path: &[String]) -> Option<&'t mut Table> {
    let mut table = root;
    for key in path {
        table = &mut table.get_mut(key)?.keys;
    }
    Some(table)
}

/// A `[header]` or `[[header]]`: defines its table (or adds an element), and returns the section's
/// path.
fn header(root: &mut Table, keys: &[Key], array: bool) -> Result<Vec<String>, Stop> {
    let (last, parents) = keys.split_last().ok_or(None)?;
    let mut table = root;
    let mut path = Vec::new();
    for (key, at) in parents {
        let entry = table.entry(key.clone()).or_insert(Entry {
            kind: Kind::Implicit,
            at: *at,
            keys: Table::new(),
        });
        if entry.kind == Kind::Value {
            return Err(Some(Duplicate {
                table: path,
                key: key.clone(),
                header: true,
                at: *at,
                first: entry.at,
            }));
        }
        path.push(key.clone());
        table = &mut entry.keys;
    }
    let (key, at) = last;
    let duplicate = |first: usize| Duplicate {
        table: path.clone(),
        key: key.clone(),
        header: true,
        at: *at,
        first,
    };
    match table.get_mut(key) {
        None => {
            table.insert(
                key.clone(),
                Entry {
                    kind: if array { Kind::Array } else { Kind::Explicit },
                    at: *at,
                    keys: Table::new(),
                },
            );
        }
        Some(entry) if array && entry.kind == Kind::Array => entry.keys = Table::new(),
        Some(entry) if !array && entry.kind == Kind::Implicit => {
            entry.kind = Kind::Explicit;
            entry.at = *at;
        }
        Some(entry) => return Err(Some(duplicate(entry.at))),
    }
    path.push(key.clone());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The duplicate as (path, line of the second, line of the first, from a header).
    fn found(source: &str) -> Option<(String, usize, usize, bool)> {
        let line = |at: usize| source[..at].matches('\n').count() + 1;
        first(source).map(|d| (d.path(), line(d.at), line(d.first), d.header))
    }

    #[test]
    fn a_key_set_twice_in_a_table_is_found_with_both_lines() {
        assert_eq!(
            found("[tasks.a]\nrun = \"true\"\nrun = \"false\"\n"),
            Some(("tasks.a.run".into(), 3, 2, false))
        );
        // Quoting does not make another key.
        assert_eq!(
            found("[tasks.a]\nrun = \"true\"\n\"run\" = \"false\"\n"),
            Some(("tasks.a.run".into(), 3, 2, false))
        );
        assert_eq!(
            found("a = 1\n# a comment\nb = 2\na = 3\n"),
            Some(("a".into(), 4, 1, false))
        );
    }

    #[test]
    fn a_table_written_twice_is_found() {
        assert_eq!(
            found("[tasks.a]\nrun = \"x\"\n\n[tasks.a]\nrun = \"y\"\n"),
            Some(("tasks.a".into(), 4, 1, true))
        );
        assert_eq!(
            found("[defaults]\n[lock]\n[defaults]\n"),
            Some(("defaults".into(), 3, 1, true))
        );
        // A table set as a value, then as a header.
        assert_eq!(
            found("[tasks]\na = { run = \"x\" }\n[tasks.a]\n"),
            Some(("tasks.a".into(), 3, 2, true))
        );
    }

    #[test]
    fn keys_inside_inline_tables_and_dotted_keys_are_checked() {
        assert_eq!(
            found("[tasks.a]\nenv = { A = \"1\", A = \"2\" }\n"),
            Some(("tasks.a.env.A".into(), 2, 2, false))
        );
        assert_eq!(
            found("[tasks.a]\nenv.A = \"1\"\nenv.A = \"2\"\n"),
            Some(("tasks.a.env.A".into(), 3, 2, false))
        );
        // A dotted key cannot add to a table a header defined, nor to an inline table.
        assert_eq!(
            found("[tasks.a.env]\nA = \"1\"\n[tasks]\na.env.B = \"2\"\n"),
            Some(("tasks.a.env".into(), 4, 1, false))
        );
        assert_eq!(
            found("[tasks.a]\nenv = { A = \"1\" }\nenv.B = \"2\"\n"),
            Some(("tasks.a.env".into(), 3, 2, false))
        );
    }

    #[test]
    fn what_toml_allows_is_not_a_duplicate() {
        for source in [
            "[tasks.a]\nrun = \"x\"\n[tasks.b]\nrun = \"x\"\n",
            // A parent named by a header may be written once, after its children.
            "[tasks.a]\nrun = \"x\"\n[tasks]\n",
            "[tasks.a]\nenv.A = \"1\"\nenv.B = \"2\"\n",
            "a = [{ x = 1 }, { x = 1 }]\nb = [[1, 2], [1, 2]]\n",
            "[[a]]\nx = 1\n[a.b]\ny = 1\n[[a]]\nx = 2\n[a.b]\ny = 2\n",
            "[x]\ny.z = 1\n[x.y.w]\nv = 1\n",
            "[tasks.a]\nrun = \"x\"\nwhen = { env = \"A\", equals = \"1\" }\nunless = { env = \"A\", equals = \"1\" }\n",
            "",
        ] {
            assert!(
                toml::from_str::<toml::Table>(source).is_ok(),
                "valid TOML: {source}"
            );
            assert_eq!(found(source), None, "{source}");
        }
    }

    #[test]
    fn every_duplicate_found_here_is_refused_by_toml_too() {
        for source in [
            "[tasks.a]\nrun = \"true\"\nrun = \"false\"\n",
            "[tasks.a]\nrun = \"x\"\n\n[tasks.a]\nrun = \"y\"\n",
            "[tasks]\na = { run = \"x\" }\n[tasks.a]\n",
            "[tasks.a]\nenv = { A = \"1\", A = \"2\" }\n",
            "[tasks.a.env]\nA = \"1\"\n[tasks]\na.env.B = \"2\"\n",
            "[tasks.a]\nenv = { A = \"1\" }\nenv.B = \"2\"\n",
            "a = 1\n[a]\n",
            "a = [1]\n[[a]]\n",
            "[[a]]\n[a]\n",
        ] {
            assert!(first(source).is_some(), "{source}");
            assert!(
                toml::from_str::<toml::Table>(source).is_err(),
                "invalid TOML: {source}"
            );
        }
    }

    #[test]
    fn nesting_deeper_than_toml_allows_is_not_followed() {
        let deep = format!("a = {}{}\na = 1\n", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(found(&deep), None);
        let fine = format!("a = {}{}\na = 1\n", "[".repeat(50), "]".repeat(50));
        assert_eq!(found(&fine), Some(("a".into(), 2, 1, false)));
    }

    #[test]
    fn a_file_that_does_not_parse_has_no_duplicate_past_the_fault() {
        assert_eq!(found("[tasks.a\nrun = 1\nrun = 2\n"), None);
        assert_eq!(found("a = 1\na = 2\n[b\n"), Some(("a".into(), 2, 1, false)));
    }

    #[test]
    fn names_are_written_as_toml_writes_them() {
        let d = first("[tasks.\"db migrate\"]\nrun = 1\nrun = 2\n").expect("a duplicate");
        assert_eq!(d.path(), "tasks.\"db migrate\".run");
        assert_eq!(d.place(), "in [tasks.\"db migrate\"]");
        let d = first("a = 1\na = 2\n").expect("a duplicate");
        assert_eq!(d.place(), "at the top level");
    }
}
