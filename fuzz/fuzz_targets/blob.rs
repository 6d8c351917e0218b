//! `Model::parse` then, when it accepts, the whole public API and `run`
//! with canary-fenced buffers.
//!
//! The first input byte picks the mode: odd, the header's length and CRC
//! are rewritten to match the rest, so mutations reach the validator
//! instead of stopping at the checksum; even, the bytes go in as they are.
//! A crash is: a panic, `run` failing on a blob `parse` accepted (parse
//! promises it cannot), a tensor outside the arena, or a write outside the
//! arena or the scratch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::model::{crc32, Model, HEADER_LEN};
use shared::preprocess::INPUT_LEN;

const GUARD: usize = 64;
const CANARY: i8 = 0x5A;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= HEADER_LEN {
        let len = bytes.len() as u32;
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc32(&bytes[16..]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    // The parser views the blob's i32 arrays in place: give it aligned memory.
    let mut words = vec![0u32; bytes.len().div_ceil(4)];
    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
    let blob = &bytemuck::cast_slice::<u32, u8>(&words)[..bytes.len()];
    let Ok(m) = Model::parse(blob) else {
        return;
    };
    assert_eq!(m.layers().count(), m.layer_count() as usize);
    for t in 0..m.tensor_count() {
        let info = m.tensor(t).expect("tensor index below tensor_count");
        assert!(
            info.range().end <= m.arena_len(),
            "tensor {t} outside the arena"
        );
    }
    let _ = (m.meta(), m.input(), m.output());
    let input: Vec<i8> = (0..INPUT_LEN).map(|i| (i * 37 % 251) as i8).collect();
    for scratch_len in [m.scratch_len(), m.fast_scratch_len()] {
        let n = m.arena_len();
        let mut arena = vec![CANARY; GUARD + n + GUARD];
        let mut scratch = vec![i16::from(CANARY); GUARD + scratch_len + GUARD];
        let mut logits = vec![0i8; m.output().dims.len()];
        m.run(
            &input,
            &mut arena[GUARD..GUARD + n],
            &mut scratch[GUARD..GUARD + scratch_len],
            &mut logits,
        )
        .expect("parse accepted the blob, so run must succeed");
        assert!(
            arena[..GUARD]
                .iter()
                .chain(&arena[GUARD + n..])
                .all(|&x| x == CANARY),
            "run wrote outside the arena"
        );
        assert!(
            scratch[..GUARD]
                .iter()
                .chain(&scratch[GUARD + scratch_len..])
                .all(|&x| x == i16::from(CANARY)),
            "run wrote outside the scratch"
        );
    }
});
