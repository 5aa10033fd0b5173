//! Rough concurrent-read throughput of a backend: `readbench FILE FORMAT THREADS`.
use std::sync::Arc;
use std::time::Instant;

use quorum_config::model::{Backing, ImageFormat, Source, StorageSource};
use quorum_replica::{OpenOptions, Replica, open};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let format = if args[2] == "qcow2" {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    };
    let src = StorageSource {
        index: None,
        format,
        source: Source::File {
            path: args[1].clone().into(),
        },
        backing: Backing::Unspecified,
    };
    let threads: u64 = args[3].parse().unwrap();
    let r: Arc<dyn Replica> = open(
        &src,
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
            nbd_timeout: None,
            refuse_corrupt: false,
        },
    )
    .unwrap()
    .into();
    let blocks = r.size() / 4096;
    let per = 200_000 / threads;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let r = Arc::clone(&r);
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut x = t * 7919 + 1;
                for _ in 0..per {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    r.read_at(&mut buf, ((x >> 33) % blocks) * 4096).unwrap();
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{threads} threads: {:.0} reads/s",
        (per * threads) as f64 / secs
    );
}
