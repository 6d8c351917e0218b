//! Deterministic batches: shuffling, random crop (4-pixel padding) and
//! horizontal flip, and the conversion of u8 HWC images to the float NCHW
//! input `(pixel - 128) / 128`.
//!
//! Every random choice is a pure function of `(seed, epoch, image index)`,
//! so an epoch is reproducible on its own: resuming at an epoch boundary
//! gives the same batches as an uninterrupted run.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::{Dataset, IMAGE_BYTES};

/// Side of the square images.
const SIZE: usize = 32;
/// Padding of the random crop.
pub const CROP_PAD: usize = 4;

/// SplitMix64 finalizer: a well-mixed hash of a 64-bit value.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order in which epoch `epoch` visits `n` images (Fisher–Yates).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = mix(seed ^ mix(epoch as u64 ^ 0x5EED));
    for i in (1..n).rev() {
        state = mix(state);
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Augmentation of one image: crop offsets in `0..=2*CROP_PAD` and a flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aug {
    /// Vertical crop offset into the padded image.
    pub dy: usize,
    /// Horizontal crop offset into the padded image.
    pub dx: usize,
    /// Mirror left–right.
    pub flip: bool,
}

impl Aug {
    /// No augmentation (evaluation).
    pub const NONE: Aug = Aug {
        dy: CROP_PAD,
        dx: CROP_PAD,
        flip: false,
    };

    /// The augmentation of image `index` in epoch `epoch`.
    pub fn draw(seed: u64, epoch: usize, index: usize) -> Aug {
        let h = mix(mix(seed ^ 0xA116) ^ mix((epoch as u64) << 32 | index as u64));
        let span = 2 * CROP_PAD as u64 + 1;
        Aug {
            dy: (h % span) as usize,
            dx: ((h / span) % span) as usize,
            flip: (h >> 40) & 1 == 1,
        }
    }
}

/// Writes one HWC u8 image as CHW floats `(p - 128) / 128` into `out`
/// (3*32*32 values), applying `aug`. Pixels cropped in from the padding are
/// 0.0, i.e. pixel value 128, the same as the network's zero padding.
pub fn write_chw(img: &[u8], aug: Aug, out: &mut [f32]) {
    debug_assert_eq!(img.len(), IMAGE_BYTES);
    for y in 0..SIZE {
        let sy = (y + aug.dy).wrapping_sub(CROP_PAD);
        for x in 0..SIZE {
            let xx = if aug.flip { SIZE - 1 - x } else { x };
            let sx = (xx + aug.dx).wrapping_sub(CROP_PAD);
            for c in 0..3 {
                out[c * SIZE * SIZE + y * SIZE + x] = if sy < SIZE && sx < SIZE {
                    (img[(sy * SIZE + sx) * 3 + c] as f32 - 128.0) / 128.0
                } else {
                    0.0
                };
            }
        }
    }
}

/// A batch: images `(n, 3, 32, 32)` f32 and labels `(n,)` u32.
pub fn batch(
    ds: &Dataset,
    indices: &[usize],
    augment: Option<(u64, usize)>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let per = 3 * SIZE * SIZE;
    let mut xs = vec![0f32; indices.len() * per];
    let mut ys = Vec::with_capacity(indices.len());
    for (k, &i) in indices.iter().enumerate() {
        let aug = match augment {
            Some((seed, epoch)) => Aug::draw(seed, epoch, i),
            None => Aug::NONE,
        };
        write_chw(ds.image(i), aug, &mut xs[k * per..(k + 1) * per]);
        ys.push(ds.labels[i] as u32);
    }
    let x = Tensor::from_vec(xs, (indices.len(), 3, SIZE, SIZE), device)?;
    let y = Tensor::from_vec(ys, indices.len(), device)?;
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(1000, 7, 3);
        assert_eq!(a, epoch_order(1000, 7, 3));
        assert_ne!(a, epoch_order(1000, 7, 4));
        assert_ne!(a, epoch_order(1000, 8, 3));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn augmentation_is_deterministic_and_covers_the_range() {
        assert_eq!(Aug::draw(1, 2, 3), Aug::draw(1, 2, 3));
        let draws: Vec<Aug> = (0..2000).map(|i| Aug::draw(42, 0, i)).collect();
        for v in 0..=2 * CROP_PAD {
            assert!(draws.iter().any(|a| a.dx == v) && draws.iter().any(|a| a.dy == v));
        }
        let flips = draws.iter().filter(|a| a.flip).count();
        assert!((800..1200).contains(&flips), "{flips}");
    }

    #[test]
    fn crop_and_flip_move_pixels() {
        let mut img = vec![128u8; IMAGE_BYTES];
        img[(5 * 32 + 7) * 3] = 255; // R of pixel (y=5, x=7)
        let mut out = vec![0f32; 3 * 32 * 32];
        write_chw(&img, Aug::NONE, &mut out);
        assert_eq!(out[5 * 32 + 7], 127.0 / 128.0);
        // Crop offset dy=dx=6: the image moves up-left by 2.
        write_chw(
            &img,
            Aug {
                dy: 6,
                dx: 6,
                flip: false,
            },
            &mut out,
        );
        assert_eq!(out[3 * 32 + 5], 127.0 / 128.0);
        // Flip: x=7 lands at 31-7=24.
        write_chw(
            &img,
            Aug {
                flip: true,
                ..Aug::NONE
            },
            &mut out,
        );
        assert_eq!(out[5 * 32 + 24], 127.0 / 128.0);
        // Shifted in from the padding: exact zeros.
        let mut ones = vec![255u8; IMAGE_BYTES];
        ones[0] = 0;
        write_chw(
            &ones,
            Aug {
                dy: 0,
                dx: 0,
                flip: false,
            },
            &mut out,
        );
        assert_eq!(out[0], 0.0);
        assert_eq!(out[4 * 32 + 4], -1.0); // the pixel with value 0
    }
}
