//! G4 segment footers, header pages and index objects
//! (`kvbm::remote::segment`), read from objects other nodes wrote. Input: a
//! mode byte; mode 0 reads the rest as a whole object's tail (trailer
//! checksum and geometry first), a header page and an index object; any
//! other mode reads a footer body directly (past the checksum a fuzzer
//! cannot forge) whose data area ends at the little-endian u64 that opens
//! it. What decodes re-encodes to the bytes it was read from; no input
//! allocates more than 16 bytes per input byte (plus 4 KiB).
#![no_main]

use kvbm::remote::segment::{decode_header, decode_tail, Announcement, Footer};
use kvtier_fuzz::{peak_during, PeakAlloc};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bound = 16 * data.len() + 4096;
    if mode == 0 {
        let (res, peak) = peak_during(|| decode_tail(rest, rest.len() as u64));
        assert!(peak <= bound, "{peak} bytes for {} input bytes", data.len());
        let _ = decode_header(rest);
        let (ann, peak) = peak_during(|| Announcement::decode(rest));
        assert!(peak <= bound, "{peak} bytes for {} input bytes", data.len());
        if let Ok(a) = ann {
            assert_eq!(a.encode(), rest);
        }
        if let Ok(f) = res {
            let enc = f.encode();
            assert_eq!(enc, rest[rest.len() - 32 - enc.len()..rest.len() - 32]);
        }
        return;
    }
    if rest.len() < 8 {
        return;
    }
    let (at, body) = rest.split_at(8);
    let mut b = [0u8; 8];
    b.copy_from_slice(at);
    let footer_at = u64::from_le_bytes(b);
    let (res, peak) = peak_during(|| Footer::decode(body, footer_at));
    assert!(peak <= bound, "{peak} bytes for {} input bytes", data.len());
    if let Ok(f) = res {
        assert_eq!(f.encode(), body);
        assert_eq!(Footer::decode(&f.encode(), footer_at).as_ref(), Ok(&f));
    }
});
