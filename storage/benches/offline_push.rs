//! The offline store on its own: how many messages a second `push_offline_unsynced` and the
//! group-commit sync take on one thread, without the network or XML around them. It is the
//! ceiling of the server's offline figure (docs/performance.md).
//!
//!     cargo bench -p confab-storage --bench offline_push
//!     taskset -c 0 cargo bench -p confab-storage --bench offline_push -- --messages 400000
//!
//! Options: `--help`.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use confab_storage::{OfflineStore, SledStorage, Storage, SyncPoint};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
struct Args {
    /// Messages to push in all.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Owners the messages are spread over.
    #[arg(long, default_value_t = 2_000)]
    owners: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// Pushes a writer makes before each sync.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 250)]
    size: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args {
        messages,
        owners,
        writers,
        batch,
        size,
        ..
    } = Args::parse();
    let (owners, writers, batch) = (owners.max(1), writers.max(1), batch.max(1));
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Arc::new(SledStorage::open(dir.path()).expect("open the store"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stanza = vec![b'x'; size];
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (store, stanza) = (store.clone(), stanza.clone());
            tasks.push(tokio::spawn(async move {
                // Writer w takes messages w, w + writers, ...: every owner in turn, as the
                // server's offline scenario sends them.
                let mine: Vec<usize> = (w..messages).step_by(writers).collect();
                for chunk in mine.chunks(batch) {
                    let mut point = SyncPoint(0);
                    for k in chunk {
                        let owner = format!("off{}@localhost", k % owners);
                        let (_, p) = store
                            .push_offline_unsynced(&owner, stanza.clone(), usize::MAX)
                            .await
                            .expect("push");
                        point = p;
                    }
                    store.sync(point).await.expect("sync");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{messages} offline messages of {size} bytes to {owners} owners, {writers} writers syncing every {batch}: \
         {secs:.2} s, {:.0} msgs/s",
        messages as f64 / secs
    );
}
