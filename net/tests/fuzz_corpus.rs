//! Replays the fuzz corpora (`fuzz/corpus/<target>/`) and the seeds through the same functions
//! the fuzz targets run (`kith_net::fuzz`), so every input the fuzzer kept (among them each
//! crash it found, once fixed) is checked by `cargo test` on the stable toolchain.

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_corpus_file_goes_through_its_decoder_without_a_panic() {
    let mut replayed = 0;
    for (name, target) in kith_net::fuzz::TARGETS {
        let dir = corpus_dir().join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no corpus for target {name} at {}: {e}", dir.display()));
        let mut files = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("corpus file");
            // A panic here names the file through the test's output.
            eprintln!("replaying {}", path.display());
            target(&bytes);
            files += 1;
        }
        assert!(files > 0, "the corpus of {name} is empty");
        replayed += files;
    }
    eprintln!("replayed {replayed} corpus files");
}

#[test]
fn every_target_accepts_its_seeds() {
    let seeds = kith_net::fuzz::seeds();
    for (name, _) in kith_net::fuzz::TARGETS {
        assert!(
            seeds.iter().any(|(target, _)| target == name),
            "no seed for {name}"
        );
    }
    for (name, bytes) in seeds {
        let target = kith_net::fuzz::target(name).expect("a known target");
        assert!(target(&bytes), "{name} refused a valid input: {bytes:02x?}");
    }
}

#[test]
fn every_target_refuses_garbage_without_a_panic() {
    for (name, target) in kith_net::fuzz::TARGETS {
        for garbage in [
            &[][..],
            &[0xff][..],
            &[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3][..],
        ] {
            assert!(!target(garbage), "{name} accepted {garbage:02x?}");
        }
    }
}
