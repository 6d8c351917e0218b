//! Data sets: CIFAR-10's official binary release (as a folder or as the
//! `.tar.gz` itself) with a checked download, and labelled folders of
//! JPEG/PNG images with any classes ([`folders`]).
//!
//! Every loader returns a [`Dataset`]: 32x32 RGB images in HWC order
//! (`r,g,b` interleaved, rows top to bottom), labels, and the class names
//! the labels index.
//!
//! ```ignore
//! # use std::path::Path;
//! # fn main() -> anyhow::Result<()> {
//! use crate::data::{self, Split};
//! let source = data::detect(Path::new("/data/cifar-10-binary.tar.gz"))?;
//! let train = data::load(&source, Split::Train)?;
//! assert_eq!(train.len(), 50_000);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};
pub mod folders;
mod resolve;
pub use folders::network_pixels;
pub use resolve::{class_table, describe, load_limited, resolve, team_folders};

/// Class names in the official CIFAR-10 label order: label `i` is `CLASSES[i]`.
pub const CLASSES: [&str; 10] = shared::CIFAR10_CLASSES;

/// Image side length in pixels.
const SIDE: usize = 32;
/// Pixels per image.
const PIXELS: usize = SIDE * SIDE;
/// Bytes of one image: 32x32 pixels, 3 channels, `u8` each.
pub const IMAGE_BYTES: usize = 32 * 32 * 3;
/// Bytes of one record in the official binary format: a label byte, then the image.
const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Training batch files of the official binary release, in load order.
const TRAIN_BATCHES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// Test batch file of the official binary release.
const TEST_BATCHES: [&str; 1] = ["test_batch.bin"];
/// Folder the official tarball unpacks into.
const BINARY_SUBDIR: &str = "cifar-10-batches-bin";

/// URL of the official CIFAR-10 binary release.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// MD5 of the file at [`CIFAR10_URL`], lowercase hex.
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// A set of labelled images.
///
/// Images are 32x32 RGB, HWC order (`r,g,b` interleaved), row-major, `u8`,
/// stored back to back in `images`; `labels[i]` (an index into `classes`)
/// belongs to the `i`-th image. `images.len()` is always
/// `labels.len() * IMAGE_BYTES`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// All images, `IMAGE_BYTES` each, HWC.
    pub images: Vec<u8>,
    /// One label per image, an index into `classes`.
    pub labels: Vec<u8>,
    /// Class names: label `i` is `classes[i]`.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `i`-th image, `IMAGE_BYTES` long, HWC.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(
            i < self.len(),
            "image index {i} out of range (len {})",
            self.len()
        );
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// MD5 of the labels and images (lowercase hex): which data a run was
    /// trained on, for `--resume`.
    pub fn fingerprint(&self) -> String {
        let mut h = Md5::new();
        h.update((self.len() as u64).to_le_bytes());
        h.update(&self.labels);
        h.update(&self.images);
        hex(&h.finalize())
    }

    /// `n` images spread evenly over the set (indices `i * len / n`), in
    /// order, so every class of a class-sorted set stays represented.
    /// Returns the whole set when `n >= len`.
    pub fn subsample(&self, n: usize) -> Dataset {
        let len = self.len();
        if n >= len {
            return self.clone();
        }
        let mut out = Dataset {
            classes: self.classes.clone(),
            ..Dataset::default()
        };
        for k in 0..n {
            let i = k * len / n;
            out.images.extend_from_slice(self.image(i));
            out.labels.push(self.labels[i]);
        }
        out
    }
}

/// A small, learnable synthetic data set for tests and demos: image `i` has
/// class `i % classes`; class `k` is bright in channel `k % 3` with
/// horizontal stripes `k + 2` rows wide, plus seeded noise.
pub fn synthetic(n: usize, classes: usize, seed: u64) -> Dataset {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut images = vec![0u8; n * IMAGE_BYTES];
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let k = i % classes.max(1);
        labels.push(k as u8);
        for p in 0..32 * 32 {
            let y = p / 32;
            for c in 0..3 {
                let noise = (mix(seed ^ (i * IMAGE_BYTES + p * 3 + c) as u64) % 40) as u8;
                let base = if c == k % 3 { 150 } else { 60 };
                let stripe = if (y / (k + 2)).is_multiple_of(2) {
                    40
                } else {
                    0
                };
                images[i * IMAGE_BYTES + p * 3 + c] = base + stripe + noise;
            }
        }
    }
    Dataset {
        images,
        labels,
        classes: (0..classes.max(1)).map(|k| format!("class{k}")).collect(),
    }
}

impl Dataset {
    /// An empty set of CIFAR-10's classes.
    pub fn cifar10() -> Self {
        Self {
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
            ..Self::default()
        }
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.classes.len()];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(usize::from(l)) {
                *c += 1;
            }
        }
        counts
    }
}

impl fmt::Debug for Dataset {
    /// Summarises instead of dumping megabytes of pixels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts = vec![0usize; self.classes.len().max(CLASSES.len())];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(usize::from(l)) {
                *c += 1;
            }
        }
        f.debug_struct("Dataset")
            .field("len", &self.len())
            .field("images_bytes", &self.images.len())
            .field("per_class", &counts)
            .finish()
    }
}

/// Which part of CIFAR-10 to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The 50,000 training images.
    Train,
    /// The 10,000 test images.
    Test,
}

impl Split {
    /// `"train"` or `"test"`: the split's folder name in the image-folder layout.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    /// The official binary batch files making up this split, in load order.
    fn batch_names(self) -> &'static [&'static str] {
        match self {
            Split::Train => &TRAIN_BATCHES,
            Split::Test => &TEST_BATCHES,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a dataset lives and in which layout; usually built by [`detect`].
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A folder holding the official `*_batch*.bin` files, directly or in a
    /// `cifar-10-batches-bin/` subfolder.
    BinaryDir(PathBuf),
    /// The official `cifar-10-binary.tar.gz`, read without extracting it.
    Tarball(PathBuf),
    /// `root/{train,test}/<class>/*.{jpg,jpeg,png}`, any classes
    /// ([`folders::load_split_folders`]).
    ImageFolders(PathBuf),
    /// `root/<class>/*.{jpg,jpeg,png}`, a per-class fraction of the images
    /// held out as the test split ([`folders::load_flat_folders`]).
    ClassFolders {
        /// The folder holding one folder per class.
        root: PathBuf,
        /// Share of each class's images in the test split.
        val_split: f64,
    },
}

/// Test share of a `root/<class>/` set unless `--val-split` says otherwise.
pub const DEFAULT_VAL_SPLIT: f64 = 0.2;

/// Text listing the accepted layouts, for error messages.
const LAYOUTS: &str = "expected one of:\n  \
     - a .tar.gz/.tgz file (the official cifar-10-binary.tar.gz)\n  \
     - a folder with train/ and test/ subfolders of <class>/*.{jpg,jpeg,png}\n  \
     - a folder of <class>/*.{jpg,jpeg,png} folders (a share held out for testing: --val-split)\n  \
     - a folder with the official *_batch*.bin files, directly or in cifar-10-batches-bin/";

/// Works out which layout `path` holds.
///
/// * a file named `*.tar.gz` or `*.tgz` → [`Source::Tarball`];
/// * a folder with `train/` and `test/` subfolders → [`Source::ImageFolders`];
/// * a folder of class folders holding images → [`Source::ClassFolders`]
///   with [`DEFAULT_VAL_SPLIT`];
/// * a folder with `*_batch*.bin` files, directly or in `cifar-10-batches-bin/`
///   → [`Source::BinaryDir`] (holding `path` itself);
/// * anything else is an error naming `path` and listing these layouts.
pub fn detect(path: &Path) -> Result<Source> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            return Ok(Source::Tarball(path.to_path_buf()));
        }
    } else if meta.is_dir() {
        if path.join("train").is_dir() && path.join("test").is_dir() {
            return Ok(Source::ImageFolders(path.to_path_buf()));
        }
        let sub = path.join(BINARY_SUBDIR);
        if has_batch_files(path)? || (sub.is_dir() && has_batch_files(&sub)?) {
            return Ok(Source::BinaryDir(path.to_path_buf()));
        }
        if folders::is_flat_layout(path) {
            return Ok(Source::ClassFolders {
                root: path.to_path_buf(),
                val_split: DEFAULT_VAL_SPLIT,
            });
        }
    }
    bail!(
        "{} is not a data set in a known layout; {LAYOUTS}",
        path.display()
    )
}

/// Whether `dir` directly holds a file named like `*_batch*.bin`.
fn has_batch_files(dir: &Path) -> Result<bool> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".bin") && name.contains("_batch") && entry.path().is_file() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Loads one split from `source`.
///
/// Order is deterministic: for the binary formats, batch files in order
/// (`data_batch_1.bin` … `data_batch_5.bin`) and records in file order; for
/// image folders, classes in label order and files sorted by name.
pub fn load(source: &Source, split: Split) -> Result<Dataset> {
    match source {
        Source::BinaryDir(dir) => load_binary_dir(dir, split),
        Source::Tarball(path) => load_tarball(path, split),
        Source::ImageFolders(root) => folders::load_split_folders(root, split),
        Source::ClassFolders { root, val_split } => {
            folders::load_flat_folders(root, *val_split, split)
        }
    }
}

// ---------------------------------------------------------------------------
// Official binary format
// ---------------------------------------------------------------------------

/// Appends the records of one batch file (already in memory) to `out`,
/// converting CHW planes to HWC. Errors do not name the file; callers add it.
fn append_records(bytes: &[u8], out: &mut Dataset) -> Result<()> {
    ensure!(
        bytes.len().is_multiple_of(RECORD_BYTES),
        "truncated: {} bytes is not a whole number of {RECORD_BYTES}-byte records",
        bytes.len()
    );
    ensure!(
        !bytes.is_empty(),
        "empty file: no {RECORD_BYTES}-byte records"
    );
    let n = bytes.len() / RECORD_BYTES;
    out.labels.reserve(n);
    out.images.reserve(n * IMAGE_BYTES);
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        ensure!(
            usize::from(label) < CLASSES.len(),
            "record {i}: label {label} is out of range 0..=9"
        );
        out.labels.push(label);
        let (r, gb) = record[1..].split_at(PIXELS);
        let (g, b) = gb.split_at(PIXELS);
        out.images
            .extend(r.iter().zip(g).zip(b).flat_map(|((&r, &g), &b)| [r, g, b]));
    }
    Ok(())
}

/// `ds` in the official binary format: per image, the label byte, then the
/// R, G and B planes (32x32 row-major each): the inverse of the reader, so
/// a `test_batch.bin` written from it loads back as `ds`.
pub fn to_binary_records(ds: &Dataset) -> Vec<u8> {
    let mut out = Vec::with_capacity(ds.len() * RECORD_BYTES);
    for i in 0..ds.len() {
        out.push(ds.labels[i]);
        let img = ds.image(i);
        for c in 0..3 {
            out.extend(img.iter().skip(c).step_by(3));
        }
    }
    out
}

/// The folder that actually holds the `.bin` files: `dir` itself if it has
/// any, else `dir/cifar-10-batches-bin` if that is a folder, else `dir`.
fn binary_batch_dir(dir: &Path) -> Result<PathBuf> {
    let sub = dir.join(BINARY_SUBDIR);
    if !has_batch_files(dir)? && sub.is_dir() {
        Ok(sub)
    } else {
        Ok(dir.to_path_buf())
    }
}

fn load_binary_dir(dir: &Path, split: Split) -> Result<Dataset> {
    let dir = binary_batch_dir(dir)?;
    let paths: Vec<PathBuf> = split.batch_names().iter().map(|n| dir.join(n)).collect();
    let missing: Vec<&str> = split
        .batch_names()
        .iter()
        .zip(&paths)
        .filter(|(_, p)| !p.is_file())
        .map(|(n, _)| *n)
        .collect();
    ensure!(
        missing.is_empty(),
        "{} lacks CIFAR-10 batch file(s) needed for the {split} split: {}",
        dir.display(),
        missing.join(", ")
    );
    let mut out = Dataset::cifar10();
    for path in &paths {
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        append_records(&bytes, &mut out).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(out)
}

fn load_tarball(path: &Path, split: Split) -> Result<Dataset> {
    let ctx = || format!("reading {}", path.display());
    let file = File::open(path).with_context(ctx)?;
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    let wanted = split.batch_names();
    let mut found: HashMap<&str, (PathBuf, Vec<u8>)> = HashMap::new();
    for entry in archive.entries().with_context(ctx)? {
        let mut entry = entry.with_context(ctx)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_path = entry.path().with_context(ctx)?.into_owned();
        let Some(name) = entry_path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(&name) = wanted.iter().find(|&&w| w == name) else {
            continue;
        };
        let entry_ctx = || format!("reading {} in {}", entry_path.display(), path.display());
        if let Some((first, _)) = found.get(name) {
            bail!(
                "{}: {name} appears twice ({} and {})",
                path.display(),
                first.display(),
                entry_path.display()
            );
        }
        let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
        entry.read_to_end(&mut bytes).with_context(entry_ctx)?;
        found.insert(name, (entry_path.clone(), bytes));
    }
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|n| !found.contains_key(n))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} lacks CIFAR-10 batch file(s) needed for the {split} split: {}",
        path.display(),
        missing.join(", ")
    );
    let mut out = Dataset::cifar10();
    for name in wanted {
        let (entry_path, bytes) = &found[name];
        append_records(bytes, &mut out)
            .with_context(|| format!("reading {} in {}", entry_path.display(), path.display()))?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Cache folder and download
// ---------------------------------------------------------------------------

/// Where downloads are kept: `$MINI_RESNET_CACHE`, else
/// `$XDG_CACHE_HOME/mini-resnet`, else `$HOME/.cache/mini-resnet`
/// (empty variables count as unset; `./.cache/mini-resnet` if none is set).
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("MINI_RESNET_CACHE") {
        PathBuf::from(dir)
    } else if let Some(xdg) = var("XDG_CACHE_HOME") {
        PathBuf::from(xdg).join("mini-resnet")
    } else {
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache").join("mini-resnet")
    }
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// MD5 of a file's contents, lowercase hex.
fn md5_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Downloads `url` into `dir/file_name` unless a file with the right MD5 is
/// already there; returns its path.
///
/// Creates `dir` if needed. The body streams into `dir/file_name.part` (with a
/// progress bar on stderr when it is a terminal) while its MD5 is computed; the
/// file is synced and renamed to `file_name` only if the MD5 equals `md5_hex`
/// (compared case-insensitively). Otherwise the `.part` file is removed and the
/// error gives the URL and both MD5s. An existing `file_name` with the wrong
/// MD5 is downloaded again.
pub fn download(url: &str, md5_hex: &str, dir: &Path, file_name: &str) -> Result<PathBuf> {
    let expected = md5_hex.to_ascii_lowercase();
    let dest = dir.join(file_name);
    if dest.is_file() {
        let actual = md5_file(&dest)?;
        if actual == expected {
            return Ok(dest);
        }
        eprintln!(
            "{} has MD5 {actual}, expected {expected}; downloading it again",
            dest.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = dir.join(format!("{file_name}.part"));
    match fetch_to(url, &part) {
        Ok(actual) if actual == expected => {}
        Ok(actual) => {
            let _ = fs::remove_file(&part);
            bail!("MD5 mismatch for {url}: expected {expected}, got {actual}");
        }
        Err(err) => {
            let _ = fs::remove_file(&part);
            return Err(err);
        }
    }
    fs::rename(&part, &dest)
        .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
    // Persist the rename too; not every platform can open a folder, so best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(dest)
}

/// Whether `url`'s host is `localhost` or a loopback address.
fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some(host) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// GETs `url` into `part` (created or truncated), fsyncs it, and returns the
/// MD5 of what was written.
fn fetch_to(url: &str, part: &Path) -> Result<String> {
    let mut config = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)));
    // A proxy (from $HTTP_PROXY & co.) cannot reach this machine's loopback.
    if is_loopback(url) {
        config = config.proxy(None);
    }
    let agent = config.build().new_agent();
    let mut response = agent
        .get(url)
        .call()
        .with_context(|| format!("downloading {url}"))?;
    let body = response.body_mut();
    let bar = match body.content_length() {
        Some(len) => ProgressBar::new(len).with_style(ProgressStyle::with_template(
            "{msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
        )?),
        None => ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
            "{spinner} {msg} {bytes} ({bytes_per_sec})",
        )?),
    };
    bar.set_message(format!("downloading {url}"));

    let mut reader = body.as_reader();
    let mut file = File::create(part).with_context(|| format!("creating {}", part.display()))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(e).with_context(|| format!("downloading {url}"));
            }
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    file.sync_all()
        .with_context(|| format!("writing {}", part.display()))?;
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests;
