//! Which data a command uses, and loading it with a limit: the CLI's data
//! options as library calls.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::{default_cache_dir, detect, download, load, Dataset, Source, Split};
use super::{CIFAR10_MD5, CIFAR10_URL, CLASSES};

/// The source for `--data` (and `--val-split`), or the default chain:
/// `$MINI_RESNET_DATA`, else the team copy at `../shared/data/cifar10-jpeg`
/// beside the workspace, else the official CIFAR-10 tarball downloaded into
/// the cache.
pub fn resolve(data: Option<&Path>, val_split: Option<f64>) -> Result<Source> {
    match (default_chain(data)?, val_split) {
        (Source::ClassFolders { root, .. }, Some(v)) => Ok(Source::ClassFolders { root, val_split: v }),
        (Source::ClassFolders { root, val_split }, None) => {
            eprintln!(
                "data: {} holds one folder per class: {:.0}% of each class's images are the test split (--val-split)",
                root.display(),
                100.0 * val_split
            );
            Ok(Source::ClassFolders { root, val_split })
        }
        (src, None) => Ok(src),
        (_, Some(_)) => bail!(
            "--val-split applies only to a folder of <class>/ folders; this data set has its own test split"
        ),
    }
}

/// The team's CIFAR-10 JPEG folders, `../shared/data/cifar10-jpeg` beside
/// the workspace (they may not exist: users download the official set).
pub fn team_folders() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cifar10-jpeg")
}

fn default_chain(data: Option<&Path>) -> Result<Source> {
    if let Some(p) = data {
        return detect(p);
    }
    if let Some(p) = std::env::var_os("MINI_RESNET_DATA") {
        return detect(&PathBuf::from(p)).context("$MINI_RESNET_DATA");
    }
    let team = team_folders();
    if team.join("train").is_dir() {
        eprintln!("data: {}", team.display());
        return detect(&team);
    }
    let dir = default_cache_dir();
    eprintln!(
        "data: no --data given; using the official CIFAR-10 binary release in {}",
        dir.display()
    );
    let tarball = download(CIFAR10_URL, CIFAR10_MD5, &dir, "cifar-10-binary.tar.gz")?;
    Ok(Source::Tarball(tarball))
}

/// A short name of the data source, for the model's provenance.
pub fn describe(src: &Source) -> String {
    let name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    match src {
        Source::ImageFolders(p) if name(p).to_ascii_lowercase().contains("cifar") => {
            format!("CIFAR-10 (JPEG re-encode) {}", name(p))
        }
        Source::ImageFolders(p) => format!("image folders {}", name(p)),
        Source::ClassFolders { root, val_split } => format!(
            "image folders {} ({:.0}% of each class held out for testing)",
            name(root),
            100.0 * val_split
        ),
        Source::BinaryDir(_) | Source::Tarball(_) => "CIFAR-10 (official binary)".into(),
    }
}

/// Loads `split`, keeping `limit` images spread over it if given, and
/// says how long it took.
pub fn load_limited(src: &Source, split: Split, limit: Option<usize>) -> Result<Dataset> {
    ensure!(
        limit != Some(0),
        "--{}-limit 0 leaves no {} images (use at least 1, or leave it out)",
        split.name(),
        split.name()
    );
    let t0 = Instant::now();
    let mut ds = load(src, split)?;
    if let Some(n) = limit {
        ds = ds.subsample(n);
    }
    eprintln!(
        "loaded {} {split} images in {:.1} s",
        ds.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(ds)
}

/// The classes with their training and test image counts, unless they are
/// CIFAR-10's.
pub fn class_table(train: &Dataset, test: &Dataset) -> Option<String> {
    if train.classes.iter().map(String::as_str).eq(CLASSES) {
        return None;
    }
    let mut s = format!(
        "{} classes (training / test images):\n",
        train.classes.len()
    );
    for ((name, tr), te) in train
        .classes
        .iter()
        .zip(train.class_counts())
        .zip(test.class_counts())
    {
        s += &format!("  {name:<24} {tr:>6} / {te}\n");
    }
    Some(s)
}
