use super::*;

#[test]
fn module_names_are_dotted_identifiers() {
    assert!(is_module_name("sklearn.linear_model"));
    assert!(is_module_name("_x1.y"));
    for bad in ["", "a..b", "1a", "os; import x", "a.b ", "a-b", ".a"] {
        assert!(!is_module_name(bad), "{bad:?}");
    }
}

#[test]
fn the_recipe_names_the_preload_list() {
    let a = recipe_digest("rt", &["numpy".into()]);
    assert_ne!(a, recipe_digest("rt", &["numpy".into(), "pandas".into()]));
    assert_ne!(a, recipe_digest("rt2", &["numpy".into()]));
    assert_eq!(a, recipe_digest("rt", &["numpy".into()]));
}

#[test]
fn exports_are_rewritten_and_read_back() {
    // (module (memory 3) (func) (export "f" (func 0)) (export "memory" (memory 0)))
    let wasm: Vec<u8> = vec![
        0, b'a', b's', b'm', 1, 0, 0, 0, // header
        1, 4, 1, 0x60, 0, 0, // type: () -> ()
        3, 2, 1, 0, // func 0: type 0
        5, 3, 1, 0, 3, // memory: min 3
        7, 14, 2, 1, b'f', 0, 0, 6, b'm', b'e', b'm', b'o', b'r', b'y', 2, 0, // exports
        10, 4, 1, 2, 0, 0x0b, // code
    ];
    assert_eq!(initial_memory(&wasm).unwrap(), 3 << 16);
    let more = rewrite_exports(&wasm, |e| e.push(("g".into(), 0, 0))).unwrap();
    let names: Vec<String> = exports(&more).unwrap().into_iter().map(|e| e.0).collect();
    assert_eq!(names, ["f", "memory", "g"]);
    let back = rewrite_exports(&more, |e| e.retain(|x| x.0 != "g")).unwrap();
    assert_eq!(back, wasm);
    assert!(func_indices(&wasm, &["f"]).unwrap_err().contains("`f`"));
}

#[test]
fn the_build_sees_fixed_file_identities() {
    let mut inodes = std::collections::HashMap::new();
    // A filestat at 8: dev 1, a host inode hash, a regular file, two links,
    // size 5, real times.
    let mut mem = vec![0u8; 8 + 64];
    let put = |m: &mut [u8], at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut mem, 8, 1);
    put(&mut mem, 16, 0xdead_beef_1234);
    mem[24] = 4;
    put(&mut mem, 32, 2);
    put(&mut mem, 40, 5);
    for t in [48, 56, 64] {
        put(&mut mem, t, 1_764_000_000_123_456_789);
    }
    fixed_filestat(&mut mem, &mut inodes, 8).unwrap();
    let get = |m: &[u8], at: usize| u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
    assert_eq!((get(&mem, 8), get(&mem, 16), mem[24]), (1, 1, 4));
    assert_eq!((get(&mem, 32), get(&mem, 40)), (1, 5));
    for t in [48, 56, 64] {
        assert_eq!(get(&mem, t), BUILD_EPOCH.as_nanos() as u64);
    }
    assert!(fixed_filestat(&mut mem, &mut inodes, 16).is_err());

    // Two dirents ("." of the same file, then "zip" of another), the second cut
    // short after its header; `used` at 0.
    let mut mem = vec![0u8; 4 + 24 + 1 + 24 + 2];
    mem[..4].copy_from_slice(&(24u32 + 1 + 24 + 2).to_le_bytes());
    put(&mut mem, 4 + 8, 0xdead_beef_1234);
    mem[4 + 16..4 + 20].copy_from_slice(&1u32.to_le_bytes());
    put(&mut mem, 4 + 25 + 8, 0x5555);
    mem[4 + 25 + 16..4 + 25 + 20].copy_from_slice(&3u32.to_le_bytes());
    fixed_dirents(&mut mem, &mut inodes, 4, 0).unwrap();
    assert_eq!((get(&mem, 4 + 8), get(&mem, 4 + 25 + 8)), (1, 2));
    assert_eq!(build_inode(&mut inodes, 0), 0);
}

#[test]
fn unsuitable_steps_say_why() {
    let low = unsuitable(64 << 20, &mut std::iter::empty()).unwrap();
    assert_eq!(
        low,
        BaseReason::MemoryBelowFloor {
            memory: 64 << 20,
            floor: MEMORY_FLOOR
        }
    );
    assert!(low.to_string().contains("floor"));
    let env = ["HOME", "SKLEARN_ASSUME_FINITE"];
    let env = unsuitable(2 << 30, &mut env.into_iter()).unwrap();
    assert_eq!(env.code(), BaseCode::ImportTimeEnv);
    assert!(env.to_string().contains("SKLEARN_ASSUME_FINITE"));
    assert!(unsuitable(2 << 30, &mut ["SEED"].into_iter()).is_none());
}

/// The record a step keeps names the variant and the reason by a stable name
/// (the API's `python.variant` and `python.reason`).
#[test]
fn variant_records_keep_their_json() {
    let base = Variant::Base(BaseReason::ImportTimeEnv {
        name: "OMP_NUM_THREADS".into(),
    })
    .record();
    let json = serde_json::to_value(&base).unwrap();
    assert_eq!(json["variant"], "base");
    assert_eq!(json["reason"], "import_time_env");
    assert!(json.get("recipe").is_none());
    assert_eq!(serde_json::from_value::<VariantRecord>(json).unwrap(), base);
    let warm = VariantRecord {
        variant: VariantName::Warm,
        recipe: Some("0123456789abcdef".into()),
        reason: None,
        detail: "numpy preloaded".into(),
    };
    assert_eq!(
        warm.to_string(),
        "the warm interpreter (snapshot 0123456789ab)"
    );
    assert_eq!(
        Variant::Base(BaseReason::ConfigOff).record().to_string(),
        "the base runtime: `[python] snapshot = false`"
    );
}
