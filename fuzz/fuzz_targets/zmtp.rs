//! The router's ZMTP reader (`kvrouter::ingest::zmtp`): the greeting and
//! READY of the handshake, then frames, multipart messages and commands,
//! from an engine's socket. The first input byte picks a mode: bit 0 set,
//! a valid handshake goes first and the rest is what follows it; bit 1
//! picks the DEALER role over SUB. Messages received respect the limits,
//! and live `[topic, seq, payload]` messages go on to the batch decoder.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use kvrouter::ingest::decode::decode_batch;
use kvrouter::ingest::zmtp::{Conn, Incoming, Limits, Role};
use kvtier_fuzz::{zmtp_handshake, ScriptedPeer};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_message_bytes: 4096,
    max_frames: 4,
    handshake_timeout: Duration::from_secs(5),
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = if mode & 1 == 1 {
        zmtp_handshake()
    } else {
        Vec::new()
    };
    bytes.extend_from_slice(rest);
    let role = if mode & 2 == 2 {
        Role::Dealer
    } else {
        Role::Sub
    };
    runtime().block_on(async {
        let Ok(conn) = Conn::over(ScriptedPeer::new(bytes), role, LIMITS).await else {
            return;
        };
        let (mut rd, _wr) = conn.split();
        // Every frame takes at least two bytes: the reader reaches EOF.
        while let Ok(m) = rd.recv().await {
            match m {
                Incoming::Message(frames) => {
                    assert!(!frames.is_empty() && frames.len() <= LIMITS.max_frames);
                    let total: usize = frames.iter().map(|f| f.len()).sum();
                    assert!(total <= LIMITS.max_message_bytes);
                    if let [.., seq, payload] = &frames[..] {
                        if seq.len() == 8 {
                            let _ = decode_batch(payload, 64);
                        }
                    }
                }
                Incoming::Oversized { bytes, frames } => {
                    assert!(bytes > LIMITS.max_message_bytes as u64 || frames > LIMITS.max_frames);
                }
                Incoming::Command => {}
            }
        }
    });
});
