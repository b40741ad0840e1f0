//! The node's layout rules (ARCHITECTURE.md, "Invariants"), checked on its sources: the core
//! names no feature, features name no other feature, and the network layer names neither.
//! A feature reaches the core's roles (`node.plugins().rooms`, `.files`, `.timers`, `.gate`,
//! `.presence`) instead.

use std::path::{Path, PathBuf};

const FEATURES: [&str; 5] = ["group", "media", "presence", "strangers", "timers"];

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Lines of code (not comments) in the `.rs` files under `dir` that contain `needle`.
fn uses(dir: &str, needle: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let files = if root.is_dir() {
        sources(&root)
    } else {
        vec![root.with_extension("rs")]
    };
    let mut hits = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if code.contains(needle) {
                hits.push(format!("{}:{}: {}", file.display(), n + 1, code));
            }
        }
    }
    hits
}

#[test]
fn the_core_names_no_feature() {
    let hits = uses("core", "features::");
    assert!(
        hits.is_empty(),
        "core/ uses a feature:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_network_layer_names_neither_core_nor_features() {
    for needle in ["crate::core", "crate::features", "crate::api", "crate::cli"] {
        let hits = uses("net", needle);
        assert!(hits.is_empty(), "net/ uses {needle}:\n{}", hits.join("\n"));
    }
}

#[test]
fn features_name_no_other_feature() {
    for feature in FEATURES {
        for other in FEATURES.iter().filter(|o| **o != feature) {
            let needle = format!("features::{other}");
            let hits = uses(&format!("features/{feature}"), &needle);
            assert!(
                hits.is_empty(),
                "features/{feature} uses {needle}:\n{}",
                hits.join("\n")
            );
        }
    }
}

#[test]
fn only_the_api_and_the_command_line_know_their_formats() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in sources(&root) {
        let relative = file.strip_prefix(&root).unwrap_or(&file);
        let edge = relative.starts_with("api")
            || relative.starts_with("cli")
            || relative == Path::new("main.rs");
        if edge {
            continue;
        }
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for format in ["axum::", "clap::", "serde_json::", "indicatif::"] {
            let hits: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//") && l.contains(format))
                .collect();
            assert!(
                hits.is_empty(),
                "{} uses {format}: {hits:?}",
                relative.display()
            );
        }
    }
}
