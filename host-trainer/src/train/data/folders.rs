//! Labelled image folders with any classes: `root/{train,test}/<class>/`,
//! or `root/<class>/` split into training and test images by a fraction.
//!
//! Class names are the folder names, sorted (byte order; CIFAR-10's names
//! sort into its official label order), and must be printable UTF-8 of at
//! most [`MAX_CLASS_NAME`] bytes; a set has 2 to [`MAX_CLASSES`] classes.
//! The training folder decides the class list: a test folder may not add
//! a class, and every class needs test images.
//!
//! Images may be JPEG or PNG of any size. A 32x32 image is used as it is;
//! any other goes through the board's own preprocessing
//! ([`shared::preprocess`]: centre crop, exact area average to 32x32), so
//! training sees what the device sees. A shorter side under 32 (or over
//! 4096) pixels is first resized into that range.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};
use rayon::prelude::*;

use super::{Dataset, Split, IMAGE_BYTES};

/// Most classes a data set may have.
pub const MAX_CLASSES: usize = 100;
/// Longest class name, in bytes.
pub const MAX_CLASS_NAME: usize = 32;
/// Fewest training images per class before it is an error.
pub const MIN_TRAIN_PER_CLASS: usize = 5;
/// Fewer training images per class than this get a warning.
pub const FEW_TRAIN_PER_CLASS: usize = 20;
/// Accepted image extensions (any case).
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// A class folder's name as a class name, or an error naming the folder.
fn class_name(path: &Path) -> Result<String> {
    let raw = path.file_name().unwrap_or_default();
    let Some(name) = raw.to_str() else {
        bail!(
            "class folder {} has a name that is not valid UTF-8 (rename it)",
            path.display()
        );
    };
    ensure!(
        !name.is_empty() && name.len() <= MAX_CLASS_NAME,
        "class folder {}: a class name must be 1 to {MAX_CLASS_NAME} bytes long (it is {})",
        path.display(),
        name.len()
    );
    ensure!(
        !name.chars().any(char::is_control) && !name.starts_with('.'),
        "class folder {}: a class name may not hold control characters or start with '.'",
        path.display()
    );
    Ok(name.to_string())
}

/// The class folders directly under `dir`, sorted by name. Anything else
/// there is an error naming it.
fn class_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let ctx = || format!("reading {}", dir.display());
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(ctx)? {
        let path = entry.with_context(ctx)?.path();
        ensure!(
            path.is_dir(),
            "unexpected file {} (this folder may only hold one folder per class)",
            path.display()
        );
        out.push((class_name(&path)?, path));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Checks the class count of `dir`'s class folders.
fn check_class_count(dir: &Path, classes: &[(String, PathBuf)]) -> Result<()> {
    let names: Vec<&str> = classes.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        (2..=MAX_CLASSES).contains(&classes.len()),
        "{} has {} class folder(s){}; a classifier needs 2 to {MAX_CLASSES} classes",
        dir.display(),
        classes.len(),
        match names.len() {
            1..=5 => format!(" ({})", names.join(", ")),
            _ => String::new(),
        }
    );
    Ok(())
}

/// The image files of one class folder, sorted by name; an empty folder or
/// another kind of entry is an error naming it.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let ctx = || format!("reading {}", dir.display());
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(ctx)? {
        let path = entry.with_context(ctx)?.path();
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        ensure!(
            ext_ok && path.is_file(),
            "unexpected entry {} (a class folder may only hold .jpg, .jpeg or .png files)",
            path.display()
        );
        files.push(path);
    }
    ensure!(
        !files.is_empty(),
        "class folder {} holds no images (remove it, or add .jpg/.jpeg/.png files)",
        dir.display()
    );
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// An RGB image of any size as the 32x32 HWC pixels the network sees: as
/// it is when 32x32, otherwise through [`shared::preprocess::preprocess`].
pub fn network_pixels(img: &image::RgbImage) -> Result<Vec<u8>> {
    use shared::preprocess::{preprocess, Frame, PixelFormat, INPUT_LEN, INPUT_SIZE, MAX_CROP};
    let (w, h) = img.dimensions();
    if (w as usize, h as usize) == (INPUT_SIZE, INPUT_SIZE) {
        return Ok(img.as_raw().clone());
    }
    let short = w.min(h) as f64;
    let target = short.clamp(INPUT_SIZE as f64, MAX_CROP as f64);
    let resized;
    let img = if target != short {
        let k = target / short;
        let (nw, nh) = ((w as f64 * k).round() as u32, (h as f64 * k).round() as u32);
        resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
        &resized
    } else {
        img
    };
    let frame = Frame {
        data: img.as_raw(),
        width: img.width() as usize,
        height: img.height() as usize,
        format: PixelFormat::Rgb888,
    };
    let mut input = [0i8; INPUT_LEN];
    preprocess(&frame, &mut input).context("preprocessing the image")?;
    Ok(input.iter().map(|&q| (q as i16 + 128) as u8).collect())
}

/// Reads and decodes one image file into `out` (`IMAGE_BYTES`), as
/// [`network_pixels`] makes it.
fn decode_image(path: &Path, out: &mut [u8]) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let decode = || -> Result<image::DynamicImage> {
        Ok(image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()?
            .decode()?)
    };
    let img = decode().with_context(|| format!("decoding {}", path.display()))?;
    let px = network_pixels(&img.into_rgb8()).with_context(|| path.display().to_string())?;
    out.copy_from_slice(&px);
    Ok(())
}

/// Decodes `files` (with their labels) in parallel; the first failure in
/// file order is reported, so errors are deterministic.
fn decode_all(files: Vec<(PathBuf, u8)>, classes: Vec<String>) -> Result<Dataset> {
    let mut images = vec![0u8; files.len() * IMAGE_BYTES];
    let first_error = images
        .par_chunks_mut(IMAGE_BYTES)
        .zip(&files)
        .map(|(out, (path, _))| decode_image(path, out))
        .find_first(Result::is_err);
    if let Some(Err(err)) = first_error {
        return Err(err);
    }
    let labels = files.into_iter().map(|(_, label)| label).collect();
    Ok(Dataset {
        images,
        labels,
        classes,
    })
}

/// Checks per-class training counts: too few is an error, few a warning.
fn check_train_counts(root: &Path, classes: &[String], counts: &[usize]) -> Result<()> {
    for (name, &n) in classes.iter().zip(counts) {
        ensure!(
            n >= MIN_TRAIN_PER_CLASS,
            "class {name:?} in {} has {n} training image(s); at least {MIN_TRAIN_PER_CLASS} are needed",
            root.display()
        );
        if n < FEW_TRAIN_PER_CLASS {
            eprintln!(
                "warning: class {name:?} has only {n} training images; expect a weak classifier for it \
                 (fine-tuning from the shipped model helps: --init default)"
            );
        }
    }
    Ok(())
}

/// Loads `split` of `root/{train,test}/<class>/`. The class list is
/// `root/train`'s; the test folder must have every class and no other.
pub fn load_split_folders(root: &Path, split: Split) -> Result<Dataset> {
    let train_dir = root.join(Split::Train.name());
    ensure!(
        train_dir.is_dir(),
        "missing split folder {} (expected {}/<class>/*.{{jpg,jpeg,png}})",
        train_dir.display(),
        train_dir.display()
    );
    let classes = class_dirs(&train_dir)?;
    check_class_count(&train_dir, &classes)?;
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let dir = root.join(split.name());
    ensure!(
        dir.is_dir(),
        "missing split folder {} (expected {}/<class>/*.{{jpg,jpeg,png}})",
        dir.display(),
        dir.display()
    );
    let here = if split == Split::Train {
        classes
    } else {
        class_dirs(&dir)?
    };
    for (name, path) in &here {
        ensure!(
            names.contains(name),
            "class folder {} has no counterpart in {} (the training folder defines the classes: {})",
            path.display(),
            train_dir.display(),
            names.join(", ")
        );
    }
    let mut files = Vec::new();
    let mut counts = vec![0usize; names.len()];
    for (label, name) in names.iter().enumerate() {
        let Some((_, path)) = here.iter().find(|(n, _)| n == name) else {
            bail!(
                "class {name:?} has no {} images: {} is missing",
                split.name(),
                dir.join(name).display()
            );
        };
        let class_files = image_files(path)?;
        counts[label] = class_files.len();
        files.extend(class_files.into_iter().map(|p| (p, label as u8)));
    }
    if split == Split::Train {
        check_train_counts(root, &names, &counts)?;
    }
    decode_all(files, names)
}

/// Which files of a class go to the test split: the `round(n * fraction)`
/// (at least 1) whose names hash lowest, a deterministic choice that does
/// not depend on the file order or on the other files' names.
fn val_files(files: &[PathBuf], fraction: f64) -> Vec<bool> {
    let n = files.len();
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let hash = |p: &PathBuf| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        Md5::digest(name.as_bytes())
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (hash(&files[i]), i));
    let mut val = vec![false; n];
    order.iter().take(k).for_each(|&i| val[i] = true);
    val
}

/// Loads `split` of `root/<class>/`, where a deterministic per-class
/// `fraction` of the images is the test split: the `round(n * fraction)`
/// (at least one) whose file names hash lowest. Prints the per-class split
/// when loading the training part.
pub fn load_flat_folders(root: &Path, fraction: f64, split: Split) -> Result<Dataset> {
    ensure!(
        fraction > 0.0 && fraction < 1.0,
        "--val-split must be between 0 and 1 (got {fraction})"
    );
    let classes = class_dirs(root)?;
    check_class_count(root, &classes)?;
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let mut files = Vec::new();
    let mut counts = Vec::new();
    for (label, (name, dir)) in classes.iter().enumerate() {
        let all = image_files(dir)?;
        ensure!(
            all.len() >= 2,
            "class folder {} holds {} image; splitting off test images needs at least 2",
            dir.display(),
            all.len()
        );
        let val = val_files(&all, fraction);
        let keep = |&(_, v): &(&PathBuf, &bool)| *v == (split == Split::Test);
        let chosen: Vec<PathBuf> = all
            .iter()
            .zip(&val)
            .filter(keep)
            .map(|(p, _)| p.clone())
            .collect();
        if split == Split::Train {
            eprintln!(
                "  {name}: {} training / {} test images",
                chosen.len(),
                all.len() - chosen.len()
            );
        }
        counts.push(chosen.len());
        files.extend(chosen.into_iter().map(|p| (p, label as u8)));
    }
    if split == Split::Train {
        check_train_counts(root, &names, &counts)?;
    }
    decode_all(files, names)
}

/// Whether `dir` looks like `root/<class>/` (only folders, at least one
/// of which holds an image file directly).
pub fn is_flat_layout(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let subdirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    !subdirs.is_empty()
        && subdirs.iter().all(|p| p.is_dir())
        && subdirs.iter().any(|d| {
            fs::read_dir(d).is_ok_and(|mut es| {
                es.any(|e| {
                    e.ok()
                        .and_then(|e| e.path().extension().map(|x| x.to_ascii_lowercase()))
                        .is_some_and(|x| IMAGE_EXTENSIONS.iter().any(|i| x == *i))
                })
            })
        })
}
