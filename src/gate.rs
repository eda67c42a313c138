//! Gates: the `when` and `unless` conditions of a task, parsed from TOML and evaluated against an
//! environment snapshot.
//!
//! Evaluation is pure: it reads a map handed to it, never the process environment, so the rules are
//! tested here without touching global state. Deciding what to *do* with a verdict belongs to `plan.rs`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;

/// A snapshot of the environment, taken once at start-up.
///
/// Values are kept as they are: one that is not UTF-8 is never mistaken for an unset variable.
/// [`Env::lookup`] tells the two apart, and `plan.rs` refuses, before anything runs, any variable
/// the config or the settings name whose value is not UTF-8; after that, [`Env::get`] is safe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    text: BTreeMap<String, String>,
    /// Variables whose value is not UTF-8 (names that are not UTF-8 cannot be named by a config).
    bytes: BTreeMap<String, OsString>,
    /// Where a variable that did not come from the process environment came from (a `.env` file).
    sources: BTreeMap<String, String>,
}

/// A variable holds bytes that are not UTF-8, where release-tasks needs text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotUtf8 {
    pub var: String,
    /// The value with each bad byte shown as U+FFFD.
    pub lossy: String,
}

impl fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} holds bytes that are not UTF-8 ({:?}); set it to plain text",
            self.var,
            crate::redact::value(&self.var, &self.lossy)
        )
    }
}

impl Env {
    /// The snapshot of `vars` (the process environment, `std::env::vars_os()`).
    pub fn from_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Env {
        let mut env = Env::default();
        for (name, value) in vars {
            let Ok(name) = name.into_string() else {
                continue;
            };
            match value.into_string() {
                Ok(value) => {
                    env.bytes.remove(&name);
                    env.text.insert(name, value);
                }
                Err(value) => {
                    env.text.remove(&name);
                    env.bytes.insert(name, value);
                }
            }
        }
        env
    }

    /// The value of `name` if it is set and UTF-8. For a variable not yet checked with
    /// [`lookup`](Env::lookup), `None` may also mean "not UTF-8".
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&String> {
        self.text.get(name)
    }

    /// The value of `name`: `Ok(None)` when unset, an error when it is not UTF-8.
    pub fn lookup(&self, name: &str) -> Result<Option<&str>, NotUtf8> {
        if let Some(value) = self.bytes.get(name) {
            return Err(NotUtf8 {
                var: name.to_owned(),
                lossy: value.to_string_lossy().into_owned(),
            });
        }
        Ok(self.text.get(name).map(String::as_str))
    }

    /// The value of `name` as text, each byte that is not UTF-8 shown as U+FFFD (for values that are
    /// only shown, such as the platform's release metadata).
    #[must_use]
    pub fn get_lossy(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.text.get(name) {
            Some(value) => Some(Cow::Borrowed(value)),
            None => self.bytes.get(name).map(|v| v.to_string_lossy()),
        }
    }

    /// The value of `name` as the operating system gave it (for paths).
    #[must_use]
    pub fn get_os(&self, name: &str) -> Option<OsString> {
        match self.text.get(name) {
            Some(value) => Some(value.into()),
            None => self.bytes.get(name).cloned(),
        }
    }

    /// Sets `name` from somewhere other than the process environment, remembering where (shown as
    /// "(from SOURCE)" wherever a gate's reason shows the value).
    pub fn insert_from(&mut self, name: String, value: String, source: String) {
        self.sources.insert(name.clone(), source);
        self.insert(name, value);
    }

    /// Where `name`'s value came from, when not from the process environment.
    #[must_use]
    pub fn source(&self, name: &str) -> Option<&str> {
        self.sources.get(name).map(String::as_str)
    }

    /// Whether `name` is set, whatever its value.
    #[must_use]
    pub fn contains_key(&self, name: &str) -> bool {
        self.text.contains_key(name) || self.bytes.contains_key(name)
    }

    /// The variables whose values are UTF-8, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.text.iter()
    }

    /// Sets `name` (for tests and callers that build a snapshot by hand).
    pub fn insert(&mut self, name: String, value: String) {
        self.bytes.remove(&name);
        self.text.insert(name, value);
    }
}

impl FromIterator<(String, String)> for Env {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Env {
        Env::from_os(iter.into_iter().map(|(k, v)| (k.into(), v.into())))
    }
}

/// All of its conditions must hold for the gate to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    pub conditions: Vec<Condition>,
}

/// One test of one environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub var: String,
    pub test: Test,
}

/// What a condition checks about its variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// `"VAR"`: the variable holds a true boolean (`true/1/yes/on`).
    Truthy,
    /// `{ env = "VAR", equals = "x" }`: the exact value.
    Equals(String),
    /// `{ env = "VAR", in = ["a", "b"] }`: one of these exact values.
    In(Vec<String>),
    /// `{ env = "VAR", set = true }`: set and not empty (or, with `false`, unset or empty).
    Set(bool),
}

/// The result of checking one gate: whether it holds and, for each condition, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub holds: bool,
    /// One entry per condition checked, in order; evaluation stops at the first that fails.
    pub reasons: Vec<Reason>,
}

/// Why one condition held or did not: the variable, what it held, and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub var: String,
    /// `None` when the variable is unset.
    pub value: Option<String>,
    pub rule: String,
    pub holds: bool,
    /// Where the value came from when not from the process environment (a `.env` file).
    pub source: Option<String>,
}

/// A variable holds a value that a gate refuses to guess about: not a boolean, or not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    pub var: String,
    pub value: String,
    /// The value is not UTF-8 (`value` shows it lossily).
    pub not_utf8: bool,
}

impl From<NotUtf8> for BadValue {
    fn from(err: NotUtf8) -> Self {
        BadValue {
            var: err.var,
            value: err.lossy,
            not_utf8: true,
        }
    }
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.not_utf8 {
            return write!(
                f,
                "{}",
                NotUtf8 {
                    var: self.var.clone(),
                    lossy: self.value.clone()
                }
            );
        }
        write!(
            f,
            "{}={:?} is not a boolean; set it to one of true/1/yes/on or false/0/no/off (or unset it)",
            self.var,
            crate::redact::value(&self.var, &self.value)
        )
    }
}

/// Reads a boolean the strict way: a typo such as `ture` is an error, never a silent `false`.
#[must_use]
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

impl Gate {
    /// Parses a `when`/`unless` value: a string, a table, or an array of these.
    pub fn from_toml(value: &toml::Value) -> Result<Gate, String> {
        let conditions = match value {
            toml::Value::Array(items) => {
                if items.is_empty() {
                    return Err(
                        "an empty array is not a gate; remove the key to run the task always"
                            .into(),
                    );
                }
                items
                    .iter()
                    .map(Condition::from_toml)
                    .collect::<Result<_, _>>()?
            }
            other => vec![Condition::from_toml(other)?],
        };
        Ok(Gate { conditions })
    }

    /// Checks every condition against `env`. A bad boolean is an error even if an earlier
    /// condition already failed, so that `check` finds every typo, not only the first that matters.
    pub fn evaluate(&self, env: &Env) -> Result<Verdict, BadValue> {
        let mut reasons = Vec::with_capacity(self.conditions.len());
        let mut holds = true;
        for condition in &self.conditions {
            let reason = condition.evaluate(env)?;
            if holds {
                holds = reason.holds;
                reasons.push(reason);
            }
        }
        Ok(Verdict { holds, reasons })
    }
}

impl Condition {
    fn from_toml(value: &toml::Value) -> Result<Condition, String> {
        match value {
            toml::Value::String(var) => Ok(Condition { var: check_var(var)?, test: Test::Truthy }),
            toml::Value::Table(table) => {
                let mut var = None;
                let mut tests = Vec::new();
                for (key, v) in table {
                    match (key.as_str(), v) {
                        ("env", toml::Value::String(s)) => var = Some(check_var(s)?),
                        ("equals", toml::Value::String(s)) => tests.push(Test::Equals(s.clone())),
                        ("in", toml::Value::Array(items)) => {
                            let values = items
                                .iter()
                                .map(|i| i.as_str().map(str::to_owned))
                                .collect::<Option<Vec<_>>>()
                                .ok_or("`in` must be an array of strings, like in = [\"staging\", \"production\"]")?;
                            if values.is_empty() {
                                // It could never hold: `when` would never run the task, `unless` never skip it.
                                return Err("`in` is empty, so the condition could never hold; list the values, like in = [\"staging\", \"production\"]".into());
                            }
                            tests.push(Test::In(values));
                        }
                        ("set", toml::Value::Boolean(b)) => tests.push(Test::Set(*b)),
                        ("env" | "equals", _) => return Err(format!("`{key}` must be a string")),
                        ("in", _) => return Err("`in` must be an array of strings".into()),
                        ("set", _) => return Err("`set` must be true or false".into()),
                        (other, _) => {
                            return Err(format!(
                                "unknown key `{other}` in a condition; a condition has `env` and one of `equals`, `in` or `set`"
                            ));
                        }
                    }
                }
                let var = var.ok_or(
                    "a condition table needs `env`, the variable to test, like { env = \"APP_ENV\", equals = \"production\" }",
                )?;
                match tests.len() {
                    1 => Ok(Condition { var, test: tests.remove(0) }),
                    0 => Err(format!(
                        "the condition on {var} needs one of `equals`, `in` or `set`; to test a boolean write just \"{var}\""
                    )),
                    _ => Err(format!(
                        "the condition on {var} has more than one of `equals`, `in` and `set`; use an array of conditions to combine them"
                    )),
                }
            }
            _ => Err("a gate is a variable name (\"VAR\"), a condition table ({ env = \"VAR\", equals = \"x\" }) or an array of these".into()),
        }
    }

    fn evaluate(&self, env: &Env) -> Result<Reason, BadValue> {
        let value = env.lookup(&self.var)?;
        let (holds, rule) = match &self.test {
            Test::Truthy => {
                let parsed = match value {
                    None => false,
                    Some(v) => parse_bool(v).ok_or_else(|| BadValue {
                        var: self.var.clone(),
                        value: v.to_owned(),
                        not_utf8: false,
                    })?,
                };
                (parsed, "is true".to_owned())
            }
            Test::Equals(want) => (
                value == Some(want.as_str()),
                format!("equals {:?}", crate::redact::value(&self.var, want)),
            ),
            Test::In(set) => (
                value.is_some_and(|v| set.iter().any(|s| s == v)),
                format!(
                    "in {:?}",
                    set.iter()
                        .map(|v| crate::redact::value(&self.var, v))
                        .collect::<Vec<_>>()
                ),
            ),
            Test::Set(want) => {
                let is_set = value.is_some_and(|v| !v.is_empty());
                (
                    is_set == *want,
                    if *want {
                        "is set".into()
                    } else {
                        "is unset or empty".into()
                    },
                )
            }
        };
        Ok(Reason {
            var: self.var.clone(),
            value: value.map(str::to_owned),
            rule,
            holds,
            source: env.source(&self.var).map(str::to_owned),
        })
    }
}

/// Whether `name` can be an environment variable's name in a gate: letters, digits and `_`, not
/// starting with a digit.
#[must_use]
pub fn is_var_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_var(name: &str) -> Result<String, String> {
    if is_var_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not an environment variable name; use letters, digits and _, like RUN_MIGRATIONS_DURING_RELEASE"
        ))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            None => write!(f, "{} is unset", self.var)?,
            Some(v) => write!(f, "{}={:?}", self.var, crate::redact::value(&self.var, v))?,
        }
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        write!(f, " (needs: {} {})", self.var, self.rule)
    }
}

/// An environment snapshot from pairs, for the unit tests of the modules that read one.
#[cfg(test)]
#[must_use]
pub fn env_of(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::env_of as env;

    fn gate(src: &str) -> Result<Gate, String> {
        let table: toml::Table = toml::from_str(&format!("g = {src}")).expect("test TOML");
        Gate::from_toml(&table["g"])
    }

    #[test]
    fn booleans_are_strict_and_case_insensitive() {
        for t in ["true", "TRUE", "1", "yes", "On", " true "] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["false", "0", "no", "OFF", ""] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        for bad in ["ture", "2", "y", "enabled", "truee"] {
            assert_eq!(parse_bool(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_snapshot_knows_set_variables_whatever_their_bytes() {
        use std::os::unix::ffi::OsStringExt;
        let snapshot = Env::from_os([
            (OsString::from("TEXT"), OsString::from("v")),
            (OsString::from("EMPTY"), OsString::new()),
            (
                OsString::from("BYTES"),
                OsString::from_vec(b"tr\xffue".to_vec()),
            ),
        ]);
        for name in ["TEXT", "EMPTY", "BYTES"] {
            assert!(snapshot.contains_key(name), "{name}");
        }
        assert!(!snapshot.contains_key("UNSET"));
        let text: Vec<(&String, &String)> = snapshot.iter().collect();
        assert_eq!(text.len(), 2, "only the UTF-8 values: {text:?}");
        assert!(text.iter().any(|(k, v)| *k == "TEXT" && *v == "v"));
        assert!(snapshot.lookup("BYTES").is_err());
        let mut snapshot = snapshot;
        snapshot.insert("BYTES".into(), "true".into());
        assert_eq!(
            snapshot.lookup("BYTES"),
            Ok(Some("true")),
            "a value set by hand replaces the bytes"
        );
    }

    #[test]
    fn an_empty_in_list_is_refused_like_an_empty_gate() {
        let err = gate("{ env = \"APP_ENV\", in = [] }").unwrap_err();
        assert!(err.contains("`in` is empty"), "{err}");
        assert!(gate("{ env = \"APP_ENV\", in = [\"x\"] }").is_ok());
    }

    #[test]
    fn truthy_gate() {
        let g = gate("\"RUN\"").unwrap();
        assert!(g.evaluate(&env(&[("RUN", "yes")])).unwrap().holds);
        assert!(!g.evaluate(&env(&[("RUN", "off")])).unwrap().holds);
        assert!(!g.evaluate(&env(&[])).unwrap().holds);
        let err = g.evaluate(&env(&[("RUN", "ture")])).unwrap_err();
        assert_eq!(err.var, "RUN");
        assert!(err.to_string().contains("\"ture\""));
    }

    #[test]
    fn a_value_that_is_not_utf8_is_an_error_never_unset() {
        use std::os::unix::ffi::OsStringExt;
        let env = Env::from_os([
            ("RUN".into(), OsString::from_vec(b"\xff".to_vec())),
            ("SKIP".into(), OsString::from_vec(b"tr\xffue".to_vec())),
        ]);
        for src in [
            "\"RUN\"",
            "{ env = \"RUN\", set = true }",
            "{ env = \"RUN\", set = false }",
            "{ env = \"RUN\", equals = \"x\" }",
            "[\"OTHER\", { env = \"SKIP\", in = [\"a\"] }]",
        ] {
            let err = gate(src).unwrap().evaluate(&env).unwrap_err();
            assert!(err.not_utf8, "{src}");
            assert!(err.to_string().contains("not UTF-8"), "{src}: {err}");
        }
        assert!(env.contains_key("RUN") && env.get("RUN").is_none());
        assert_eq!(env.lookup("NOPE"), Ok(None));
    }

    #[test]
    fn table_conditions() {
        let eq = gate("{ env = \"APP_ENV\", equals = \"production\" }").unwrap();
        assert!(
            eq.evaluate(&env(&[("APP_ENV", "production")]))
                .unwrap()
                .holds
        );
        assert!(
            !eq.evaluate(&env(&[("APP_ENV", "Production")]))
                .unwrap()
                .holds
        );
        let within = gate("{ env = \"APP_ENV\", in = [\"a\", \"b\"] }").unwrap();
        assert!(within.evaluate(&env(&[("APP_ENV", "b")])).unwrap().holds);
        assert!(!within.evaluate(&env(&[])).unwrap().holds);
        let set = gate("{ env = \"URL\", set = true }").unwrap();
        assert!(set.evaluate(&env(&[("URL", "x")])).unwrap().holds);
        assert!(!set.evaluate(&env(&[("URL", "")])).unwrap().holds);
        let unset = gate("{ env = \"URL\", set = false }").unwrap();
        assert!(unset.evaluate(&env(&[("URL", "")])).unwrap().holds);
    }

    #[test]
    fn arrays_need_every_condition_and_still_check_every_boolean() {
        let g = gate("[\"A\", { env = \"B\", equals = \"x\" }, \"C\"]").unwrap();
        assert!(
            g.evaluate(&env(&[("A", "1"), ("B", "x"), ("C", "on")]))
                .unwrap()
                .holds
        );
        let v = g.evaluate(&env(&[("A", "0"), ("B", "x")])).unwrap();
        assert!(!v.holds);
        assert_eq!(
            v.reasons.len(),
            1,
            "stops explaining at the first failed condition"
        );
        assert!(g.evaluate(&env(&[("A", "0"), ("C", "ture")])).is_err());
    }

    #[test]
    fn malformed_gates_say_what_to_write() {
        for (src, needle) in [
            ("[]", "empty array"),
            ("3", "a gate is"),
            ("\"9LIVES\"", "not an environment variable name"),
            ("\"\"", "not an environment variable name"),
            ("{ equals = \"x\" }", "needs `env`"),
            ("{ env = \"A\" }", "needs one of"),
            (
                "{ env = \"A\", equals = \"x\", set = true }",
                "more than one",
            ),
            ("{ env = \"A\", equal = \"x\" }", "unknown key `equal`"),
            ("{ env = \"A\", in = [1] }", "array of strings"),
            ("{ env = \"A\", set = \"yes\" }", "true or false"),
        ] {
            let err = gate(src).unwrap_err();
            assert!(err.contains(needle), "{src}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_value_is_a_verdict_or_a_named_error(value in "\\PC{0,20}") {
            let g = gate("[\"V\", { env = \"W\", in = [\"a\"] }]").unwrap();
            match g.evaluate(&env(&[("V", &value), ("W", &value)])) {
                Ok(v) => proptest::prop_assert_eq!(v.holds, parse_bool(&value) == Some(true) && value == "a"),
                Err(bad) => {
                    proptest::prop_assert_eq!(parse_bool(&value), None);
                    proptest::prop_assert_eq!(bad.var, "V");
                }
            }
        }
    }
}
