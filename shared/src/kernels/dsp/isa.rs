//! The Cortex-M4/M7 DSP instructions the fast kernels use, twice: as
//! `core::arch::asm!` on `armv7em` targets (set by `shared/build.rs`) and as
//! a plain-Rust emulation of the same instruction everywhere else, so host
//! tests run the fast kernels' packing, tiling and tails bit for bit.
//!
//! Lanes: a `u32` holds two signed 16-bit halfwords (bottom = bits 0..16) or
//! four signed bytes (byte 0 = bits 0..8).
//!
//! Flags: `options(preserves_flags)` promises the compiler that the block
//! leaves every flag as it was, the sticky Q flag and the GE bits included.
//! It is given only to instructions that write no APSR bit (SXTB16,
//! SMMLAR); SMLAD, SSAT and QADD may set Q, SADD16 and SSUB8 set GE.

#[cfg(armv7em)]
use core::arch::asm;

/// `SMLAD`: `acc + x.lo * y.lo + x.hi * y.hi` over signed halfwords, the
/// sum wrapping modulo 2^32 (the hardware wraps too, and sets the Q flag).
#[inline(always)]
pub fn smlad(x: u32, y: u32, acc: i32) -> i32 {
    #[cfg(armv7em)]
    {
        let r: i32;
        // SAFETY: register-only arithmetic, no memory. SMLAD sets the Q
        // flag on overflow, so no `preserves_flags` (it covers Q too).
        unsafe {
            asm!("smlad {r}, {x}, {y}, {a}", r = lateout(reg) r, x = in(reg) x, y = in(reg) y, a = in(reg) acc,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        let p0 = (x as i16 as i32) * (y as i16 as i32);
        let p1 = ((x >> 16) as i16 as i32) * ((y >> 16) as i16 as i32);
        acc.wrapping_add(p0).wrapping_add(p1)
    }
}

/// `SXTB16`: sign-extends bytes 0 and 2 of `x` into the two halfwords.
#[inline(always)]
pub fn sxtb16(x: u32) -> u32 {
    #[cfg(armv7em)]
    {
        let r: u32;
        // SAFETY: register-only arithmetic, no memory. `preserves_flags`
        // holds: SXTB16 writes no APSR bit (ARMv7-M ARM pseudocode: no N, Z,
        // C, V, Q or GE update).
        unsafe {
            asm!("sxtb16 {r}, {x}", r = lateout(reg) r, x = in(reg) x,
                 options(pure, nomem, nostack, preserves_flags));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        let lo = (x as u8 as i8 as i16 as u16) as u32;
        let hi = ((x >> 16) as u8 as i8 as i16 as u16) as u32;
        lo | (hi << 16)
    }
}

/// `SXTB16 ..., ROR #8`: sign-extends bytes 1 and 3 of `x` into the two halfwords.
#[inline(always)]
pub fn sxtb16_ror8(x: u32) -> u32 {
    #[cfg(armv7em)]
    {
        let r: u32;
        // SAFETY: register-only arithmetic, no memory. `preserves_flags`
        // holds: SXTB16 writes no flags, with or without the rotation.
        unsafe {
            asm!("sxtb16 {r}, {x}, ror #8", r = lateout(reg) r, x = in(reg) x,
                 options(pure, nomem, nostack, preserves_flags));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        sxtb16(x.rotate_right(8))
    }
}

/// `SADD16`: halfword-wise wrapping addition.
#[inline(always)]
pub fn sadd16(x: u32, y: u32) -> u32 {
    #[cfg(armv7em)]
    {
        let r: u32;
        // SAFETY: register-only arithmetic; SADD16 sets only the GE flags, which no Rust code reads.
        unsafe {
            asm!("sadd16 {r}, {x}, {y}", r = lateout(reg) r, x = in(reg) x, y = in(reg) y,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        let lo = (x as u16).wrapping_add(y as u16) as u32;
        let hi = ((x >> 16) as u16).wrapping_add((y >> 16) as u16) as u32;
        lo | (hi << 16)
    }
}

/// Host emulation of a byte-wise SIMD instruction: `f` on each of the four
/// signed byte lanes of `x` and `y`.
#[cfg(not(armv7em))]
fn bytewise(x: u32, y: u32, f: impl Fn(i8, i8) -> i8) -> u32 {
    (0..4).fold(0, |r, lane| {
        let (a, b) = ((x >> (8 * lane)) as u8 as i8, (y >> (8 * lane)) as u8 as i8);
        r | ((f(a, b) as u8 as u32) << (8 * lane))
    })
}

/// `SSUB8` then `SEL`: the byte-wise signed maximum of `x` and `y`.
#[inline(always)]
pub fn smax8(x: u32, y: u32) -> u32 {
    #[cfg(armv7em)]
    {
        let r: u32;
        // SAFETY: register-only arithmetic; the GE flags SSUB8 sets are consumed by SEL in the same block.
        unsafe {
            asm!("ssub8 {r}, {x}, {y}", "sel {r}, {x}, {y}", r = out(reg) r, x = in(reg) x, y = in(reg) y,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        bytewise(x, y, i8::max)
    }
}

/// `SSUB8` then `SEL`: the byte-wise signed minimum of `x` and `y`.
#[inline(always)]
pub fn smin8(x: u32, y: u32) -> u32 {
    #[cfg(armv7em)]
    {
        let r: u32;
        // SAFETY: register-only arithmetic; the GE flags SSUB8 sets are consumed by SEL in the same block.
        unsafe {
            asm!("ssub8 {r}, {x}, {y}", "sel {r}, {y}, {x}", r = out(reg) r, x = in(reg) x, y = in(reg) y,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        bytewise(x, y, i8::min)
    }
}

/// `SSAT #8`: `x` saturated to `-128..=127`.
#[inline(always)]
pub fn ssat8(x: i32) -> i32 {
    #[cfg(armv7em)]
    {
        let r: i32;
        // SAFETY: register-only arithmetic, no memory. SSAT sets the Q flag
        // when it saturates, so no `preserves_flags`.
        unsafe {
            asm!("ssat {r}, #8, {x}", r = lateout(reg) r, x = in(reg) x,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        x.clamp(-128, 127)
    }
}

/// `SSAT #10`: `x` saturated to `-512..=511`.
#[inline(always)]
pub fn ssat10(x: i32) -> i32 {
    #[cfg(armv7em)]
    {
        let r: i32;
        // SAFETY: register-only arithmetic, no memory. SSAT sets the Q flag
        // when it saturates, so no `preserves_flags`.
        unsafe {
            asm!("ssat {r}, #10, {x}", r = lateout(reg) r, x = in(reg) x,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        x.clamp(-512, 511)
    }
}

/// `QADD`: `x + y` saturated to `i32`.
#[inline(always)]
pub fn qadd(x: i32, y: i32) -> i32 {
    #[cfg(armv7em)]
    {
        let r: i32;
        // SAFETY: register-only arithmetic, no memory. QADD sets the Q flag
        // when it saturates, so no `preserves_flags`.
        unsafe {
            asm!("qadd {r}, {x}, {y}", r = lateout(reg) r, x = in(reg) x, y = in(reg) y,
                 options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        x.saturating_add(y)
    }
}

/// `SMMLAR`: the top word of `(acc << 32) + x * y + 2^31`, modulo 2^64.
#[inline(always)]
pub fn smmlar(x: i32, y: i32, acc: i32) -> i32 {
    #[cfg(armv7em)]
    {
        let r: i32;
        // SAFETY: register-only arithmetic, no memory. `preserves_flags`
        // holds: SMMLAR writes no APSR bit, Q included (ARMv7-M ARM
        // pseudocode: the 64-bit sum wraps, nothing saturates).
        unsafe {
            asm!("smmlar {r}, {x}, {y}, {a}", r = lateout(reg) r, x = in(reg) x, y = in(reg) y, a = in(reg) acc,
                 options(pure, nomem, nostack, preserves_flags));
        }
        r
    }
    #[cfg(not(armv7em))]
    {
        let v = ((acc as i64) << 32)
            .wrapping_add(x as i64 * y as i64)
            .wrapping_add(1 << 31);
        (v >> 32) as i32
    }
}

/// A little-endian `u32` from 4 bytes at `p` (any alignment; `LDR` on the M7).
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
pub unsafe fn load_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes.
    u32::from_le(unsafe { core::ptr::read_unaligned(p as *const u32) })
}

/// Stores `v` little-endian at `p` (any alignment).
///
/// # Safety
/// `p..p + 4` must be writable.
#[inline(always)]
pub unsafe fn store_u32(p: *mut u8, v: u32) {
    // SAFETY: the caller guarantees 4 writable bytes.
    unsafe { core::ptr::write_unaligned(p as *mut u32, v.to_le()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack16(lo: i16, hi: i16) -> u32 {
        (lo as u16 as u32) | ((hi as u16 as u32) << 16)
    }

    fn pack8(b: [i8; 4]) -> u32 {
        u32::from_le_bytes(b.map(|v| v as u8))
    }

    #[test]
    fn smlad_by_hand() {
        assert_eq!(smlad(pack16(3, -4), pack16(5, 6), 10), 10 + 15 - 24);
        assert_eq!(
            smlad(pack16(-32768, -32768), pack16(-32768, -32768), 0),
            i32::MIN // 2^31 wraps, as the hardware's result does
        );
        assert_eq!(smlad(pack16(1, 0), pack16(1, 0), i32::MAX), i32::MIN);
        assert_eq!(
            smlad(pack16(-128, 127), pack16(127, -128), -7),
            -7 - 2 * 16256
        );
    }

    #[test]
    fn sxtb16_by_hand() {
        let x = pack8([-1, 2, -128, 127]);
        assert_eq!(sxtb16(x), pack16(-1, -128));
        assert_eq!(sxtb16_ror8(x), pack16(2, 127));
        assert_eq!(sxtb16(pack8([5, -5, 0, 1])), pack16(5, 0));
    }

    #[test]
    fn sadd16_wraps_per_lane() {
        assert_eq!(
            sadd16(pack16(-255, 300), pack16(128, -1)),
            pack16(-127, 299)
        );
        assert_eq!(
            sadd16(pack16(i16::MAX, -1), pack16(1, 1)),
            pack16(i16::MIN, 0)
        );
    }

    #[test]
    fn smax8_and_ssat8_by_hand() {
        assert_eq!(
            smax8(pack8([-128, 5, 127, -1]), pack8([-127, 4, -128, -2])),
            pack8([-127, 5, 127, -1])
        );
        assert_eq!(
            smin8(pack8([-128, 5, 127, -1]), pack8([-127, 4, -128, -2])),
            pack8([-128, 4, -128, -2])
        );
        assert_eq!((ssat8(300), ssat8(-300), ssat8(-5)), (127, -128, -5));
        assert_eq!((ssat10(600), ssat10(-600), ssat10(-511)), (511, -512, -511));
        assert_eq!(
            (qadd(i32::MAX, 1), qadd(i32::MIN, -1), qadd(3, -5)),
            (i32::MAX, i32::MIN, -2)
        );
    }

    #[test]
    fn smmlar_by_hand() {
        // (1 << 32) * 2 + 2^31 + 2^31 → top word 3.
        assert_eq!(smmlar(1 << 16, 1 << 15, 2), 3);
        assert_eq!(smmlar(1 << 16, (1 << 15) - 1, 2), 2);
        assert_eq!(smmlar(-1, 1, 0), 0);
        assert_eq!(smmlar(i32::MIN, i32::MIN, 0), 1 << 30);
        assert_eq!(smmlar(i32::MIN, i32::MAX, -5), -(1 << 30) - 5 + 1);
    }

    #[test]
    fn loads_are_little_endian_and_unaligned() {
        let b = [0u8, 1, 2, 3, 4, 5];
        // SAFETY: 4 bytes from index 1 are in the array.
        assert_eq!(unsafe { load_u32(b.as_ptr().add(1)) }, 0x0403_0201);
        let mut o = [0u8; 6];
        // SAFETY: 4 bytes from index 2 are in the array.
        unsafe { store_u32(o.as_mut_ptr().add(2), 0xAABB_CCDD) };
        assert_eq!(o, [0, 0, 0xDD, 0xCC, 0xBB, 0xAA]);
    }
}
