//! A short run of the crash test (`confab-crashtest`, `confab_tests::crash`): the real
//! server is killed with SIGKILL while clients write, restarted, and everything
//! acknowledged under docs/durability.md's contract must be there. The full run is
//! `tests/crash/run` (50 rounds, release build).

use confab_tests::confab_bin;
use confab_tests::crash::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_of_the_server() -> anyhow::Result<()> {
    let mut opts = Options::new(confab_bin().to_path_buf());
    opts.rounds = 3;
    opts.clients = 4;
    opts.recipients = 3;
    opts.min_delay_ms = 50;
    opts.max_delay_ms = 400;
    opts.seed = std::env::var("CONFAB_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let started = std::time::Instant::now();
    let totals = run(&opts).await?;
    assert!(totals.ok(), "seed {}: {totals:#?}", opts.seed);
    assert_eq!(totals.rounds, 3);
    assert_eq!(totals.lost, 0);
    assert!(
        totals.acknowledged > 0,
        "nothing was acknowledged: {totals:#?}"
    );
    assert!(
        totals.verified > 0 && totals.verified <= totals.acknowledged,
        "{totals:#?}"
    );
    println!("{totals:?} in {:?}", started.elapsed());
    Ok(())
}
