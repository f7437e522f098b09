//! The G4 bucket client against a real S3-compatible server (Garage): two
//! clients share segments bit-exact, damage and absence are misses, and a
//! server that disappears costs a bounded wait, then nothing (the breaker),
//! until it returns.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvbm::remote::bucket::Miss;
use kvbm::remote::segment::{Builder, Origin, Sealed};
use kvtier_e2e::{rt, Garage};
use object_store::{ObjectStoreExt, PutPayload};

/// A chain of `n` blocks of `len` bytes each, with distinct contents.
fn chain(node: u64, n: usize, len: usize) -> (Sealed, Vec<Vec<u8>>) {
    let mut b = Builder::new(Origin {
        node,
        seq: 1,
        created_ms: 0,
    });
    let mut datas = Vec::new();
    for i in 0..n {
        let data: Vec<u8> = (0..len)
            .map(|j| (i * 7 + j * 13 + node as usize) as u8)
            .collect();
        let parent = if i == 0 {
            vec![]
        } else {
            vec![i as u8 - 1; 16]
        };
        b.push(
            "m/tp0",
            &[i as u8; 16],
            &parent,
            &[i as u32; 16],
            Bytes::from(data.clone()),
        )
        .expect("push");
        datas.push(data);
    }
    (b.finish(), datas)
}

#[test]
fn two_clients_share_segments_bit_exact() {
    let Some(g) = Garage::start() else { return };
    rt().block_on(async {
        let (a, b) = (g.bucket("kv"), g.bucket("kv"));
        // Large blocks (a footer found in the first tail read) and a
        // segment smaller than that first read.
        for (name, n, len) in [("seg-big", 24, 300_000), ("seg-small", 3, 100)] {
            let (s, datas) = chain(1, n, len);
            a.put_segment(name, &s).await.expect("put");
            let f = b
                .read_footer(name)
                .await
                .expect("footer from the other client");
            assert_eq!(f, s.footer);
            let all: Vec<usize> = (0..n).collect();
            let got = b.read_blocks(name, &f, &all).await.expect("read");
            for (g, d) in got.iter().zip(&datas) {
                assert_eq!(g.as_deref(), Some(&d[..]));
            }
            // A subset, not adjacent.
            let got = b.read_blocks(name, &f, &[0, 2]).await.expect("read");
            assert_eq!(got[1].as_deref(), Some(&datas[2][..]));
        }
        // Prefixes keep nodes' namespaces apart.
        assert_eq!(
            g.bucket("other").read_footer("seg-big").await,
            Err(Miss::NotFound)
        );
    });
}

#[test]
fn damage_and_absence_are_misses() {
    let Some(g) = Garage::start() else { return };
    rt().block_on(async {
        let b = g.bucket("kv");
        assert_eq!(b.read_footer("nothing-here").await, Err(Miss::NotFound));
        // Not a segment at all.
        let junk = b.path("junk");
        b.store()
            .put(&junk, PutPayload::from_static(&[7u8; 9000]))
            .await
            .expect("put junk");
        assert!(matches!(b.read_footer("junk").await, Err(Miss::Segment(_))));
        // One flipped bit in block 1: that block is refused, the others
        // come back.
        let (s, datas) = chain(2, 4, 10_000);
        let mut obj: Vec<u8> = s.parts.iter().flat_map(|p| p.iter().copied()).collect();
        obj[s.footer.blocks[1].offset as usize + 5] ^= 0x10;
        b.store()
            .put(&b.path("flipped"), PutPayload::from(obj))
            .await
            .expect("put");
        let f = b
            .read_footer("flipped")
            .await
            .expect("the footer is intact");
        let got = b
            .read_blocks("flipped", &f, &[0, 1, 2, 3])
            .await
            .expect("read");
        assert_eq!(got[0].as_deref(), Some(&datas[0][..]));
        assert_eq!(got[1], None);
        assert_eq!(got[3].as_deref(), Some(&datas[3][..]));
        // A vanished segment.
        b.delete("flipped").await.expect("delete");
        assert_eq!(
            b.read_blocks("flipped", &f, &[0]).await,
            Err(Miss::NotFound)
        );
        assert!(!b.breaker().is_open(), "misses are answers, not failures");
    });
}

#[test]
fn a_dead_server_costs_a_deadline_then_nothing_until_it_returns() {
    let Some(mut g) = Garage::start() else { return };
    rt().block_on(async {
        let b = g.bucket("kv");
        let (s, datas) = chain(3, 4, 50_000);
        b.put_segment("seg", &s).await.expect("put");
        g.kill9();
        // Each failed request is bounded by its deadline (plus the
        // client's two short retries), and after three the breaker opens.
        for _ in 0..3 {
            let t = Instant::now();
            assert!(b.read_footer("seg").await.is_err());
            assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        }
        assert!(b.breaker().is_open());
        let t = Instant::now();
        assert_eq!(b.read_footer("seg").await, Err(Miss::Breaker));
        assert!(t.elapsed() < Duration::from_millis(50));
        g.restart();
        // The breaker probes again after its back-off (1-1.25 s first).
        let t = Instant::now();
        let f = loop {
            match b.read_footer("seg").await {
                Ok(f) => break f,
                Err(_) if t.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("no recovery: {e}"),
            }
        };
        assert!(!b.breaker().is_open());
        let got = b
            .read_blocks("seg", &f, &[3])
            .await
            .expect("read after recovery");
        assert_eq!(got[0].as_deref(), Some(&datas[3][..]));
    });
}

/// A sealed chain from `node`, numbered `seq`, created at `ms`.
fn announced(node: u64, seq: u64, ms: u64) -> (Sealed, Vec<Vec<u8>>) {
    let (mut s, datas) = chain(node, 3, 5000 + seq as usize);
    s.origin = Origin {
        node,
        seq,
        created_ms: ms,
    };
    (s, datas)
}

#[test]
fn a_node_finds_what_another_published_and_only_once() {
    use kvbm::remote::discovery::Discovery;
    let Some(g) = Garage::start() else { return };
    rt().block_on(async {
        let (a, b) = (g.bucket("fleet"), g.bucket("fleet"));
        let mut seen_b = Discovery::new(0, Duration::from_secs(60));
        assert!(seen_b.poll(&b).await.expect("empty").segments.is_empty());
        let now = 1_764_000_000_000;
        let mut datas = Vec::new();
        for seq in 1..=3 {
            let (s, d) = announced(0xA, seq, now + seq);
            a.publish(&s).await.expect("publish");
            datas.push(d);
        }
        // B learns all three, and reads them bit-exact by their footers.
        let t = Instant::now();
        let found = seen_b.poll(&b).await.expect("poll");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(found.segments.len(), 3);
        assert_eq!(found.refused, 0);
        for ((name, ann), d) in found.segments.iter().zip(&datas) {
            let got = b
                .read_blocks(name, &ann.footer, &[0, 1, 2])
                .await
                .expect("read");
            for (g, d) in got.iter().zip(d) {
                assert_eq!(g.as_deref(), Some(&d[..]));
            }
        }
        // Nothing new: nothing found again. A writer whose clock lags by
        // 30 s (inside the window) is still found; junk under idx/ is
        // refused, not fatal.
        assert!(seen_b.poll(&b).await.expect("poll").segments.is_empty());
        let (late, _) = announced(0xC, 1, now - 30_000);
        a.publish(&late).await.expect("publish");
        b.store()
            .put(
                &b.path(&format!("idx/{:013}-junk.kvi", now + 10)),
                object_store::PutPayload::from_static(b"not an index object"),
            )
            .await
            .expect("put junk");
        let found = seen_b.poll(&b).await.expect("poll");
        assert_eq!(found.segments.len(), 1);
        assert_eq!(found.segments[0].1.origin.node, 0xC);
        assert_eq!(found.refused, 1);
        // A restarted node that kept its high-water mark catches up on what
        // came since, and sees the older ones again only inside the window.
        let mut restarted = Discovery::new(seen_b.high_ms(), Duration::from_millis(1));
        let (s4, _) = announced(0xA, 4, now + 100);
        a.publish(&s4).await.expect("publish");
        let found = restarted.poll(&b).await.expect("poll");
        let nodes: Vec<u64> = found.segments.iter().map(|s| s.1.origin.seq).collect();
        assert_eq!(nodes, [4]);
        // Retracted: the index goes first, then the segment; reads miss.
        let (name, ann) = &found.segments[0];
        a.retract(&ann.origin).await.expect("retract");
        assert_eq!(b.read_footer(name).await, Err(Miss::NotFound));
    });
}

#[test]
fn orphans_are_this_nodes_unknown_segments_only() {
    use kvbm::remote::segment::segment_name;
    let Some(g) = Garage::start() else { return };
    rt().block_on(async {
        let b = g.bucket("sweep");
        let mut names = Vec::new();
        for (node, seq) in [(0xA, 1), (0xA, 2), (0xB, 1)] {
            let (s, _) = announced(node, seq, 1_764_000_000_000 + seq);
            let name = segment_name(&s.origin);
            b.put_segment(&name, &s).await.expect("put");
            names.push(name);
        }
        let known = |n: &str| n == names[0];
        // Too young to be an orphan (an upload whose announcement is on its
        // way).
        let young = b
            .orphans(0xA, Duration::from_secs(600), &known)
            .await
            .expect("sweep");
        assert!(young.is_empty(), "{young:?}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let old = b
            .orphans(0xA, Duration::from_secs(1), &known)
            .await
            .expect("sweep");
        // Node A's unknown segment; never A's known one, never B's.
        assert_eq!(old, [names[1].clone()]);
    });
}
