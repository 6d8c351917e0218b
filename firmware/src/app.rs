//! The application path shared by the board and QEMU images:
//! camera frame → `shared::preprocess` → `shared::model` → class.
//!
//! No heap: the caller owns the arena and scratch (statics on the MCU).

use shared::model::{top1, Model, ModelError, MAX_CLASSES};
use shared::preprocess::{preprocess, Frame, INPUT_LEN};

/// What went wrong while classifying a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "board", derive(defmt::Format))]
pub enum AppError {
    /// The frame has a wrong size or buffer length.
    Frame(shared::Error),
    /// The model rejected a buffer (cannot happen once [`Engine::new`] passed).
    Model(ModelError),
}

/// The result of one inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification<'a> {
    /// Class index (label order).
    pub class: usize,
    /// Its name, from the model blob.
    pub name: &'a str,
    /// Softmax probability of `class`, in per-mille.
    pub confidence_permille: u16,
    logits: [i8; MAX_CLASSES],
    classes: usize,
}

impl Classification<'_> {
    /// The raw int8 logits, one per class (the QEMU image and tests print
    /// them; the board logs the class only).
    #[cfg_attr(feature = "board", allow(dead_code))]
    pub fn logits(&self) -> &[i8] {
        &self.logits[..self.classes]
    }
}

/// A validated model with its working memory.
#[derive(Debug)]
pub struct Engine<'a> {
    model: Model<'a>,
    arena: &'a mut [i8],
    scratch: &'a mut [i16],
    input: [i8; INPUT_LEN],
}

// The host build (stub main + tests) uses only part of the engine.
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
impl<'a> Engine<'a> {
    /// Checks that `arena`/`scratch` are large enough for the model, once.
    /// Any class count and names the blob carries work (the blob checks
    /// that there are [`MAX_CLASSES`] at most, one name per logit).
    pub fn new(
        model: Model<'a>,
        arena: &'a mut [i8],
        scratch: &'a mut [i16],
    ) -> Result<Self, ModelError> {
        if arena.len() < model.arena_len() {
            return Err(ModelError::Buffer {
                buffer: "arena",
                needed: model.arena_len(),
                actual: arena.len(),
            });
        }
        if scratch.len() < model.scratch_len() {
            return Err(ModelError::Buffer {
                buffer: "scratch",
                needed: model.scratch_len(),
                actual: scratch.len(),
            });
        }
        Ok(Self {
            model,
            arena,
            scratch,
            input: [0; INPUT_LEN],
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<'a> {
        &self.model
    }

    /// Preprocesses `frame` into the network input (kept for [`infer`](Self::infer)).
    pub fn preprocess(&mut self, frame: &Frame<'_>) -> Result<(), AppError> {
        preprocess(frame, &mut self.input).map_err(AppError::Frame)
    }

    /// Runs the network on the last preprocessed input.
    pub fn infer(&mut self) -> Result<Classification<'a>, AppError> {
        let classes = self.model.class_count();
        let mut logits = [0i8; MAX_CLASSES];
        self.model
            .run(
                self.input.as_slice(),
                self.arena,
                self.scratch,
                &mut logits[..classes],
            )
            .map_err(AppError::Model)?;
        let out = self.model.output();
        let (class, confidence_permille) = top1(&logits[..classes], out.scale);
        Ok(Classification {
            class,
            name: self.model.class_name(class).unwrap_or("?"),
            confidence_permille,
            logits,
            classes,
        })
    }

    /// Runs layer `i` alone (after [`load_input`](Self::load_input)), for
    /// per-layer measurements.
    pub fn run_layer(&mut self, i: u16) -> Result<(), AppError> {
        self.model
            .run_layer(i, self.arena, self.scratch)
            .map_err(AppError::Model)
    }

    /// Copies the last preprocessed input into the arena.
    pub fn load_input(&mut self) -> Result<(), AppError> {
        self.model
            .load_input(&self.input, self.arena)
            .map_err(AppError::Model)
    }

    /// Frame → class: [`preprocess`](Self::preprocess) then [`infer`](Self::infer).
    #[cfg_attr(not(feature = "board"), allow(dead_code))]
    pub fn classify(&mut self, frame: &Frame<'_>) -> Result<Classification<'a>, AppError> {
        self.preprocess(frame)?;
        self.infer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_classifies_a_frame_like_the_host() {
        let model = shared::model::default_model().expect("the model committed in shared");
        let mut arena = vec![0i8; model.arena_len()];
        let mut scratch = vec![0i16; model.scratch_len()];
        let mut engine = Engine::new(model.clone(), &mut arena, &mut scratch).unwrap();
        let frame: Vec<u8> = (0..160 * 120)
            .flat_map(|i: u32| (i.wrapping_mul(2654435761) >> 16).to_le_bytes()[..2].to_vec())
            .collect();
        let f = Frame {
            data: &frame,
            width: 160,
            height: 120,
            format: shared::preprocess::PixelFormat::Rgb565Le,
        };
        let got = engine.classify(&f).unwrap();
        // Same path by hand.
        let mut input = [0i8; INPUT_LEN];
        preprocess(&f, &mut input).unwrap();
        let mut a2 = vec![0i8; model.arena_len()];
        let mut s2 = vec![0i16; model.scratch_len()];
        let mut logits = [0i8; 10];
        model.run(&input, &mut a2, &mut s2, &mut logits).unwrap();
        assert_eq!(got.logits(), logits);
        assert_eq!(got.name, model.class_name(got.class).unwrap());
        assert_eq!(got.name, shared::CIFAR10_CLASSES[got.class]);
        // A bad frame is an error, not a panic.
        let bad = Frame {
            data: &frame[..100],
            ..f
        };
        assert!(matches!(engine.classify(&bad), Err(AppError::Frame(_))));
    }
}
