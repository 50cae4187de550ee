//! The tree format: the canonical text a tree digest is taken over, and the
//! names a tree can hold.

use std::path::Path;

use super::{ArtifactError, Entry, EntryKind};

pub(super) fn entry_name(path: &Path) -> Result<String, ArtifactError> {
    use std::os::unix::ffi::OsStrExt;
    match path.file_name() {
        Some(n) => entry_name_bytes(n.as_bytes(), path),
        None => Err(ArtifactError::BadName(path.to_path_buf())),
    }
}

/// A name a tree can hold exactly: UTF-8 without a newline (the line separator of
/// the tree text). Every other character, `\r` and other control characters
/// included, is kept as it is, so two different names never become one.
pub(super) fn entry_name_bytes(name: &[u8], path: &Path) -> Result<String, ArtifactError> {
    match std::str::from_utf8(name) {
        Ok(n) if valid_name(n) => Ok(n.to_string()),
        _ => Err(ArtifactError::BadName(path.to_path_buf())),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\0', '\n'])
}

fn valid_digest(d: &str) -> bool {
    d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `f <digest> <size> <name>` / `d <digest> <size> <name>`, one line per entry,
/// sorted by name: the canonical text a tree digest is taken over.
pub(super) fn tree_text(entries: &[Entry]) -> String {
    let mut s = String::from("millrace-tree-v1\n");
    for e in entries {
        let k = match e.kind {
            EntryKind::File => 'f',
            EntryKind::Dir => 'd',
        };
        s += &format!("{k} {} {} {}\n", e.digest, e.size, e.name);
    }
    s
}

/// The entries of a tree text, or `None` unless the text is exactly what
/// [`tree_text`] writes for them: lines split on `\n` only (a `\r` is part of a
/// name), names valid, unique and sorted, digests of 64 hex digits. So a parsed
/// tree can never hold two entries for one path, nor a path outside it.
pub(super) fn parse_tree(text: &str) -> Option<Vec<Entry>> {
    let body = text.strip_prefix("millrace-tree-v1\n")?;
    let mut entries: Vec<Entry> = Vec::new();
    for l in body.split_terminator('\n') {
        let mut parts = l.splitn(4, ' ');
        let kind = match parts.next()? {
            "f" => EntryKind::File,
            "d" => EntryKind::Dir,
            _ => return None,
        };
        let digest = parts.next()?.to_string();
        let size = parts.next()?.parse().ok()?;
        let name = parts.next()?.to_string();
        if !valid_digest(&digest) || !valid_name(&name) {
            return None;
        }
        if entries.last().is_some_and(|prev| prev.name >= name) {
            return None;
        }
        entries.push(Entry {
            name,
            kind,
            digest,
            size,
        });
    }
    // Canonical: no missing final newline, no `+1` or `01` sizes.
    (tree_text(&entries) == text).then_some(entries)
}
