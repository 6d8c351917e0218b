//! Tests of training with `--distill`.

use super::*;
use crate::distill::{distill_loss, DistillConfig, Teachers};

fn distill_from(teacher: &Path, weight: f64, temperature: f64) -> Option<DistillConfig> {
    Some(DistillConfig {
        teachers: vec![teacher.to_path_buf()],
        weight,
        temperature,
    })
}

/// Mean `KL(teacher ‖ student)` at temperature 1 over `ds`.
fn kl_to_teacher(teachers: &Teachers, student: &Trainee, ds: &Dataset) -> f32 {
    let idx: Vec<usize> = (0..ds.len()).collect();
    let (x, _) = crate::augment::batch(ds, &idx, None, &Device::Cpu).unwrap();
    let targets = teachers.soft_targets(&x).unwrap();
    let logits = student.model.forward_t(&x, false).unwrap();
    distill_loss(&logits, &targets, 1.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A distilled run resumes bit-exactly, like any other.
#[test]
fn a_distilled_run_resumes_bit_exactly() {
    let (_dir, teacher, _, _) = interrupted_run();
    resume_matches_straight_run(TrainConfig {
        distill: distill_from(&teacher, 0.7, 2.0),
        swa_from: Some(2),
        ..tiny_config(3)
    });
}

/// With the distillation term alone, the student's predictions move
/// towards the teacher's: much closer than the same run on labels alone
/// gets, and closer than where it started.
#[test]
fn distillation_pulls_the_student_towards_its_teacher() {
    let (_dir, teacher, train_set, test_set) = interrupted_run();
    let cfg = DistillConfig {
        teachers: vec![teacher.clone()],
        weight: 1.0,
        temperature: 1.0,
    };
    let teachers = Teachers::load(&cfg, 4, &Device::Cpu).unwrap();
    let run = |distill: Option<DistillConfig>| {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            distill,
            seed: 11,
            swa_from: None,
            ..tiny_config(8)
        };
        run_cpu(c, &train_set, &test_set, dir.path(), false, None)
            .unwrap()
            .trainee
    };
    let start = Trainee::new(&tiny_config(8).arch, 11, &Device::Cpu).unwrap();
    let before = kl_to_teacher(&teachers, &start, &test_set);
    let distilled = kl_to_teacher(&teachers, &run(Some(cfg)), &test_set);
    let labels_only = kl_to_teacher(&teachers, &run(None), &test_set);
    assert!(
        distilled < 0.25 * before && distilled < 0.25 * labels_only,
        "KL to the teacher: {before} at the start, {distilled} distilled, {labels_only} on labels"
    );
}

/// A teacher of other classes, a missing one or one with a NaN weight is
/// refused by name.
#[test]
fn a_wrong_teacher_is_refused_by_name() {
    let (_dir, teacher, _, _) = interrupted_run();
    let e = format!(
        "{:#}",
        Teachers::load(&distill_from(&teacher, 0.9, 4.0).unwrap(), 3, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains(&teacher.display().to_string()) && e.contains("predicts 4 classes"),
        "{e}"
    );
    let missing = teacher.with_file_name("gone.safetensors");
    let e = format!(
        "{:#}",
        Teachers::load(&distill_from(&missing, 0.9, 4.0).unwrap(), 4, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("gone.safetensors"), "{e}");
    // A checkpoint whose weights hold a NaN (intact file, bad values).
    let mut ck = load_checkpoint(&teacher, &Device::Cpu).unwrap();
    let t = model_from_checkpoint(&ck, &Device::Cpu).unwrap();
    let (name, var) = t.named_vars().into_iter().next().unwrap();
    let nan = Tensor::full(f32::NAN, var.dims(), &Device::Cpu).unwrap();
    ck.tensors
        .insert(format!("{}{name}", ck.weights_prefix()), nan);
    let bad = teacher.with_file_name("nan.safetensors");
    crate::checkpoint::save_weights(&bad, &ck, "test").unwrap();
    let e = format!(
        "{:#}",
        Teachers::load(&distill_from(&bad, 0.9, 4.0).unwrap(), 4, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("nan.safetensors") && e.contains("NaN") && e.contains(&name),
        "{e}"
    );
}

/// The provenance line names the teachers and the settings.
#[test]
fn a_distilled_checkpoint_says_so() {
    let (_dir, p, _, _) = interrupted_run();
    let mut ck = load_checkpoint(&p, &Device::Cpu).unwrap();
    ck.meta.config.distill = distill_from(Path::new("t/a.safetensors"), 0.9, 4.0);
    let o = ck.origin();
    assert!(
        o.ends_with(", distilled from t/a.safetensors (weight 0.9, temperature 4)"),
        "{o}"
    );
}
