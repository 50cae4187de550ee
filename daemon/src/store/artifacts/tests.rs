use super::*;

#[test]
fn printed_text_cannot_move_the_cursor_or_reorder_itself() {
    assert_eq!(escape_controls("plain é"), "plain é");
    assert_eq!(escape_controls("x\r"), "x\\r");
    assert_eq!(escape_controls("\u{1b}]0;t\u{7}"), "\\u{1b}]0;t\\u{7}");
    assert_eq!(
        escape_controls("a\u{202e}b\u{2028}"),
        "a\\u{202e}b\\u{2028}"
    );
}

fn none(_: &Path, _: &FileStat) -> Option<String> {
    None
}

#[test]
fn same_content_same_digest_and_moves_into_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
    for d in ["a", "b"] {
        let dir = tmp.path().join(d);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("x.csv"), "1,2\n").unwrap();
        fs::write(dir.join("sub/y"), "y").unwrap();
    }
    let a = store
        .ingest_dir(&tmp.path().join("a"), Mode::Move, &none)
        .unwrap();
    let b = store
        .ingest_dir(&tmp.path().join("b"), Mode::Copy, &none)
        .unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!((a.files, a.size), (2, 5));
    assert!(!tmp.path().join("a/x.csv").exists(), "moved");
    assert!(tmp.path().join("b/x.csv").exists(), "copied");
    store.verify(&a.digest, &none).unwrap();
    let dest = tmp.path().join("m");
    store.materialise(&a.digest, &dest).unwrap();
    assert_eq!(fs::read_to_string(dest.join("sub/y")).unwrap(), "y");
}

#[test]
fn a_damaged_blob_is_detected_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
    let f = tmp.path().join("model.bin");
    fs::write(&f, "weights").unwrap();
    let a = store.ingest_file(&f, Mode::Copy, &none).unwrap();
    let blob = store.blob_path(&hash_file(&f).unwrap());
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, "WEIGHTS").unwrap();
    let err = store.verify(&a.digest, &none).unwrap_err();
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    assert!(!blob.exists());
}

fn rehash_every_blob(objects: &Path) {
    for shard in fs::read_dir(objects.join("blobs")).unwrap() {
        let shard = shard.unwrap().path();
        for f in fs::read_dir(&shard).unwrap() {
            let f = f.unwrap().path();
            let name = format!(
                "{}{}",
                shard.file_name().unwrap().to_str().unwrap(),
                f.file_name().unwrap().to_str().unwrap()
            );
            assert_eq!(hash_file(&f).unwrap(), name, "blob {} changed", f.display());
        }
    }
}

#[test]
fn names_differing_by_a_carriage_return_stay_two_files() {
    let tmp = tempfile::tempdir().unwrap();
    let objects = tmp.path().join("objects");
    let store = ArtifactStore::open(&objects).unwrap();
    let o = tmp.path().join("o");
    fs::create_dir(&o).unwrap();
    fs::write(o.join("x"), "plain x\n").unwrap();
    fs::write(o.join("x\r"), "attacker's bytes\n").unwrap();
    fs::write(o.join("\x1b[2Jesc"), "escape\n").unwrap();
    let a = store.ingest_dir(&o, Mode::Move, &none).unwrap();
    let names: Vec<String> = store
        .list(&a.digest)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["\x1b[2Jesc", "x", "x\r"]);
    // Materialised twice (the second time the blobs are linked twice over).
    for d in ["m1", "m2"] {
        let dest = tmp.path().join(d);
        store.materialise(&a.digest, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("x")).unwrap(), "plain x\n");
        assert_eq!(
            fs::read_to_string(dest.join("x\r")).unwrap(),
            "attacker's bytes\n"
        );
    }
    let e = tmp.path().join("e");
    store.export(&a.digest, &e).unwrap();
    assert_eq!(fs::read_dir(&e).unwrap().count(), 3);
    rehash_every_blob(&objects);
}

#[test]
fn a_tree_text_is_accepted_only_in_canonical_form() {
    let d = "a".repeat(64);
    let ok = format!("millrace-tree-v1\nf {d} 1 a\nf {d} 2 a\r\nd {d} 3 b\n");
    assert_eq!(parse_tree(&ok).unwrap()[1].name, "a\r");
    for bad in [
        format!("millrace-tree-v1\nf {d} 1 a\nf {d} 1 a\n"),
        format!("millrace-tree-v1\nf {d} 1 b\nf {d} 1 a\n"),
        format!("millrace-tree-v1\nf {d} 1 \n"),
        format!("millrace-tree-v1\nf {d} 1 .\n"),
        format!("millrace-tree-v1\nd {d} 1 ..\n"),
        format!("millrace-tree-v1\nf {d} 1 a/b\n"),
        format!("millrace-tree-v1\nf {d} 1 a\0b\n"),
        format!("millrace-tree-v1\nf {d} 1 a"),
        format!("millrace-tree-v1\r\nf {d} 1 a\r\n"),
        format!("millrace-tree-v1\nf {d} +1 a\n"),
        format!("millrace-tree-v1\nf {d} 01 a\n"),
        "millrace-tree-v1\nf ab 1 a\n".to_string(),
        format!("millrace-tree-v1\n\nf {d} 1 a\n"),
    ] {
        assert!(parse_tree(&bad).is_none(), "{bad:?}");
    }
}

#[test]
fn materialise_never_writes_onto_an_existing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let objects = tmp.path().join("objects");
    let store = ArtifactStore::open(&objects).unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), "good").unwrap();
    let a = store.ingest_dir(&src, Mode::Copy, &none).unwrap();
    fs::write(tmp.path().join("other"), "other bytes").unwrap();
    let b = store
        .ingest_file(&tmp.path().join("other"), Mode::Copy, &none)
        .unwrap();
    // `dest/x` is a hard link to b's blob: a copy onto it would change that blob.
    let dest = tmp.path().join("dest");
    store.materialise(&b.digest, &dest).unwrap();
    fs::rename(dest.join("other"), dest.join("x")).unwrap();
    let err = store.materialise(&a.digest, &dest).unwrap_err();
    assert!(matches!(err, ArtifactError::Exists(_)), "{err}");
    let err = store.export(&a.digest, &dest).unwrap_err();
    assert!(matches!(err, ArtifactError::Exists(_)), "{err}");
    rehash_every_blob(&objects);
}

#[test]
fn deep_trees_hit_the_depth_limit_and_long_paths_work() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
    // 40 levels of 200-byte names: 8 000 bytes of path, beyond PATH_MAX.
    let long = tmp.path().join("long");
    fs::create_dir(&long).unwrap();
    let mut d = Dir::open(&long).unwrap();
    let name = CString::new("n".repeat(200)).unwrap();
    for _ in 0..40 {
        d.mkdir(&name, 0o755).unwrap();
        d = d.open_dir(&name).unwrap();
    }
    d.create_new(c"f", 0o644)
        .unwrap()
        .write_all(b"deep")
        .unwrap();
    let a = store.ingest_dir(&long, Mode::Move, &none).unwrap();
    assert_eq!((a.files, a.size), (1, 4));
    store.verify(&a.digest, &none).unwrap();
    store.materialise(&a.digest, &tmp.path().join("m")).unwrap();
    store.export(&a.digest, &tmp.path().join("e")).unwrap();
    walk::remove_tree(&tmp.path().join("m")).unwrap();
    walk::remove_tree(&tmp.path().join("e")).unwrap();
    // Past the limit (and deep enough to overflow a recursive walk): refused.
    let deep = tmp.path().join("deep");
    fs::create_dir(&deep).unwrap();
    let mut d = Dir::open(&deep).unwrap();
    for _ in 0..3_000 {
        d.mkdir(c"a", 0o755).unwrap();
        d = d.open_dir(c"a").unwrap();
    }
    drop(d);
    let err = store.ingest_dir(&deep, Mode::Move, &none).unwrap_err();
    assert!(
        err.to_string()
            .contains("directory depth limit of 256 levels"),
        "{err}"
    );
    walk::remove_tree(&deep).unwrap();
}

#[test]
fn a_rewrite_with_its_mtime_restored_changes_the_stat() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("data.csv");
    fs::write(&f, "1,2\n").unwrap();
    let before = fs::metadata(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&f, "3,4\n").unwrap();
    let file = fs::File::options().write(true).open(&f).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    let after = fs::metadata(&f).unwrap();
    assert_eq!(before.mtime_nsec(), after.mtime_nsec());
    assert_ne!(FileStat::of(&before), FileStat::of(&after));
}
