//! Camera frame → 32x32x3 int8 network input, in fixed point.
//!
//! 1. Center-crop the frame to a square of side `s = min(width, height)`.
//! 2. Area-average the square down to 32x32: output pixel `(oy, ox)` is the
//!    exact mean of the source area it covers, fractional source pixels
//!    weighted by their covered fraction, rounded to nearest (ties up). In
//!    units of 1/32 source pixel, source pixel `i` spans `[32 i, 32 i + 32)`
//!    and output pixel `o` spans `[o s, o s + s)`, so every weight is an
//!    integer and the sum of weights is `s²`.
//! 3. RGB565 channels are first widened to 8 bits by bit replication
//!    (`r8 = r5 << 3 | r5 >> 2`, `g8 = g6 << 2 | g6 >> 4`).
//! 4. The network input is `pixel - 128` as int8, HWC order (R, G, B).
//!
//! **Quantization of the input:** scale 1/128, zero point 0, i.e. the float
//! model sees `(pixel - 128) / 128` in `[-1, 127/128]`. Zero padding in int8
//! is zero padding in float.

use crate::error::Error;

/// Side of the square network input.
pub const INPUT_SIZE: usize = 32;
/// Channels of the network input (R, G, B).
pub const INPUT_CHANNELS: usize = 3;
/// Elements of the network input.
pub const INPUT_LEN: usize = INPUT_SIZE * INPUT_SIZE * INPUT_CHANNELS;
/// Real value of one int8 step of the input: `real = q / 128`.
pub const INPUT_SCALE_RECIPROCAL: u32 = 128;
/// Largest supported crop side (keeps the u32 sums exact).
pub const MAX_CROP: usize = 4096;

/// Pixel format of a camera frame. Frames are tightly packed, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PixelFormat {
    /// 16-bit RGB565, low byte first.
    Rgb565Le,
    /// 16-bit RGB565, high byte first (the order an OV7670 sends on the bus).
    Rgb565Be,
    /// 24-bit R, G, B bytes.
    Rgb888,
}

impl PixelFormat {
    /// Bytes per pixel.
    pub const fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb565Le | PixelFormat::Rgb565Be => 2,
            PixelFormat::Rgb888 => 3,
        }
    }

    /// The 8-bit R, G, B of the pixel starting at `px` (which holds at least
    /// [`bytes_per_pixel`](Self::bytes_per_pixel) bytes).
    #[inline(always)]
    fn rgb(self, px: &[u8]) -> [u32; 3] {
        let v = match self {
            PixelFormat::Rgb888 => return [px[0] as u32, px[1] as u32, px[2] as u32],
            PixelFormat::Rgb565Le => u16::from_le_bytes([px[0], px[1]]),
            PixelFormat::Rgb565Be => u16::from_be_bytes([px[0], px[1]]),
        };
        rgb565_to_rgb888(v)
    }
}

/// Widens an RGB565 value to 8 bits per channel by bit replication.
#[inline(always)]
pub const fn rgb565_to_rgb888(v: u16) -> [u32; 3] {
    let r = (v >> 11) as u32 & 0x1f;
    let g = (v >> 5) as u32 & 0x3f;
    let b = v as u32 & 0x1f;
    [
        (r << 3) | (r >> 2),
        (g << 2) | (g >> 4),
        (b << 3) | (b >> 2),
    ]
}

/// A borrowed camera frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Pixel bytes, `width * height * format.bytes_per_pixel()` of them.
    pub data: &'a [u8],
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Pixel format.
    pub format: PixelFormat,
}

/// Per-axis resampling: for output index `o`, the first source index and the
/// weights (in 1/32 pixel) of the source pixels it covers. At most
/// `ceil(s / 32) + 1` source pixels contribute to one output.
#[inline(always)]
fn axis_span(o: usize, s: usize) -> (usize, usize) {
    let lo = o * s; // in 1/32 source pixels
    let hi = lo + s;
    (lo / INPUT_SIZE, hi.div_ceil(INPUT_SIZE))
}

#[inline(always)]
fn axis_weight(i: usize, o: usize, s: usize) -> u32 {
    let lo = (o * s).max(i * INPUT_SIZE);
    let hi = ((o + 1) * s).min((i + 1) * INPUT_SIZE);
    (hi - lo) as u32
}

/// Converts `frame` into the network input (see the module docs).
///
/// Errors: [`Error::FrameSize`] if the shorter side is under 32 or over
/// [`MAX_CROP`] pixels; [`Error::BufferLength`] (buffer `"frame"`) if
/// `frame.data` is not exactly `width * height * bytes_per_pixel` long.
pub fn preprocess(frame: &Frame<'_>, out: &mut [i8; INPUT_LEN]) -> Result<(), Error> {
    let s = frame.width.min(frame.height);
    if !(INPUT_SIZE..=MAX_CROP).contains(&s) {
        return Err(Error::FrameSize {
            width: frame.width,
            height: frame.height,
        });
    }
    let bpp = frame.format.bytes_per_pixel();
    let expected = frame
        .width
        .checked_mul(frame.height)
        .and_then(|n| n.checked_mul(bpp))
        .ok_or(Error::FrameSize {
            width: frame.width,
            height: frame.height,
        })?;
    crate::error::check_len("frame", expected, frame.data.len())?;

    let x_off = (frame.width - s) / 2;
    let y_off = (frame.height - s) / 2;
    let total = (s * s) as u32;
    for oy in 0..INPUT_SIZE {
        let (y0, y1) = axis_span(oy, s);
        for ox in 0..INPUT_SIZE {
            let (x0, x1) = axis_span(ox, s);
            let mut sum = [0u32; 3];
            for sy in y0..y1 {
                let wy = axis_weight(sy, oy, s);
                let row = (y_off + sy) * frame.width + x_off;
                for sx in x0..x1 {
                    let w = wy * axis_weight(sx, ox, s);
                    let at = (row + sx) * bpp;
                    let rgb = frame.format.rgb(&frame.data[at..at + bpp]);
                    for (acc, v) in sum.iter_mut().zip(rgb) {
                        *acc += w * v;
                    }
                }
            }
            let dst = &mut out[(oy * INPUT_SIZE + ox) * INPUT_CHANNELS..][..INPUT_CHANNELS];
            for (d, acc) in dst.iter_mut().zip(sum) {
                let mean = (acc + total / 2) / total; // 0..=255
                *d = (mean as i32 - 128) as i8;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::Rng;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// Definition by supersampling: blow every source pixel of the crop up
    /// into 32x32 sub-pixels; output pixel (oy, ox) is the mean of the
    /// s x s block of sub-pixels at (oy*s, ox*s), rounded half up.
    fn ref_preprocess(rgb: &[[u8; 3]], width: usize, height: usize) -> Vec<i8> {
        let s = width.min(height);
        let (xo, yo) = ((width - s) / 2, (height - s) / 2);
        let mut out = Vec::new();
        for oy in 0..32 {
            for ox in 0..32 {
                let mut sum = [0u64; 3];
                for sy in oy * s..(oy + 1) * s {
                    for sx in ox * s..(ox + 1) * s {
                        let p = rgb[(yo + sy / 32) * width + xo + sx / 32];
                        for c in 0..3 {
                            sum[c] += p[c] as u64;
                        }
                    }
                }
                let n = (s * s) as u64;
                for c in sum {
                    let mean = (2 * c + n) / (2 * n); // floor(c / n + 1/2)
                    out.push((mean as i32 - 128) as i8);
                }
            }
        }
        out
    }

    fn frame_888(rgb: &[[u8; 3]]) -> Vec<u8> {
        rgb.iter().flatten().copied().collect()
    }

    fn run(
        data: &[u8],
        width: usize,
        height: usize,
        format: PixelFormat,
    ) -> Result<Vec<i8>, Error> {
        let mut out = [0i8; INPUT_LEN];
        preprocess(
            &Frame {
                data,
                width,
                height,
                format,
            },
            &mut out,
        )?;
        Ok(out.to_vec())
    }

    #[test]
    fn rgb565_bit_replication() {
        assert_eq!(rgb565_to_rgb888(0xF800), [255, 0, 0]);
        assert_eq!(rgb565_to_rgb888(0x07E0), [0, 255, 0]);
        assert_eq!(rgb565_to_rgb888(0x001F), [0, 0, 255]);
        assert_eq!(rgb565_to_rgb888(0xFFFF), [255, 255, 255]);
        assert_eq!(rgb565_to_rgb888(0x0000), [0, 0, 0]);
        // r5 = 0b10000 → 0b10000_100 = 132; g6 = 0b100000 → 0b100000_10 = 130.
        assert_eq!(rgb565_to_rgb888(0x8410), [132, 130, 132]);
    }

    #[test]
    fn identity_at_32x32() {
        let mut rng = Rng(1);
        let rgb: Vec<[u8; 3]> = (0..32 * 32)
            .map(|_| {
                [
                    rng.next_u64() as u8,
                    rng.next_u64() as u8,
                    rng.next_u64() as u8,
                ]
            })
            .collect();
        let out = run(&frame_888(&rgb), 32, 32, PixelFormat::Rgb888).unwrap();
        let want: Vec<i8> = rgb
            .iter()
            .flatten()
            .map(|&v| (v as i32 - 128) as i8)
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn box_average_at_64x64_and_crop() {
        // 96x64 frame: the 64x64 center crop starts at x = 16. Each output is
        // the mean of a 2x2 block; choose blocks with means 10.5 → 11 (tie up).
        let (w, h) = (96, 64);
        let mut rgb = vec![[255u8, 255, 255]; w * h];
        for y in 0..h {
            for x in 16..80 {
                let v = if (x + y) % 2 == 0 { 10 } else { 11 };
                rgb[y * w + x] = [v, 0, 255];
            }
        }
        let out = run(&frame_888(&rgb), w, h, PixelFormat::Rgb888).unwrap();
        for px in out.chunks(3) {
            assert_eq!(px, [-117, -128, 127]); // 11 - 128
        }
    }

    #[test]
    fn rgb565_byte_orders_agree() {
        let mut rng = Rng(2);
        let (w, h) = (160, 120);
        let px: Vec<u16> = (0..w * h).map(|_| rng.next_u64() as u16).collect();
        let le: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
        let be: Vec<u8> = px.iter().flat_map(|v| v.to_be_bytes()).collect();
        let rgb: Vec<[u8; 3]> = px
            .iter()
            .map(|&v| rgb565_to_rgb888(v).map(|c| c as u8))
            .collect();
        let want = ref_preprocess(&rgb, w, h);
        assert_eq!(run(&le, w, h, PixelFormat::Rgb565Le).unwrap(), want);
        assert_eq!(run(&be, w, h, PixelFormat::Rgb565Be).unwrap(), want);
    }

    #[test]
    fn camera_sizes_match_reference() {
        let mut rng = Rng(3);
        for &(w, h) in &[
            (160, 120),
            (320, 240),
            (33, 32),
            (32, 100),
            (176, 144),
            (45, 47),
        ] {
            let rgb: Vec<[u8; 3]> = (0..w * h)
                .map(|_| {
                    [
                        rng.next_u64() as u8,
                        rng.next_u64() as u8,
                        rng.next_u64() as u8,
                    ]
                })
                .collect();
            assert_eq!(
                run(&frame_888(&rgb), w, h, PixelFormat::Rgb888).unwrap(),
                ref_preprocess(&rgb, w, h),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn extremes() {
        assert_eq!(
            run(&vec![0u8; 40 * 40 * 3], 40, 40, PixelFormat::Rgb888).unwrap(),
            vec![-128; INPUT_LEN]
        );
        assert_eq!(
            run(&vec![255u8; 40 * 40 * 3], 40, 40, PixelFormat::Rgb888).unwrap(),
            vec![127; INPUT_LEN]
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(
            run(&[0; 31 * 40 * 3], 40, 31, PixelFormat::Rgb888),
            Err(Error::FrameSize {
                width: 40,
                height: 31
            })
        );
        assert_eq!(
            run(&[], 0, 0, PixelFormat::Rgb565Le),
            Err(Error::FrameSize {
                width: 0,
                height: 0
            })
        );
        assert_eq!(
            run(&[0; 100], 32, 32, PixelFormat::Rgb565Be),
            Err(Error::BufferLength {
                buffer: "frame",
                expected: 2048,
                actual: 100
            })
        );
        assert_eq!(
            run(&[0; 5000], 5000, usize::MAX / 2, PixelFormat::Rgb888),
            Err(Error::FrameSize {
                width: 5000,
                height: usize::MAX / 2
            })
        );
        assert_eq!(
            run(&[0; 4], 4097, 4097, PixelFormat::Rgb888),
            Err(Error::FrameSize {
                width: 4097,
                height: 4097
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn matches_reference(seed in any::<u64>(), w in 32usize..=70, h in 32usize..=70, fmt in 0u8..3) {
            let mut rng = Rng(seed);
            let rgb: Vec<[u8; 3]> = (0..w * h).map(|_| [rng.next_u64() as u8, rng.next_u64() as u8, rng.next_u64() as u8]).collect();
            let (data, rgb) = match fmt {
                0 => (frame_888(&rgb), rgb),
                _ => {
                    let px: Vec<u16> = rgb.iter().map(|p| u16::from_le_bytes([p[0], p[1]])).collect();
                    let bytes: Vec<u8> = px.iter().flat_map(|v| if fmt == 1 { v.to_le_bytes() } else { v.to_be_bytes() }).collect();
                    (bytes, px.iter().map(|&v| rgb565_to_rgb888(v).map(|c| c as u8)).collect())
                }
            };
            let format = [PixelFormat::Rgb888, PixelFormat::Rgb565Le, PixelFormat::Rgb565Be][fmt as usize];
            prop_assert_eq!(run(&data, w, h, format).unwrap(), ref_preprocess(&rgb, w, h));
        }
    }
}
