//! Pool-socket frames (`kvtier_proto::session`): the daemon decodes request
//! frames from local clients, the client decodes the daemon's replies. The
//! input is one frame: a 5-byte header, then a body that every body decoder
//! reads. Whatever decodes must re-encode to the same value, and to the same
//! bytes where the encoding is canonical.
#![no_main]

use kvtier_proto::session as wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<5>() else {
        return;
    };
    if let Ok((len, _)) = wire::decode_header(*head) {
        assert!(len < wire::MAX_FRAME);
    }
    keys(body);
    reserve(body);
    replies(head[4], body);
});

/// Re-encoded frame: its header must announce exactly its body.
fn body_of(buf: &[u8], op: u8) -> &[u8] {
    let head: [u8; 5] = buf[..5].try_into().unwrap();
    assert_eq!(wire::decode_header(head), Ok((buf.len() - 5, op)));
    &buf[5..]
}

fn keys(body: &[u8]) {
    let Ok(k) = wire::decode_keys(body) else {
        return;
    };
    let held: usize = k.keys.iter().map(|k| k.len()).sum();
    assert!(held + k.namespace.len() <= body.len());
    let mut buf = Vec::new();
    wire::encode_keys(
        &mut buf,
        wire::OP_COMMIT,
        k.namespace,
        k.keys.iter().copied(),
    )
    .expect("decoded keys re-encode");
    let again = body_of(&buf, wire::OP_COMMIT);
    assert_eq!(wire::decode_keys(again).as_ref(), Ok(&k));
    // An empty chain re-encodes with key length 0, whatever it said.
    if !k.keys.is_empty() {
        assert_eq!(again, body);
    }
}

fn reserve(body: &[u8]) {
    let Ok(r) = wire::decode_reserve(body) else {
        return;
    };
    assert_eq!(r.parents.len(), r.keys.len());
    // The daemon slices each block's tokens out of this.
    assert_eq!(r.tokens.len(), r.keys.len() * r.tokens_per_block);
    let mut buf = Vec::new();
    let keys = r.keys.iter().copied();
    let parents = r.parents.iter().copied();
    wire::encode_reserve(
        &mut buf,
        r.namespace,
        keys,
        parents,
        &r.tokens,
        r.tokens_per_block,
    )
    .expect("decoded reserve re-encodes");
    let again = wire::decode_reserve(body_of(&buf, wire::OP_RESERVE)).expect("re-decodes");
    assert_eq!(
        (again.namespace, &again.keys, &again.parents, &again.tokens),
        (r.namespace, &r.keys, &r.parents, &r.tokens)
    );
    // Without token ids the block size is not sent.
    if !r.tokens.is_empty() {
        assert_eq!(again.tokens_per_block, r.tokens_per_block);
    }
    if !r.keys.is_empty() {
        assert_eq!(&buf[5..], body);
    }
}

fn replies(kind: u8, body: &[u8]) {
    match wire::decode_lookup_reply(kind, body) {
        Ok(c) => {
            let mut buf = Vec::new();
            wire::encode_lookup_reply(&mut buf, c);
            let again = body_of(&buf, wire::STATUS_OK);
            if body.len() >= 16 {
                assert_eq!(again, &body[..16]);
            } else {
                // A 3-value reply (an older daemon's): all of it local.
                assert_eq!(&again[..12], &body[..12]);
                assert_eq!(c.local, c.matched);
            }
            assert_eq!(wire::decode_lookup_reply(wire::STATUS_OK, again), Ok(c));
        }
        Err((status, msg)) if kind != wire::STATUS_OK => {
            assert_eq!(status, kind);
            // What the daemon sends as an error comes back as sent.
            if msg.len() <= 4096 {
                let mut buf = Vec::new();
                wire::encode_error(&mut buf, status, &msg);
                let again = body_of(&buf, status);
                assert_eq!(wire::decode_lookup_reply(status, again), Err((status, msg)));
            }
        }
        Err(_) => {}
    }
    if let Ok(n) = wire::decode_count_reply(kind, body) {
        let mut buf = Vec::new();
        wire::encode_count_reply(&mut buf, n);
        assert_eq!(body_of(&buf, wire::STATUS_OK), &body[..4]);
    }
    if let Ok(slots) = wire::decode_slots_reply(kind, body) {
        let mut buf = Vec::new();
        wire::encode_slots_reply(&mut buf, slots.iter().copied());
        assert_eq!(body_of(&buf, wire::STATUS_OK), body);
    }
}
