//! Replays every seed corpus and every regression input through its target on the stable
//! toolchain: what the fuzzer starts from, and what it once found, never panic.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(folder: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(folder);
    let mut replayed = 0;
    for (name, target) in natcall_fuzz::TARGETS {
        for file in files(&root.join(name)) {
            let data = std::fs::read(&file).expect("a readable input");
            eprintln!(
                "{folder}/{name}/{}",
                file.file_name().expect("a file name").to_string_lossy()
            );
            target(&data);
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn every_seed_corpus_replays_without_a_panic() {
    for (name, _) in natcall_fuzz::TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name);
        assert!(!files(&dir).is_empty(), "no seeds in {}", dir.display());
    }
    assert!(replay("corpus") > 0);
}

#[test]
fn every_regression_input_replays_without_a_panic() {
    replay("regressions");
}

#[test]
fn committed_seeds_are_what_the_generator_writes() {
    // The registration's certificate and signature are fresh on every run; everything else
    // is deterministic.
    for seed in natcall_fuzz::seeds::all().iter().filter(|s| s.name != "register") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(seed.target)
            .join(&seed.name);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == seed.data,
            "{} is stale: run `cargo run -p natcall-fuzz --bin gen-corpus`",
            path.display()
        );
    }
}
