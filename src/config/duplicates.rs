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

use std::fmt::Write as _;

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

/// Keys joined by dots, as TOML writes them (quoted where a bare key cannot say them); an item of
/// an array (a place of the scan's own, named by a NUL) is left out.
pub(super) fn written(keys: &[String]) -> String {
    let mut out = String::new();
    for key in keys.iter().filter(|key| !key.starts_with('\0')) {
        if !out.is_empty() {
            out.push('.');
        }
        if !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            out.push_str(key);
        } else {
            let _ = write!(out, "{key:?}");
        }
    }
    out
}

/// The first key or table `source` defines twice, if any (in the order of the file). A file of more
/// than [`MAX_DEFINITIONS`] keys and tables is not followed to its end (nor is anything past a
/// place the parser cannot read).
pub(super) fn first(source: &str) -> Option<Duplicate> {
    let source = Source::new(source);
    let tokens = source.lex().into_vec();
    let mut events: Vec<Event> = Vec::with_capacity(tokens.len());
    // Nesting as deep as the `toml` crate allows, and no deeper: `a = [[[[...` ten thousand deep
    // must not take the stack.
    let mut guarded = RecursionGuard::new(&mut events, MAX_DEPTH);
    toml_parser::parser::parse_document(&tokens, &mut guarded, &mut ());
    let mut scan = Scan {
        source,
        events: &events,
        next: 0,
        defined: Vec::new(),
        found: None,
    };
    let _ = scan.document();
    scan.found
}

/// The deepest nesting of arrays and inline tables followed (the `toml` crate's own limit).
const MAX_DEPTH: u32 = 80;

/// The most keys and tables followed: each is looked up among those before it.
const MAX_DEFINITIONS: usize = 4096;

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
    Table,
    /// A `[[header]]` array of tables; what is under it belongs to its last element.
    Array,
}

/// A key or table defined so far: its keys from the top, how, and where its key starts.
struct Defined {
    path: Vec<String>,
    kind: Kind,
    at: usize,
}

struct Scan<'s, 'e> {
    source: Source<'s>,
    events: &'e [Event],
    next: usize,
    defined: Vec<Defined>,
    /// The duplicate that stopped the scan (a scan also stops, with none, at an event it cannot
    /// follow: the file does not parse, and the `toml` crate's message says why).
    found: Option<Duplicate>,
}

impl Scan<'_, '_> {
    /// The next event that is not whitespace, a comment or a newline, left in place.
    fn peek(&mut self) -> Option<EventKind> {
        loop {
            let kind = self.events.get(self.next)?.kind();
            if !matches!(
                kind,
                EventKind::Whitespace | EventKind::Comment | EventKind::Newline
            ) {
                return Some(kind);
            }
            self.next += 1;
        }
    }

    fn take(&mut self) -> Option<Event> {
        self.peek()?;
        self.next += 1;
        Some(self.events[self.next - 1])
    }

    /// The whole file, up to its first duplicate or a place the scan cannot follow.
    fn document(&mut self) -> Option<()> {
        let mut section = Vec::new();
        while let Some(kind) = self.peek() {
            match kind {
                EventKind::StdTableOpen | EventKind::ArrayTableOpen => {
                    self.next += 1;
                    let (close, kind) = if kind == EventKind::StdTableOpen {
                        (EventKind::StdTableClose, Kind::Table)
                    } else {
                        (EventKind::ArrayTableClose, Kind::Array)
                    };
                    let keys = self.keys(close)?;
                    section = self.define(&[], &keys, kind)?;
                }
                _ => self.key_value(&section, 0)?,
            }
        }
        Some(())
    }

    /// Keys joined by dots, decoded (`"run"` and `run` are one key), with where each starts; up to
    /// and including `end` (`=`, or a header's closing bracket).
    fn keys(&mut self, end: EventKind) -> Option<Vec<(String, usize)>> {
        let mut keys = Vec::new();
        loop {
            let event = self.take()?;
            match event.kind() {
                EventKind::SimpleKey => {
                    let mut key = String::new();
                    self.source.get(event)?.decode_key(&mut key, &mut ());
                    keys.push((key, event.span().start()));
                }
                EventKind::KeySep => {}
                kind if kind == end && !keys.is_empty() => return Some(keys),
                _ => return None,
            }
        }
    }

    /// `keys = value` in the table at `table`, the value included.
    fn key_value(&mut self, table: &[String], depth: u32) -> Option<()> {
        let keys = self.keys(EventKind::KeyValSep)?;
        let path = self.define(table, &keys, Kind::Value)?;
        self.value(&path, depth)
    }

    /// Defines `keys` under `table` as `kind` (a value, or a header's table or array), with TOML's
    /// rules for each key on the way; returns the path defined.
    fn define(
        &mut self,
        table: &[String],
        keys: &[(String, usize)],
        kind: Kind,
    ) -> Option<Vec<String>> {
        let header = kind != Kind::Value;
        let mut path = table.to_vec();
        for (i, (key, at)) in keys.iter().enumerate() {
            path.push(key.clone());
            let last = i + 1 == keys.len();
            let Some(found) = self.defined.iter().rposition(|d| d.path == path) else {
                if self.defined.len() >= MAX_DEFINITIONS {
                    return None;
                }
                let kind = match (last, header) {
                    (true, _) => kind,
                    (false, true) => Kind::Implicit,
                    (false, false) => Kind::Dotted,
                };
                self.defined.push(Defined {
                    path: path.clone(),
                    kind,
                    at: *at,
                });
                continue;
            };
            let before = self.defined[found].kind;
            let allowed = match (last, before) {
                // A header may pass through any table; a dotted key only through one that dotted
                // keys made or a header named as a parent.
                (false, Kind::Table | Kind::Array) => header,
                (false, Kind::Dotted | Kind::Implicit) => true,
                (true, Kind::Implicit) if kind == Kind::Table => {
                    self.defined[found].kind = Kind::Table;
                    self.defined[found].at = *at;
                    true
                }
                (true, Kind::Array) if kind == Kind::Array => {
                    // A new element: what was under the last one is gone from view.
                    self.forget_under(&path);
                    true
                }
                (false, Kind::Value) | (true, _) => false,
            };
            if !allowed {
                path.pop();
                self.found = Some(Duplicate {
                    table: path,
                    key: key.clone(),
                    header,
                    at: *at,
                    first: self.defined[found].at,
                });
                return None;
            }
        }
        Some(path)
    }

    /// Forgets what is defined under `path`.
    fn forget_under(&mut self, path: &[String]) {
        self.defined
            .retain(|d| !(d.path.len() > path.len() && d.path.starts_with(path)));
    }

    /// One value: a scalar, an array (of values), or an inline table, whose keys are checked
    /// among themselves; `path` is where it is, `depth` how deep it is nested.
    fn value(&mut self, path: &[String], depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let (close, inline) = match self.take()?.kind() {
            EventKind::Scalar => return Some(()),
            EventKind::ArrayOpen => (EventKind::ArrayClose, false),
            EventKind::InlineTableOpen => (EventKind::InlineTableClose, true),
            _ => return None,
        };
        // Each item of an array is a place of its own (`[{ x = 1 }, { x = 1 }]`), under a key (a
        // NUL) that no release.toml has a reason to write.
        let mut item = path.to_vec();
        item.push("\0".to_owned());
        loop {
            match self.peek()? {
                kind if kind == close => {
                    self.next += 1;
                    return Some(());
                }
                EventKind::ValueSep => self.next += 1,
                _ if inline => self.key_value(path, depth + 1)?,
                _ => {
                    self.value(&item, depth + 1)?;
                    self.forget_under(&item);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The duplicate as (path, line of the second, line of the first, from a header).
    fn found(source: &str) -> Option<(String, usize, usize, bool)> {
        let line = |at: usize| source[..at].matches('\n').count() + 1;
        first(source).map(|d| {
            let mut path = d.table.clone();
            path.push(d.key);
            (written(&path), line(d.at), line(d.first), d.header)
        })
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
    fn a_key_twice_in_an_inline_table_in_an_array_is_named_by_the_array() {
        assert_eq!(
            found("a = [{ x = 1 }, { x = 1, x = 2 }]\n"),
            Some(("a.x".into(), 1, 1, false))
        );
    }

    #[test]
    fn a_file_of_more_keys_than_followed_gives_up_rather_than_take_long() {
        let keys = |n: usize| {
            (0..n).fold(String::new(), |mut s, i| {
                let _ = writeln!(s, "k{i} = 1");
                s
            })
        };
        let mut many = keys(MAX_DEFINITIONS);
        many.push_str("one_more = 1\nk0 = 2\n");
        assert_eq!(found(&many), None);
        let few = keys(MAX_DEFINITIONS - 1);
        assert_eq!(found(&(few + "k0 = 2\n")).map(|d| d.0), Some("k0".into()));
    }

    #[test]
    fn a_file_that_does_not_parse_has_no_duplicate_past_the_fault() {
        assert_eq!(found("[tasks.a\nrun = 1\nrun = 2\n"), None);
        assert_eq!(found("a = 1\na = 2\n[b\n"), Some(("a".into(), 2, 1, false)));
    }

    #[test]
    fn names_are_written_as_toml_writes_them() {
        let d = first("[tasks.\"db migrate\"]\nrun = 1\nrun = 2\n").expect("a duplicate");
        assert_eq!(written(&d.table), "tasks.\"db migrate\"");
        assert_eq!(
            written(&["a".into(), "\0".into(), "b.c".into()]),
            "a.\"b.c\""
        );
    }
}
