//! Float vs int8 on a small trained model: accuracy and agreement, per-layer
//! error bounds derived from the scales, layer-by-layer vs whole-network
//! equality, export determinism, and rejection of damaged blobs.

use std::sync::OnceLock;

use candle_core::Device;
use host_trainer::blob::OwnedModel;
use host_trainer::data::{synthetic, Dataset};
use host_trainer::export::{compare, export, ExportOptions};
use host_trainer::model::ArchConfig;
use host_trainer::quantize::{calibrate, int8_input, Calibration, FLayer, Graph};
use host_trainer::train::{
    self, load_checkpoint, model_from_checkpoint, Recipe, RunOptions, TrainConfig,
};
use shared::kernels::Dims;
use shared::model::{Layer, LayerKind, Model};

struct Fixture {
    _dir: tempfile::TempDir,
    ck: train::Checkpoint,
    trainee: train::Trainee,
    train_set: Dataset,
    test_set: Dataset,
}

/// A small Mini-ResNet (two stages, with max pool, a projection shortcut and
/// identity blocks) trained for a few epochs on a learnable synthetic set.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let train_set = synthetic(384, 4, 11);
        let test_set = synthetic(256, 4, 12);
        let mut cfg = TrainConfig::from_recipe(
            Recipe::Linear,
            train_set.len(),
            Some(3),
            Some(32),
            Some(0.05),
        )
        .unwrap();
        cfg.arch = ArchConfig {
            widths: vec![8, 16],
            blocks: vec![2, 2],
            maxpool: true,
            classes: 4,
        };
        let dir = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            run_dir: dir.path().to_path_buf(),
            resume: false,
            eval_batch: 64,
            stop_after: None,
            progress: false,
        };
        train::train(cfg, &train_set, &test_set, &opts, &Device::Cpu).unwrap();
        let ck = load_checkpoint(&dir.path().join("checkpoint.safetensors"), &Device::Cpu).unwrap();
        let trainee = model_from_checkpoint(&ck, &Device::Cpu).unwrap();
        Fixture {
            _dir: dir,
            ck,
            trainee,
            train_set,
            test_set,
        }
    })
}

fn opts() -> ExportOptions {
    ExportOptions {
        calib_images: 128,
        calibration: Calibration::MinMax,
        bias_correction: true,
        dataset: "synthetic".into(),
    }
}

fn exported() -> &'static (Vec<u8>, host_trainer::export::Comparison) {
    static E: OnceLock<(Vec<u8>, host_trainer::export::Comparison)> = OnceLock::new();
    E.get_or_init(|| {
        let f = fixture();
        export(
            &f.trainee.model,
            &f.ck,
            &f.train_set,
            &f.test_set,
            &opts(),
            &Device::Cpu,
        )
        .unwrap()
    })
}

#[test]
fn int8_agrees_with_float() {
    let (_, cmp) = exported();
    eprintln!("{}", serde_json::to_string(cmp).unwrap());
    assert_eq!(cmp.images, 256);
    assert!(
        cmp.float_accuracy > 80.0,
        "the fixture did not learn: {}",
        cmp.float_accuracy
    );
    assert!(
        cmp.top1_agreement >= 97.0,
        "top-1 agreement {}",
        cmp.top1_agreement
    );
    assert!(
        cmp.accuracy_delta.abs() <= 2.0,
        "accuracy moved {} points",
        cmp.accuracy_delta
    );
}

#[test]
fn export_is_deterministic() {
    let f = fixture();
    let (a, _) = exported();
    let (b, _) = export(
        &f.trainee.model,
        &f.ck,
        &f.train_set,
        &f.test_set,
        &opts(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(a == &b, "two exports of the same checkpoint differ");
}

#[test]
fn provenance_is_recorded() {
    let (blob, cmp) = exported();
    let owned = OwnedModel::new(blob).unwrap();
    let m = owned.model().unwrap();
    assert_eq!(m.meta_value("recipe"), Some("linear"));
    assert_eq!(m.meta_value("epochs"), Some("3"));
    assert_eq!(m.meta_value("dataset"), Some("synthetic"));
    assert_eq!(
        m.meta_value("int8_accuracy"),
        Some(format!("{:.2}", cmp.int8_accuracy).as_str())
    );
    assert!(m.meta_value("trainer_revision").is_some());
}

#[test]
fn every_single_byte_corruption_and_truncation_is_rejected() {
    let (blob, _) = exported();
    let owned = OwnedModel::new(blob).unwrap();
    let good = owned.bytes();
    // Work in an aligned buffer so only the corruption can fail the parse.
    let mut words = vec![0u32; good.len().div_ceil(4)];
    let buf: &mut [u8] = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..good.len()];
    buf.copy_from_slice(good);
    assert!(Model::parse(buf).is_ok());
    for i in 0..buf.len() {
        for flip in [0x01u8, 0x80, 0xFF] {
            buf[i] ^= flip;
            assert!(
                Model::parse(buf).is_err(),
                "corrupting byte {i} with {flip:#x} was accepted"
            );
            buf[i] ^= flip;
        }
    }
    for len in 0..buf.len() {
        assert!(
            Model::parse(&buf[..len]).is_err(),
            "truncation to {len} bytes was accepted"
        );
    }
    assert!(Model::parse(buf).is_ok());
}

/// Each layer run by calling the **reference** kernels directly, every
/// tensor in its own buffer (no arena, so no reliance on the exporter's
/// memory plan), equals the whole-network `Model::run` (the fast kernels,
/// through the DSP emulation on the host) bit for bit, with the minimum
/// scratch (2x2 conv tile), with four columns (1x4 tile) and with room for
/// the widened conv input (the firmware's `SCRATCH_LEN_FAST`).
fn reference_equals_fast(m: &Model<'_>, inputs: &[[i8; shared::preprocess::INPUT_LEN]]) {
    use shared::kernels::{
        add_s8_reference, avgpool_s8, conv2d_s8_reference, conv2d_s8_scratch_len, fc_s8,
        maxpool_s8_reference,
    };
    for (i, input) in inputs.iter().enumerate() {
        let mut tensors: Vec<Vec<i8>> = (0..m.tensor_count())
            .map(|t| vec![0; m.tensor(t).unwrap().dims.len()])
            .collect();
        tensors[m.input_index() as usize].copy_from_slice(input);
        for layer in m.layers() {
            let (din, dout) = (
                m.tensor(layer.input).unwrap().dims,
                m.tensor(layer.output).unwrap().dims,
            );
            let x = tensors[layer.input as usize].clone();
            let mut y = vec![0i8; dout.len()];
            match &layer.kind {
                LayerKind::Conv(c) => {
                    let mut s = vec![0i16; conv2d_s8_scratch_len(&c.params, din.c)];
                    conv2d_s8_reference(c, &x, din, &mut y, dout, &mut s).unwrap()
                }
                LayerKind::MaxPool(p) => maxpool_s8_reference(p, &x, din, &mut y, dout).unwrap(),
                LayerKind::AvgPool(p) => avgpool_s8(p, &x, din, &mut y, dout).unwrap(),
                LayerKind::Add(p) => {
                    add_s8_reference(p, &x, &tensors[layer.input2 as usize], &mut y).unwrap()
                }
                LayerKind::FullyConnected(fc) => fc_s8(fc, &x, &mut y).unwrap(),
            }
            tensors[layer.output as usize] = y;
        }
        let want = &tensors[m.output_index() as usize];
        // The widened input needs `fast_scratch_len()` after aligning the buffer.
        for scratch_len in [
            m.scratch_len(),
            2 * m.scratch_len(),
            m.fast_scratch_len() + 1,
        ] {
            let mut arena = vec![0i8; m.arena_len()];
            let mut scratch = vec![0i16; scratch_len];
            let mut whole = vec![0i8; m.output().dims.len()];
            m.run(input, &mut arena, &mut scratch, &mut whole).unwrap();
            assert_eq!(&whole, want, "image {i}, scratch {scratch_len}");
        }
    }
}

#[test]
fn reference_kernels_equal_fast_network() {
    let (blob, _) = exported();
    let owned = OwnedModel::new(blob).unwrap();
    let m = owned.model().unwrap();
    let f = fixture();
    let inputs: Vec<_> = (0..16)
        .map(|i| int8_input(f.test_set.image(i)).unwrap())
        .collect();
    reference_equals_fast(&m, &inputs);
}

/// The same on the model shipped in `shared` (the seed Mini-ResNet).
#[test]
fn shipped_model_reference_equals_fast() {
    let m = shared::model::default_model().unwrap();
    let f = fixture();
    let inputs: Vec<_> = (0..4)
        .map(|i| int8_input(f.test_set.image(i)).unwrap())
        .collect();
    reference_equals_fast(&m, &inputs);
}

/// Float evaluation of one layer of the traced graph, on NHWC f64 inputs.
fn float_layer(g: &Graph, layer: &FLayer, inputs: &[Vec<f64>]) -> Vec<f64> {
    match layer {
        FLayer::Conv {
            io,
            w,
            b,
            k,
            stride,
            relu,
            ..
        } => {
            let (id, od) = (g.tensors[io.0].dims, g.tensors[io.1].dims);
            let pad = k / 2;
            let mut out = vec![0f64; od.len()];
            for oy in 0..od.h {
                for ox in 0..od.w {
                    for oc in 0..od.c {
                        let mut acc = b[oc] as f64;
                        for ky in 0..*k {
                            for kx in 0..*k {
                                let iy = (oy * stride + ky) as i64 - pad as i64;
                                let ix = (ox * stride + kx) as i64 - pad as i64;
                                if iy < 0 || ix < 0 || iy >= id.h as i64 || ix >= id.w as i64 {
                                    continue;
                                }
                                for ic in 0..id.c {
                                    acc += inputs[0]
                                        [(iy as usize * id.w + ix as usize) * id.c + ic]
                                        * w[((oc * k + ky) * k + kx) * id.c + ic] as f64;
                                }
                            }
                        }
                        out[(oy * od.w + ox) * od.c + oc] = if *relu { acc.max(0.0) } else { acc };
                    }
                }
            }
            out
        }
        FLayer::MaxPool { io } => {
            let (id, od) = (g.tensors[io.0].dims, g.tensors[io.1].dims);
            let mut out = vec![f64::NEG_INFINITY; od.len()];
            for oy in 0..od.h {
                for ox in 0..od.w {
                    for c in 0..od.c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (2 * oy + ky) as i64 - 1;
                                let ix = (2 * ox + kx) as i64 - 1;
                                if iy >= 0 && ix >= 0 && iy < id.h as i64 && ix < id.w as i64 {
                                    let v =
                                        inputs[0][(iy as usize * id.w + ix as usize) * id.c + c];
                                    let o = &mut out[(oy * od.w + ox) * od.c + c];
                                    *o = o.max(v);
                                }
                            }
                        }
                    }
                }
            }
            out
        }
        FLayer::Add { .. } => inputs[0]
            .iter()
            .zip(&inputs[1])
            .map(|(a, b)| (a + b).max(0.0))
            .collect(),
        FLayer::Gap { io } => {
            let id = g.tensors[io.0].dims;
            (0..id.c)
                .map(|c| {
                    (0..id.h * id.w)
                        .map(|p| inputs[0][p * id.c + c])
                        .sum::<f64>()
                        / (id.h * id.w) as f64
                })
                .collect()
        }
        FLayer::Fc { w, b, .. } => {
            let n_in = inputs[0].len();
            b.iter()
                .enumerate()
                .map(|(o, &bo)| {
                    bo as f64
                        + (0..n_in)
                            .map(|i| inputs[0][i] * w[o * n_in + i] as f64)
                            .sum::<f64>()
                })
                .collect()
        }
    }
}

/// The weight step of output channel `oc` recovered from its requantization
/// `(multiplier, shift)`: `s_in * s_w / s_out = multiplier * 2^(shift - 31)`.
fn weight_step((s_in, s_out): (f64, f64), multiplier: i32, shift: i32) -> f64 {
    s_out * multiplier as f64 * 2f64.powi(shift - 31) / s_in
}

/// Per-output extra error of layer `layer` (traced as `fl`) from weight and
/// bias rounding: half a weight step times the input magnitude, plus half
/// an input step times the weight step, for conv and FC; 0 for the others.
fn weight_error(
    g: &Graph,
    m: &Model<'_>,
    layer: &Layer<'_>,
    fl: &FLayer,
    input: &[f64],
    n_out: usize,
) -> Vec<f64> {
    let s_in = m.tensor(layer.input).unwrap().scale as f64;
    let s_out = m.tensor(layer.output).unwrap().scale as f64;
    match (&layer.kind, fl) {
        (LayerKind::Conv(c), FLayer::Conv { io, k, stride, .. }) => {
            let (id, od) = (g.tensors[io.0].dims, g.tensors[io.1].dims);
            let taps = k * k * id.c;
            let mut e = vec![0f64; od.len()];
            for oy in 0..od.h {
                for ox in 0..od.w {
                    let mag = window_magnitude(input, id, (*k, *stride), (oy, ox));
                    for oc in 0..od.c {
                        let wmax = c.filter[oc * taps..(oc + 1) * taps]
                            .iter()
                            .map(|&v| (v as i32).abs())
                            .max()
                            .unwrap_or(0);
                        let (mult, shift) = (c.requant.multiplier[oc], c.requant.shift[oc]);
                        let s_w = if wmax == 0 {
                            0.0
                        } else {
                            weight_step((s_in, s_out), mult, shift)
                        };
                        e[(oy * od.w + ox) * od.c + oc] = 0.5 * s_w * mag + 0.5 * s_in * s_w;
                    }
                }
            }
            e
        }
        (LayerKind::FullyConnected(fc), FLayer::Fc { .. }) => {
            let mag: f64 = input.iter().map(|v| v.abs()).sum();
            (0..fc.bias.len())
                .map(|o| {
                    let (mult, shift) = (fc.requant.multiplier[o], fc.requant.shift[o]);
                    let s_w = weight_step((s_in, s_out), mult, shift);
                    0.5 * s_w * mag + 0.5 * s_in * s_w
                })
                .collect()
        }
        _ => vec![0.0; n_out],
    }
}

/// Σ |x| over the input window of output pixel `(oy, ox)` of a `k` x `k`
/// conv with stride `stride` and padding `k / 2` (padded taps add 0).
fn window_magnitude(
    input: &[f64],
    id: Dims,
    (k, stride): (usize, usize),
    (oy, ox): (usize, usize),
) -> f64 {
    let mut mag = 0.0;
    for ky in 0..k {
        for kx in 0..k {
            let iy = (oy * stride + ky) as i64 - (k / 2) as i64;
            let ix = (ox * stride + kx) as i64 - (k / 2) as i64;
            if iy >= 0 && ix >= 0 && iy < id.h as i64 && ix < id.w as i64 {
                let at = (iy as usize * id.w + ix as usize) * id.c;
                for v in &input[at..at + id.c] {
                    mag += v.abs();
                }
            }
        }
    }
    mag
}

/// Each int8 layer, fed the int8 output of the previous one, stays within a
/// bound derived from the scales of the float layer fed the same
/// (dequantized) input: half an output step for the output rounding, plus
/// the weight rounding (half a weight step times the input magnitude) and
/// bias rounding for conv/FC, plus a relative 1e-6 for the multipliers.
/// Values outside the int8 range saturate, so the float side is clamped too.
#[test]
fn per_layer_error_is_within_scale_derived_bounds() {
    let (blob, _) = exported();
    let owned = OwnedModel::new(blob).unwrap();
    let m = owned.model().unwrap();
    let f = fixture();
    let calib = f.train_set.subsample(128);
    let (g, _, _) = calibrate(&f.trainee.model, &calib, Calibration::MinMax, 64).unwrap();
    assert_eq!(g.layers.len(), m.layer_count() as usize);
    let mut worst = 0f64;
    for img in 0..8 {
        let input = int8_input(f.test_set.image(img)).unwrap();
        let mut arena = vec![0i8; m.arena_len()];
        let mut scratch = vec![0i16; m.scratch_len()];
        m.load_input(&input, &mut arena).unwrap();
        let deq = |arena: &[i8], t: u16| -> Vec<f64> {
            let info = m.tensor(t).unwrap();
            arena[info.range()]
                .iter()
                .map(|&q| (q as i32 - info.zero_point) as f64 * info.scale as f64)
                .collect()
        };
        for (li, fl) in g.layers.iter().enumerate() {
            let layer = m.layer(li as u16).unwrap();
            let mut ins = vec![deq(&arena, layer.input)];
            if let LayerKind::Add(_) = layer.kind {
                ins.push(deq(&arena, layer.input2));
            }
            let want = float_layer(&g, fl, &ins);
            m.run_layer(li as u16, &mut arena, &mut scratch).unwrap();
            let got = deq(&arena, layer.output);
            let out = m.tensor(layer.output).unwrap();
            let s_out = out.scale as f64;
            let lo = (-128 - out.zero_point) as f64 * s_out;
            let hi = (127 - out.zero_point) as f64 * s_out;
            let extra = weight_error(&g, &m, &layer, fl, &ins[0], got.len());
            for (j, (&gv, &wv)) in got.iter().zip(&want).enumerate() {
                let wv = wv.clamp(lo, hi);
                let tol = 0.5 * s_out * (1.0 + 1e-3) + extra[j] + 1e-6 * (1.0 + wv.abs());
                let err = (gv - wv).abs();
                worst = worst.max(err / tol);
                assert!(err <= tol, "layer {} ({}), element {j}: int8 {gv} vs float {wv}, error {err} > bound {tol}", li, layer.name);
            }
        }
    }
    eprintln!("worst error / bound = {worst:.3}");
}

#[test]
fn calibration_methods_both_export() {
    let f = fixture();
    let o = ExportOptions {
        calibration: Calibration::Percentile(99.99),
        ..opts()
    };
    let (blob, cmp) = export(
        &f.trainee.model,
        &f.ck,
        &f.train_set,
        &f.test_set,
        &o,
        &Device::Cpu,
    )
    .unwrap();
    assert!(OwnedModel::new(&blob).is_ok());
    assert!(cmp.top1_agreement >= 95.0, "{}", cmp.top1_agreement);
    // The comparison is reproducible on its own too.
    let again = compare(
        &f.trainee.model,
        &OwnedModel::new(&blob).unwrap(),
        &f.test_set,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(again.int8_accuracy, cmp.int8_accuracy);
}

/// Shipping writes the float checkpoint with the source checkpoint's
/// provenance line when it has one (re-exporting the shipped checkpoint
/// keeps where its weights came from), and this workspace's revision
/// otherwise.
#[test]
fn shipping_keeps_a_weights_only_checkpoints_provenance() {
    let f = fixture();
    let (blob, cmp) = exported();
    let given = "host-trainer 0.1.0 at git abc1234";
    for (source, want) in [(Some(given), given), (None, "host-trainer ")] {
        let dir = tempfile::tempdir().unwrap();
        let s = host_trainer::ship::Shipment {
            blob,
            int8_accuracy: cmp.int8_accuracy,
            checkpoint: &f.ck,
            provenance: source.map(String::from),
            model: &f.trainee.model,
            test_set: &f.test_set,
            force: false,
        };
        host_trainer::ship::ship(&s, dir.path(), &Device::Cpu).unwrap();
        let path = dir.path().join(host_trainer::ship::CHECKPOINT_FILE);
        let line = host_trainer::checkpoint::read_provenance(&path)
            .unwrap()
            .unwrap();
        assert!(line.starts_with(want), "{line}");
        assert!(source.is_some() || !line.contains("abc1234"), "{line}");
    }
}
