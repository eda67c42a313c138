//! The `changed` gate: which files a task's globs match, their content hash, and the decision
//! against what the release ledger recorded at the task's last successful run.
//!
//! Globs are matched by a small matcher of our own (`*`, `**`, `?`, `[...]`), not by a crate: the
//! syntax a `changed` list needs is those four forms, `globset` would add a regex engine (hundreds
//! of kilobytes) to a binary with a size budget, and the `glob` crate walks from the process's
//! directory with its own rules for dotfiles and symbolic links, where this one walks from the
//! config's directory with ours:
//!
//! - a pattern is relative to the directory of the config file; `/` separates names, and `*`, `?`
//!   and `[...]` never match it; `**` as a whole name matches any number of names (none included);
//! - `*` and `?` also match a name that starts with a dot;
//! - a directory that a pattern matches is taken whole (`db/migrate` is `db/migrate/**`);
//! - `.git` directories are never entered (their content changes on every commit);
//! - a symbolic link is not followed: its target's path is hashed, not the target's bytes.
//!
//! The hash is SHA-256 over every matched file in the order of their paths' bytes, each file as its
//! path and the SHA-256 of its bytes, so a renamed file, an added or removed one and an edited one
//! all change it, and nothing else does (not a file's time, owner or mode).

use std::collections::BTreeMap;
use std::fmt;
#[cfg(feature = "postgres")]
use std::path::Path;
use std::path::PathBuf;

/// One parsed `changed` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    /// The pattern as written, for messages.
    pub raw: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of names, none included.
    Any,
    /// One name, matched piece by piece.
    Name(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Many,
    /// `[...]`: ranges (a single character is a range of one), negated with a leading `!` or `^`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    /// Parses a pattern; the error says what is wrong with it, for a config message.
    pub fn parse(raw: &str) -> Result<Glob, String> {
        if raw.is_empty() {
            return Err(
                "an empty pattern matches nothing; give a path like \"db/migrate/**\"".into(),
            );
        }
        if raw.starts_with('/') {
            return Err(format!(
                "{raw:?} is absolute; patterns are relative to the config file's directory, like \"db/migrate/**\""
            ));
        }
        if raw.contains('\0') {
            return Err(format!("{raw:?} contains a NUL byte; remove it"));
        }
        let mut segments = Vec::new();
        for name in raw.split('/') {
            match name {
                // `a//b` and a trailing `/` mean what they mean to a shell.
                "" | "." => {}
                ".." => {
                    return Err(format!(
                        "{raw:?} goes up with `..`; a pattern may only name files below the config file's directory"
                    ));
                }
                "**" => {
                    if segments.last() != Some(&Segment::Any) {
                        segments.push(Segment::Any);
                    }
                }
                name if name.contains("**") => {
                    return Err(format!(
                        "{raw:?}: `**` must be a whole name, like \"db/**/*.sql\"; use `*` within a name"
                    ));
                }
                name => segments.push(Segment::Name(pieces(raw, name)?)),
            }
        }
        if segments.is_empty() {
            return Err(format!(
                "{raw:?} names the config file's directory itself; use \"**\" to mean every file below it"
            ));
        }
        Ok(Glob {
            raw: raw.to_owned(),
            segments,
        })
    }

    /// Whether `path` (names separated by `/`, relative to the config's directory) matches.
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
        match_segments(&self.segments, &names)
    }

    /// The leading names without a wildcard: where a walk for this pattern starts.
    #[must_use]
    pub fn literal_prefix(&self) -> PathBuf {
        let mut prefix = PathBuf::new();
        for segment in &self.segments {
            match segment {
                Segment::Name(pieces) if pieces.iter().all(|p| matches!(p, Piece::Literal(_))) => {
                    prefix.push(
                        pieces
                            .iter()
                            .map(|p| match p {
                                Piece::Literal(c) => *c,
                                _ => unreachable!("only literals"),
                            })
                            .collect::<String>(),
                    );
                }
                _ => break,
            }
        }
        prefix
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

fn pieces(raw: &str, name: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '?' => out.push(Piece::One),
            '*' => out.push(Piece::Many),
            '[' => {
                let negated = matches!(chars.peek(), Some('!' | '^'));
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(c) = chars.next() else {
                        return Err(format!(
                            "{raw:?}: a `[` is never closed by `]`; close it, like \"[0-9]\""
                        ));
                    };
                    // A `]` first in the class is a character, as in a shell.
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    if chars.peek() == Some(&'-') {
                        let mut ahead = chars.clone();
                        ahead.next();
                        match ahead.next() {
                            Some(end) if end != ']' => {
                                if end < c {
                                    return Err(format!(
                                        "{raw:?}: the range `{c}-{end}` is backwards; write `{end}-{c}`"
                                    ));
                                }
                                chars = ahead;
                                ranges.push((c, end));
                                continue;
                            }
                            _ => {}
                        }
                    }
                    ranges.push((c, c));
                }
                out.push(Piece::Class { negated, ranges });
            }
            c => out.push(Piece::Literal(c)),
        }
    }
    Ok(out)
}

fn match_segments(segments: &[Segment], names: &[&str]) -> bool {
    match segments.split_first() {
        None => names.is_empty(),
        Some((Segment::Any, rest)) => {
            (0..=names.len()).any(|skip| match_segments(rest, &names[skip..]))
        }
        Some((Segment::Name(pieces), rest)) => match names.split_first() {
            Some((name, names)) => {
                let chars: Vec<char> = name.chars().collect();
                match_name(pieces, &chars) && match_segments(rest, names)
            }
            None => false,
        },
    }
}

/// One name against its pieces; `*` by backtracking to the last star (linear for one star, and a
/// name is short).
fn match_name(pieces: &[Piece], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match pieces.get(p) {
            Some(Piece::Many) => {
                star = Some((p, n));
                p += 1;
                continue;
            }
            Some(Piece::One) => true,
            Some(Piece::Literal(c)) => *c == name[n],
            Some(Piece::Class { negated, ranges }) => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&name[n])) != *negated
            }
            None => false,
        };
        if step {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pieces[p..].iter().all(|piece| *piece == Piece::Many)
}

/// The files a task's patterns match and their hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The patterns, as written.
    pub patterns: Vec<String>,
    /// Each matched file (relative path, lossily as text) and the SHA-256 of its bytes, in hex,
    /// in the order of the paths' bytes.
    pub files: BTreeMap<Vec<u8>, String>,
    /// The patterns that matched no file (a warning in `check`).
    pub unmatched: Vec<String>,
    /// SHA-256 over the paths and the files' hashes, in hex.
    pub hash: String,
}

impl Inputs {
    /// The first 6 hex digits of the hash, as people see it.
    #[must_use]
    pub fn short(&self) -> &str {
        short(&self.hash)
    }

    /// The patterns joined for a sentence: `db/migrate/**, prisma/migrations/**`.
    #[must_use]
    pub fn shown_patterns(&self) -> String {
        self.patterns.join(", ")
    }

    /// The per-file hashes as the ledger keeps them, so that a later release can say how many
    /// files changed: a line per file, its hash's first 16 hex digits, a space and its path (lossily
    /// as text, a newline in it escaped).
    #[must_use]
    pub fn manifest(&self) -> String {
        let mut manifest = String::new();
        for (path, hash) in self.entries() {
            manifest.push_str(hash);
            manifest.push(' ');
            manifest.push_str(&path);
            manifest.push('\n');
        }
        manifest
    }

    /// Each file as the manifest has it: (path, hash's first 16 hex digits).
    fn entries(&self) -> impl Iterator<Item = (String, &str)> {
        self.files.iter().map(|(path, hash)| {
            (
                String::from_utf8_lossy(path).replace('\n', "\\n"),
                hash.get(..16).unwrap_or(hash),
            )
        })
    }

    /// How many files were added, removed or edited since the run whose manifest this is; `None`
    /// when the manifest cannot be read.
    #[must_use]
    pub fn files_changed_since(&self, manifest: &str) -> Option<usize> {
        let old: BTreeMap<&str, &str> = manifest
            .lines()
            .map(|line| line.split_once(' ').map(|(hash, path)| (path, hash)))
            .collect::<Option<_>>()?;
        let now: BTreeMap<String, &str> = self.entries().collect();
        let changed_or_gone = old.iter().filter(|(p, h)| now.get(**p) != Some(*h)).count();
        let added = now.keys().filter(|p| !old.contains_key(p.as_str())).count();
        Some(changed_or_gone + added)
    }
}

/// The first 6 hex digits of a hash.
#[must_use]
pub fn short(hash: &str) -> &str {
    hash.get(..6).unwrap_or(hash)
}

/// Finds and hashes the files that `patterns` match below `base` (the config's directory).
/// An unreadable file or directory is an error that names it.
#[cfg(feature = "postgres")]
pub fn hash(base: &Path, patterns: &[Glob]) -> Result<Inputs, String> {
    use ring::digest::{Context, SHA256};
    let mut found: BTreeMap<Vec<u8>, PathBuf> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for glob in patterns {
        let before = found.len();
        let mut matched_any = false;
        let start = glob.literal_prefix();
        let at = base.join(&start);
        if std::fs::symlink_metadata(&at).is_ok() {
            walk(base, &start, glob, false, &mut found, &mut matched_any)?;
        }
        if !matched_any && found.len() == before {
            unmatched.push(glob.raw.clone());
        }
    }
    let mut files = BTreeMap::new();
    let mut all = Context::new(&SHA256);
    for (rel, path) in &found {
        let meta = std::fs::symlink_metadata(path).map_err(|e| cannot_read(path, &e))?;
        let mut one = Context::new(&SHA256);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).map_err(|e| cannot_read(path, &e))?;
            one.update(b"symlink:");
            one.update(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()));
        } else if !meta.is_file() {
            // A FIFO, a socket or a device: opening a FIFO waits for a writer forever, a socket
            // cannot be opened, and neither has contents of its own; its path and kind count.
            use std::os::unix::fs::FileTypeExt;
            let kind = meta.file_type();
            one.update(if kind.is_fifo() {
                b"special:fifo".as_slice()
            } else if kind.is_socket() {
                b"special:socket"
            } else {
                b"special:device"
            });
        } else {
            use std::io::Read;
            let mut file = std::fs::File::open(path).map_err(|e| cannot_read(path, &e))?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf).map_err(|e| cannot_read(path, &e))?;
                if n == 0 {
                    break;
                }
                one.update(&buf[..n]);
            }
        }
        let digest = hex(one.finish().as_ref());
        all.update(&(rel.len() as u64).to_be_bytes());
        all.update(rel);
        all.update(digest.as_bytes());
        files.insert(rel.clone(), digest);
    }
    Ok(Inputs {
        patterns: patterns.iter().map(|g| g.raw.clone()).collect(),
        files,
        unmatched,
        hash: hex(all.finish().as_ref()),
    })
}

#[cfg(feature = "postgres")]
fn cannot_read(path: &Path, err: &std::io::Error) -> String {
    format!(
        "cannot read {} ({err}) for a `changed` pattern; check its permissions",
        path.display()
    )
}

/// Collects what `glob` matches at and below `rel`; `whole` when an ancestor matched already.
#[cfg(feature = "postgres")]
fn walk(
    base: &Path,
    rel: &Path,
    glob: &Glob,
    whole: bool,
    found: &mut BTreeMap<Vec<u8>, PathBuf>,
    matched: &mut bool,
) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let path = base.join(rel);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        // Gone since it was listed: it is not there.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(cannot_read(&path, &err)),
    };
    let text = rel.to_string_lossy();
    let here = whole || (!rel.as_os_str().is_empty() && glob.matches(&text));
    if meta.is_dir() {
        if rel.file_name().is_some_and(|n| n == ".git") {
            return Ok(());
        }
        *matched |= here;
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .map_err(|e| cannot_read(&path, &e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| cannot_read(&path, &e))?;
        entries.sort();
        for name in entries {
            walk(base, &rel.join(name), glob, here, found, matched)?;
        }
    } else if here {
        *matched = true;
        found.insert(rel.as_os_str().as_bytes().to_vec(), path);
    }
    Ok(())
}

#[cfg(feature = "postgres")]
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What the ledger recorded at a task's last successful run under this lock key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastSuccess {
    /// The release it ran in (its version, else its commit).
    pub release: String,
    pub hash: String,
    /// Its per-file hashes, when recorded.
    pub manifest: Option<String>,
}

/// Whether a task with a `changed` gate runs, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// No successful run of the task is recorded under this key: the first run always runs.
    FirstRun,
    /// The files are what they were at `since`: the task is skipped.
    Unchanged { since: String, hash: String },
    /// The files changed since `since` (`files` of them, when that can be told).
    Differs {
        since: String,
        files: Option<usize>,
        was: String,
        now: String,
    },
    /// `--force` or `RELEASE_TASKS_FORCE`: it runs whatever the files say.
    Forced,
}

impl Changed {
    /// The pure decision: compares the files now with the last successful run.
    #[must_use]
    pub fn decide(inputs: &Inputs, last: Option<&LastSuccess>, force: bool) -> Changed {
        if force {
            return Changed::Forced;
        }
        let Some(last) = last else {
            return Changed::FirstRun;
        };
        if last.hash == inputs.hash {
            return Changed::Unchanged {
                since: last.release.clone(),
                hash: short(&inputs.hash).to_owned(),
            };
        }
        Changed::Differs {
            since: last.release.clone(),
            files: last
                .manifest
                .as_deref()
                .and_then(|m| inputs.files_changed_since(m)),
            was: short(&last.hash).to_owned(),
            now: short(&inputs.hash).to_owned(),
        }
    }

    /// Whether the task runs.
    #[must_use]
    pub fn runs(&self) -> bool {
        !matches!(self, Changed::Unchanged { .. })
    }

    /// The reason, for people: `db/migrate/** unchanged since v41 (a3f9c2)`, `2 files changed
    /// since v41 (a3f9c2 -> 7be01d)`.
    #[must_use]
    pub fn describe(&self, inputs: &Inputs) -> String {
        let patterns = inputs.shown_patterns();
        match self {
            Changed::FirstRun => format!(
                "changed: no successful run recorded yet, so it runs ({patterns}: {} file{}, {})",
                inputs.files.len(),
                plural(inputs.files.len()),
                inputs.short()
            ),
            Changed::Unchanged { since, hash } => {
                format!("{patterns} unchanged since {since} ({hash})")
            }
            Changed::Differs {
                since,
                files: Some(n),
                was,
                now,
            } => format!(
                "{n} file{} changed since {since} ({patterns}: {was} -> {now})",
                plural(*n)
            ),
            Changed::Differs {
                since, was, now, ..
            } => format!("{patterns} changed since {since} ({was} -> {now})"),
            Changed::Forced => format!(
                "changed: forced by --force or RELEASE_TASKS_FORCE ({patterns}: {})",
                inputs.short()
            ),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::parse(p).unwrap()
    }

    #[test]
    fn stars_stay_within_a_name_and_double_stars_cross_names() {
        assert!(g("db/migrate/*.rb").matches("db/migrate/001_init.rb"));
        assert!(!g("db/migrate/*.rb").matches("db/migrate/old/001_init.rb"));
        assert!(g("db/migrate/**").matches("db/migrate/old/001_init.rb"));
        assert!(g("db/migrate/**").matches("db/migrate/x"));
        assert!(g("**/*.sql").matches("a.sql"));
        assert!(g("**/*.sql").matches("a/b/c.sql"));
        assert!(!g("**/*.sql").matches("a/b/c.sqlx"));
        assert!(g("db/**/schema.rb").matches("db/schema.rb"));
        assert!(g("db/**/schema.rb").matches("db/x/y/schema.rb"));
        assert!(!g("db/*").matches("db"));
        assert!(g("*").matches(".env"));
        assert!(g("a*b*c").matches("aXbYbZc"));
        assert!(!g("a*b*c").matches("aXbYbZ"));
        assert!(g("*").matches("x"));
        assert!(!g("x").matches("x/y"));
    }

    #[test]
    fn questions_and_classes() {
        assert!(g("v?.sql").matches("v1.sql"));
        assert!(!g("v?.sql").matches("v10.sql"));
        assert!(g("[0-9][0-9]_*").matches("01_init"));
        assert!(!g("[0-9]*").matches("a1"));
        assert!(g("[!0-9]*").matches("a1"));
        assert!(g("[^0-9]*").matches("a1"));
        assert!(!g("[!0-9]*").matches("1a"));
        assert!(g("[]]").matches("]"));
        assert!(g("[a-]").matches("-"));
        assert!(!g("?").matches("ab"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (bad, says) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "`..`"),
            ("a/**b", "whole name"),
            ("[0-9", "never closed"),
            ("[9-0]", "backwards"),
            (".", "directory itself"),
        ] {
            let err = Glob::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert_eq!(g("./db//m/").literal_prefix(), PathBuf::from("db/m"));
        assert_eq!(g("db/**/x").literal_prefix(), PathBuf::from("db"));
        assert_eq!(g("**/x").literal_prefix(), PathBuf::new());
    }

    fn inputs(files: &[(&str, &str)], hash: &str) -> Inputs {
        Inputs {
            patterns: vec!["db/migrate/**".into()],
            files: files
                .iter()
                .map(|(p, h)| (p.as_bytes().to_vec(), format!("{h:0<64}")))
                .collect(),
            unmatched: Vec::new(),
            hash: hash.into(),
        }
    }

    #[test]
    fn the_decision_and_its_words() {
        let now = inputs(&[("a", "11"), ("b", "22"), ("c", "33")], "a3f9c2ffff");
        assert_eq!(Changed::decide(&now, None, false), Changed::FirstRun);
        assert_eq!(Changed::decide(&now, None, true), Changed::Forced);
        let same = LastSuccess {
            release: "v41".into(),
            hash: "a3f9c2ffff".into(),
            manifest: None,
        };
        let v = Changed::decide(&now, Some(&same), false);
        assert!(!v.runs());
        assert_eq!(
            v.describe(&now),
            "db/migrate/** unchanged since v41 (a3f9c2)"
        );
        assert!(Changed::decide(&now, Some(&same), true).runs());
        let before = inputs(&[("a", "11"), ("b", "99"), ("d", "44")], "7be01d0000");
        let other = LastSuccess {
            release: "v41".into(),
            hash: before.hash.clone(),
            manifest: Some(before.manifest()),
        };
        let v = Changed::decide(&now, Some(&other), false);
        assert!(v.runs());
        // b edited, d removed, c added.
        assert_eq!(
            v.describe(&now),
            "3 files changed since v41 (db/migrate/**: 7be01d -> a3f9c2)"
        );
        let no_manifest = LastSuccess {
            manifest: None,
            ..other
        };
        assert_eq!(
            Changed::decide(&now, Some(&no_manifest), false).describe(&now),
            "db/migrate/** changed since v41 (7be01d -> a3f9c2)"
        );
        let one = inputs(&[("a", "11"), ("b", "22"), ("c", "34")], "ffffff");
        let was = LastSuccess {
            release: "v41".into(),
            hash: now.hash.clone(),
            manifest: Some(now.manifest()),
        };
        assert_eq!(
            Changed::decide(&one, Some(&was), false).describe(&one),
            "1 file changed since v41 (db/migrate/**: a3f9c2 -> ffffff)"
        );
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn hashing_is_stable_and_sees_paths_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::create_dir_all(base.join("db/migrate/old")).unwrap();
        std::fs::create_dir_all(base.join(".git")).unwrap();
        std::fs::write(base.join("db/migrate/001.rb"), "one").unwrap();
        std::fs::write(base.join("db/migrate/old/000.rb"), "zero").unwrap();
        std::fs::write(base.join(".git/index"), "x").unwrap();
        let globs = [g("db/migrate/**"), g("nothing/*")];
        let first = hash(base, &globs).unwrap();
        assert_eq!(first.files.len(), 2);
        assert_eq!(first.unmatched, ["nothing/*"]);
        assert_eq!(hash(base, &globs).unwrap().hash, first.hash, "stable");
        // A directory named by a pattern is taken whole; `.git` is never entered.
        let whole = hash(base, &[g("db/migrate")]).unwrap();
        assert_eq!(whole.files, first.files);
        assert!(
            hash(base, &[g("**")])
                .unwrap()
                .files
                .keys()
                .all(|k| !k.starts_with(b".git"))
        );
        // Bytes, then a rename, each change the hash; a file's time does not.
        std::fs::write(base.join("db/migrate/001.rb"), "one!").unwrap();
        let edited = hash(base, &globs).unwrap();
        assert_ne!(edited.hash, first.hash);
        std::fs::rename(
            base.join("db/migrate/001.rb"),
            base.join("db/migrate/002.rb"),
        )
        .unwrap();
        let renamed = hash(base, &globs).unwrap();
        assert_ne!(renamed.hash, edited.hash);
        assert_eq!(renamed.files_changed_since(&edited.manifest()), Some(2));
        std::fs::write(base.join("db/migrate/002.rb"), "one!").unwrap();
        assert_eq!(hash(base, &globs).unwrap().hash, renamed.hash);
    }
}
