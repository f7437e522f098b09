//! Session and lease ownership, tried at random: honest clients reserve,
//! write, commit, read and release while others replay their session ids
//! (with the wrong process, or a guessed id) on every session call. The
//! rules checked after every step:
//!
//! - a claim that does not own a session can neither commit, abort, acquire
//!   nor release anything in it, and its attempt changes nothing;
//! - a reserved block is never readable before its owner commits it;
//! - every block read (by Get or through a lease) holds exactly the bytes its
//!   owner wrote before committing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kvbm::catalog::rocks::RocksCatalog;
use kvbm::store::{Owner, Session, Store};
use kvbm::{Config, ErrorKind};
use kvtier_proto::v1 as pb;
use rand::{Rng, SeedableRng};

const BLOCK: u64 = 4096;
const KEYS: u64 = 600;
const NS: &str = "ns";

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:05}").into_bytes()
}

/// The bytes an owner writes for block `i`: every read must see these.
fn pattern(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in &mut v {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn meta(i: u64) -> pb::BlockMeta {
    pb::BlockMeta {
        key: key(i),
        parent: vec![],
        token_ids: vec![i as u32],
    }
}

fn open_store(dir: &std::path::Path) -> Arc<Store> {
    let cfg = Config {
        data_dir: dir.to_path_buf(),
        socket: dir.join("kvbm.sock"),
        disk_path: dir.join("g3.dat"),
        // 256 slots for 600 keys: eviction reuses slots all the time.
        host_bytes: 1 << 20,
        disk_bytes: 0,
        ..Config::default()
    };
    let catalog = Arc::new(RocksCatalog::open(&dir.join("catalog")).unwrap());
    let store = Store::open(cfg, catalog).unwrap();
    store.register_namespace(NS, BLOCK, None).unwrap();
    store
}

/// Every way a claim can be wrong for session `s`.
fn impostors(s: Session, rng: &mut impl Rng) -> Vec<Session> {
    let Owner::Process { pid, uid } = s.owner else {
        unreachable!()
    };
    vec![
        Session {
            id: s.id,
            owner: Owner::Process { pid: pid + 1, uid },
        },
        Session {
            id: s.id,
            owner: Owner::Process { pid, uid: uid + 1 },
        },
        Session {
            id: s.id,
            owner: Owner::Daemon,
        },
        Session { id: 0, ..s },
        Session {
            id: s.id.wrapping_add(1),
            ..s
        },
        Session {
            id: rng.random(),
            ..s
        },
    ]
}

#[test]
fn sessions_and_leases_belong_to_their_owner() {
    for seed in 0..4u64 {
        run(seed);
    }
}

fn run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sessions: Vec<Session> = (1..=3)
        .map(|pid| store.open_session(Owner::Process { pid, uid: 1000 }, 0))
        .collect();
    // Reserved and not yet committed: key -> (session, slot offset).
    let mut pending: HashMap<u64, (Session, u64)> = HashMap::new();
    // Leases held: (session, lease id, keys).
    let mut leases: Vec<(Session, u64, Vec<u64>)> = Vec::new();

    let read_slot = |off: u64| unsafe { store.pool().slice(off, BLOCK) }.to_vec();
    let write_slot = |off: u64, data: &[u8]| unsafe {
        store.pool().slice_mut(off, BLOCK).copy_from_slice(data);
    };

    for step in 0..3000 {
        let s = sessions[rng.random_range(0..sessions.len())];
        let i = rng.random_range(0..KEYS);
        match rng.random_range(0..10) {
            // Reserve; the owner writes its bytes only when it commits.
            0 | 1 => {
                if pending.contains_key(&i) {
                    continue;
                }
                let grants = match store.reserve(s, NS, vec![meta(i)]) {
                    Ok(g) => g,
                    Err(e) if e.kind() == ErrorKind::ResourceExhausted => continue,
                    Err(e) => panic!("reserve: {e}"),
                };
                if grants[0].length > 0 {
                    pending.insert(i, (s, grants[0].offset));
                }
            }
            // The owner writes and commits a pending block.
            2 => {
                let Some(&k) = pending.keys().next() else {
                    continue;
                };
                let (owner, off) = pending.remove(&k).unwrap();
                write_slot(off, &pattern(k));
                assert_eq!(store.commit(owner, NS, &[key(k)]).unwrap(), 1);
            }
            // Someone else replays a pending block's session: nothing moves.
            3 => {
                let Some((&k, &(owner, _))) = pending.iter().next() else {
                    continue;
                };
                for bad in impostors(owner, &mut rng) {
                    let committed = store.commit(bad, NS, &[key(k)]).unwrap_or(0);
                    let aborted = store.abort(bad, NS, &[key(k)]).unwrap_or(0);
                    assert_eq!(
                        (committed, aborted),
                        (0, 0),
                        "{bad:?} took {owner:?}'s block"
                    );
                    let acquired = rt.block_on(store.acquire(bad, NS, &[key(k)]));
                    assert!(
                        acquired.is_err(),
                        "{bad:?} acquired under {owner:?}'s session"
                    );
                    store.close_session(bad);
                }
                // Not readable before its owner's commit.
                assert!(rt.block_on(store.get(NS, &key(k))).is_err());
                let (_, grants, _) = rt.block_on(store.acquire(s, NS, &[key(k)])).unwrap();
                assert!(grants.is_empty(), "a reserved block was leased");
            }
            // The owner aborts.
            4 => {
                let Some(&k) = pending.keys().next() else {
                    continue;
                };
                let (owner, _) = pending.remove(&k).unwrap();
                assert_eq!(store.abort(owner, NS, &[key(k)]).unwrap(), 1);
            }
            // Lease a run of keys and check their bytes.
            5 => {
                let keys: Vec<u64> = (i..(i + 4).min(KEYS)).collect();
                let wire: Vec<Vec<u8>> = keys.iter().map(|&k| key(k)).collect();
                let (lease, grants, _) = rt.block_on(store.acquire(s, NS, &wire)).unwrap();
                for (g, &k) in grants.iter().zip(&keys) {
                    assert_eq!(read_slot(g.offset), pattern(k), "leased block {k}");
                }
                if lease != 0 {
                    leases.push((s, lease, keys[..grants.len()].to_vec()));
                }
            }
            // Someone else releases a lease: refused, the blocks stay pinned.
            6 => {
                let Some(&(owner, lease, ref keys)) = leases.first() else {
                    continue;
                };
                for bad in impostors(owner, &mut rng) {
                    assert!(store.release(bad, lease).is_err());
                }
                let wire: Vec<Vec<u8>> = keys.iter().map(|&k| key(k)).collect();
                assert_eq!(
                    store.evict(NS, &wire).unwrap(),
                    0,
                    "a leased block was evicted"
                );
                store.release(owner, lease).unwrap();
                leases.remove(0);
            }
            // Get and Put, the daemon's own copying paths.
            7 => match rt.block_on(store.get(NS, &key(i))) {
                Ok((data, _)) => assert_eq!(data, pattern(i), "get of block {i}"),
                Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound),
            },
            8 => {
                if !pending.contains_key(&i) {
                    let _ = store.put(NS, meta(i), &pattern(i));
                }
            }
            // Churn: eviction, and a client that goes away.
            _ => {
                if rng.random_bool(0.9) {
                    let keys: Vec<Vec<u8>> = (i..(i + 8).min(KEYS)).map(key).collect();
                    store.evict(NS, &keys).unwrap();
                } else {
                    let gone = sessions.swap_remove(rng.random_range(0..sessions.len()));
                    store.close_session(gone);
                    pending.retain(|_, (o, _)| *o != gone);
                    leases.retain(|(o, _, _)| *o != gone);
                    let pid = 10 + step as u32;
                    sessions.push(store.open_session(Owner::Process { pid, uid: 1000 }, 0));
                }
            }
        }
    }
    // Every block still present reads back as its owner wrote it.
    let mut seen = HashSet::new();
    for i in 0..KEYS {
        if let Ok((data, _)) = rt.block_on(store.get(NS, &key(i))) {
            assert_eq!(data, pattern(i), "block {i} at the end");
            seen.insert(i);
        }
    }
    assert!(!seen.is_empty(), "seed {seed}: nothing stored at all");
}
