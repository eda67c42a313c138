//! The serde mirror of `release.toml`: structs shaped like the file, with `toml::Spanned` positions.
//! The validator walks the parsed document itself (`toml::de::DeTable`, spans on keys and values)
//! to find unknown keys and datetimes.
//!
//! Unknown keys are not rejected here (serde would stop at the first one and hide every other
//! problem); `validate.rs` finds them all, with the key lists taken from these structs themselves, so a
//! field added here is known there without a second list to keep in step.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use toml::Spanned;

use super::NotifyFormat;

#[derive(Deserialize)]
#[serde(expecting = "a release.toml: [defaults], [require], [lock] and [tasks.NAME] tables")]
pub(super) struct RawConfig {
    pub(super) defaults: Option<RawDefaults>,
    pub(super) require: Option<RawRequire>,
    pub(super) lock: Option<Spanned<RawLock>>,
    #[serde(default)]
    pub(super) tasks: RawTasks,
}

#[derive(Deserialize)]
#[serde(expecting = "a [require] table, like env = [\"DATABASE_URL\"]")]
pub(super) struct RawRequire {
    #[serde(default)]
    pub(super) env: Vec<Typed<String>>,
}

#[derive(Deserialize)]
#[serde(expecting = "a [lock] table, like postgres = \"DATABASE_URL\" or mysql = \"DATABASE_URL\"")]
pub(super) struct RawLock {
    /// One of `postgres` and `mysql` is required; the validator reports a missing one among the
    /// other problems.
    pub(super) postgres: Option<Typed<OneOrMany>>,
    pub(super) mysql: Option<Typed<OneOrMany>>,
    pub(super) key: Option<Typed<String>>,
    pub(super) timeout: Option<Typed<String>>,
    pub(super) once: Option<Typed<bool>>,
    pub(super) connect_timeout: Option<Typed<String>>,
}

/// `[lock] postgres` or `mysql`: one variable name, or a list of them.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a variable name or a list of them, like \"DATABASE_URL\" or [\"DIRECT_URL\", \"DATABASE_URL\"]"
)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(expecting = "a notify table, like notify = { url = \"${RELEASE_WEBHOOK_URL}\" }")]
pub(super) struct RawNotify {
    /// Required; `None` is reported by the validator, among the other problems.
    pub(super) url: Option<Typed<String>>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Typed<String>>,
    pub(super) format: Option<Typed<NotifyFormat>>,
    pub(super) timeout: Option<Typed<String>>,
    pub(super) retries: Option<Typed<u32>>,
}

#[derive(Deserialize)]
#[serde(expecting = "a [defaults] table, like timeout = \"30m\"")]
pub(super) struct RawDefaults {
    pub(super) timeout: Option<Typed<String>>,
    pub(super) grace: Option<Typed<String>>,
    pub(super) shell: Option<Typed<String>>,
    pub(super) heartbeat: Option<Typed<String>>,
    pub(super) release_timeout: Option<Typed<String>>,
    pub(super) tail_lines: Option<Typed<u32>>,
}

#[derive(Deserialize)]
#[serde(
    expecting = "a task table, like [tasks.migrate] with run = \"bundle exec rails db:migrate\""
)]
pub(super) struct RawTask {
    pub(super) run: Option<Spanned<toml::Value>>,
    pub(super) notify: Option<Spanned<RawNotify>>,
    pub(super) on: Option<Typed<String>>,
    pub(super) when: Option<Spanned<toml::Value>>,
    pub(super) unless: Option<Spanned<toml::Value>>,
    pub(super) timeout: Option<Typed<String>>,
    pub(super) grace: Option<Typed<String>>,
    pub(super) after: Option<Vec<Typed<String>>>,
    pub(super) allow_failure: Option<Typed<bool>>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, Typed<String>>,
    pub(super) dir: Option<Typed<String>>,
    pub(super) changed: Option<Spanned<toml::Value>>,
    pub(super) retries: Option<Typed<u32>>,
    pub(super) retry_delay: Option<Typed<String>>,
    pub(super) retry_on: Option<Spanned<toml::Value>>,
    pub(super) attempt_timeout: Option<Typed<String>>,
}

/// A value whose type the validator checks, not serde: serde stops at the first value of the wrong
/// type, which would hide every other problem in the file; here a wrong type is one problem among
/// the rest, with its place and, as data, what was found and what was expected (`validate.rs`
/// words the message).
pub(super) struct Typed<T>(pub(super) Result<Spanned<T>, (Range<usize>, Mismatch)>);

impl<'de, T: Expect> Deserialize<'de> for Typed<T> {
    // Once per type, not inlined into each of the thirty-odd fields of the serde mirror: a little
    // less in the static binary, whose size has a budget (README, "Static binary").
    #[inline(never)]
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Spanned::<toml::Value>::deserialize(deserializer)?;
        let span = value.span();
        let value = value.into_inner();
        let found = Found::of(&value);
        Ok(Typed(match T::deserialize(value) {
            Ok(typed) => Ok(Spanned::new(span, typed)),
            Err(_) => Err((
                span,
                Mismatch {
                    found,
                    expected: T::EXPECTED,
                },
            )),
        }))
    }
}

/// What a [`Typed`] value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expected {
    Str,
    Bool,
    U32,
    /// One of these strings.
    Variant(&'static [&'static str]),
    /// Something a sentence describes.
    Described(&'static str),
    /// A table or a list, as a sentence describes it: not a value that quotes would make right.
    Container(&'static str),
}

/// A type a [`Typed`] value can have, and how to say what it must be.
pub(super) trait Expect: DeserializeOwned {
    const EXPECTED: Expected;
}

impl Expect for String {
    const EXPECTED: Expected = Expected::Str;
}

impl Expect for bool {
    const EXPECTED: Expected = Expected::Bool;
}

impl Expect for u32 {
    const EXPECTED: Expected = Expected::U32;
}

impl Expect for NotifyFormat {
    const EXPECTED: Expected = Expected::Variant(&["json", "slack"]);
}

impl Expect for OneOrMany {
    const EXPECTED: Expected = Expected::Described(
        "a variable name or a list of them, like \"DATABASE_URL\" or [\"DIRECT_URL\", \"DATABASE_URL\"]",
    );
}

/// A value that is not what its key takes: what it is, and what it must be.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Mismatch {
    pub(super) found: Found,
    pub(super) expected: Expected,
}

/// The kind of a TOML value, with the value itself where it is short enough to show.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Found {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array,
    Table,
}

impl Found {
    fn of(value: &toml::Value) -> Found {
        match value {
            toml::Value::String(s) => Found::Str(s.clone()),
            toml::Value::Integer(i) => Found::Int(*i),
            toml::Value::Float(f) => Found::Float(*f),
            toml::Value::Boolean(b) => Found::Bool(*b),
            toml::Value::Datetime(d) => Found::Datetime(d.to_string()),
            toml::Value::Array(_) => Found::Array,
            toml::Value::Table(_) => Found::Table,
        }
    }
}

/// The `[tasks]` table in file order (a plain map would sort the names).
#[derive(Default)]
pub(super) struct RawTasks(pub(super) Vec<(Spanned<String>, Spanned<RawTask>)>);

impl<'de> Deserialize<'de> for RawTasks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = RawTasks;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of tasks, like [tasks.migrate]")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTasks, A::Error> {
                let mut tasks = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    tasks.push(entry);
                }
                Ok(RawTasks(tasks))
            }
        }
        deserializer.deserialize_map(InOrder)
    }
}

/// The keys a derived `Deserialize` struct accepts, asked of the derive itself: it hands them to
/// `deserialize_struct`, which this deserializer records before refusing to go on.
pub(super) fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Recorder<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Recorder<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("only the field names are wanted"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("only the field names are wanted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}

/// Which keys each kind of table in the file may have.
pub(super) struct Schema {
    pub(super) root: &'static [&'static str],
    pub(super) defaults: &'static [&'static str],
    pub(super) require: &'static [&'static str],
    pub(super) lock: &'static [&'static str],
    pub(super) task: &'static [&'static str],
    pub(super) notify: &'static [&'static str],
}

impl Schema {
    pub(super) fn new() -> Schema {
        Schema {
            root: fields_of::<RawConfig>(),
            defaults: fields_of::<RawDefaults>(),
            require: fields_of::<RawRequire>(),
            lock: fields_of::<RawLock>(),
            task: fields_of::<RawTask>(),
            notify: fields_of::<RawNotify>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_lists_come_from_the_structs() {
        let schema = Schema::new();
        assert_eq!(schema.root, ["defaults", "require", "lock", "tasks"]);
        assert!(schema.task.contains(&"timeout") && schema.task.contains(&"notify"));
        assert!(schema.lock.contains(&"postgres") && schema.lock.contains(&"mysql"));
    }
}
