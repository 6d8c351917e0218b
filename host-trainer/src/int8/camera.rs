//! Camera-realism benchmark: CIFAR-10 test images shown to the int8 model
//! through the board's path, with CIFAR-10-C-style corruptions.
//!
//! For each test image:
//!
//! 1. **Frame.** The 32x32 image is enlarged bilinearly to the 120x120
//!    centre of a 160x120 frame (the OV7670's QQVGA), its edges extended
//!    into the 20-pixel side bands that the board's centre crop drops.
//! 2. **Corruption** (none for the clean row) in the frame, with
//!    CIFAR-10-C's parameters (Hendrycks & Dietterich, 2019) at severities
//!    1, 3 and 5. Spatial parameters (blur radii, motion length, pixelation
//!    block) and the noise σ are scaled by the frame's 120/32 = 3.75
//!    enlargement, so that what reaches the 32x32 input is as strong as in
//!    CIFAR-10-C (the area average divides an independent per-pixel noise
//!    by 3.75); brightness, contrast and JPEG quality are used as given.
//! 3. **RGB565**, big-endian as the OV7670 sends it, then
//!    [`shared::preprocess::preprocess`] and [`shared::model`] — the same
//!    code as on the board.
//!
//! Every random choice (noise, motion direction) is seeded per image, so
//! runs are repeatable and two models see the same frames.

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use shared::preprocess::{preprocess, Frame, PixelFormat, INPUT_LEN};

use crate::augment::mix;
use crate::blob::OwnedModel;
use crate::camera_aug::Rng;
use crate::data::{Dataset, IMAGE_BYTES};
use crate::export::argmax;

/// Frame width (QQVGA).
pub const FRAME_W: usize = 160;
/// Frame height (QQVGA).
pub const FRAME_H: usize = 120;
/// Side of the centre square the board crops (the object).
const SIDE: usize = FRAME_H;
/// Enlargement from the 32x32 image to the frame.
const ZOOM: f32 = SIDE as f32 / 32.0;
/// The severities reported.
pub const SEVERITIES: [usize; 3] = [1, 3, 5];

/// A float RGB frame, HWC, values in `[0, 1]`.
type Px = Vec<f32>;

/// CIFAR-10-C's corruptions that a camera produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// Value (HSV) raised by `[.05, .1, .15, .2, .3]`.
    Brightness,
    /// Distance to the mean scaled by `[.75, .5, .4, .3, .15]`.
    Contrast,
    /// Additive Gaussian noise, σ `[.04, .06, .08, .09, .10]` (× 3.75).
    GaussianNoise,
    /// Disk of radius `[.3, .4, .5, 1, 1.5]` then a Gaussian of σ
    /// `[.4, .5, .6, .2, .1]` (both × 3.75).
    DefocusBlur,
    /// One-sided Gaussian streak, σ `[1, 1.5, 2, 2.5, 3]` (× 3.75), at an
    /// angle in `[-45°, 45°]`.
    MotionBlur,
    /// JPEG at quality `[80, 65, 58, 50, 40]`.
    Jpeg,
    /// Box-averaged to `[.95, .9, .85, .75, .65]` of the size (in object
    /// pixels), shown back with nearest-neighbour.
    Pixelate,
}

impl Corruption {
    /// All of them, in report order.
    pub const ALL: [Corruption; 7] = [
        Corruption::Brightness,
        Corruption::Contrast,
        Corruption::GaussianNoise,
        Corruption::DefocusBlur,
        Corruption::MotionBlur,
        Corruption::Jpeg,
        Corruption::Pixelate,
    ];

    /// Name as in CIFAR-10-C.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::Brightness => "brightness",
            Corruption::Contrast => "contrast",
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::MotionBlur => "motion_blur",
            Corruption::Jpeg => "jpeg_compression",
            Corruption::Pixelate => "pixelate",
        }
    }

    /// Applies the corruption at `severity` (1..=5) to `px`.
    pub fn apply(self, px: &mut Px, severity: usize, seed: u64) -> Result<()> {
        ensure!(
            (1..=5).contains(&severity),
            "severity {severity} is not in 1..=5"
        );
        let s = severity - 1;
        match self {
            Corruption::Brightness => brightness(px, [0.05, 0.1, 0.15, 0.2, 0.3][s]),
            Corruption::Contrast => contrast(px, [0.75, 0.5, 0.4, 0.3, 0.15][s]),
            Corruption::GaussianNoise => {
                let sigma = [0.04, 0.06, 0.08, 0.09, 0.10][s] * ZOOM;
                let mut rng = Rng(seed);
                px.iter_mut()
                    .for_each(|v| *v = (*v + sigma * rng.normal()).clamp(0.0, 1.0));
            }
            Corruption::DefocusBlur => {
                let (r, a) = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)][s];
                let k = convolve_kernels(&disk(r * ZOOM), &gaussian(a * ZOOM));
                *px = filter(px, &k);
            }
            Corruption::MotionBlur => {
                let sigma = [1.0, 1.5, 2.0, 2.5, 3.0][s] * ZOOM;
                let angle = (Rng(seed ^ 0x0A46).unit() - 0.5) * std::f32::consts::FRAC_PI_2;
                motion_blur(px, sigma, angle);
            }
            Corruption::Jpeg => jpeg(px, [80, 65, 58, 50, 40][s])?,
            Corruption::Pixelate => pixelate(px, [0.95, 0.9, 0.85, 0.75, 0.65][s]),
        }
        Ok(())
    }
}

/// The 32x32 HWC image enlarged into the centre of a frame (bilinear, edge
/// pixels extended outwards).
pub fn render(img: &[u8]) -> Px {
    debug_assert_eq!(img.len(), IMAGE_BYTES);
    let x_off = (FRAME_W - SIDE) as f32 / 2.0;
    let src = |y: usize, x: usize, c: usize| img[(y * 32 + x) * 3 + c] as f32 / 255.0;
    let coord = |v: f32| {
        let v = v.clamp(0.0, 31.0);
        let i = (v.floor() as usize).min(30);
        (i, v - i as f32)
    };
    let mut px = vec![0f32; FRAME_W * FRAME_H * 3];
    for y in 0..FRAME_H {
        let (y0, fy) = coord((y as f32 + 0.5) / ZOOM - 0.5);
        for x in 0..FRAME_W {
            let (x0, fx) = coord((x as f32 - x_off + 0.5) / ZOOM - 0.5);
            for c in 0..3 {
                let top = src(y0, x0, c) * (1.0 - fx) + src(y0, x0 + 1, c) * fx;
                let bottom = src(y0 + 1, x0, c) * (1.0 - fx) + src(y0 + 1, x0 + 1, c) * fx;
                px[(y * FRAME_W + x) * 3 + c] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    px
}

/// The frame as the OV7670 sends it: RGB565, high byte first, each channel
/// rounded to the nearest level.
pub fn to_rgb565_be(px: &Px) -> Vec<u8> {
    let level = |v: f32, max: f32| (v.clamp(0.0, 1.0) * max).round() as u16;
    px.chunks_exact(3)
        .flat_map(|p| {
            let v = level(p[0], 31.0) << 11 | level(p[1], 63.0) << 5 | level(p[2], 31.0);
            v.to_be_bytes()
        })
        .collect()
}

/// Scales each pixel so that its HSV value rises by `c` (hue and
/// saturation kept).
fn brightness(px: &mut Px, c: f32) {
    for p in px.chunks_exact_mut(3) {
        let v = p[0].max(p[1]).max(p[2]);
        if v <= 0.0 {
            p.fill(c.min(1.0));
            continue;
        }
        let k = (v + c).min(1.0) / v;
        p.iter_mut().for_each(|x| *x *= k);
    }
}

/// Moves every value towards the frame's mean by the factor `c`.
fn contrast(px: &mut Px, c: f32) {
    let mean = px.iter().sum::<f32>() / px.len() as f32;
    px.iter_mut()
        .for_each(|v| *v = ((*v - mean) * c + mean).clamp(0.0, 1.0));
}

/// A square 2D kernel, side `2 * half + 1`, row-major, summing to 1.
#[derive(Debug, Clone, PartialEq)]
struct Kernel {
    half: usize,
    w: Vec<f32>,
}

/// A disk of radius `r` pixels (the centre always in).
fn disk(r: f32) -> Kernel {
    let half = r.floor() as usize;
    let side = 2 * half + 1;
    let w: Vec<f32> = (0..side * side)
        .map(|i| {
            let (y, x) = (
                (i / side) as f32 - half as f32,
                (i % side) as f32 - half as f32,
            );
            if x * x + y * y <= r * r {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    normalized(half, w)
}

/// A Gaussian of standard deviation `sigma`, cut at 3σ.
fn gaussian(sigma: f32) -> Kernel {
    let half = (3.0 * sigma).ceil().max(1.0) as usize;
    let side = 2 * half + 1;
    let w = (0..side * side)
        .map(|i| {
            let (y, x) = (
                (i / side) as f32 - half as f32,
                (i % side) as f32 - half as f32,
            );
            (-(x * x + y * y) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    normalized(half, w)
}

fn normalized(half: usize, mut w: Vec<f32>) -> Kernel {
    let sum: f32 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= sum);
    Kernel { half, w }
}

/// The kernel of applying `a` then `b`.
fn convolve_kernels(a: &Kernel, b: &Kernel) -> Kernel {
    let half = a.half + b.half;
    let (side, sa, sb) = (2 * half + 1, 2 * a.half + 1, 2 * b.half + 1);
    let mut w = vec![0f32; side * side];
    for (i, &wa) in a.w.iter().enumerate() {
        for (j, &wb) in b.w.iter().enumerate() {
            let y = i / sa + j / sb;
            let x = i % sa + j % sb;
            w[y * side + x] += wa * wb;
        }
    }
    Kernel { half, w }
}

/// 2D filtering with edge pixels extended.
fn filter(px: &Px, k: &Kernel) -> Px {
    let side = 2 * k.half + 1;
    let h = k.half as isize;
    let mut out = vec![0f32; px.len()];
    for y in 0..FRAME_H as isize {
        for x in 0..FRAME_W as isize {
            let mut acc = [0f32; 3];
            for (i, &w) in k.w.iter().enumerate() {
                if w == 0.0 {
                    continue;
                }
                let sy = (y + (i / side) as isize - h).clamp(0, FRAME_H as isize - 1) as usize;
                let sx = (x + (i % side) as isize - h).clamp(0, FRAME_W as isize - 1) as usize;
                let p = &px[(sy * FRAME_W + sx) * 3..][..3];
                acc.iter_mut().zip(p).for_each(|(a, v)| *a += w * v);
            }
            out[(y as usize * FRAME_W + x as usize) * 3..][..3].copy_from_slice(&acc);
        }
    }
    out
}

/// A streak behind each pixel along `angle`: samples at distances
/// `0, 1, …, 3σ` weighted by a Gaussian of σ (ImageMagick's motion blur).
fn motion_blur(px: &mut Px, sigma: f32, angle: f32) {
    let taps = (3.0 * sigma).ceil() as usize;
    let weights: Vec<f32> = (0..=taps)
        .map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let (dx, dy) = (angle.cos(), angle.sin());
    let src = px.clone();
    let at = |y: isize, x: isize, c: usize| {
        let y = y.clamp(0, FRAME_H as isize - 1) as usize;
        let x = x.clamp(0, FRAME_W as isize - 1) as usize;
        src[(y * FRAME_W + x) * 3 + c]
    };
    for y in 0..FRAME_H {
        for x in 0..FRAME_W {
            for c in 0..3 {
                let mut acc = 0.0;
                for (i, w) in weights.iter().enumerate() {
                    let sx = (x as f32 - dx * i as f32).round() as isize;
                    let sy = (y as f32 - dy * i as f32).round() as isize;
                    acc += w * at(sy, sx, c);
                }
                px[(y * FRAME_W + x) * 3 + c] = acc / total;
            }
        }
    }
}

/// JPEG round trip at `quality`.
fn jpeg(px: &mut Px, quality: u8) -> Result<()> {
    let bytes: Vec<u8> = px
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(
            &bytes,
            FRAME_W as u32,
            FRAME_H as u32,
            image::ExtendedColorType::Rgb8,
        )
        .context("JPEG-encoding a benchmark frame")?;
    let back = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .context("decoding a benchmark frame")?
        .to_rgb8();
    *px = back.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(())
}

/// Box-averages the frame to `c` of its resolution in object pixels (the
/// object becomes `32 c` pixels wide, as in CIFAR-10-C) and enlarges it
/// back with nearest-neighbour.
fn pixelate(px: &mut Px, c: f32) {
    let block = ZOOM / c; // frame pixels per coarse pixel
    let (cw, ch) = (
        (FRAME_W as f32 / block).round() as usize,
        (FRAME_H as f32 / block).round() as usize,
    );
    let cell = |i: usize, n: usize, coarse: usize| (i * coarse / n).min(coarse - 1);
    let mut sums = vec![0f32; cw * ch * 3];
    let mut counts = vec![0f32; cw * ch];
    for y in 0..FRAME_H {
        for x in 0..FRAME_W {
            let k = cell(y, FRAME_H, ch) * cw + cell(x, FRAME_W, cw);
            counts[k] += 1.0;
            for c in 0..3 {
                sums[k * 3 + c] += px[(y * FRAME_W + x) * 3 + c];
            }
        }
    }
    for y in 0..FRAME_H {
        for x in 0..FRAME_W {
            let k = cell(y, FRAME_H, ch) * cw + cell(x, FRAME_W, cw);
            for c in 0..3 {
                px[(y * FRAME_W + x) * 3 + c] = sums[k * 3 + c] / counts[k];
            }
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CameraRow {
    /// Corruption name, or `clean` for the camera path alone.
    pub corruption: String,
    /// Accuracy (%) per severity in [`SEVERITIES`] (the clean row repeats
    /// its one figure).
    pub accuracy: Vec<f64>,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct CameraReport {
    /// Test images used.
    pub images: usize,
    /// Plain int8 accuracy (32x32 input, no camera path), for reference.
    pub plain: f64,
    /// The camera path without corruption, then one row per corruption.
    pub rows: Vec<CameraRow>,
    /// Mean over the corruptions, per severity.
    pub mean: Vec<f64>,
}

/// The int8 class of one frame through the board's path.
fn classify_frame(
    model: &shared::model::Model<'_>,
    frame: &[u8],
    bufs: &mut (Vec<i8>, Vec<i16>, Vec<i8>),
) -> Result<usize> {
    let mut input = [0i8; INPUT_LEN];
    let f = Frame {
        data: frame,
        width: FRAME_W,
        height: FRAME_H,
        format: PixelFormat::Rgb565Be,
    };
    preprocess(&f, &mut input).context("preprocessing a frame")?;
    let (arena, scratch, logits) = bufs;
    model
        .run(&input, arena, scratch, logits)
        .context("running the int8 model")?;
    Ok(argmax(&logits[..]))
}

/// Accuracy (%) of `m` on `images` of `ds` shown through the camera path,
/// with `corruption` at `severity` (or clean).
fn accuracy(
    m: &OwnedModel,
    ds: &Dataset,
    images: &[usize],
    corruption: Option<(Corruption, usize)>,
) -> Result<f64> {
    let model = m.model()?;
    let classes = model.output().dims.len();
    let correct: usize = images
        .par_iter()
        .map_init(
            || {
                (
                    vec![0i8; model.arena_len()],
                    vec![0i16; model.scratch_len()],
                    vec![0i8; classes],
                )
            },
            |bufs, &i| -> Result<usize> {
                let mut px = render(ds.image(i));
                if let Some((c, s)) = corruption {
                    c.apply(&mut px, s, mix((i as u64) ^ ((s as u64) << 40)))?;
                }
                let class = classify_frame(&model, &to_rgb565_be(&px), bufs)?;
                Ok(usize::from(class == ds.labels[i] as usize))
            },
        )
        .sum::<Result<usize>>()?;
    Ok(100.0 * correct as f64 / images.len() as f64)
}

/// Runs the benchmark on `limit` test images spread evenly over `ds` (all
/// when `None`), calling `progress` after each pass.
pub fn run(
    m: &OwnedModel,
    ds: &Dataset,
    limit: Option<usize>,
    mut progress: impl FnMut(&str),
) -> Result<CameraReport> {
    let n = limit.unwrap_or(ds.len()).min(ds.len());
    ensure!(n > 0, "the camera benchmark needs at least one test image");
    let ds = &ds.subsample(n);
    let images: Vec<usize> = (0..n).collect();
    let plain = crate::export::evaluate_int8(m, ds)?.int8_accuracy;
    let clean = accuracy(m, ds, &images, None)?;
    progress("clean");
    let mut rows = vec![CameraRow {
        corruption: "clean".into(),
        accuracy: vec![clean; SEVERITIES.len()],
    }];
    for c in Corruption::ALL {
        let accuracy = SEVERITIES
            .iter()
            .map(|&s| accuracy(m, ds, &images, Some((c, s))))
            .collect::<Result<Vec<f64>>>()?;
        progress(c.name());
        rows.push(CameraRow {
            corruption: c.name().into(),
            accuracy,
        });
    }
    let mean = (0..SEVERITIES.len())
        .map(|k| rows[1..].iter().map(|r| r.accuracy[k]).sum::<f64>() / (rows.len() - 1) as f64)
        .collect();
    Ok(CameraReport {
        images: n,
        plain,
        rows,
        mean,
    })
}

/// The report as a table.
pub fn format_report(r: &CameraReport) -> String {
    let mut s = format!(
        "camera benchmark: {} CIFAR-10 test images as {FRAME_W}x{FRAME_H} RGB565 frames through shared::preprocess and the int8 model\n\
         plain 32x32 int8 accuracy: {:.2}%\n\n{:<18} {:>8} {:>8} {:>8}\n",
        r.images, r.plain, "corruption", "sev 1", "sev 3", "sev 5"
    );
    for row in &r.rows {
        s += &format!("{:<18}", row.corruption);
        for a in &row.accuracy {
            s += &format!(" {a:>7.2}%");
        }
        s += "\n";
    }
    s += &format!("{:<18}", "mean (corrupted)");
    for a in &r.mean {
        s += &format!(" {a:>7.2}%");
    }
    s + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: f32) -> Px {
        vec![v; FRAME_W * FRAME_H * 3]
    }

    #[test]
    fn render_fills_the_centre_square_and_extends_the_edges() {
        let mut img = vec![0u8; IMAGE_BYTES];
        for y in 0..32 {
            for x in 0..32 {
                img[(y * 32 + x) * 3] = (x * 8) as u8;
            }
        }
        let px = render(&img);
        // Left band repeats image column 0, right band column 31.
        assert_eq!(px[(60 * FRAME_W + 3) * 3], 0.0);
        assert!((px[(60 * FRAME_W + 157) * 3] - 248.0 / 255.0).abs() < 1e-6);
        // The centre crop area-averages back to the original (bilinear
        // enlargement of a linear ramp is the ramp).
        let frame = to_rgb565_be(&px);
        let mut input = [0i8; INPUT_LEN];
        let f = Frame {
            data: &frame,
            width: FRAME_W,
            height: FRAME_H,
            format: PixelFormat::Rgb565Be,
        };
        preprocess(&f, &mut input).unwrap();
        for x in 1..31 {
            let got = input[(16 * 32 + x) * 3] as i32 + 128;
            assert!((got - (x * 8) as i32).abs() <= 6, "x {x}: {got}");
        }
    }

    #[test]
    fn kernels_sum_to_one_and_keep_flat_frames() {
        for k in [disk(0.3 * ZOOM), disk(1.5 * ZOOM), gaussian(0.4 * ZOOM)] {
            assert!((k.w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let k = convolve_kernels(&disk(1.1), &gaussian(1.5));
        assert!((k.w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(k.half, 1 + 5);
        let out = filter(&flat(0.5), &k);
        assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-5));
        let mut px = flat(0.25);
        motion_blur(&mut px, 5.0, 0.3);
        assert!(px.iter().all(|v| (v - 0.25).abs() < 1e-5));
    }

    #[test]
    fn photometric_corruptions_match_their_definitions() {
        let mut px = vec![0.2, 0.4, 0.6, 0.0, 0.0, 0.0];
        px.resize(FRAME_W * FRAME_H * 3, 0.5);
        brightness(&mut px, 0.3);
        // V 0.6 → 0.9: every channel × 1.5 (hue and saturation kept).
        assert!((px[0] - 0.3).abs() < 1e-6 && (px[2] - 0.9).abs() < 1e-6);
        assert_eq!(&px[3..6], &[0.3, 0.3, 0.3]);
        let mut px = flat(0.5);
        px[0] = 1.0;
        let mean = px.iter().sum::<f32>() / px.len() as f32;
        contrast(&mut px, 0.5);
        assert!((px[0] - (mean + (1.0 - mean) * 0.5)).abs() < 1e-6);
    }

    #[test]
    fn corruptions_are_seeded_and_change_the_frame() {
        let mut img = vec![0u8; IMAGE_BYTES];
        img.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (mix(i as u64) & 0xff) as u8);
        let base = render(&img);
        for c in Corruption::ALL {
            let (mut a, mut b) = (base.clone(), base.clone());
            c.apply(&mut a, 3, 7).unwrap();
            c.apply(&mut b, 3, 7).unwrap();
            assert_eq!(a, b, "{}", c.name());
            assert_ne!(a, base, "{}", c.name());
            assert!(a.iter().all(|v| (0.0..=1.0).contains(v)), "{}", c.name());
            let (mut s1, mut s5) = (base.clone(), base.clone());
            c.apply(&mut s1, 1, 7).unwrap();
            c.apply(&mut s5, 5, 7).unwrap();
            let dist = |p: &Px| p.iter().zip(&base).map(|(x, y)| (x - y).abs()).sum::<f32>();
            assert!(
                dist(&s5) > dist(&s1),
                "{}: severity 5 is not stronger",
                c.name()
            );
        }
        assert!(Corruption::Jpeg.apply(&mut base.clone(), 6, 0).is_err());
    }

    #[test]
    fn pixelate_makes_blocks_of_the_object_scale() {
        let mut px = render(&{
            let mut img = vec![0u8; IMAGE_BYTES];
            img.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = (mix(i as u64) & 0xff) as u8);
            img
        });
        pixelate(&mut px, 0.5);
        // 16 coarse pixels across the object: blocks of 7.5 frame pixels,
        // so at most 23 distinct values along a row of 160.
        let row: Vec<f32> = (0..FRAME_W).map(|x| px[(60 * FRAME_W + x) * 3]).collect();
        let changes = row.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 22, "{changes}");
    }
}
