//! The SMLAD tiles over a block of columns: one output channel × four
//! pixels ([`dot_1x4`], and [`dot_1x4_x16`] for the lean loops). Weights
//! are read straight from the OHWI filter as words and unpacked with
//! SXTB16 / SXTB16 ROR #8.

use super::cols::Cols;
#[cfg(not(armv7em))]
use {
    super::cols::col_word,
    crate::kernels::dsp::isa::{load_u32, smlad, sxtb16, sxtb16_ror8},
};

/// The asm text of two tap groups of the 1 × 4 tile: one LDRD of two
/// weight words, eight LDRD of column pairs, four SXTB16, 16 SMLAD (29
/// instructions per 32 MACs).
#[cfg(armv7em)]
macro_rules! two_groups {
    () => {
        concat!(
            "ldrd {w}, {w1}, [{pw}], #8\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "sxtb16 {we}, {w}\n",
            "sxtb16 {w}, {w}, ror #8\n",
            "smlad {a0}, {we}, {x0}, {a0}\n",
            "smlad {a0}, {w}, {x1}, {a0}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a1}, {we}, {x0}, {a1}\n",
            "smlad {a1}, {w}, {x1}, {a1}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a2}, {we}, {x0}, {a2}\n",
            "smlad {a2}, {w}, {x1}, {a2}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a3}, {we}, {x0}, {a3}\n",
            "smlad {a3}, {w}, {x1}, {a3}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "sxtb16 {we}, {w1}\n",
            "sxtb16 {w1}, {w1}, ror #8\n",
            "smlad {a0}, {we}, {x0}, {a0}\n",
            "smlad {a0}, {w1}, {x1}, {a0}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a1}, {we}, {x0}, {a1}\n",
            "smlad {a1}, {w1}, {x1}, {a1}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a2}, {we}, {x0}, {a2}\n",
            "smlad {a2}, {w1}, {x1}, {a2}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a3}, {we}, {x0}, {a3}\n",
            "smlad {a3}, {w1}, {x1}, {a3}\n",
        )
    };
}

/// The asm text of four tap groups of [`dot_1x4_x16`] (58 instructions per
/// 64 MACs without the loop).
#[cfg(armv7em)]
macro_rules! four_groups {
    () => {
        concat!(two_groups!(), two_groups!())
    };
}

/// `asm!` of a 1 × 4 dot-product loop over `text`, with the operands every
/// such loop uses: the filter and column pointers `pw`/`pc` (advanced), the
/// filter end, the four accumulators, and five scratch registers (`w`, `w1`,
/// `we`, `x0`, `x1`). A text that leaves an operand unused names it in an
/// `@` comment.
#[cfg(armv7em)]
macro_rules! dot_1x4_asm {
    ($pw:ident, $pc:ident, $end:ident, $a0:ident, $a1:ident, $a2:ident, $a3:ident; $($text:expr),* $(,)?) => {
        // SAFETY: the loop reads filter bytes from `pw` up to `end` (4-byte
        // aligned words) and four column halfword pairs per filter word
        // from `pc`, as the portable loop does; the callers guarantee both.
        unsafe {
            core::arch::asm!(
                $($text),*,
                pw = inout(reg) $pw,
                pc = inout(reg) $pc,
                end = in(reg) $end,
                a0 = inout(reg) $a0,
                a1 = inout(reg) $a1,
                a2 = inout(reg) $a2,
                a3 = inout(reg) $a3,
                w = out(reg) _,
                w1 = out(reg) _,
                we = out(reg) _,
                x0 = out(reg) _,
                x1 = out(reg) _,
                options(nostack, readonly),
            )
        }
    };
}

/// The 1 × 4 dot product over whole weight words, `pw..end`, in plain
/// Rust on the emulated instructions (the host's twin of the `asm!` loops
/// of [`dot_1x4`] and [`dot_1x4_x16`]).
///
/// # Safety
/// `pw..end` is readable (a multiple of 4 bytes); `pc` holds one 4-pixel
/// group (32 bytes, 4-byte aligned) per weight word.
#[cfg(not(armv7em))]
#[inline(always)]
pub(super) unsafe fn dot_1x4_words(
    mut pw: *const u8,
    mut pc: *const u8,
    end: *const u8,
    acc: [i32; 4],
) -> [i32; 4] {
    let [mut a0, mut a1, mut a2, mut a3] = acc;
    while pw < end {
        // SAFETY: one weight word and one 4-pixel group (32 bytes) per step.
        unsafe {
            let wv = load_u32(pw);
            let (we, wo) = (sxtb16(wv), sxtb16_ror8(wv));
            a0 = smlad(we, col_word(pc), a0);
            a0 = smlad(wo, col_word(pc.add(4)), a0);
            a1 = smlad(we, col_word(pc.add(8)), a1);
            a1 = smlad(wo, col_word(pc.add(12)), a1);
            a2 = smlad(we, col_word(pc.add(16)), a2);
            a2 = smlad(wo, col_word(pc.add(20)), a2);
            a3 = smlad(we, col_word(pc.add(24)), a3);
            a3 = smlad(wo, col_word(pc.add(28)), a3);
            pw = pw.add(4);
            pc = pc.add(32);
        }
    }
    [a0, a1, a2, a3]
}

/// One output channel (filter row `w`) × four pixels of the block `col`.
///
/// # Safety
/// `w` holds `taps` values; `col` is a 4-pixel block of `k`.
#[inline(always)]
pub(super) unsafe fn dot_1x4(w: *const i8, col: *const i16, k: Cols, acc: [i32; 4]) -> [i32; 4] {
    let [mut a0, mut a1, mut a2, mut a3] = acc;
    // Advanced by the `asm!` loops (the host's loop takes copies).
    #[cfg_attr(not(armv7em), allow(unused_mut))]
    let (mut pw, mut pc) = (w as *const u8, col as *const u8);
    // SAFETY: `full` filter values.
    let end = unsafe { pw.add(k.full) };
    // Two groups per step with LDRD of two weight words: filter rows start
    // 4-byte aligned (the blob aligns the filter, `taps % 4 == 0`) and the
    // group count is even in every 3x3 and 1x1 conv of Mini-ResNet.
    #[cfg(armv7em)]
    if k.full.is_multiple_of(16) && (w as usize).is_multiple_of(4) && pw < end {
        // Four groups per step (every 3x3 and 1x1 conv of Mini-ResNet has
        // a multiple of 16 taps): 60 instructions per 64 MACs.
        // SAFETY: as the two-group loop below.
        dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; "2:", four_groups!(), "cmp {pw}, {end}", "blo 2b");
    }
    #[cfg(armv7em)]
    if k.full.is_multiple_of(8) && (w as usize).is_multiple_of(4) && pw < end {
        // 29 instructions per 32 MACs plus the loop's CMP/BLO.
        // SAFETY: reads `full` filter bytes from `w` (4-byte aligned) and
        // `4 * full` column halfwords from `col` (4-byte aligned), as the
        // portable loop does.
        dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; "2:", two_groups!(), "cmp {pw}, {end}", "blo 2b");
    }
    #[cfg(armv7em)]
    if pw < end {
        // The same loop as the portable one below, scheduled by hand: one
        // weight word, four LDRD of column pairs, 8 SMLAD; 17 instructions
        // per 16 MACs.
        // SAFETY: reads `full` filter bytes from `w` and `4 * full` column
        // halfwords from `col` (4-byte aligned), as the portable loop does.
        unsafe {
            core::arch::asm!(
                "2:",
                "ldr {w}, [{pw}], #4",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "sxtb16 {we}, {w}",
                "sxtb16 {w}, {w}, ror #8",
                "smlad {a0}, {we}, {x0}, {a0}",
                "smlad {a0}, {w}, {x1}, {a0}",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "smlad {a1}, {we}, {x0}, {a1}",
                "smlad {a1}, {w}, {x1}, {a1}",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "smlad {a2}, {we}, {x0}, {a2}",
                "smlad {a2}, {w}, {x1}, {a2}",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "smlad {a3}, {we}, {x0}, {a3}",
                "smlad {a3}, {w}, {x1}, {a3}",
                "cmp {pw}, {end}",
                "blo 2b",
                pw = inout(reg) pw,
                pc = inout(reg) pc,
                end = in(reg) end,
                a0 = inout(reg) a0,
                a1 = inout(reg) a1,
                a2 = inout(reg) a2,
                a3 = inout(reg) a3,
                w = out(reg) _,
                we = out(reg) _,
                x0 = out(reg) _,
                x1 = out(reg) _,
                options(nostack, readonly),
            );
        }
    }
    #[cfg(armv7em)]
    let _ = (pw, pc);
    #[cfg(not(armv7em))]
    {
        // SAFETY: `full` filter bytes from `pw`, their 4-pixel groups from `pc`.
        [a0, a1, a2, a3] = unsafe { dot_1x4_words(pw, pc, end, [a0, a1, a2, a3]) };
    }
    let tail = k.taps - k.full;
    for t in 0..tail {
        // SAFETY: tail taps of the row and of each pixel.
        unsafe {
            let wt = *w.add(k.full + t) as i32;
            let x = col.add(4 * k.full + t);
            a0 = a0.wrapping_add(wt * *x as i32);
            a1 = a1.wrapping_add(wt * *x.add(tail) as i32);
            a2 = a2.wrapping_add(wt * *x.add(2 * tail) as i32);
            a3 = a3.wrapping_add(wt * *x.add(3 * tail) as i32);
        }
    }
    [a0, a1, a2, a3]
}

/// [`dot_1x4`] for a row of `full` taps, `full` a non-zero multiple of 16,
/// `w` 4-byte aligned: 4 groups when `H4` (`full & 16`), 8 more when `H8`
/// (`full & 32`), then a 16-group loop (2 loop instructions per 256 MACs).
/// The heads are chosen per layer, not tested per channel.
///
/// # Safety
/// `w` holds `full` values (4-byte aligned); `col` is a 4-pixel block of
/// `full` taps; `H4 == (full & 16 != 0)`, `H8 == (full & 32 != 0)`.
#[inline(always)]
pub(super) unsafe fn dot_1x4_x16<const H4: bool, const H8: bool>(
    w: *const i8,
    col: *const i16,
    full: usize,
    acc: i32,
) -> [i32; 4] {
    debug_assert!(full > 0 && full.is_multiple_of(16) && (w as usize).is_multiple_of(4));
    debug_assert!(H4 == (full & 16 != 0) && H8 == (full & 32 != 0));
    let (mut a0, mut a1, mut a2, mut a3) = (acc, acc, acc, acc);
    // Advanced by the `asm!` loops (the host's loop takes copies).
    #[cfg_attr(not(armv7em), allow(unused_mut))]
    let (mut pw, mut pc) = (w as *const u8, col as *const u8);
    // SAFETY: `full` filter values.
    let end = unsafe { pw.add(full) };
    #[cfg(armv7em)]
    {
        if H4 {
            dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; four_groups!(), "@ {end}");
        }
        if H8 {
            dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; four_groups!(), four_groups!(), "@ {end}");
        }
        if full >= 64 {
            dot_1x4_asm!(
                pw, pc, end, a0, a1, a2, a3;
                "5:",
                four_groups!(),
                four_groups!(),
                four_groups!(),
                four_groups!(),
                "cmp {pw}, {end}",
                "blo 5b"
            );
        }
        let _ = (pw, pc, end);
    }
    #[cfg(not(armv7em))]
    {
        // SAFETY: `full` filter bytes from `pw`, their 4-pixel groups from `pc`.
        [a0, a1, a2, a3] = unsafe { dot_1x4_words(pw, pc, end, [a0, a1, a2, a3]) };
    }
    [a0, a1, a2, a3]
}
