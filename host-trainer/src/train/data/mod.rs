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
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Full error chain as one string.
    fn chain(err: &anyhow::Error) -> String {
        format!("{err:#}")
    }

    /// A record with label `label` whose pixel `p` has R = `p + seed`,
    /// G = `2p + seed`, B = `3p + seed` (all mod 256).
    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut rec = vec![label];
        for c in 0..3u32 {
            rec.extend((0..PIXELS as u32).map(|p| ((c + 1) * p + u32::from(seed)) as u8));
        }
        rec
    }

    /// Expected HWC bytes of [`record`]`(_, seed)`.
    fn expected_image(seed: u8) -> Vec<u8> {
        (0..PIXELS as u32)
            .flat_map(|p| (1..=3u32).map(move |c| (c * p + u32::from(seed)) as u8))
            .collect()
    }

    /// Batch file contents: `(label, seed)` per record.
    fn batch(records: &[(u8, u8)]) -> Vec<u8> {
        records.iter().flat_map(|&(l, s)| record(l, s)).collect()
    }

    /// Batch files of a small fake binary release: 3 records each, distinct seeds.
    fn fake_batches() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        for (i, name) in TRAIN_BATCHES.iter().chain(&TEST_BATCHES).enumerate() {
            let i = i as u8;
            out.push((
                *name,
                batch(&[(i, 10 * i), ((i + 3) % 10, 10 * i + 1), (9, 10 * i + 2)]),
            ));
        }
        out
    }

    #[test]
    fn binary_records_are_the_readers_inverse() {
        let bytes = batch(&[(3, 7), (9, 200)]);
        let mut ds = Dataset::default();
        append_records(&bytes, &mut ds).unwrap();
        assert_eq!(ds.labels, [3, 9]);
        assert_eq!(ds.image(1), expected_image(200).as_slice());
        assert_eq!(to_binary_records(&ds), bytes);
        assert!(to_binary_records(&Dataset::default()).is_empty());
    }

    fn write_batches(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for (name, bytes) in fake_batches() {
            fs::write(dir.join(name), bytes).unwrap();
        }
    }

    fn tarball_bytes(prefix: &str) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        for (name, bytes) in fake_batches() {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("{prefix}{name}"), bytes.as_slice())
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn binary_dir_loads_and_converts_to_hwc() {
        let tmp = tempfile::tempdir().unwrap();
        write_batches(tmp.path());
        let source = detect(tmp.path()).unwrap();
        assert_eq!(source, Source::BinaryDir(tmp.path().to_path_buf()));

        let test = load(&source, Split::Test).unwrap();
        assert_eq!(test.len(), 3);
        assert_eq!(test.labels, [5, 8, 9]);
        assert_eq!(test.images.len(), 3 * IMAGE_BYTES);
        assert_eq!(test.image(1), expected_image(51).as_slice());
        // Pixel (x, y) = (7, 20): R plane p, G plane 2p, B plane 3p (+ seed).
        let (x, y) = (7, 20);
        let p = y * 32 + x;
        let seed = 50;
        let px = &test.image(0)[p * 3..p * 3 + 3];
        assert_eq!(
            px,
            [(p + seed) as u8, (2 * p + seed) as u8, (3 * p + seed) as u8]
        );

        let train = load(&source, Split::Train).unwrap();
        assert_eq!(train.len(), 15);
        assert_eq!(train.labels, [0, 3, 9, 1, 4, 9, 2, 5, 9, 3, 6, 9, 4, 7, 9]);
        assert_eq!(train.image(14), expected_image(42).as_slice());
    }

    #[test]
    fn binary_dir_in_subfolder() {
        let tmp = tempfile::tempdir().unwrap();
        write_batches(&tmp.path().join(BINARY_SUBDIR));
        let source = detect(tmp.path()).unwrap();
        assert_eq!(source, Source::BinaryDir(tmp.path().to_path_buf()));
        let direct = tempfile::tempdir().unwrap();
        write_batches(direct.path());
        for split in [Split::Train, Split::Test] {
            let a = load(&source, split).unwrap();
            let b = load(&Source::BinaryDir(direct.path().to_path_buf()), split).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn binary_truncated_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        write_batches(tmp.path());
        let mut bytes = batch(&[(1, 1), (2, 2)]);
        bytes.pop();
        fs::write(tmp.path().join("test_batch.bin"), &bytes).unwrap();
        let err = load(&Source::BinaryDir(tmp.path().into()), Split::Test).unwrap_err();
        let msg = chain(&err);
        assert!(msg.contains("test_batch.bin"), "{msg}");
        assert!(
            msg.contains("truncated: 6145 bytes is not a whole number of 3073-byte records"),
            "{msg}"
        );
    }

    #[test]
    fn binary_bad_label_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        write_batches(tmp.path());
        fs::write(
            tmp.path().join("data_batch_4.bin"),
            batch(&[(1, 1), (2, 2), (10, 3)]),
        )
        .unwrap();
        let err = load(&Source::BinaryDir(tmp.path().into()), Split::Train).unwrap_err();
        let msg = chain(&err);
        assert!(msg.contains("data_batch_4.bin"), "{msg}");
        assert!(msg.contains("record 2: label 10"), "{msg}");
    }

    #[test]
    fn binary_missing_batches_are_listed() {
        let tmp = tempfile::tempdir().unwrap();
        write_batches(tmp.path());
        fs::remove_file(tmp.path().join("data_batch_3.bin")).unwrap();
        fs::remove_file(tmp.path().join("data_batch_5.bin")).unwrap();
        let source = Source::BinaryDir(tmp.path().into());
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains("data_batch_3.bin, data_batch_5.bin"), "{msg}");
        assert!(!msg.contains("data_batch_1.bin"), "{msg}");
        // The test split is still complete.
        assert_eq!(load(&source, Split::Test).unwrap().len(), 3);
    }

    #[test]
    fn tarball_matches_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join("bins");
        write_batches(&folder);
        for (prefix, file) in [("cifar-10-batches-bin/", "a.tar.gz"), ("", "b.tgz")] {
            let tgz = tmp.path().join(file);
            fs::write(&tgz, tarball_bytes(prefix)).unwrap();
            let source = detect(&tgz).unwrap();
            assert_eq!(source, Source::Tarball(tgz.clone()));
            for split in [Split::Train, Split::Test] {
                let from_tar = load(&source, split).unwrap();
                let from_dir = load(&Source::BinaryDir(folder.clone()), split).unwrap();
                assert_eq!(from_tar, from_dir, "{file} {split}");
            }
        }
    }

    #[test]
    fn tarball_missing_and_broken_entries() {
        let tmp = tempfile::tempdir().unwrap();
        // Only the test batch, truncated.
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        let bytes = [0u8; 100];
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_cksum();
        builder
            .append_data(
                &mut header,
                "cifar-10-batches-bin/test_batch.bin",
                &bytes[..],
            )
            .unwrap();
        let tgz = tmp.path().join("x.tar.gz");
        fs::write(&tgz, builder.into_inner().unwrap().finish().unwrap()).unwrap();
        let source = Source::Tarball(tgz);
        let msg = chain(&load(&source, Split::Test).unwrap_err());
        assert!(
            msg.contains("cifar-10-batches-bin/test_batch.bin in"),
            "{msg}"
        );
        assert!(msg.contains("x.tar.gz"), "{msg}");
        assert!(msg.contains("truncated: 100 bytes"), "{msg}");
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains("data_batch_1.bin, data_batch_2.bin"), "{msg}");

        // Not gzip at all.
        let bogus = tmp.path().join("bogus.tgz");
        fs::write(&bogus, b"not a tarball").unwrap();
        let msg = chain(&load(&Source::Tarball(bogus), Split::Test).unwrap_err());
        assert!(msg.contains("bogus.tgz"), "{msg}");
    }

    /// Pixel value for image `seed` at (x, y), channel c.
    fn pattern(seed: u8, x: u32, y: u32, c: u32) -> u8 {
        (x * 7 + y * 3 + c * 50) as u8 ^ seed
    }

    fn rgb(seed: u8, w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                pattern(seed, x, y, 0),
                pattern(seed, x, y, 1),
                pattern(seed, x, y, 2),
            ])
        })
    }

    /// Train: cat/{b.png, a.png, c.jpg}, airplane/{z.png, 1.JPEG}; test: truck/t.png.
    /// `train/{airplane,cat}` with 5 images each (mixed formats, names out
    /// of order), `test/{airplane,cat}` with one each.
    fn write_image_folders(root: &Path) {
        for (class, base) in [("airplane", 10u8), ("cat", 20)] {
            let train = root.join("train").join(class);
            let test = root.join("test").join(class);
            fs::create_dir_all(&train).unwrap();
            fs::create_dir_all(&test).unwrap();
            for (k, name) in ["e.png", "b.png", "d.png", "a.png"].iter().enumerate() {
                rgb(base + k as u8, 32, 32).save(train.join(name)).unwrap();
            }
            let mut jpeg = Vec::new();
            rgb(base + 9, 32, 32)
                .write_to(
                    &mut std::io::Cursor::new(&mut jpeg),
                    image::ImageFormat::Jpeg,
                )
                .unwrap();
            fs::write(train.join("c.JPEG"), jpeg).unwrap();
            rgb(base + 5, 32, 32).save(test.join("t.png")).unwrap();
        }
    }

    #[test]
    fn image_folders_load_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        write_image_folders(tmp.path());
        let source = detect(tmp.path()).unwrap();
        assert_eq!(source, Source::ImageFolders(tmp.path().to_path_buf()));

        let train = load(&source, Split::Train).unwrap();
        assert_eq!(train.classes, ["airplane", "cat"]);
        assert_eq!(train.labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
        // airplane: a.png (seed 13), b.png (11), c.JPEG (19), d.png (12), e.png (10)
        assert_eq!(train.image(0), rgb(13, 32, 32).as_raw().as_slice());
        assert_eq!(train.image(1), rgb(11, 32, 32).as_raw().as_slice());
        assert_eq!(train.image(4), rgb(10, 32, 32).as_raw().as_slice());
        assert_eq!(train.image(9), rgb(20, 32, 32).as_raw().as_slice());
        // JPEG is lossy: only check it is close.
        let err: f64 = train
            .image(2)
            .iter()
            .zip(rgb(19, 32, 32).as_raw())
            .map(|(&a, &b)| f64::from(a.abs_diff(b)))
            .sum::<f64>()
            / IMAGE_BYTES as f64;
        assert!(err < 20.0, "mean abs error {err}");

        let test = load(&source, Split::Test).unwrap();
        assert_eq!(
            (test.labels.clone(), test.classes.clone()),
            (vec![0, 1], train.classes)
        );
        assert_eq!(test.image(1), rgb(25, 32, 32).as_raw().as_slice());
    }

    #[test]
    fn image_folders_convert_gray_and_rgba() {
        let tmp = tempfile::tempdir().unwrap();
        write_image_folders(tmp.path());
        let dir = tmp.path().join("test/cat");
        fs::remove_file(dir.join("t.png")).unwrap();
        image::GrayImage::from_fn(32, 32, |x, y| image::Luma([(x + y) as u8]))
            .save(dir.join("a.png"))
            .unwrap();
        image::RgbaImage::from_fn(32, 32, |x, y| image::Rgba([x as u8, y as u8, 7, 128]))
            .save(dir.join("b.png"))
            .unwrap();
        image::GrayImage::from_pixel(32, 32, image::Luma([200]))
            .save(dir.join("c.jpg"))
            .unwrap();
        let test = load(&detect(tmp.path()).unwrap(), Split::Test).unwrap();
        assert_eq!(test.labels, [0, 1, 1, 1]);
        let p = (5 * 32 + 3) * 3; // (x, y) = (3, 5)
        assert_eq!(test.image(1)[p..p + 3], [8, 8, 8]);
        assert_eq!(test.image(2)[p..p + 3], [3, 5, 7]);
        assert!(test.image(3).iter().all(|&v| v.abs_diff(200) <= 2));
    }

    /// Images of any size go through the board's preprocessing: the same
    /// bytes as `shared::preprocess` on that image, and a 64x48 image of
    /// 2x2 blocks becomes its centre 48x48 averaged.
    #[test]
    fn image_folders_take_any_size_through_the_board_path() {
        let tmp = tempfile::tempdir().unwrap();
        write_image_folders(tmp.path());
        let big = rgb(3, 64, 48);
        big.save(tmp.path().join("test/cat/big.png")).unwrap();
        let tiny = rgb(4, 8, 6);
        tiny.save(tmp.path().join("test/cat/tiny.png")).unwrap();
        let test = load(&detect(tmp.path()).unwrap(), Split::Test).unwrap();
        assert_eq!(test.len(), 4);
        let mut want = [0i8; shared::preprocess::INPUT_LEN];
        let frame = shared::preprocess::Frame {
            data: big.as_raw(),
            width: 64,
            height: 48,
            format: shared::preprocess::PixelFormat::Rgb888,
        };
        shared::preprocess::preprocess(&frame, &mut want).unwrap();
        let want: Vec<u8> = want.iter().map(|&q| (q as i16 + 128) as u8).collect();
        assert_eq!(test.image(1), want.as_slice()); // big.png sorts first
        assert_eq!(network_pixels(&tiny).unwrap().len(), IMAGE_BYTES);
    }

    #[test]
    fn flat_class_folders_split_deterministically() {
        let tmp = tempfile::tempdir().unwrap();
        for (class, n) in [("ok", 10u8), ("damaged", 12)] {
            let dir = tmp.path().join(class);
            fs::create_dir_all(&dir).unwrap();
            for k in 0..n {
                rgb(k, 40, 40)
                    .save(dir.join(format!("{k:02}.png")))
                    .unwrap();
            }
        }
        let source = detect(tmp.path()).unwrap();
        assert_eq!(
            source,
            Source::ClassFolders {
                root: tmp.path().to_path_buf(),
                val_split: DEFAULT_VAL_SPLIT
            }
        );
        let train = load(&source, Split::Train).unwrap();
        let test = load(&source, Split::Test).unwrap();
        assert_eq!(train.classes, ["damaged", "ok"]);
        assert_eq!(train.class_counts(), [10, 8]);
        assert_eq!(test.class_counts(), [2, 2]);
        // No image in both, none lost, and the same split every time.
        for i in 0..test.len() {
            assert!((0..train.len()).all(|j| train.image(j) != test.image(i)));
        }
        assert_eq!(load(&source, Split::Test).unwrap(), test);
        let half = Source::ClassFolders {
            root: tmp.path().to_path_buf(),
            val_split: 0.5,
        };
        assert_eq!(load(&half, Split::Test).unwrap().class_counts(), [6, 5]);
        let bad = Source::ClassFolders {
            root: tmp.path().to_path_buf(),
            val_split: 1.0,
        };
        assert!(chain(&load(&bad, Split::Train).unwrap_err()).contains("--val-split"));
    }

    #[test]
    fn image_folders_errors_name_the_culprit() {
        let tmp = tempfile::tempdir().unwrap();
        write_image_folders(tmp.path());
        let source = Source::ImageFolders(tmp.path().to_path_buf());
        let expect_err = |split: Split, needles: &[&str]| {
            let msg = chain(&load(&source, split).unwrap_err());
            for n in needles {
                assert!(msg.contains(n), "{n:?} not in: {msg}");
            }
        };
        // Corrupt file.
        let bad = tmp.path().join("train/cat/x.jpg");
        fs::write(&bad, [0x13u8, 0x37, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
        expect_err(Split::Train, &[&bad.display().to_string()]);
        fs::remove_file(&bad).unwrap();

        // A test class the training folder lacks.
        let unknown = tmp.path().join("test/dog");
        fs::create_dir(&unknown).unwrap();
        rgb(0, 32, 32).save(unknown.join("a.png")).unwrap();
        expect_err(
            Split::Test,
            &[&unknown.display().to_string(), "no counterpart"],
        );
        fs::remove_dir_all(&unknown).unwrap();

        // Other extension in a class folder; stray file in the split folder.
        let txt = tmp.path().join("train/cat/notes.txt");
        fs::write(&txt, "hi").unwrap();
        expect_err(Split::Train, &[&txt.display().to_string()]);
        fs::remove_file(&txt).unwrap();
        let stray = tmp.path().join("train/labels.csv");
        fs::write(&stray, "x").unwrap();
        expect_err(Split::Train, &[&stray.display().to_string()]);
        fs::remove_file(&stray).unwrap();

        // Everything fine again.
        assert_eq!(load(&source, Split::Train).unwrap().len(), 10);

        // A class with no test images; an empty class folder; a missing split.
        fs::remove_dir_all(tmp.path().join("test/cat")).unwrap();
        expect_err(Split::Test, &["\"cat\" has no test images"]);
        let cat = tmp.path().join("test/cat");
        fs::create_dir_all(&cat).unwrap();
        expect_err(
            Split::Test,
            &[&cat.display().to_string(), "holds no images"],
        );
        fs::remove_dir_all(tmp.path().join("test")).unwrap();
        expect_err(Split::Test, &["missing split folder"]);
    }

    /// Data sets a classifier cannot be trained on: each error names the
    /// folder (or the class) at fault.
    #[test]
    fn bad_class_sets_are_clear_errors() {
        let make = |classes: &[&str], per: usize| {
            let tmp = tempfile::tempdir().unwrap();
            for c in classes {
                for split in ["train", "test"] {
                    let d = tmp.path().join(split).join(c);
                    fs::create_dir_all(&d).unwrap();
                    for k in 0..per {
                        rgb(k as u8, 32, 32)
                            .save(d.join(format!("{k}.png")))
                            .unwrap();
                    }
                }
            }
            tmp
        };
        let err = |tmp: &tempfile::TempDir| {
            chain(
                &load(
                    &Source::ImageFolders(tmp.path().to_path_buf()),
                    Split::Train,
                )
                .unwrap_err(),
            )
        };
        let one = make(&["only"], 5);
        assert!(
            err(&one).contains("1 class folder(s) (only)"),
            "{}",
            err(&one)
        );
        let names: Vec<String> = (0..101).map(|k| format!("c{k:03}")).collect();
        let many = make(&names.iter().map(String::as_str).collect::<Vec<_>>(), 1);
        assert!(err(&many).contains("101 class folder(s)"), "{}", err(&many));
        let few = make(&["a", "b"], 4);
        assert!(
            err(&few).contains("\"a\"") && err(&few).contains("4 training image"),
            "{}",
            err(&few)
        );
        let long = make(&["a", &"x".repeat(33)], 5);
        assert!(err(&long).contains("1 to 32 bytes"), "{}", err(&long));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let ok = make(&["a", "b"], 5);
            let name = std::ffi::OsStr::from_bytes(b"caf\xe9");
            let bad = ok.path().join("train").join(name);
            fs::create_dir_all(&bad).unwrap();
            assert!(err(&ok).contains("not valid UTF-8"), "{}", err(&ok));
            assert!(
                err(&ok).contains(&bad.display().to_string()),
                "{}",
                err(&ok)
            );
        }
    }

    #[test]
    fn detect_rejects_unknown_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        let msg = chain(&detect(tmp.path()).unwrap_err());
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        assert!(msg.contains(".tar.gz"), "{msg}");
        assert!(msg.contains("train/ and test/"), "{msg}");
        assert!(msg.contains("cifar-10-batches-bin"), "{msg}");

        // Only train/ is not enough for image folders.
        fs::create_dir(tmp.path().join("train")).unwrap();
        assert!(detect(tmp.path()).is_err());

        let file = tmp.path().join("data.zip");
        fs::write(&file, b"x").unwrap();
        let msg = chain(&detect(&file).unwrap_err());
        assert!(msg.contains("data.zip"), "{msg}");

        let missing = tmp.path().join("nope");
        let msg = chain(&detect(&missing).unwrap_err());
        assert!(msg.contains("nope"), "{msg}");
    }

    #[test]
    fn dataset_subsample_and_debug() {
        let d = Dataset {
            images: (0..6).flat_map(|i| vec![i as u8; IMAGE_BYTES]).collect(),
            labels: vec![0, 0, 1, 1, 2, 2],
            ..Dataset::cifar10()
        };
        assert!(!d.is_empty());
        assert_eq!(d.subsample(10), d);
        let s = d.subsample(3);
        assert_eq!(s.labels, vec![0, 1, 2]);
        assert_eq!((s.image(1)[0], s.image(2)[0]), (2, 4));
        assert!(format!("{s:?}").contains("len: 3"));
        assert!(d.subsample(0).is_empty());
    }

    /// Serves `body` at `/data.tar.gz` and 404 elsewhere on 127.0.0.1; returns
    /// the base URL and a counter of 200 responses.
    fn serve(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&served);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = io::BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // Skip the headers.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let result = if path == "/data.tar.gz" {
                    count.fetch_add(1, Ordering::SeqCst);
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .and_then(|()| stream.write_all(&body))
                } else {
                    stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\
                          Connection: close\r\n\r\nnot found",
                    )
                };
                let _ = result.and_then(|()| stream.flush());
            }
        });
        (base, served)
    }

    #[test]
    fn download_checks_md5_and_caches() {
        let body = tarball_bytes("cifar-10-batches-bin/");
        let md5 = hex(&Md5::digest(&body));
        let (base, served) = serve(body.clone());
        let url = format!("{base}/data.tar.gz");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache/sub");

        let path = download(&url, &md5.to_uppercase(), &dir, "cifar.tar.gz").unwrap();
        assert_eq!(path, dir.join("cifar.tar.gz"));
        assert_eq!(fs::read(&path).unwrap(), body);
        assert!(!dir.join("cifar.tar.gz.part").exists());
        assert_eq!(served.load(Ordering::SeqCst), 1);
        // It is a loadable tarball.
        assert_eq!(load(&detect(&path).unwrap(), Split::Test).unwrap().len(), 3);

        // Already there with the right MD5: no second request.
        let again = download(&url, &md5, &dir, "cifar.tar.gz").unwrap();
        assert_eq!(again, path);
        assert_eq!(served.load(Ordering::SeqCst), 1);

        // Wrong MD5: error names both and the URL, nothing left behind.
        let wrong = "0123456789abcdef0123456789abcdef";
        let msg = chain(&download(&url, wrong, &dir, "other.tar.gz").unwrap_err());
        assert!(
            msg.contains(wrong) && msg.contains(&md5) && msg.contains(&url),
            "{msg}"
        );
        assert!(!dir.join("other.tar.gz").exists());
        assert!(!dir.join("other.tar.gz.part").exists());
        assert_eq!(served.load(Ordering::SeqCst), 2);

        // A corrupted cached file is downloaded again.
        fs::write(&path, b"garbage").unwrap();
        download(&url, &md5, &dir, "cifar.tar.gz").unwrap();
        assert_eq!(fs::read(&path).unwrap(), body);
        assert_eq!(served.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn download_http_error_names_url() {
        let (base, served) = serve(Vec::new());
        let url = format!("{base}/missing.tar.gz");
        let tmp = tempfile::tempdir().unwrap();
        let msg = chain(&download(&url, CIFAR10_MD5, tmp.path(), "x.tar.gz").unwrap_err());
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains("404"), "{msg}");
        assert_eq!(served.load(Ordering::SeqCst), 0);
        assert!(!tmp.path().join("x.tar.gz").exists());
        assert!(!tmp.path().join("x.tar.gz.part").exists());
    }

    #[test]
    fn loopback_urls_skip_proxies() {
        assert!(is_loopback("http://127.0.0.1:8080/x.tar.gz"));
        assert!(is_loopback("http://localhost/x"));
        assert!(is_loopback("http://[::1]:80/x"));
        assert!(!is_loopback(CIFAR10_URL));
        assert!(!is_loopback("not a url"));
    }

    #[test]
    fn cache_dir_from_env() {
        // Only reads the environment as it is; the precedence logic is simple
        // enough that mutating process-wide env vars in parallel tests is not
        // worth the risk.
        let dir = default_cache_dir();
        if let Some(v) = std::env::var_os("MINI_RESNET_CACHE").filter(|v| !v.is_empty()) {
            assert_eq!(dir, PathBuf::from(v));
        } else {
            assert!(dir.ends_with("mini-resnet"), "{}", dir.display());
        }
    }

    /// Times loading the real JPEG test split; run with
    /// `cargo test --release -- --ignored --nocapture real_data`.
    #[test]
    #[ignore = "reads ../shared/data/cifar10-jpeg next to the workspace (slow in debug builds)"]
    fn real_data_timing() {
        let root_buf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cifar10-jpeg");
        let root = root_buf.as_path();
        let source = detect(root).unwrap();
        for split in [Split::Test, Split::Train] {
            let t = std::time::Instant::now();
            let d = load(&source, split).unwrap();
            eprintln!("{split}: {d:?} in {:.2?}", t.elapsed());
        }
    }
}
