//! Training augmentations that prepare the network for the camera path.
//!
//! On the board a frame goes through the OV7670 (RGB565, sensor noise,
//! focus and exposure that vary) and [`shared::preprocess`] (a centre crop,
//! area-averaged to 32x32). CIFAR-10's photos are sharper, better exposed and
//! framed tighter. [`CameraAug`] draws, per image:
//!
//! 1. **geometry:** the random crop (±[`CROP_PAD`] pixels) and flip of
//!    [`crate::augment`], plus a zoom around the centre (scale jitter: the
//!    object fills more or less of the crop), resampled bilinearly;
//!    pixels from outside the image are 128 (0.0 after normalization);
//! 2. **exposure and colour:** brightness, contrast and saturation jitter;
//! 3. **optics and sensor:** a separable Gaussian blur, Gaussian noise;
//! 4. **RGB565:** the pixel rounded to 5/6/5 bits and widened by bit
//!    replication, as [`shared::preprocess::rgb565_to_rgb888`] does;
//! 5. **cutout:** a square set to 0.0 (regularization).
//!
//! Every choice is a pure function of `(seed, epoch, image index)`, so a
//! resumed run sees the same images, and a batch does not depend on how
//! many threads build it.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::{mix, Aug, CROP_PAD};
use crate::data::{Dataset, IMAGE_BYTES};

/// Side of the square images.
const SIZE: usize = 32;
/// Values of one image.
const LEN: usize = SIZE * SIZE * 3;

/// Strengths and probabilities of the camera augmentations (stored in the
/// run's configuration, so a resume uses the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CameraAug {
    /// Zoom range `[min, max]` around the centre (1 = none), drawn log-uniform.
    pub scale: [f32; 2],
    /// Probability of the exposure and colour jitter.
    pub jitter_p: f32,
    /// Largest brightness shift, in 8-bit pixel units.
    pub brightness: f32,
    /// Contrast factor range `[min, max]` around the image's mean grey.
    pub contrast: [f32; 2],
    /// Largest relative saturation change.
    pub saturation: f32,
    /// Probability of a blur.
    pub blur_p: f32,
    /// Blur standard deviation range `[min, max]`, in pixels.
    pub blur_sigma: [f32; 2],
    /// Probability of sensor noise.
    pub noise_p: f32,
    /// Largest noise standard deviation, in 8-bit pixel units.
    pub noise_sigma: f32,
    /// Probability of RGB565 rounding.
    pub rgb565_p: f32,
    /// Probability of a cutout square.
    pub cutout_p: f32,
    /// Side of the cutout square, in pixels.
    pub cutout_size: usize,
}

impl CameraAug {
    /// The default recipe's strengths: moderate, so that clean accuracy
    /// does not pay much for robustness.
    pub fn standard() -> Self {
        Self {
            scale: [0.85, 1.25],
            jitter_p: 0.8,
            brightness: 32.0,
            contrast: [0.4, 1.3],
            saturation: 0.3,
            blur_p: 0.25,
            blur_sigma: [0.3, 1.2],
            noise_p: 0.3,
            noise_sigma: 20.0,
            rgb565_p: 0.5,
            cutout_p: 0.5,
            cutout_size: 8,
        }
    }

    /// The same ranges at half the probabilities and without cutout: for a
    /// last phase that keeps some robustness while costing less clean
    /// accuracy (`train --augment camera-light`).
    pub fn light() -> Self {
        let s = Self::standard();
        Self {
            jitter_p: s.jitter_p / 2.0,
            blur_p: s.blur_p / 2.0,
            noise_p: s.noise_p / 2.0,
            rgb565_p: s.rgb565_p / 2.0,
            cutout_p: 0.0,
            ..s
        }
    }

    /// Checks the ranges (a configuration file may have been edited).
    pub fn validate(&self) -> Result<()> {
        for (name, [lo, hi], min, max) in [
            ("scale", self.scale, 0.25, 4.0),
            ("contrast", self.contrast, 0.0, 4.0),
            ("blur_sigma", self.blur_sigma, 0.0, 4.0),
        ] {
            ensure!(
                lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max,
                "camera augmentation: {name} [{lo}, {hi}] must satisfy {min} <= min <= max <= {max}"
            );
        }
        for (name, p) in [
            ("jitter_p", self.jitter_p),
            ("blur_p", self.blur_p),
            ("noise_p", self.noise_p),
            ("rgb565_p", self.rgb565_p),
            ("cutout_p", self.cutout_p),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "camera augmentation: {name} = {p} is not a probability"
            );
        }
        for (name, v, max) in [
            ("brightness", self.brightness, 255.0),
            ("saturation", self.saturation, 1.0),
            ("noise_sigma", self.noise_sigma, 128.0),
        ] {
            ensure!(
                (0.0..=max).contains(&v),
                "camera augmentation: {name} = {v} must be in [0, {max}]"
            );
        }
        ensure!(
            self.cutout_size <= SIZE,
            "camera augmentation: cutout_size {} is larger than the image ({SIZE})",
            self.cutout_size
        );
        Ok(())
    }

    /// Writes image `index` of epoch `epoch`, augmented, as CHW floats
    /// `(p - 128) / 128` into `out` (3*32*32 values).
    pub fn write_chw(&self, img: &[u8], seed: u64, epoch: usize, index: usize, out: &mut [f32]) {
        debug_assert_eq!(img.len(), IMAGE_BYTES);
        let mut rng = Rng(mix(
            mix(seed ^ 0xCA3E_2A00) ^ mix((epoch as u64) << 32 | index as u64)
        ));
        let crop = Aug::draw(seed, epoch, index);
        let mut px = self.geometry(img, crop, &mut rng);
        if rng.chance(self.jitter_p) {
            self.jitter(&mut px, &mut rng);
        }
        if rng.chance(self.blur_p) {
            let [lo, hi] = self.blur_sigma;
            blur(&mut px, rng.uniform(lo, hi));
        }
        if rng.chance(self.noise_p) {
            let sigma = rng.uniform(0.0, self.noise_sigma);
            px.iter_mut().for_each(|v| *v += sigma * rng.normal());
        }
        let rgb565 = rng.chance(self.rgb565_p);
        for (i, v) in px.iter().enumerate() {
            let mut p = v.round().clamp(0.0, 255.0) as u16;
            if rgb565 {
                p = widen(p, if i % 3 == 1 { 6 } else { 5 });
            }
            let (y, x, c) = (i / (SIZE * 3), (i / 3) % SIZE, i % 3);
            out[c * SIZE * SIZE + y * SIZE + x] = (p as f32 - 128.0) / 128.0;
        }
        if rng.chance(self.cutout_p) {
            let (cy, cx) = (rng.below(SIZE), rng.below(SIZE));
            cutout(out, cy, cx, self.cutout_size);
        }
    }

    /// Crop offset, flip and zoom, bilinear: HWC floats in pixel units.
    fn geometry(&self, img: &[u8], crop: Aug, rng: &mut Rng) -> Vec<f32> {
        let [lo, hi] = self.scale;
        let s = (rng.uniform(lo.ln(), hi.ln())).exp();
        let centre = (SIZE as f32 - 1.0) / 2.0;
        let (oy, ox) = (
            crop.dy as f32 - CROP_PAD as f32,
            crop.dx as f32 - CROP_PAD as f32,
        );
        let sample = |y: isize, x: isize, c: usize| -> f32 {
            if (0..SIZE as isize).contains(&y) && (0..SIZE as isize).contains(&x) {
                img[(y as usize * SIZE + x as usize) * 3 + c] as f32
            } else {
                128.0
            }
        };
        let mut px = vec![0f32; LEN];
        for y in 0..SIZE {
            let v = (y as f32 - centre) / s + centre + oy;
            let (y0, fy) = (v.floor() as isize, v - v.floor());
            for x in 0..SIZE {
                let xx = if crop.flip { SIZE - 1 - x } else { x };
                let u = (xx as f32 - centre) / s + centre + ox;
                let (x0, fx) = (u.floor() as isize, u - u.floor());
                for c in 0..3 {
                    let top = sample(y0, x0, c) * (1.0 - fx) + sample(y0, x0 + 1, c) * fx;
                    let bottom =
                        sample(y0 + 1, x0, c) * (1.0 - fx) + sample(y0 + 1, x0 + 1, c) * fx;
                    px[(y * SIZE + x) * 3 + c] = top * (1.0 - fy) + bottom * fy;
                }
            }
        }
        px
    }

    /// Brightness, contrast (around the image's mean grey) and saturation
    /// (around each pixel's grey), clamped to `[0, 255]`.
    fn jitter(&self, px: &mut [f32], rng: &mut Rng) {
        let b = rng.uniform(-self.brightness, self.brightness);
        let k = rng.uniform(self.contrast[0], self.contrast[1]);
        let sat = 1.0 + rng.uniform(-self.saturation, self.saturation);
        let grey = |p: &[f32]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        let mean = px.chunks_exact(3).map(grey).sum::<f32>() / (SIZE * SIZE) as f32;
        for p in px.chunks_exact_mut(3) {
            let g = grey(p);
            for v in p.iter_mut() {
                let saturated = g + (*v - g) * sat;
                *v = ((saturated - mean) * k + mean + b).clamp(0.0, 255.0);
            }
        }
    }
}

/// Separable Gaussian blur of standard deviation `sigma` pixels (cut at
/// 2.5σ), edges clamped. No-op for `sigma <= 0`.
fn blur(px: &mut [f32], sigma: f32) {
    if sigma <= 0.0 {
        return;
    }
    let half = (2.5 * sigma).ceil() as isize;
    let taps: Vec<f32> = (-half..=half)
        .map(|d| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = taps.iter().sum();
    let at = |y: usize, x: usize, c: usize| (y * SIZE + x) * 3 + c;
    let clamp = |i: usize, d: isize| (i as isize + d).clamp(0, SIZE as isize - 1) as usize;
    for horizontal in [true, false] {
        let src = px.to_vec();
        for y in 0..SIZE {
            for x in 0..SIZE {
                for c in 0..3 {
                    let mut acc = 0.0;
                    for (w, d) in taps.iter().zip(-half..=half) {
                        let i = if horizontal {
                            at(y, clamp(x, d), c)
                        } else {
                            at(clamp(y, d), x, c)
                        };
                        acc += w * src[i];
                    }
                    px[at(y, x, c)] = acc / total;
                }
            }
        }
    }
}

/// An 8-bit value rounded to `bits` bits and widened back by bit
/// replication (the camera's RGB565 and the board's widening).
fn widen(p: u16, bits: u32) -> u16 {
    let q = (p * ((1 << bits) - 1) + 127) / 255;
    (q << (8 - bits)) | (q >> (2 * bits - 8))
}

/// Sets a `size`-pixel square centred at `(cy, cx)` (clipped) to 0.0 in a
/// CHW image.
fn cutout(out: &mut [f32], cy: usize, cx: usize, size: usize) {
    let (y0, x0) = (cy.saturating_sub(size / 2), cx.saturating_sub(size / 2));
    let (y1, x1) = (
        (cy + size.div_ceil(2)).min(SIZE),
        (cx + size.div_ceil(2)).min(SIZE),
    );
    for c in 0..3 {
        for y in y0..y1 {
            out[c * SIZE * SIZE + y * SIZE + x0..c * SIZE * SIZE + y * SIZE + x1].fill(0.0);
        }
    }
}

/// A SplitMix64 stream (also the camera benchmark's corruptions').
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }

    /// Uniform in `[0, 1)`, 24 bits.
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// A camera-augmented batch: images `(n, 3, 32, 32)` f32 and labels `(n,)`
/// u32, built on the host (in parallel, image by image) and uploaded.
pub fn batch(
    ds: &Dataset,
    indices: &[usize],
    aug: &CameraAug,
    seed: u64,
    epoch: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut xs = vec![0f32; indices.len() * LEN];
    xs.par_chunks_mut(LEN)
        .zip(indices.par_iter())
        .for_each(|(out, &i)| aug.write_chw(ds.image(i), seed, epoch, i, out));
    let ys: Vec<u32> = indices.iter().map(|&i| ds.labels[i] as u32).collect();
    let x = Tensor::from_vec(xs, (indices.len(), 3, SIZE, SIZE), device)?;
    let y = Tensor::from_vec(ys, indices.len(), device)?;
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::write_chw;

    fn off() -> CameraAug {
        CameraAug {
            scale: [1.0, 1.0],
            jitter_p: 0.0,
            blur_p: 0.0,
            noise_p: 0.0,
            rgb565_p: 0.0,
            cutout_p: 0.0,
            ..CameraAug::standard()
        }
    }

    fn image(seed: u64) -> Vec<u8> {
        (0..IMAGE_BYTES as u64)
            .map(|i| (mix(seed ^ i) & 0xff) as u8)
            .collect()
    }

    #[test]
    fn switched_off_it_is_the_plain_crop_and_flip() {
        let img = image(3);
        let (mut a, mut b) = (vec![0f32; LEN], vec![0f32; LEN]);
        for index in 0..50 {
            off().write_chw(&img, 11, 2, index, &mut a);
            write_chw(&img, Aug::draw(11, 2, index), &mut b);
            assert_eq!(a, b, "image {index}");
        }
    }

    #[test]
    fn deterministic_per_image_and_varies_with_the_epoch() {
        let (img, aug) = (image(5), CameraAug::standard());
        let mut a = vec![0f32; LEN];
        let mut b = vec![0f32; LEN];
        aug.write_chw(&img, 1, 4, 9, &mut a);
        aug.write_chw(&img, 1, 4, 9, &mut b);
        assert_eq!(a, b);
        aug.write_chw(&img, 1, 5, 9, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().all(|v| (-1.0..=127.0 / 128.0).contains(v)));
    }

    #[test]
    fn rgb565_widening_matches_the_board() {
        for p in 0..=255u16 {
            let r5 = (p * 31 + 127) / 255;
            let g6 = (p * 63 + 127) / 255;
            let v = (r5 << 11) | (g6 << 5) | r5;
            let [r, g, b] = shared::preprocess::rgb565_to_rgb888(v);
            assert_eq!(widen(p, 5) as u32, r);
            assert_eq!(widen(p, 6) as u32, g);
            assert_eq!(widen(p, 5) as u32, b);
            // Rounding to the nearest level: never more than half a step off.
            assert!((widen(p, 5) as i32 - p as i32).abs() <= 5, "{p}");
        }
    }

    #[test]
    fn each_augmentation_does_what_it_says() {
        // A flat grey image: blur and geometry (zoom 1) leave it unchanged.
        let flat = vec![100u8; IMAGE_BYTES];
        let mut px: Vec<f32> = flat.iter().map(|&p| p as f32).collect();
        blur(&mut px, 1.2);
        assert!(px.iter().all(|&v| (v - 100.0).abs() < 1e-3));
        // Blur spreads a single bright pixel as a normalized Gaussian:
        // σ 0.4 → 3 taps per axis, weights exp(-d²/0.32).
        let mut dot = vec![0f32; LEN];
        dot[(10 * SIZE + 10) * 3] = 1.0;
        blur(&mut dot, 0.4);
        let side = (-1.0f32 / 0.32).exp();
        let w = |d: f32| if d == 0.0 { 1.0 } else { side } / (1.0 + 2.0 * side);
        assert!((dot[(10 * SIZE + 10) * 3] - w(0.0) * w(0.0)).abs() < 1e-6);
        assert!((dot[(9 * SIZE + 11) * 3] - w(1.0) * w(1.0)).abs() < 1e-6);
        assert_eq!(dot[(12 * SIZE + 10) * 3], 0.0);
        assert!((dot.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Cutout zeroes exactly a clipped square in all three planes.
        let mut out = vec![1f32; LEN];
        cutout(&mut out, 0, 31, 8);
        let zeros = out.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(zeros, 3 * 4 * 5);
        assert_eq!(out[3 * SIZE + 27], 0.0);
        assert_eq!(out[4 * SIZE + 27], 1.0);
        // Zoom 2 about the centre: the centre pixel stays, a corner pixel
        // comes from a quarter of the way in.
        let aug = CameraAug {
            scale: [2.0, 2.0],
            ..off()
        };
        let img = image(8);
        let mut rng = Rng(0);
        let g = aug.geometry(&img, Aug::NONE, &mut rng);
        let src = |y: usize, x: usize| img[(y * SIZE + x) * 3] as f32;
        // (0,0) maps to (15.5 - 15.5/2) = 7.75 in both axes.
        let want = src(7, 7) * 0.25 * 0.25
            + src(7, 8) * 0.25 * 0.75
            + src(8, 7) * 0.75 * 0.25
            + src(8, 8) * 0.75 * 0.75;
        assert!((g[0] - want).abs() < 1e-3, "{} vs {want}", g[0]);
    }

    #[test]
    fn validate_names_the_field() {
        let bad = CameraAug {
            noise_p: 1.5,
            ..CameraAug::standard()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("noise_p"));
        let bad = CameraAug {
            scale: [1.2, 1.0],
            ..CameraAug::standard()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("scale"));
        CameraAug::standard().validate().unwrap();
    }

    #[test]
    fn batch_is_the_same_on_any_thread_count() {
        let ds = crate::data::synthetic(20, 10, 4);
        let idx: Vec<usize> = (0..20).rev().collect();
        let aug = CameraAug::standard();
        let (a, _) = batch(&ds, &idx, &aug, 3, 1, &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (b, _) = pool
            .install(|| batch(&ds, &idx, &aug, 3, 1, &Device::Cpu))
            .unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b);
    }
}
