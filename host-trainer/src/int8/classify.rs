//! Classifying image files with an int8 model through the board's path.

use std::path::Path;

use anyhow::{Context, Result};
use shared::model::Model;
use shared::preprocess::INPUT_LEN;

use crate::blob::OwnedModel;
use crate::data::network_pixels;

/// An int8 model: a `.bin` file, or `default` for the one committed in
/// `shared`.
pub fn load_model(spec: &str) -> Result<OwnedModel> {
    if spec == "default" {
        OwnedModel::new(&shared::model::BLOB.0).context("the model committed in shared")
    } else {
        OwnedModel::load(Path::new(spec))
    }
}

/// A model with its working memory, for classifying images one by one.
#[derive(Debug)]
pub struct Classifier<'a> {
    model: Model<'a>,
    arena: Vec<i8>,
    scratch: Vec<i16>,
    logits: Vec<i8>,
}

impl<'a> Classifier<'a> {
    /// Parses `m` and allocates its arena and scratch.
    pub fn new(m: &'a OwnedModel) -> Result<Self> {
        let model = m.model()?;
        Ok(Self {
            arena: vec![0i8; model.arena_len()],
            scratch: vec![0i16; model.scratch_len()],
            logits: vec![0i8; model.output().dims.len()],
            model,
        })
    }

    /// The image file at `path` through the board's preprocessing (see
    /// [`network_pixels`]); returns the class name and the softmax
    /// confidence (%) the board would log. Class names come from the model.
    pub fn classify_file(&mut self, path: &Path) -> Result<(&'a str, f64)> {
        let img = image::open(path)
            .with_context(|| format!("reading image {}", path.display()))?
            .to_rgb8();
        let px =
            network_pixels(&img).with_context(|| format!("preprocessing {}", path.display()))?;
        let mut input = [0i8; INPUT_LEN];
        input
            .iter_mut()
            .zip(&px)
            .for_each(|(q, &p)| *q = (p as i16 - 128) as i8);
        self.model
            .run(&input, &mut self.arena, &mut self.scratch, &mut self.logits)
            .with_context(|| format!("running the model on {}", path.display()))?;
        let (best, permille) = shared::model::top1(&self.logits, self.model.output().scale);
        Ok((
            self.model.class_name(best).unwrap_or("?"),
            f64::from(permille) / 10.0,
        ))
    }
}
