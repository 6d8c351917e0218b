//! The backward pass of conv + BatchNorm (+ ReLU) on NHWC tensors: the BN
//! backward coefficients, then per chunk of images the `dz` pass and the
//! two products of `kernel.rs` (weight gradient, input gradient), partial
//! weight gradients summed in chunk order.

use rayon::prelude::*;

use super::conv::{padded_chunk, Geom, Moments, Saved};
use super::kernel::{self, Epilogue, Isa, Tile};
use super::{Aligned, SyncPtr};

/// Narrowest input for which the weight gradient reads the unpadded input
/// ([`dw_chunk_direct`]); narrower ones are padded first, as runs of one or
/// two pixels per segment cost more than the copy.
const DIRECT_DW_WIDTH: usize = 8;

/// Weights OIHW → `[tap][o][c]`, taps flipped when `flip` (the stride-1
/// input gradient) or as they are (the strided scatter).
fn pack_backward(w: &[f32], g: &Geom, flip: bool) -> Aligned {
    let (o, c, kk) = (g.o, g.c, g.k * g.k);
    let mut out = Aligned::zeros(kk * c * o);
    let dst = SyncPtr(out.as_mut_ptr());
    // One output channel per task: its weight row (c·k·k values) stays in
    // L1 while every destination row gets c contiguous values.
    (0..o).into_par_iter().for_each(|oc| {
        let row = &w[oc * c * kk..][..c * kk];
        for t in 0..kk {
            let d = if flip { kk - 1 - t } else { t };
            for ic in 0..c {
                // SAFETY: (d, oc, ic) < (kk, o, c); tasks own disjoint oc.
                unsafe { *dst.ptr().add((d * o + oc) * c + ic) = row[ic * kk + t] };
            }
        }
    });
    out
}

/// BN (+ ReLU) backward as per-channel coefficients:
/// `dz = c1·dy' + c2 + c3·z` with `dy' = dy` where the output was positive
/// (or everywhere without ReLU).
#[derive(Debug)]
pub(super) struct BnBackward {
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
    c1: Vec<f32>,
    c2: Vec<f32>,
    c3: Vec<f32>,
}

/// `dy` where the output `z·a + b` was positive (or everywhere without ReLU).
#[inline(always)]
fn masked(dy: f32, z: f32, a: f32, b: f32, relu: bool) -> f32 {
    if relu && z * a + b <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// Adds one image's `Σdy'` and `Σdy'·(z − mean)` per channel into `s1`, `s2`.
fn bn_sums(dy: &[f32], z: &[f32], s: &Saved, relu: bool, s1: &mut [f32], s2: &mut [f32]) {
    let o = s1.len();
    let (a, b, mean, s2) = (&s.a[..o], &s.b[..o], &s.mean[..o], &mut s2[..o]);
    for (dy, z) in dy.chunks_exact(o).zip(z.chunks_exact(o)) {
        for ch in 0..o {
            let d = masked(dy[ch], z[ch], a[ch], b[ch], relu);
            s1[ch] += d;
            s2[ch] += d * (z[ch] - mean[ch]);
        }
    }
}

pub(super) fn bn_backward(s: &Saved, dy: &[f32], g: &Geom, relu: bool) -> BnBackward {
    let (o, img) = (g.o, g.p() * g.o);
    // Per image Σdy' and Σdy'·(z − mean), then summed in image order.
    let parts: Vec<Moments> = dy
        .par_chunks(img)
        .zip(s.z.par_chunks(img))
        .map(|(dy, z)| {
            let (mut s1, mut s2) = (vec![0f32; o], vec![0f32; o]);
            if relu {
                bn_sums(dy, z, s, true, &mut s1, &mut s2);
            } else {
                bn_sums(dy, z, s, false, &mut s1, &mut s2);
            }
            (s1, s2)
        })
        .collect();
    let (mut sdy, mut sdyz) = (vec![0f64; o], vec![0f64; o]);
    for (p1, p2) in &parts {
        for ch in 0..o {
            sdy[ch] += p1[ch] as f64;
            sdyz[ch] += p2[ch] as f64;
        }
    }
    let m = (g.n * g.p()) as f32;
    let mut r = BnBackward {
        dgamma: vec![0.0; o],
        dbeta: vec![0.0; o],
        c1: vec![0.0; o],
        c2: vec![0.0; o],
        c3: vec![0.0; o],
    };
    for ch in 0..o {
        let inv = s.inv_std[ch];
        // dγ = Σ dy·x̂, dβ = Σ dy, dz = γ·inv/M · (M·dy − dβ − x̂·dγ).
        let (dbeta, dgamma) = (sdy[ch] as f32, sdyz[ch] as f32 * inv);
        let kf = s.gamma[ch] * inv / m;
        r.dgamma[ch] = dgamma;
        r.dbeta[ch] = dbeta;
        r.c1[ch] = kf * m;
        r.c3[ch] = -kf * dgamma * inv;
        r.c2[ch] = -kf * dbeta - r.c3[ch] * s.mean[ch];
    }
    r
}

/// `dz` of images `n0..n1` into `dst`, whose image `i` pixel (y, x) is at
/// `(i·(ho + 2q) + y + q)·(wo + 2q) + x + q`, with a zero border of `q`:
/// every element of the chunk's images is written.
#[allow(clippy::too_many_arguments)]
fn dz_chunk(
    g: &Geom,
    dy: &[f32],
    s: &Saved,
    bn: &BnBackward,
    relu: bool,
    (n0, n1): (usize, usize),
    q: usize,
    dst: &mut [f32],
) {
    let (o, p) = (g.o, g.p());
    let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
    for i in 0..n1 - n0 {
        zero_border(&mut dst[i * hq * wq * o..][..hq * wq * o], (hq, wq, o), q);
        for y in 0..g.ho {
            let src = ((n0 + i) * p + y * g.wo) * o;
            let d0 = ((i * hq + y + q) * wq + q) * o;
            let (dy, z) = (&dy[src..][..g.wo * o], &s.z[src..][..g.wo * o]);
            let d = &mut dst[d0..][..g.wo * o];
            if relu {
                dz_pixels(d, dy, z, s, bn, true);
            } else {
                dz_pixels(d, dy, z, s, bn, false);
            }
        }
    }
}

/// Zeroes the border of width `q` of one image of `h` × `w` pixels of `ch`
/// values.
fn zero_border(img: &mut [f32], (h, w, ch): (usize, usize, usize), q: usize) {
    if q == 0 {
        return;
    }
    for (y, row) in img.chunks_exact_mut(w * ch).enumerate() {
        if y < q || y + q >= h {
            row.fill(0.0);
        } else {
            row[..q * ch].fill(0.0);
            row[(w - q) * ch..].fill(0.0);
        }
    }
}

/// `dz = c1·dy' + c2 + c3·z` for whole pixels (`o` channels each).
#[inline(always)]
fn dz_pixels(d: &mut [f32], dy: &[f32], z: &[f32], s: &Saved, bn: &BnBackward, relu: bool) {
    let o = bn.c1.len();
    let (a, b) = (&s.a[..o], &s.b[..o]);
    let (c1, c2, c3) = (&bn.c1[..o], &bn.c2[..o], &bn.c3[..o]);
    for ((d, dy), z) in d
        .chunks_exact_mut(o)
        .zip(dy.chunks_exact(o))
        .zip(z.chunks_exact(o))
    {
        for ch in 0..o {
            let m = masked(dy[ch], z[ch], a[ch], b[ch], relu);
            d[ch] = c1[ch] * m + c2[ch] + c3[ch] * z[ch];
        }
    }
}

/// Weight gradient of one chunk, `[tap][c][o]`, from its padded input and
/// its `dz` (border `q`).
fn dw_chunk(isa: Isa, g: &Geom, xpad: &[f32], dz: &[f32], images: usize, q: usize) -> Aligned {
    let (c, o, wp) = (g.c, g.o, g.wp());
    let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
    let segs: Vec<(isize, isize)> = (0..images)
        .flat_map(|i| (0..g.ho).map(move |y| (i, y)))
        .map(|(i, y)| {
            let a = (i * g.hp() + y * g.stride) * wp * c;
            let b = ((i * hq + y + q) * wq + q) * o;
            (a as isize, b as isize)
        })
        .collect();
    // Every element is written by the products below (each tap's c×o block,
    // not accumulating).
    let mut dw = Aligned::uninit(g.k * g.k * c * o);
    for t in 0..g.k * g.k {
        let (ky, kx) = (t / g.k, t % g.k);
        let tile = Tile::flat(
            xpad[(ky * wp + kx) * c..].as_ptr(),
            1,
            (g.stride * c) as isize,
            dz.as_ptr(),
            o as isize,
            &segs,
            g.wo,
            dw[t * c * o..].as_mut_ptr(),
            o as isize,
            false,
        );
        // SAFETY: row r (channel) of step x in segment (i, y) reads
        // xpad[i][y·s + ky][x·s + kx][r], inside the padded chunk; B reads
        // dz[i][y + q][x + q][0..o]; out is the tap's c×o block.
        unsafe { kernel::product(isa, &tile, c, o) };
    }
    dw
}

/// Output positions `lo..hi` (of `n_out`) whose input position `x·s + t −
/// pad` lies inside `0..n_in`, for kernel offset `t`.
fn valid_range(t: usize, g: &Geom, n_out: usize, n_in: usize) -> (usize, usize) {
    let s = g.stride;
    let lo = g.pad.saturating_sub(t).div_ceil(s);
    let hi = match (n_in + g.pad).checked_sub(t + 1) {
        Some(last) => (last / s + 1).min(n_out),
        None => 0,
    };
    (lo, hi.max(lo))
}

/// As [`dw_chunk`], but reading the chunk's unpadded images `x`: each tap
/// sums only over the output pixels whose input pixel is inside the image
/// (the padded version adds zero products there), so no padded copy is
/// made. Worth it on images wide enough for long runs of pixels.
fn dw_chunk_direct(isa: Isa, g: &Geom, x: &[f32], dz: &[f32], images: usize, q: usize) -> Aligned {
    let (c, o, s) = (g.c, g.o, g.stride);
    let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
    // Every element is written: each tap's c×o block by a product, or
    // zeroed when no pixel reaches inside the image.
    let mut dw = Aligned::uninit(g.k * g.k * c * o);
    for t in 0..g.k * g.k {
        let (ky, kx) = (t / g.k, t % g.k);
        let (y0, y1) = valid_range(ky, g, g.ho, g.h);
        let (x0, x1) = valid_range(kx, g, g.wo, g.w);
        let out = &mut dw[t * c * o..][..c * o];
        if y0 == y1 || x0 == x1 {
            out.fill(0.0);
            continue;
        }
        let segs: Vec<(isize, isize)> = (0..images)
            .flat_map(|i| (y0..y1).map(move |y| (i, y)))
            .map(|(i, y)| {
                let (iy, ix) = (y * s + ky - g.pad, x0 * s + kx - g.pad);
                let a = ((i * g.h + iy) * g.w + ix) * c;
                let b = ((i * hq + y + q) * wq + q + x0) * o;
                (a as isize, b as isize)
            })
            .collect();
        let tile = Tile::flat(
            x.as_ptr(),
            1,
            (s * c) as isize,
            dz.as_ptr(),
            o as isize,
            &segs,
            x1 - x0,
            out.as_mut_ptr(),
            o as isize,
            false,
        );
        // SAFETY: row r (channel) of step j in segment (i, y) reads
        // x[i][y·s + ky − pad][(x0 + j)·s + kx − pad][r], inside the image
        // by the valid ranges; B reads dz[i][y + q][x0 + j + q][0..o]; out
        // is the tap's c×o block.
        unsafe { kernel::product(isa, &tile, c, o) };
    }
    dw
}

/// Input gradient of one chunk into `dx` (the chunk's images, NHWC), plus
/// `res` (laid out like `dx`) when given.
fn dx_chunk(
    isa: Isa,
    g: &Geom,
    (wb, dz): (&[f32], &[f32]),
    images: usize,
    dx: &mut [f32],
    res: Option<&[f32]>,
) {
    let (c, o) = (g.c, g.o);
    let img = g.h * g.w * c;
    if g.dx_gathers() {
        let q = g.q();
        let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
        let taps = g.taps(wq, o, o * c);
        for i in 0..images {
            let out = &mut dx[i * g.h * g.w * c..][..g.h * g.w * c];
            let t = Tile {
                a: dz[i * hq * wq * o..].as_ptr(),
                a_rs: o as isize,
                rw: g.w,
                a_gs: (wq * o) as isize,
                a_ks: 1,
                b: wb.as_ptr(),
                b_ks: c as isize,
                segs: &taps,
                k: o,
                out: out.as_mut_ptr(),
                out_rs: c as isize,
                out_gs: (g.w * c) as isize,
                accumulate: false,
                epilogue: Epilogue {
                    res: res.map_or(std::ptr::null(), |r| r[i * img..].as_ptr()),
                    ..Epilogue::NONE
                },
            };
            // SAFETY: input pixel (y, x) reads dzpad[i][y + ty][x + tx] with
            // y + ty < h + k − 1 ≤ ho + 2q (stride 1); out (and the residual)
            // is the image.
            unsafe { kernel::product(isa, &t, g.h * g.w, c) };
        }
        return;
    }
    // Strided: scatter each tap of dz·Wᵀ into a padded gradient.
    let (hp, wp) = (g.hp(), g.wp());
    let mut dpad = Aligned::zeros(hp * wp * c);
    for i in 0..images {
        dpad.fill(0.0);
        for t in 0..g.k * g.k {
            let (ky, kx) = (t / g.k, t % g.k);
            let seg = [(0isize, (t * o * c) as isize)];
            let tile = Tile {
                a: dz[i * g.p() * o..].as_ptr(),
                a_rs: o as isize,
                rw: g.wo,
                a_gs: (g.wo * o) as isize,
                a_ks: 1,
                b: wb.as_ptr(),
                b_ks: c as isize,
                segs: &seg,
                k: o,
                out: dpad[(ky * wp + kx) * c..].as_mut_ptr(),
                out_rs: (g.stride * c) as isize,
                out_gs: (g.stride * wp * c) as isize,
                accumulate: true,
                epilogue: Epilogue::NONE,
            };
            // SAFETY: output pixel (y, x) adds into the padded gradient at
            // (y·s + ky, x·s + kx), inside it for every valid output.
            unsafe { kernel::product(isa, &tile, g.p(), c) };
        }
        let img = &mut dx[i * g.h * g.w * c..][..g.h * g.w * c];
        for y in 0..g.h {
            img[y * g.w * c..][..g.w * c]
                .copy_from_slice(&dpad[((y + g.pad) * wp + g.pad) * c..][..g.w * c]);
        }
        if let Some(r) = res {
            img.iter_mut()
                .zip(&r[i * g.h * g.w * c..])
                .for_each(|(d, r)| *d += r);
        }
    }
}

/// Input and weight gradients of the whole batch, chunk by chunk; `dx_res`
/// (laid out like `x`) is added to the input gradient.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_backward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    s: &Saved,
    bn: &BnBackward,
    relu: bool,
    need_dx: bool,
    dx_res: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let isa = Isa::detect();
    let wb = pack_backward(w, g, g.dx_gathers());
    let q = if need_dx && g.dx_gathers() { g.q() } else { 0 };
    let img_in = g.h * g.w * g.c;
    // Every element is written by `dx_chunk` (a gather, or the copy out
    // of the padded scatter).
    let mut dx = super::output_vec(if need_dx { g.n * img_in } else { 0 });
    let dxp = SyncPtr(dx.as_mut_ptr());
    let mut parts: Vec<Aligned> = g
        .chunks()
        .into_par_iter()
        .map(|(n0, n1)| {
            let images = n1 - n0;
            // Every element is written by `dz_chunk` (border and values).
            let mut dz = Aligned::uninit(images * (g.ho + 2 * q) * (g.wo + 2 * q) * g.o);
            dz_chunk(g, dy, s, bn, relu, (n0, n1), q, &mut dz);
            let dw = if g.pad > 0 && g.w >= DIRECT_DW_WIDTH {
                dw_chunk_direct(isa, g, &x[n0 * img_in..n1 * img_in], &dz, images, q)
            } else {
                dw_chunk(isa, g, &padded_chunk(x, g, (n0, n1)), &dz, images, q)
            };
            if need_dx {
                // SAFETY: images n0..n1 of dx belong to this chunk only.
                let dxc = unsafe {
                    std::slice::from_raw_parts_mut(dxp.ptr().add(n0 * img_in), images * img_in)
                };
                let res = dx_res.map(|r| &r[n0 * img_in..n1 * img_in]);
                dx_chunk(isa, g, (&wb, &dz), images, dxc, res);
            }
            dw
        })
        .collect();
    // Sum the chunks in order (into the first), then [tap][c][o] → OIHW by
    // blocks of 16 output channels.
    let (kk, c, o) = (g.k * g.k, g.c, g.o);
    let (sum, rest) = parts.split_first_mut().expect("at least one chunk");
    sum.par_chunks_mut(4096).enumerate().for_each(|(i, d)| {
        for part in rest.iter() {
            d.iter_mut()
                .zip(&part[i * 4096..])
                .for_each(|(d, p)| *d += p);
        }
    });
    // Every element is written: each block covers its rows' (c, tap) pairs.
    let mut dw = super::output_vec(o * c * kk);
    dw.par_chunks_mut(16 * c * kk)
        .enumerate()
        .for_each(|(blk, rows)| {
            let o0 = blk * 16;
            for t in 0..kk {
                for ic in 0..c {
                    let src = &sum[(t * c + ic) * o + o0..];
                    for (row, &v) in rows.chunks_exact_mut(c * kk).zip(src) {
                        row[ic * kk + t] = v;
                    }
                }
            }
        });
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `valid_range` against counting every position, over strides,
    /// paddings, kernel offsets and sizes down to inputs smaller than the
    /// kernel.
    #[test]
    fn valid_range_is_exactly_the_positions_inside() {
        for (k, stride, pad) in [
            (3, 1, 1),
            (3, 2, 1),
            (1, 2, 0),
            (3, 1, 0),
            (5, 2, 2),
            (3, 3, 2),
        ] {
            for n_in in 1..12 {
                let x = candle_core::Shape::from((1, n_in, n_in, 1));
                let Ok(g) = Geom::new(&x, &candle_core::Shape::from((1, 1, k, k)), stride, pad)
                else {
                    continue;
                };
                for t in 0..k {
                    let inside: Vec<usize> = (0..g.wo)
                        .filter(|&o| (o * stride + t).checked_sub(pad).is_some_and(|i| i < n_in))
                        .collect();
                    let (lo, hi) = valid_range(t, &g, g.wo, n_in);
                    assert_eq!(
                        (lo..hi).collect::<Vec<_>>(),
                        inside,
                        "k {k} stride {stride} pad {pad} n_in {n_in} t {t}"
                    );
                }
            }
        }
    }
}
