//! The attack benchmark's harness, kept from rotting: one short round of it (baseline and the
//! garbage attack) against the debug `kith-relay` binary. No timing is asserted: only that the
//! attack ran and was refused, and that every honest message was stored and delivered.

use kith_tests::attack::{self, Attack, Settings};
use kith_tests::init_logs;
use kith_tests::process::binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_attack_round_delivers_every_honest_message() -> anyhow::Result<()> {
    init_logs();
    let settings = Settings::quick(binary("kith-relay")?);
    let report = attack::run(&settings, &[Attack::Garbage]).await?;
    for row in std::iter::once(&report.baseline).chain(&report.attacks) {
        assert!(row.honest_tried > 0, "{row:?}");
        assert_eq!(row.honest_lost, 0, "{row:?}");
        assert_eq!(row.honest_not_stored, 0, "{row:?}");
        assert!(row.disk_bytes > 0 && row.log_bytes > 0, "{row:?}");
    }
    let garbage = &report.attacks[0];
    assert!(garbage.attempted > 0, "{garbage:?}");
    assert!(
        garbage.refused > 0,
        "the relay refused no garbage: {garbage:?}"
    );
    assert_eq!(report.baseline.refused, 0, "{:?}", report.baseline);
    assert!(report.markdown().contains("| garbage |"));
    Ok(())
}
