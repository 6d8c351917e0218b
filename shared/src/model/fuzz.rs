//! Deterministic mutation fuzzing of [`Model::parse`] and [`Model::run`],
//! on stable Rust as an ordinary test (so CI runs it on every change).
//!
//! Two base blobs: the hand-built residual network of the validator's unit
//! tests (small, so most mutations hit structure) and the shipped model
//! (mutations biased to its header, tables and first parameters). Each case
//! applies one kind of mutation: bit flips, truncation or insertion with the
//! checksum left stale; and bit flips, `u16`/`u32` field writes of boundary
//! values, or truncation/insertion with the length and CRC recomputed, so
//! they reach the validator. Every case must return from `parse` without
//! panicking; when `parse` accepts, `run` must succeed (parse promises it
//! cannot fail) and write nothing outside its arena and scratch, which are
//! fenced by canaries.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::validate::tests::{pattern, residual};
use super::*;
// A fixed seed gives the same cases on every run.
use crate::rng::Rng;

/// Field values at the edges of what the format allows.
const BOUNDARY: [u32; 16] = [
    0,
    1,
    2,
    3,
    4,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x3FFF_FFFF,
    0x4000_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
];

/// Canary bytes around the buffers `run` gets.
const GUARD: usize = 64;
const CANARY: i8 = 0x5A;

#[derive(Debug, Default)]
struct Tally {
    cases: usize,
    checksum: usize,
    rejected: usize,
    ran: usize,
}

/// One mutated copy of `base`, and what was done, for failure messages.
/// `hot` is the prefix most mutations land in.
fn mutate(base: &[u8], hot: usize, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = base.to_vec();
    let pos = |rng: &mut Rng, len: usize| {
        if rng.below(4) < 3 {
            rng.below(hot.min(len))
        } else {
            rng.below(len)
        }
    };
    let (kind, fix_crc) = match rng.below(8) {
        0 => {
            for _ in 0..1 + rng.below(3) {
                let p = pos(rng, b.len());
                b[p] ^= 1 << rng.below(8);
            }
            ("bit flips", false)
        }
        1 => {
            b.truncate(rng.below(b.len()));
            ("truncation", false)
        }
        2 => {
            let p = pos(rng, b.len() + 1);
            for _ in 0..1 + rng.below(8) {
                b.insert(p, rng.next_u64() as u8);
            }
            ("insertion", false)
        }
        3 => {
            if rng.below(2) == 0 {
                b.truncate(HEADER_LEN + rng.below(b.len() - HEADER_LEN));
            } else {
                let p = pos(rng, b.len() + 1).max(16);
                for _ in 0..1 + rng.below(8) {
                    b.insert(p, rng.next_u64() as u8);
                }
            }
            let head = b.first_chunk().expect("at least a header is kept");
            let h = format::Header {
                total_len: b.len() as u32,
                ..format::Header::decode(head)
            };
            b[..HEADER_LEN].copy_from_slice(&h.encode());
            ("resize, length and CRC fixed", true)
        }
        4 | 5 => {
            for _ in 0..1 + rng.below(4) {
                let p = pos(rng, b.len());
                b[p] ^= 1 << rng.below(8);
            }
            ("bit flips, CRC fixed", true)
        }
        _ => {
            for _ in 0..1 + rng.below(3) {
                let v = if rng.below(4) == 0 {
                    rng.next_u64() as u32
                } else {
                    BOUNDARY[rng.below(BOUNDARY.len())]
                };
                let p = pos(rng, b.len()) & !1;
                if rng.below(2) == 0 && p + 2 <= b.len() {
                    b[p..p + 2].copy_from_slice(&(v as u16).to_le_bytes());
                } else if p + 4 <= b.len() {
                    let p = p & !3;
                    b[p..p + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            ("field writes, CRC fixed", true)
        }
    };
    if fix_crc && b.len() >= format::CRC_FROM {
        format::seal(&mut b);
    }
    (b, String::from(kind))
}

/// Parses `bytes` from aligned memory; if it parses, uses the whole public
/// API and runs the network with the minimal and with the fast scratch.
fn check(bytes: &[u8], tally: &mut Tally) -> Result<(), String> {
    let mut words = vec![0u32; bytes.len().div_ceil(4)];
    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    let blob = &bytemuck::cast_slice::<u32, u8>(&words)[..bytes.len()];
    tally.cases += 1;
    let m = match Model::parse(blob) {
        Ok(m) => m,
        Err(ModelError::Checksum { .. }) => {
            tally.checksum += 1;
            return Ok(());
        }
        Err(_) => {
            tally.rejected += 1;
            return Ok(());
        }
    };
    if m.layers().count() != m.layer_count() as usize {
        return Err("layers() skipped a layer".into());
    }
    for t in 0..m.tensor_count() {
        let info = m.tensor(t).ok_or("tensor index within tensor_count")?;
        if info.range().end > m.arena_len() {
            return Err(format!("tensor {t} outside the arena"));
        }
    }
    let _ = (m.meta(), m.input(), m.output());
    for scratch_len in [m.scratch_len(), m.fast_scratch_len()] {
        let n = m.arena_len();
        let mut arena = vec![CANARY; GUARD + n + GUARD];
        let mut scratch = vec![i16::from(CANARY); GUARD + scratch_len + GUARD];
        let input = pattern(INPUT_LEN, tally.cases as u32);
        let mut logits = vec![0i8; m.output().dims.len()];
        m.run(
            &input,
            &mut arena[GUARD..GUARD + n],
            &mut scratch[GUARD..GUARD + scratch_len],
            &mut logits,
        )
        .map_err(|e| format!("parse accepted it but run failed: {e}"))?;
        let fenced = |v: &[i8]| v.iter().all(|&x| x == CANARY);
        if !fenced(&arena[..GUARD]) || !fenced(&arena[GUARD + n..]) {
            return Err("run wrote outside the arena".into());
        }
        let s = i16::from(CANARY);
        if scratch[..GUARD]
            .iter()
            .chain(&scratch[GUARD + scratch_len..])
            .any(|&x| x != s)
        {
            return Err("run wrote outside the scratch".into());
        }
    }
    tally.ran += 1;
    Ok(())
}

/// `cases` mutations of `base`; returns the tally.
fn fuzz(base: &[u8], hot: usize, cases: usize, seed: u64) -> Tally {
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    check(base, &mut tally).unwrap();
    assert_eq!(tally.ran, 1, "the base blob must parse and run");
    for case in 0..cases {
        let (bytes, what) = mutate(base, hot, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| check(&bytes, &mut tally))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("seed {seed:#x} case {case} ({what}): {e}"),
            Err(_) => panic!("seed {seed:#x} case {case} ({what}): panicked"),
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "fuzz: {} cases: {} checksum errors, {} other rejections, {} parsed and ran",
        tally.cases,
        tally.checksum,
        tally.rejected,
        tally.ran
    );
    tally
}

#[test]
fn fuzz_hand_built_blob() {
    let base = residual().bytes();
    let t = fuzz(&base, base.len(), 12_000, 0x5EED_0001);
    // Every kind of outcome is reached: the test exercises the validator,
    // not only the checksum.
    assert!(
        t.checksum > 1_000 && t.rejected > 1_000 && t.ran > 100,
        "{t:?}"
    );
}

#[test]
fn fuzz_shipped_blob() {
    let base = &BLOB.0;
    let data_at = u32::from_le_bytes(base[48..52].try_into().unwrap()) as usize;
    let t = fuzz(base, data_at + 4096, 600, 0x5EED_0002);
    assert!(t.checksum > 50 && t.rejected > 50 && t.ran > 20, "{t:?}");
}

/// The committed seed of the coverage-guided target `fuzz/fuzz_targets/blob.rs`
/// is the hand-built blob, behind mode byte 1 (length and CRC fixed up).
/// `MINI_RESNET_WRITE_FUZZ_SEED=1 cargo test -p shared fuzz_target_seed`
/// rewrites it after a format change.
#[test]
fn fuzz_target_seed_is_the_hand_built_blob() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/blob/residual.bin"
    );
    let mut want = vec![1u8];
    want.extend_from_slice(&residual().bytes());
    if std::env::var_os("MINI_RESNET_WRITE_FUZZ_SEED").is_some() {
        std::fs::write(path, &want).unwrap();
    }
    let have = std::fs::read(path).unwrap_or_default();
    assert!(
        have == want,
        "{path} is not the hand-built blob; rewrite it with MINI_RESNET_WRITE_FUZZ_SEED=1"
    );
}
