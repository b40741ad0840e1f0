//! The systemd units in `dist/` start the binaries with arguments those binaries take.

use std::path::Path;
use std::process::Command;

use kith_tests::process::binary;

/// The command line of a unit's `ExecStart=`.
fn exec_start(unit: &str) -> anyhow::Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(unit);
    let text = std::fs::read_to_string(&path)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .ok_or_else(|| anyhow::anyhow!("{unit} has no ExecStart"))?;
    assert!(text.contains("[Install]"), "{unit} can be enabled");
    Ok(line.split_whitespace().map(str::to_owned).collect())
}

#[test]
fn the_units_start_the_binaries_with_arguments_they_take() -> anyhow::Result<()> {
    for (unit, bin) in [
        ("kith.service", "kith"),
        ("kith-relay.service", "kith-relay"),
    ] {
        let args = exec_start(unit)?;
        assert!(args[0].ends_with(&format!("/{bin}")), "{unit}: {args:?}");
        // `--help` last: the binary parses everything before it, then prints its help.
        let out = Command::new(binary(bin)?)
            .args(&args[1..])
            .arg("--help")
            .output()?;
        assert!(
            out.status.success(),
            "{unit}: {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A misspelt argument would fail the same way.
        let bad = Command::new(binary(bin)?)
            .args(&args[1..])
            .arg("--no-such-flag")
            .arg("--help")
            .output()?;
        assert!(!bad.status.success(), "{unit}: the check itself works");
    }
    Ok(())
}
