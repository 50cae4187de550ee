//! `foreach`: an artifact split into its items, and the items' outputs merged
//! back into one artifact.

use std::collections::BTreeMap;

use super::{ArtifactError, ArtifactStore, Entry, EntryKind, escape_controls};

/// Two items' outputs hold the same path.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(
        "items `{}` and `{}` both wrote `{}`",
        escape_controls(first),
        escape_controls(second),
        escape_controls(path)
    )]
    Conflict {
        path: String,
        first: String,
        second: String,
    },
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

impl ArtifactStore {
    /// The top-level entries of artifact `digest`, each with the digest of a tree
    /// holding only it (written to the store): what an item's step sees at its
    /// mount, and the content its key is taken over.
    pub fn items(&self, digest: &str) -> Result<Vec<(Entry, String)>, ArtifactError> {
        self.read_tree(digest)?
            .into_iter()
            .map(|e| {
                let tree = self.write_tree(std::slice::from_ref(&e))?;
                Ok((e, tree))
            })
            .collect()
    }

    /// One tree holding every entry of `trees` (labelled by item), directories
    /// merged level by level. A path that two items both hold (a file, or a file
    /// and a directory) is a conflict naming both, even with equal content: what
    /// one item wrote never silently replaces another's.
    pub fn merge(&self, trees: &[(String, String)]) -> Result<String, MergeError> {
        self.merge_at("", trees)
    }

    fn merge_at(&self, prefix: &str, trees: &[(String, String)]) -> Result<String, MergeError> {
        if let [(_, one)] = trees {
            return Ok(one.clone());
        }
        // name → the entry and its item; directories of the same name from
        // several items are merged below.
        let mut merged: BTreeMap<String, (Entry, String)> = BTreeMap::new();
        let mut dirs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (item, tree) in trees {
            for e in self.read_tree(tree)? {
                let path = format!("{prefix}{}", e.name);
                match merged.get(&e.name) {
                    None => {
                        if e.kind == EntryKind::Dir {
                            dirs.entry(e.name.clone())
                                .or_default()
                                .push((item.clone(), e.digest.clone()));
                        }
                        merged.insert(e.name.clone(), (e, item.clone()));
                    }
                    Some((prev, _)) if prev.kind == EntryKind::Dir && e.kind == EntryKind::Dir => {
                        dirs.entry(e.name.clone())
                            .or_default()
                            .push((item.clone(), e.digest.clone()));
                    }
                    Some((_, first)) => {
                        return Err(MergeError::Conflict {
                            path,
                            first: first.clone(),
                            second: item.clone(),
                        });
                    }
                }
            }
        }
        let mut entries = Vec::with_capacity(merged.len());
        for (name, (mut e, _)) in merged {
            if let Some(parts) = dirs.get(&name)
                && parts.len() > 1
            {
                e.digest = self.merge_at(&format!("{prefix}{name}/"), parts)?;
                e.size = self.read_tree(&e.digest)?.iter().map(|c| c.size).sum();
            }
            entries.push(e);
        }
        Ok(self.write_tree(&entries)?)
    }
}
