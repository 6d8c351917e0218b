//! Fast `add_s8`: TFLM's ADD arithmetic with the two input rescalings looked
//! up in 256-entry tables (each is a function of one int8 value), and the
//! output requantization through [`ChannelRequant`]. Bit-identical to
//! [`AddParams::add_one`](crate::kernels::AddParams::add_one) by
//! construction: the tables hold exactly the reference's values.

use super::isa::smmlar;
#[cfg(armv7em)]
use super::requant::folded_requant;
use super::requant::{ChannelRequant, FoldedRequant};
use crate::kernels::AddParams;

/// Below this many elements the tables cost more than they save.
const TABLE_MIN_LEN: usize = 128;

/// The residual add. The caller has validated the parameters and that the
/// three slices have the same length.
pub(crate) fn add_s8_dsp(p: &AddParams, input1: &[i8], input2: &[i8], output: &mut [i8]) {
    debug_assert!(input1.len() == input2.len() && input1.len() == output.len());
    if output.len() < TABLE_MIN_LEN {
        for ((o, &a), &b) in output.iter_mut().zip(input1).zip(input2) {
            *o = p.add_one(a, b);
        }
    } else {
        add_s8_tables(p, input1, input2, output);
    }
}

/// `t[128 + v] = MBQM((v + offset) << left_shift, m, shift)` for every int8
/// `v`. With `left_shift <= 21` every argument `x` has `|x| < 2^29`, so:
/// a shift of 0 (the larger input scale's multiplier is exactly 0.5 = `(2^30,
/// 0)` in TFLM's ADD) is `SRDHM(x, m) = SMMLAR(2x, m, 0)` for any `m`, and a
/// negative shift with `m > 2^30` is [`FoldedRequant::scale_small`].
fn fill_table(
    t: &mut [i32; 256],
    s: &ChannelRequant,
    m: i32,
    shift: i32,
    offset: i32,
    left_shift: i32,
) {
    let small = (0..=21).contains(&left_shift);
    if small && shift == 0 {
        for (v, e) in (-128i32..).zip(t.iter_mut()) {
            *e = smmlar(((v + offset) << left_shift) << 1, m, 0);
        }
    } else if let (true, Some(u)) = (small, FoldedRequant::unsat(m, shift)) {
        for (v, e) in (-128i32..).zip(t.iter_mut()) {
            *e = u.scale_small((v + offset) << left_shift);
        }
    } else {
        for (v, e) in (-128i32..).zip(t.iter_mut()) {
            *e = s.scale((v + offset) << left_shift);
        }
    }
}

/// The table path of [`add_s8_dsp`], for any length.
pub(crate) fn add_s8_tables(p: &AddParams, input1: &[i8], input2: &[i8], output: &mut [i8]) {
    let mut t1 = [0i32; 256];
    let mut t2 = [0i32; 256];
    fill_input_tables(p, &mut t1, &mut t2);
    let out = ChannelRequant::new(
        p.output_multiplier,
        p.output_shift,
        p.output_offset,
        p.act_min,
        p.act_max,
    );
    if p.output_multiplier == i32::MIN {
        for ((o, &a), &b) in output.iter_mut().zip(input1).zip(input2) {
            let a = t1[(a as i32 + 128) as usize];
            let b = t2[(b as i32 + 128) as usize];
            *o = out.apply(a.wrapping_add(b));
        }
        return;
    }
    if let Some(f) = FoldedRequant::new(p.output_multiplier, p.output_shift, p.output_offset) {
        add_folded(
            &f,
            (&t1, &t2),
            (p.act_min, p.act_max),
            input1,
            input2,
            output,
        );
    } else {
        add_unfolded(&out, (&t1, &t2), input1, input2, output);
    }
}

/// The two input rescalings of `p` as tables `t1`, `t2` (see
/// [`fill_table`]).
#[inline(always)]
fn fill_input_tables(p: &AddParams, t1: &mut [i32; 256], t2: &mut [i32; 256]) {
    let s1 = ChannelRequant::new(p.input1_multiplier, p.input1_shift, 0, i8::MIN, i8::MAX);
    let s2 = ChannelRequant::new(p.input2_multiplier, p.input2_shift, 0, i8::MIN, i8::MAX);
    fill_table(
        t1,
        &s1,
        p.input1_multiplier,
        p.input1_shift,
        p.input1_offset,
        p.left_shift,
    );
    fill_table(
        t2,
        &s2,
        p.input2_multiplier,
        p.input2_shift,
        p.input2_offset,
        p.left_shift,
    );
}

/// The table sums requantized by the folded output requantization `f`
/// and clamped to `min..=max`.
#[inline(always)]
fn add_folded(
    f: &FoldedRequant,
    (t1, t2): (&[i32; 256], &[i32; 256]),
    (min, max): (i8, i8),
    input1: &[i8],
    input2: &[i8],
    output: &mut [i8],
) {
    // Tables indexed by the signed value itself: `t[128 + v]`.
    let (c1, c2) = (t1.as_ptr().wrapping_add(128), t2.as_ptr().wrapping_add(128));
    let (min, max) = (min as i32, max as i32);
    let n = output.len();
    let (x, y, o) = (input1.as_ptr(), input2.as_ptr(), output.as_mut_ptr());
    let mut i = 0;
    // SAFETY: `i < n`, the length of all three slices; `128 + v` is in
    // `0..256` for every int8 `v`.
    unsafe {
        #[cfg(armv7em)]
        if min == -128 && max == 127 && n >= 2 {
            i = add_pairs_asm(f, (c1, c2), x, y, o, n);
        }
        if max == 127 {
            while i < n {
                let a = *c1.offset(*x.add(i) as isize);
                let b = *c2.offset(*y.add(i) as isize);
                *o.add(i) = f.apply_max127(a.wrapping_add(b), min);
                i += 1;
            }
        } else {
            while i < n {
                let a = *c1.offset(*x.add(i) as isize);
                let b = *c2.offset(*y.add(i) as isize);
                *o.add(i) = f.apply(a.wrapping_add(b), min, max);
                i += 1;
            }
        }
    }
}

/// [`add_folded`] without a clamp beyond int8 saturation, by hand, two
/// elements per step, 12 instructions per element: both table lookups,
/// their sum, the folded requantization. Returns the elements done
/// (`n & !1`).
///
/// # Safety
///
/// `x` and `y` are readable and `o` writable for `n` bytes; `c1` and `c2`
/// point at entry 128 of 256-entry tables.
#[cfg(armv7em)]
#[inline(always)]
unsafe fn add_pairs_asm(
    f: &FoldedRequant,
    (c1, c2): (*const i32, *const i32),
    x: *const i8,
    y: *const i8,
    o: *mut i8,
    n: usize,
) -> usize {
    macro_rules! add_element {
        () => {
            concat!(
                "ldrsb {a}, [{x}], #1\n",
                "ldrsb {b}, [{y}], #1\n",
                "ldr {a}, [{t1}, {a}, lsl #2]\n",
                "ldr {b}, [{t2}, {b}, lsl #2]\n",
                "add {a}, {a}, {b}\n",
                folded_requant!("a", "b"),
                "strb {a}, [{o}], #1\n",
            )
        };
    }
    let (m, c, e) = f.parts();
    let (mut xs, mut ys, mut os) = (x, y, o);
    // SAFETY: `n & !1 <= n` bytes past `o` are within its buffer.
    let end = unsafe { o.add(n & !1) };
    // SAFETY: reads `n & !1` bytes of each input, writes as many outputs;
    // table indices are int8 values, `c1`/`c2` point at entry 128 of 256.
    unsafe {
        core::arch::asm!(
            "2:",
            add_element!(),
            add_element!(),
            "cmp {o}, {end}",
            "blo 2b",
            x = inout(reg) xs,
            y = inout(reg) ys,
            o = inout(reg) os,
            end = in(reg) end,
            t1 = in(reg) c1,
            t2 = in(reg) c2,
            c = in(reg) c,
            m = in(reg) m,
            e = in(reg) e,
            a = out(reg) _,
            b = out(reg) _,
            options(nostack),
        );
    }
    let _ = (xs, ys, os);
    n & !1
}

/// The table sums requantized by the general output requantization `out`
/// (whose multiplier is not `i32::MIN`: the caller took that case).
#[inline(always)]
fn add_unfolded(
    out: &ChannelRequant,
    (t1, t2): (&[i32; 256], &[i32; 256]),
    input1: &[i8],
    input2: &[i8],
    output: &mut [i8],
) {
    // Tables indexed by the signed value itself: `t[128 + v]`.
    let (c1, c2) = (t1.as_ptr().wrapping_add(128), t2.as_ptr().wrapping_add(128));
    if out.max_is_127() {
        for ((o, &a), &b) in output.iter_mut().zip(input1).zip(input2) {
            // SAFETY: `128 + v` is in `0..256` for every int8 `v`.
            let (a, b) = unsafe { (*c1.offset(a as isize), *c2.offset(b as isize)) };
            *o = out.apply_no_min_max127(a.wrapping_add(b));
        }
    } else {
        for ((o, &a), &b) in output.iter_mut().zip(input1).zip(input2) {
            // SAFETY: as above.
            let (a, b) = unsafe { (*c1.offset(a as isize), *c2.offset(b as isize)) };
            *o = out.apply_no_min(a.wrapping_add(b));
        }
    }
}
