use super::*;
use candle_core::Var;

/// NHWC ↔ NCHW views for comparing with stock candle (which is NCHW).
fn nchw(t: &Tensor) -> Tensor {
    t.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()
}
fn nhwc(t: &Tensor) -> Tensor {
    t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = crate::augment::mix(s);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    tensor(v, shape).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Gradients of `sum(f(x) · r)` for a fixed random `r`, through candle.
fn grads_of(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    seed: u64,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = rand(y.dims(), seed);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grads = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
    (y, grads)
}

/// Stock candle conv → BN with batch statistics → ReLU.
fn stock_conv_bn(t: &[Tensor], stride: usize, pad: usize, relu: bool) -> Tensor {
    let z = nchw(&t[0]).conv2d(&t[1], pad, stride, 1, 1).unwrap();
    let c = z.dim(1).unwrap();
    let mean4 = |v: &Tensor| {
        v.mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap()
    };
    let zc = z.broadcast_sub(&mean4(&z)).unwrap();
    let var = mean4(&zc.sqr().unwrap());
    let y = zc
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&t[2].reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&t[3].reshape((1, c, 1, 1)).unwrap())
        .unwrap();
    nhwc(&if relu { y.relu().unwrap() } else { y })
}

fn fused(t: &[Tensor], stride: usize, pad: usize, relu: bool) -> Tensor {
    conv_bn_train(&t[0], &t[1], &t[2], &t[3], stride, pad, 1e-5, relu)
        .unwrap()
        .0
}

#[test]
fn conv_bn_matches_stock_candle_forward_and_backward() {
    // (n, c, h, w, o, k, stride, pad): 3x3 s1/s2, 1x1 s2, odd sizes,
    // 2x2 inputs, the stem, Mini-ResNet's widths (whole vectors on every
    // ISA) and odd widths (vector tails).
    let cases = [
        (3, 16, 8, 8, 16, 3, 1, 1),
        (2, 16, 8, 8, 32, 3, 2, 1),
        (3, 32, 4, 4, 64, 3, 2, 1),
        (2, 64, 4, 4, 128, 1, 2, 0),
        (2, 128, 2, 2, 128, 3, 1, 1),
        (2, 24, 5, 7, 40, 3, 1, 1),
        (2, 3, 8, 8, 5, 3, 1, 1),
        (3, 4, 7, 9, 6, 3, 2, 1),
        (2, 5, 9, 7, 3, 1, 2, 0),
        (3, 2, 2, 2, 2, 3, 1, 1),
        (4, 3, 32, 32, 16, 3, 1, 1),
        (2, 8, 4, 4, 8, 3, 2, 1),
        // Enough images for several chunks per thread group.
        (70, 2, 8, 8, 3, 3, 1, 1),
        (37, 2, 6, 6, 3, 3, 2, 1),
        // Chunks sized by the weight-gradient part (wide, 2x2 images).
        (41, 128, 2, 2, 128, 3, 1, 1),
    ];
    for (i, &(n, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
        for relu in [false, true] {
            let inputs = [
                rand(&[n, h, w, c], 10 + i as u64),
                rand(&[o, c, k, k], 20 + i as u64),
                rand(&[o], 30 + i as u64).affine(0.5, 1.0).unwrap(),
                rand(&[o], 40 + i as u64),
            ];
            let (y1, g1) = grads_of(&|t| fused(t, s, p, relu), &inputs, 7);
            let (y2, g2) = grads_of(&|t| stock_conv_bn(t, s, p, relu), &inputs, 7);
            assert!(
                max_abs_diff(&y1, &y2) < 1e-4,
                "case {i} relu {relu}: forward"
            );
            for k in 0..4 {
                let d = max_abs_diff(&g1[k], &g2[k]);
                assert!(d < 1e-3, "case {i} relu {relu}: gradient {k} off by {d}");
            }
        }
    }
}

/// Central finite differences of `sum(f(x)·r)` against the analytic
/// gradient, at a few coordinates of each input.
fn check_finite_differences(f: &dyn Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], tol: f32) {
    let (y, grads) = grads_of(f, inputs, 99);
    let r = rand(y.dims(), 99);
    let loss = |ts: &[Tensor]| -> f64 {
        let y: Vec<f32> = f(ts).flatten_all().unwrap().to_vec1().unwrap();
        let r: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let h = 1e-2f32;
    for (k, inp) in inputs.iter().enumerate() {
        let base: Vec<f32> = inp.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f32> = grads[k].flatten_all().unwrap().to_vec1().unwrap();
        for idx in (0..base.len()).step_by(base.len().div_ceil(7)) {
            let eval = |delta: f32| {
                let mut v = base.clone();
                v[idx] += delta;
                let mut ts = inputs.to_vec();
                ts[k] = tensor(v, inp.dims()).unwrap();
                loss(&ts)
            };
            let num = ((eval(h) - eval(-h)) / (2.0 * h as f64)) as f32;
            assert!(
                (num - g[idx]).abs() <= tol * (1.0 + num.abs()),
                "input {k} index {idx}: numeric {num} analytic {}",
                g[idx]
            );
        }
    }
}

#[test]
fn conv_bn_finite_differences() {
    let inputs = [
        rand(&[3, 5, 6, 3], 1),
        rand(&[4, 3, 3, 3], 2),
        rand(&[4], 3).affine(0.5, 1.0).unwrap(),
        rand(&[4], 4),
    ];
    check_finite_differences(&|t| fused(t, 2, 1, false), &inputs, 3e-2);
}

#[test]
fn conv_bn_reports_batch_statistics() {
    // An offset input, so the mean is large against the spread.
    let x = (rand(&[4, 5, 5, 3], 3) + 3.0).unwrap();
    let w = rand(&[2, 3, 3, 3], 4);
    let ones = Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap();
    let zeros = ones.zeros_like().unwrap();
    let (_, st) = conv_bn_train(&x, &w, &ones, &zeros, 1, 1, 1e-5, false).unwrap();
    let z = nchw(&x).conv2d(&w, 1, 1, 1, 1).unwrap();
    let zc = z.transpose(0, 1).unwrap().flatten_from(1).unwrap();
    let mean: Vec<f32> = zc.mean(1).unwrap().to_vec1().unwrap();
    let var: Vec<f32> = zc
        .broadcast_sub(&zc.mean_keepdim(1).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(st.count, 100);
    for c in 0..2 {
        assert!((st.mean[c] - mean[c]).abs() < 1e-5);
        assert!((st.var[c] - var[c]).abs() < 1e-4);
    }
}

#[test]
fn conv_affine_eval_matches_stock_candle() {
    let x = rand(&[2, 6, 5, 16], 9);
    let w = rand(&[16, 16, 3, 3], 10);
    let a = rand(&[16], 11);
    let b = rand(&[16], 12);
    for relu in [false, true] {
        for (s, p) in [(1, 1), (2, 1)] {
            let y = nchw(&conv_affine_eval(&x, &w, &a, &b, s, p, relu).unwrap());
            let r = nchw(&x)
                .conv2d(&w, p, s, 1, 1)
                .unwrap()
                .broadcast_mul(&a.reshape((1, 16, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&b.reshape((1, 16, 1, 1)).unwrap())
                .unwrap();
            let r = if relu { r.relu().unwrap() } else { r };
            let d = max_abs_diff(&y, &r);
            assert!(d < 1e-4, "stride {s} relu {relu}: off by {d}");
        }
    }
}

/// The fused inference stem gives the bits of its two ops run apart: the
/// stem's shape, odd sizes, stride 2 and a batch of several chunks.
#[test]
fn conv_relu_maxpool_eval_equals_the_two_ops() {
    for (i, &(n, h, w, c, o, s)) in [
        (3, 32, 32, 3, 16, 1),
        (2, 7, 9, 5, 6, 1),
        (2, 9, 8, 4, 16, 2),
        (40, 12, 12, 3, 16, 1),
    ]
    .iter()
    .enumerate()
    {
        let seed = 100 + 10 * i as u64;
        let x = rand(&[n, h, w, c], seed);
        let wt = rand(&[o, c, 3, 3], seed + 1);
        let (a, b) = (rand(&[o], seed + 2), rand(&[o], seed + 3));
        let fused = conv_affine_relu_maxpool_eval(&x, &wt, (&a, &b), s, 1).unwrap();
        let apart =
            maxpool_3x3_s2_p1(&conv_affine_eval(&x, &wt, &a, &b, s, 1, true).unwrap()).unwrap();
        assert_eq!(fused.dims(), apart.dims());
        assert_eq!(max_abs_diff(&fused, &apart), 0.0, "case {i}");
    }
}

#[test]
fn add_relu_matches_stock_candle() {
    let a = rand(&[2, 3, 4, 5], 12);
    let b = rand(&[2, 3, 4, 5], 13);
    let (y1, g1) = grads_of(
        &|t| add_relu(&t[0], &t[1]).unwrap(),
        &[a.clone(), b.clone()],
        14,
    );
    let (y2, g2) = grads_of(&|t| (&t[0] + &t[1]).unwrap().relu().unwrap(), &[a, b], 14);
    assert_eq!(max_abs_diff(&y1, &y2), 0.0);
    assert_eq!(max_abs_diff(&g1[0], &g2[0]), 0.0);
    assert_eq!(max_abs_diff(&g1[1], &g2[1]), 0.0);
}

#[test]
fn maxpool_matches_the_stacked_view_version() {
    for &(h, w) in &[(4usize, 4usize), (5, 7), (32, 32), (1, 2), (3, 1)] {
        // Positive and distinct (no ties, and the stock version's zero
        // padding never wins).
        let x = (rand(&[2, h, w, 3], h as u64 * 31 + w as u64).abs().unwrap() + 0.01).unwrap();
        let (y1, g1) = grads_of(
            &|t| maxpool_3x3_s2_p1(&t[0]).unwrap(),
            std::slice::from_ref(&x),
            15,
        );
        let (y2, g2) = grads_of(
            &|t| nhwc(&crate::model::maxpool_3x3_s2_p1(&nchw(&t[0])).unwrap()),
            &[x],
            15,
        );
        assert_eq!(max_abs_diff(&y1, &y2), 0.0, "{h}x{w}");
        // An input in up to four windows gets their gradients added in
        // another order than candle's: equal up to rounding.
        let d = max_abs_diff(&g1[0], &g2[0]);
        assert!(d < 1e-6, "{h}x{w}: gradient off by {d}");
    }
}

#[test]
fn maxpool_ties_go_to_the_first_maximum() {
    let x = tensor(vec![0.0; 16], (1, 4, 4, 1)).unwrap();
    let (_, g) = grads_of(&|t| maxpool_3x3_s2_p1(&t[0]).unwrap(), &[x], 1);
    let g: Vec<f32> = g[0].flatten_all().unwrap().to_vec1().unwrap();
    // Windows start at (0,0), (0,1), (1,0), (1,1): one nonzero each.
    assert_eq!(g.iter().filter(|v| **v != 0.0).count(), 4);
    assert!(g[0] != 0.0 && g[1] != 0.0 && g[4] != 0.0 && g[5] != 0.0);
}

#[test]
fn maxpool_finite_differences() {
    let x = rand(&[1, 5, 5, 2], 17);
    check_finite_differences(&|t| maxpool_3x3_s2_p1(&t[0]).unwrap(), &[x], 1e-2);
}

#[test]
fn bad_shapes_are_errors() {
    let x = rand(&[1, 4, 4, 3], 1);
    let g = rand(&[2], 3);
    assert!(conv_bn_train(&x, &rand(&[2, 4, 3, 3], 2), &g, &g, 1, 1, 1e-5, false).is_err());
    assert!(conv_bn_train(&x, &rand(&[3, 3, 3, 3], 2), &g, &g, 1, 1, 1e-5, false).is_err());
    let empty = Tensor::zeros((0, 4, 4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(conv_bn_train(&empty, &rand(&[2, 3, 3, 3], 2), &g, &g, 1, 1, 1e-5, false).is_err());
    assert!(add_relu(&x, &rand(&[1, 4, 5, 3], 5)).is_err());
    assert!(maxpool_3x3_s2_p1(&rand(&[1, 3], 5)).is_err());
}

/// The same seed gives the same bytes whatever the thread count: chunks
/// depend only on the shape and partial sums are added in chunk order.
#[test]
fn conv_bn_results_do_not_depend_on_the_thread_count() {
    // 6x6: the weight gradient reads a padded copy; 10x9: the input itself.
    for (n, h, w) in [(37, 6, 6), (23, 10, 9)] {
        same_bytes_for_1_2_3_threads(n, h, w);
    }
}

fn same_bytes_for_1_2_3_threads(n: usize, h: usize, w: usize) {
    let inputs = [
        rand(&[n, h, w, 16], 1),
        rand(&[32, 16, 3, 3], 2),
        rand(&[32], 3).affine(0.5, 1.0).unwrap(),
        rand(&[32], 4),
    ];
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (y, g) = grads_of(&|t| fused(t, 2, 1, true), &inputs, 5);
            let mut all: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for g in g {
                all.extend(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            all
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn conv_affine_add_relu_eval_matches_stock_candle() {
    for (s, p, k, c, o) in [
        (1, 1, 3, 16, 16),
        (2, 1, 3, 16, 32),
        (2, 0, 1, 8, 24),
        (1, 1, 3, 4, 4),
        (1, 1, 3, 8, 8),
    ] {
        let x = rand(&[7, 6, 5, c], 21);
        let w = rand(&[o, c, k, k], 22);
        let a = rand(&[o], 23);
        let b = rand(&[o], 24);
        let y0 = conv_affine_eval(&x, &w, &a, &b, s, p, false).unwrap();
        let res = rand(y0.dims(), 25);
        let y = conv_affine_add_relu_eval(&x, &w, &a, &b, &res, s, p).unwrap();
        let r = nchw(&x)
            .conv2d(&w, p, s, 1, 1)
            .unwrap()
            .broadcast_mul(&a.reshape((1, o, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        let r = (nhwc(&r) + &res).unwrap().relu().unwrap();
        let d = max_abs_diff(&y, &r);
        assert!(d < 1e-4, "stride {s} k {k}: off by {d}");
        let bad = rand(&[3, 6, 5, o], 26);
        if bad.dims() != y.dims() {
            assert!(conv_affine_add_relu_eval(&x, &w, &a, &b, &bad, s, p).is_err());
        }
    }
}

/// The block op against the same block composed of the single ops (which
/// the tests above hold to stock candle): output, every gradient, and the
/// BN statistics, for an identity and a projection shortcut, over batches
/// of several chunks.
#[test]
fn block_train_matches_the_composed_ops() {
    for (n, h, c, o, stride, projection) in [(9, 6, 16, 16, 1, false), (7, 8, 16, 32, 2, true)] {
        let k = [o * c * 9, o * o * 9, if projection { o * c } else { 0 }];
        let x = rand(&[n, h, h, c], 1);
        let w = rand(&[k.iter().sum()], 2);
        let gb = rand(&[if projection { 6 } else { 4 } * o], 3)
            .affine(0.5, 0.75)
            .unwrap();
        let spec = BlockSpec {
            cin: c,
            cout: o,
            stride,
            projection,
        };
        let fused = |t: &[Tensor]| block_train(&t[0], &t[1], &t[2], spec, 1e-5).unwrap().0;
        let composed = |t: &[Tensor]| {
            let wt = |i: usize, shape: (usize, usize, usize, usize)| {
                let at = k[..i].iter().sum();
                t[1].narrow(0, at, k[i]).unwrap().reshape(shape).unwrap()
            };
            let bn = |i: usize| {
                let g = t[2].narrow(0, 2 * i * o, o).unwrap();
                (g, t[2].narrow(0, (2 * i + 1) * o, o).unwrap())
            };
            let ((g1, b1), (g2, b2)) = (bn(0), bn(1));
            let y1 = conv_bn_train(&t[0], &wt(0, (o, c, 3, 3)), &g1, &b1, stride, 1, 1e-5, true);
            let y1 = y1.unwrap().0;
            let y2 = conv_bn_train(&y1, &wt(1, (o, o, 3, 3)), &g2, &b2, 1, 1, 1e-5, false);
            let short = if projection {
                let (gs, bs) = bn(2);
                conv_bn_train(
                    &t[0],
                    &wt(2, (o, c, 1, 1)),
                    &gs,
                    &bs,
                    stride,
                    0,
                    1e-5,
                    false,
                )
                .unwrap()
                .0
            } else {
                t[0].clone()
            };
            add_relu(&y2.unwrap().0, &short).unwrap()
        };
        let inputs = [x.clone(), w.clone(), gb.clone()];
        let (y1, g1) = grads_of(&fused, &inputs, 4);
        let (y2, g2) = grads_of(&composed, &inputs, 4);
        assert!(
            max_abs_diff(&y1, &y2) < 1e-5,
            "projection {projection}: output"
        );
        for i in 0..3 {
            let d = max_abs_diff(&g1[i], &g2[i]);
            assert!(d < 1e-4, "projection {projection}: gradient {i} off by {d}");
        }
        let (_, stats) = block_train(&x, &w, &gb, spec, 1e-5).unwrap();
        assert_eq!(stats.len(), if projection { 3 } else { 2 });
        assert_eq!(stats[0].count, n * (h / stride) * (h / stride));
    }
}
