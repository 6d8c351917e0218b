//! The one compute kernel of the CPU training ops: a register-blocked
//! product `out[r][j] (=|+=) Σ_seg Σ_k A(r, k) · B(k, j)` with arbitrary
//! strides, where `A` is read one scalar at a time (broadcast) and `B` one
//! vector row at a time. The convolution's forward pass, input gradient and
//! weight gradient are all this product over different views of NHWC data
//! (see `conv.rs`), so no im2col matrix is ever materialized.
//!
//! Runtime ISA dispatch: AVX-512F (16 lanes, up to 6×64 or 8×32 tiles),
//! AVX2+FMA (8 lanes, up to 6×16 tiles), and a portable fallback for other
//! CPUs and for column tails that are not a whole number of vectors. Every
//! backend computes the same sums in the same order per output element
//! (k innermost, segments in order), so results do not depend on the tile
//! shape; across ISAs they differ only by FMA rounding.

use std::sync::OnceLock;

/// One tile's operands. Offsets and strides are in `f32` elements.
#[derive(Debug, Clone, Copy)]
pub struct Tile<'a> {
    /// Base of `A`.
    pub a: *const f32,
    /// Distance between rows `r` of `A` within a group of `rw` rows.
    pub a_rs: isize,
    /// Rows per group: row `r` is row `r % rw` of group `r / rw` (the
    /// pixels of one image row, when a tile spans several image rows).
    pub rw: usize,
    /// Distance between groups of rows of `A`.
    pub a_gs: isize,
    /// Distance between steps `k` of `A`.
    pub a_ks: isize,
    /// Base of `B` (the first column of the tile).
    pub b: *const f32,
    /// Distance between steps `k` of `B` (its columns are contiguous).
    pub b_ks: isize,
    /// `(A offset, B offset)` of each segment; `k` runs over `0..k` in each.
    pub segs: &'a [(isize, isize)],
    /// Steps per segment.
    pub k: usize,
    /// Output base (row 0, first column of the tile); columns contiguous.
    pub out: *mut f32,
    /// Distance between output rows within a group.
    pub out_rs: isize,
    /// Distance between groups of output rows.
    pub out_gs: isize,
    /// Add into `out` instead of overwriting it.
    pub accumulate: bool,
    /// Epilogue (when not accumulating): `out = relu?(sum + bias[col] +
    /// res[row, col])`, with `bias` (one per column) and `res` (laid out
    /// like `out`) left out when null.
    pub epilogue: Epilogue,
}

/// What is added to a tile's sums before they are stored.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue {
    /// Per-column shift, or null.
    pub bias: *const f32,
    /// A residual laid out like the output, or null.
    pub res: *const f32,
    /// Clamp at zero last.
    pub relu: bool,
}

impl Epilogue {
    /// Store the sums as they are.
    pub const NONE: Self = Self {
        bias: std::ptr::null(),
        res: std::ptr::null(),
        relu: false,
    };
}

/// The instruction set the ops dispatch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (x86-64-v4).
    Avx512,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// Plain Rust loops (any CPU).
    Portable,
}

impl Isa {
    /// Lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            Self::Avx2 => 8,
            Self::Portable => 16,
        }
    }

    /// Most rows of a tile `j` vectors wide.
    pub fn max_rows(self, j: usize) -> usize {
        match (self, j) {
            (Self::Avx512, 4) => 6,
            (Self::Avx512, _) => 8,
            (Self::Avx2, 2) => 6,
            (Self::Avx2, _) => 8,
            (Self::Portable, _) => 8,
        }
    }

    /// Widest tile, in vectors.
    pub fn max_vectors(self) -> usize {
        match self {
            Self::Avx512 => 4,
            Self::Avx2 => 2,
            Self::Portable => 1,
        }
    }

    /// What this CPU supports, unless `MINI_RESNET_ISA` (`avx512`, `avx2`,
    /// `portable`) asks for less. Detected once.
    pub fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            match std::env::var("MINI_RESNET_ISA").as_deref() {
                Ok("portable") => Self::Portable,
                Ok("avx2") if best != Self::Portable => Self::Avx2,
                _ => best,
            }
        })
    }

    fn best_supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "AVX-512F",
            Self::Avx2 => "AVX2+FMA",
            Self::Portable => "portable",
        }
    }
}

impl Tile<'_> {
    /// Offsets of row `r` in `A` and in the output.
    #[inline(always)]
    fn row(&self, r: usize) -> (isize, isize) {
        let (g, i) = ((r / self.rw) as isize, (r % self.rw) as isize);
        (
            g * self.a_gs + i * self.a_rs,
            g * self.out_gs + i * self.out_rs,
        )
    }

    /// A tile with no row groups (`a_rs`, `out_rs` apart).
    #[allow(clippy::too_many_arguments)]
    pub fn flat(
        a: *const f32,
        a_rs: isize,
        a_ks: isize,
        b: *const f32,
        b_ks: isize,
        segs: &[(isize, isize)],
        k: usize,
        out: *mut f32,
        out_rs: isize,
        accumulate: bool,
    ) -> Tile<'_> {
        Tile {
            a,
            a_rs,
            rw: usize::MAX,
            a_gs: 0,
            a_ks,
            b,
            b_ks,
            segs,
            k,
            out,
            out_rs,
            out_gs: 0,
            accumulate,
            epilogue: Epilogue::NONE,
        }
    }
}

/// Splits `n` rows into blocks of at most `max` rows, as even as possible:
/// yields `(first row, rows)`.
pub fn row_blocks(n: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let blocks = n.div_ceil(max.max(1));
    (0..blocks).map(move |b| {
        let lo = b * n / blocks;
        (lo, (b + 1) * n / blocks - lo)
    })
}

/// Runs the product for `rows` rows and `cols` columns (any counts), tiling
/// the columns into vectors of `isa` and the rest portably.
///
/// # Safety
/// Every element addressed through `t` (for rows `0..rows`, columns
/// `0..cols`, each segment and step) must be in bounds, and `out` must not
/// alias `A` or `B`.
pub unsafe fn product(isa: Isa, t: &Tile, rows: usize, cols: usize) {
    let lanes = isa.lanes();
    let mut c0 = 0;
    while c0 < cols {
        let vecs = ((cols - c0) / lanes).min(isa.max_vectors());
        let e = t.epilogue;
        let sub = Tile {
            b: t.b.wrapping_add(c0),
            out: t.out.wrapping_add(c0),
            epilogue: Epilogue {
                bias: if e.bias.is_null() {
                    e.bias
                } else {
                    e.bias.wrapping_add(c0)
                },
                res: if e.res.is_null() {
                    e.res
                } else {
                    e.res.wrapping_add(c0)
                },
                relu: e.relu,
            },
            ..*t
        };
        if vecs == 0 || isa == Isa::Portable {
            let w = (cols - c0).min(16);
            // SAFETY: forwarded; the tile covers columns c0..c0 + w.
            unsafe { portable(&sub, 0, rows, w) };
            c0 += w;
            continue;
        }
        let max = isa.max_rows(vecs);
        for (r0, n) in row_blocks(rows, max) {
            // SAFETY: forwarded; the block covers rows r0..r0 + n.
            unsafe { dispatch(isa, &sub, r0, n, vecs) };
        }
        c0 += vecs * lanes;
    }
}

/// Plain loops, rows `r0..r0 + rows` and `cols ≤ 16`.
///
/// # Safety
/// As [`product`], for rows `r0..r0 + rows` and columns `0..cols`.
unsafe fn portable(t: &Tile, r0: usize, rows: usize, cols: usize) {
    for r in r0..r0 + rows {
        let (ar, or) = t.row(r);
        let mut acc = [0f32; 16];
        for &(sa, sb) in t.segs {
            // SAFETY: row `r`, segment start of `A`: in bounds (the caller).
            let mut a = unsafe { t.a.offset(sa + ar) };
            // SAFETY: segment start of `B`: in bounds (the caller).
            let mut b = unsafe { t.b.offset(sb) };
            for _ in 0..t.k {
                // SAFETY: `A(r, k)` of this segment, in bounds (the caller).
                let av = unsafe { *a };
                for (j, acc) in acc.iter_mut().enumerate().take(cols) {
                    // SAFETY: `B(k, j)`, `j < cols`, in bounds (the caller).
                    *acc = av.mul_add(unsafe { *b.add(j) }, *acc);
                }
                a = a.wrapping_offset(t.a_ks);
                b = b.wrapping_offset(t.b_ks);
            }
        }
        // SAFETY: output row `r`, in bounds (the caller).
        let o = unsafe { t.out.offset(or) };
        let e = &t.epilogue;
        for (j, &v) in acc.iter().enumerate().take(cols) {
            // SAFETY: output, bias and residual element `j < cols` of row
            // `r`, in bounds (the caller); `out` aliases neither `A` nor `B`.
            unsafe {
                if t.accumulate {
                    *o.add(j) += v;
                    continue;
                }
                let mut v = v;
                if !e.bias.is_null() {
                    v += *e.bias.add(j);
                }
                if !e.res.is_null() {
                    v += *e.res.offset(or).add(j);
                }
                *o.add(j) = if e.relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// Picks the monomorphized tile for rows `r0..r0 + rows` × `vecs` vectors.
unsafe fn dispatch(isa: Isa, t: &Tile, r0: usize, rows: usize, vecs: usize) {
    macro_rules! pick {
        ($f:ident, $j:literal, $($r:literal)*) => {
            match rows {
                // SAFETY: forwarded from `product`.
                $($r => unsafe { $f::<$r, $j>(t, r0) },)*
                _ => unreachable!("tile rows {rows}"),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    match (isa, vecs) {
        (Isa::Avx512, 4) => return pick!(avx512, 4, 1 2 3 4 5 6),
        (Isa::Avx512, 3) => return pick!(avx512, 3, 1 2 3 4 5 6 7 8),
        (Isa::Avx512, 2) => return pick!(avx512, 2, 1 2 3 4 5 6 7 8),
        (Isa::Avx512, 1) => return pick!(avx512, 1, 1 2 3 4 5 6 7 8),
        (Isa::Avx2, 2) => return pick!(avx2, 2, 1 2 3 4 5 6),
        (Isa::Avx2, 1) => return pick!(avx2, 1, 1 2 3 4 5 6 7 8),
        _ => {}
    }
    // SAFETY: forwarded.
    unsafe { portable(t, r0, rows, vecs * isa.lanes()) }
}

/// Defines one ISA's tile: `R` rows of `J` vectors held in registers over
/// every segment and step, then stored or added once.
macro_rules! simd_tile {
    ($name:ident, $feat:literal, $lanes:literal, $v:ty, $zero:ident, $set1:ident,
     $load:ident, $store:ident, $add:ident, $max:ident, $fma:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $name<const R: usize, const J: usize>(t: &Tile, r0: usize) {
            use std::arch::x86_64::*;
            let mut acc: [[$v; J]; R] = [[$zero(); J]; R];
            let rows: [(isize, isize); R] = std::array::from_fn(|r| t.row(r0 + r));
            for &(sa, sb) in t.segs {
                let mut a = t.a.wrapping_offset(sa);
                let mut b = t.b.wrapping_offset(sb);
                for _ in 0..t.k {
                    let mut bv: [$v; J] = [$zero(); J];
                    for (j, v) in bv.iter_mut().enumerate() {
                        // SAFETY: the caller guarantees B's bounds.
                        *v = unsafe { $load(b.add(j * $lanes)) };
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: the caller guarantees A's bounds.
                        let av = $set1(unsafe { *a.offset(rows[r].0) });
                        for (acc, &bv) in acc.iter_mut().zip(&bv) {
                            *acc = $fma(av, bv, *acc);
                        }
                    }
                    a = a.wrapping_offset(t.a_ks);
                    b = b.wrapping_offset(t.b_ks);
                }
            }
            let e = &t.epilogue;
            for (r, acc) in acc.iter().enumerate() {
                let o = t.out.wrapping_offset(rows[r].1);
                for (j, &v) in acc.iter().enumerate() {
                    let p = o.wrapping_add(j * $lanes);
                    // SAFETY: the caller guarantees the bounds of the
                    // output, the bias and the residual.
                    unsafe {
                        if t.accumulate {
                            $store(p, $add($load(p), v));
                            continue;
                        }
                        let mut v = v;
                        if !e.bias.is_null() {
                            v = $add(v, $load(e.bias.add(j * $lanes)));
                        }
                        if !e.res.is_null() {
                            v = $add(v, $load(e.res.offset(rows[r].1).add(j * $lanes)));
                        }
                        if e.relu {
                            v = $max(v, $zero());
                        }
                        $store(p, v);
                    }
                }
            }
        }
    };
}

simd_tile!(
    avx512,
    "avx512f",
    16,
    __m512,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_add_ps,
    _mm512_max_ps,
    _mm512_fmadd_ps
);
simd_tile!(
    avx2,
    "avx2,fma",
    8,
    __m256,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_max_ps,
    _mm256_fmadd_ps
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loop with the same summation order (index loops on
    /// purpose: the reference spells out every address).
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn reference(
        a: &[f32],
        b: &[f32],
        t: &Tile,
        a0: usize,
        b0: usize,
        rows: usize,
        cols: usize,
        out: &mut [f32],
        o0: usize,
        (bias, res): (&[f32], &[f32]),
    ) {
        for r in 0..rows {
            for j in 0..cols {
                let mut s = 0f32;
                for &(sa, sb) in t.segs {
                    for k in 0..t.k {
                        let ai = a0 as isize + sa + t.row(r).0 + k as isize * t.a_ks;
                        let bi = b0 as isize + sb + k as isize * t.b_ks + j as isize;
                        s = a[ai as usize].mul_add(b[bi as usize], s);
                    }
                }
                let oi = (o0 as isize + t.row(r).1) as usize + j;
                if t.accumulate {
                    out[oi] += s;
                } else {
                    let e = &t.epilogue;
                    let mut v = s;
                    if !e.bias.is_null() {
                        v += bias[j];
                    }
                    if !e.res.is_null() {
                        v += res[oi];
                    }
                    out[oi] = if e.relu { v.max(0.0) } else { v };
                }
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::augment::mix(s);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_isa_and_shape_matches_the_plain_loop() {
        let isas: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| match i {
                Isa::Portable => true,
                Isa::Avx2 => Isa::best_supported() != Isa::Portable,
                Isa::Avx512 => Isa::best_supported() == Isa::Avx512,
            })
            .collect();
        let a = values(40_000, 1);
        let b = values(40_000, 2);
        let segs = [(0isize, 0isize), (37, 900), (5, 3000)];
        for &isa in &isas {
            for rows in [1usize, 2, 5, 6, 7, 8, 13, 16] {
                for cols in [1usize, 7, 8, 16, 24, 32, 48, 64, 72, 128, 131] {
                    for (a_rs, a_ks, rw) in [(19isize, 1isize, 3usize), (1, 23, 99), (64, 2, 2)] {
                        for (accumulate, epi) in [(false, 0), (true, 0), (false, 1), (false, 2)] {
                            let t0 = Tile {
                                a: std::ptr::null(),
                                a_rs,
                                rw,
                                a_gs: 211,
                                a_ks,
                                b: std::ptr::null(),
                                b_ks: 150,
                                segs: &segs,
                                k: 11,
                                out: std::ptr::null_mut(),
                                out_rs: 140,
                                out_gs: 500,
                                accumulate,
                                epilogue: Epilogue::NONE,
                            };
                            let init = values(4200, 3);
                            let (bias, res) = (values(200, 4), values(4200, 5));
                            // 1: bias and ReLU; 2: bias, residual and ReLU.
                            let epilogue = |b: *const f32, r: *const f32| Epilogue {
                                bias: if epi >= 1 { b } else { std::ptr::null() },
                                res: if epi == 2 { r } else { std::ptr::null() },
                                relu: epi >= 1,
                            };
                            let t0 = Tile {
                                epilogue: epilogue(bias.as_ptr(), res.as_ptr()),
                                ..t0
                            };
                            let mut want = init.clone();
                            let br = (&bias[..], &res[..]);
                            reference(&a, &b, &t0, 10, 20, rows, cols, &mut want, 3, br);
                            let mut got = init.clone();
                            let t = Tile {
                                a: a[10..].as_ptr(),
                                b: b[20..].as_ptr(),
                                out: got[3..].as_mut_ptr(),
                                epilogue: epilogue(bias.as_ptr(), res[3..].as_ptr()),
                                ..t0
                            };
                            // SAFETY: every index stays inside the vectors
                            // (checked by `reference`'s indexing above).
                            unsafe { product(isa, &t, rows, cols) };
                            assert_eq!(
                                got, want,
                                "{isa:?} rows {rows} cols {cols} a_rs {a_rs} acc {accumulate} epilogue {epi}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_blocks_cover_evenly() {
        let v: Vec<_> = row_blocks(16, 6).collect();
        assert_eq!(v, [(0, 5), (5, 5), (10, 6)]);
        assert_eq!(row_blocks(4, 6).collect::<Vec<_>>(), [(0, 4)]);
        assert_eq!(row_blocks(0, 6).count(), 0);
    }
}
