//! Calls that take more than one of the store's locks, run against each
//! other: none may wait forever. `Stats` once held the block table's lock
//! while it took the namespaces', which `RegisterNamespace` takes in the
//! other order (an engine starting while anyone read the stats could hang
//! the daemon's gRPC workers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kvbm::catalog::rocks::RocksCatalog;
use kvbm::store::Store;
use kvbm::Config;

#[test]
fn stats_and_namespace_registration_never_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().to_path_buf(),
        socket: dir.path().join("kvbm.sock"),
        disk_path: dir.path().join("g3.dat"),
        host_bytes: 1 << 20,
        disk_bytes: 0,
        ..Config::default()
    };
    let catalog = Arc::new(RocksCatalog::open(&dir.path().join("catalog")).unwrap());
    let store = Store::open(cfg, catalog).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                store.stats();
            }
        })
    };
    let (done_tx, done_rx) = mpsc::channel();
    {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..2000 {
                store
                    .register_namespace(&format!("ns{i}"), 4096, None)
                    .unwrap();
            }
            let _ = done_tx.send(());
        });
    }
    let finished = done_rx.recv_timeout(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    assert!(finished.is_ok(), "RegisterNamespace and Stats deadlocked");
    reader.join().unwrap();
}
