//! CIFAR-10 loading: the official binary release (as a folder or as the
//! `.tar.gz` itself), folders of JPEG/PNG images, and a checked download.
//!
//! Every loader returns a [`Dataset`]: 32x32 RGB images in HWC order
//! (`r,g,b` interleaved, rows top to bottom) and labels in `0..=9` that index
//! [`CLASSES`].
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
use std::io::{self, BufReader, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};
use rayon::prelude::*;

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
/// File extensions accepted in image folders (compared case-insensitively).
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// URL of the official CIFAR-10 binary release.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// MD5 of the file at [`CIFAR10_URL`], lowercase hex.
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// A set of labelled images.
///
/// Images are 32x32 RGB, HWC order (`r,g,b` interleaved), row-major, `u8`,
/// stored back to back in `images`; `labels[i]` (in `0..=9`, an index into
/// [`CLASSES`]) belongs to the `i`-th image. `images.len()` is always
/// `labels.len() * IMAGE_BYTES`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// All images, `IMAGE_BYTES` each, HWC.
    pub images: Vec<u8>,
    /// One label per image, `0..=9`.
    pub labels: Vec<u8>,
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
        let mut out = Dataset::default();
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
    Dataset { images, labels }
}

impl fmt::Debug for Dataset {
    /// Summarises instead of dumping megabytes of pixels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts = [0usize; CLASSES.len()];
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A folder holding the official `*_batch*.bin` files, directly or in a
    /// `cifar-10-batches-bin/` subfolder.
    BinaryDir(PathBuf),
    /// The official `cifar-10-binary.tar.gz`, read without extracting it.
    Tarball(PathBuf),
    /// `root/{train,test}/<class>/*.{jpg,jpeg,png}` with `<class>` one of [`CLASSES`].
    ImageFolders(PathBuf),
}

/// Text listing the accepted layouts, for error messages.
const LAYOUTS: &str = "expected one of:\n  \
     - a .tar.gz/.tgz file (the official cifar-10-binary.tar.gz)\n  \
     - a folder with train/ and test/ subfolders of <class>/*.{jpg,jpeg,png}\n  \
     - a folder with the official *_batch*.bin files, directly or in cifar-10-batches-bin/";

/// Works out which layout `path` holds.
///
/// * a file named `*.tar.gz` or `*.tgz` → [`Source::Tarball`];
/// * a folder with `train/` and `test/` subfolders → [`Source::ImageFolders`];
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
    }
    bail!(
        "{} is not a CIFAR-10 dataset in a known layout; {LAYOUTS}",
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
        Source::ImageFolders(root) => load_image_folders(root, split),
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
    let mut out = Dataset::default();
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
    let mut out = Dataset::default();
    for name in wanted {
        let (entry_path, bytes) = &found[name];
        append_records(bytes, &mut out)
            .with_context(|| format!("reading {} in {}", entry_path.display(), path.display()))?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------

/// Lists `root/<split>/<class>/*.{jpg,jpeg,png}` as `(path, label)`, classes in
/// label order and files sorted by name within each class. Anything else in
/// the split or class folders is an error.
fn list_image_files(root: &Path, split: Split) -> Result<Vec<(PathBuf, u8)>> {
    let split_dir = root.join(split.name());
    ensure!(
        split_dir.is_dir(),
        "missing split folder {} (expected {}/<class>/*.{{jpg,jpeg,png}})",
        split_dir.display(),
        split_dir.display()
    );
    let ctx = |p: &Path| format!("reading {}", p.display());

    let mut class_dirs: Vec<(u8, PathBuf)> = Vec::new();
    for entry in fs::read_dir(&split_dir).with_context(|| ctx(&split_dir))? {
        let path = entry.with_context(|| ctx(&split_dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let label = name
            .as_deref()
            .and_then(|n| CLASSES.iter().position(|c| *c == n));
        match label {
            Some(label) if path.is_dir() => class_dirs.push((label as u8, path)),
            _ if path.is_dir() => bail!(
                "unknown class folder {} (expected one of: {})",
                path.display(),
                CLASSES.join(", ")
            ),
            _ => bail!(
                "unexpected file {} (a split folder may only hold class folders: {})",
                path.display(),
                CLASSES.join(", ")
            ),
        }
    }
    class_dirs.sort_by_key(|(label, _)| *label);
    let missing: Vec<&str> = CLASSES
        .iter()
        .enumerate()
        .filter(|(c, _)| !class_dirs.iter().any(|(l, _)| *l as usize == *c))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() && !class_dirs.is_empty() {
        eprintln!(
            "warning: {} has no folder for {}: those classes have no {} images",
            split_dir.display(),
            missing.join(", "),
            split.name()
        );
    }

    let mut files = Vec::new();
    for (label, dir) in class_dirs {
        let mut class_files = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| ctx(&dir))? {
            let path = entry.with_context(|| ctx(&dir))?.path();
            let ext_ok = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
            ensure!(
                ext_ok && path.is_file(),
                "unexpected entry {} (a class folder may only hold .jpg, .jpeg or .png files)",
                path.display()
            );
            class_files.push(path);
        }
        ensure!(
            !class_files.is_empty(),
            "class folder {} holds no images (remove it, or add .jpg/.jpeg/.png files)",
            dir.display()
        );
        class_files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        files.extend(class_files.into_iter().map(|p| (p, label)));
    }
    ensure!(
        !files.is_empty(),
        "split folder {} holds no images",
        split_dir.display()
    );
    Ok(files)
}

/// Reads and decodes one image file into `out` (`IMAGE_BYTES` long) as RGB8 HWC.
fn decode_image(path: &Path, out: &mut [u8]) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let decode = || -> Result<image::DynamicImage> {
        Ok(image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()?
            .decode()?)
    };
    let img = decode().with_context(|| format!("decoding {}", path.display()))?;
    let (w, h) = (img.width(), img.height());
    ensure!(
        (w as usize, h as usize) == (SIDE, SIDE),
        "{} is {w}x{h}, expected {SIDE}x{SIDE}",
        path.display()
    );
    out.copy_from_slice(img.into_rgb8().as_raw());
    Ok(())
}

fn load_image_folders(root: &Path, split: Split) -> Result<Dataset> {
    let files = list_image_files(root, split)?;
    let mut images = vec![0u8; files.len() * IMAGE_BYTES];
    // Decode in parallel; report the first failure in file order so errors are
    // deterministic too.
    let first_error = images
        .par_chunks_mut(IMAGE_BYTES)
        .zip(&files)
        .map(|(out, (path, _))| decode_image(path, out))
        .find_first(Result::is_err);
    if let Some(Err(err)) = first_error {
        return Err(err);
    }
    let labels = files.into_iter().map(|(_, label)| label).collect();
    Ok(Dataset { images, labels })
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
    fn write_image_folders(root: &Path) {
        let cat = root.join("train/cat");
        let airplane = root.join("train/airplane");
        let truck = root.join("test/truck");
        for d in [&cat, &airplane, &truck] {
            fs::create_dir_all(d).unwrap();
        }
        rgb(1, 32, 32).save(cat.join("b.png")).unwrap();
        rgb(2, 32, 32).save(cat.join("a.png")).unwrap();
        rgb(3, 32, 32).save(cat.join("c.jpg")).unwrap();
        rgb(4, 32, 32).save(airplane.join("z.png")).unwrap();
        let mut jpeg = Vec::new();
        rgb(5, 32, 32)
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        fs::write(airplane.join("1.JPEG"), jpeg).unwrap();
        rgb(6, 32, 32).save(truck.join("t.png")).unwrap();
    }

    #[test]
    fn image_folders_load_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        write_image_folders(tmp.path());
        let source = detect(tmp.path()).unwrap();
        assert_eq!(source, Source::ImageFolders(tmp.path().to_path_buf()));

        let train = load(&source, Split::Train).unwrap();
        assert_eq!(train.labels, [0, 0, 3, 3, 3]);
        // airplane: 1.JPEG, z.png; cat: a.png, b.png, c.jpg
        assert_eq!(train.image(1), rgb(4, 32, 32).as_raw().as_slice());
        assert_eq!(train.image(2), rgb(2, 32, 32).as_raw().as_slice());
        assert_eq!(train.image(3), rgb(1, 32, 32).as_raw().as_slice());
        // JPEG is lossy: only check it is close.
        for (i, seed) in [(0, 5), (4, 3)] {
            let want = rgb(seed, 32, 32);
            let err: f64 = train
                .image(i)
                .iter()
                .zip(want.as_raw())
                .map(|(&a, &b)| f64::from(a.abs_diff(b)))
                .sum::<f64>()
                / IMAGE_BYTES as f64;
            assert!(err < 20.0, "image {i}: mean abs error {err}");
        }

        let test = load(&source, Split::Test).unwrap();
        assert_eq!(test.labels, [9]);
        assert_eq!(test.image(0), rgb(6, 32, 32).as_raw().as_slice());
    }

    #[test]
    fn image_folders_convert_gray_and_rgba() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("test/frog");
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(tmp.path().join("train")).unwrap();
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
        assert_eq!(test.labels, [6, 6, 6]);
        let p = (5 * 32 + 3) * 3; // (x, y) = (3, 5)
        assert_eq!(test.image(0)[p..p + 3], [8, 8, 8]);
        assert_eq!(test.image(1)[p..p + 3], [3, 5, 7]);
        assert!(test.image(2).iter().all(|&v| v.abs_diff(200) <= 2));
    }

    #[test]
    fn image_folders_errors_name_the_culprit() {
        // Corrupt file.
        let tmp = tempfile::tempdir().unwrap();
        write_image_folders(tmp.path());
        let bad = tmp.path().join("train/cat/x.jpg");
        fs::write(&bad, [0x13u8, 0x37, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
        let source = Source::ImageFolders(tmp.path().to_path_buf());
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
        fs::remove_file(&bad).unwrap();

        // Wrong size.
        let small = tmp.path().join("train/cat/small.png");
        rgb(0, 31, 32).save(&small).unwrap();
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains(&small.display().to_string()), "{msg}");
        assert!(msg.contains("31x32"), "{msg}");
        fs::remove_file(&small).unwrap();

        // Unknown class folder.
        let unknown = tmp.path().join("train/cats");
        fs::create_dir(&unknown).unwrap();
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains(&unknown.display().to_string()), "{msg}");
        assert!(msg.contains("unknown class folder"), "{msg}");
        fs::remove_dir(&unknown).unwrap();

        // Other extension in a class folder.
        let txt = tmp.path().join("train/cat/notes.txt");
        fs::write(&txt, "hi").unwrap();
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains(&txt.display().to_string()), "{msg}");
        fs::remove_file(&txt).unwrap();

        // Stray file in the split folder.
        let stray = tmp.path().join("train/labels.csv");
        fs::write(&stray, "x").unwrap();
        let msg = chain(&load(&source, Split::Train).unwrap_err());
        assert!(msg.contains(&stray.display().to_string()), "{msg}");
        fs::remove_file(&stray).unwrap();

        // Everything fine again.
        assert_eq!(load(&source, Split::Train).unwrap().len(), 5);

        // Empty and missing split folders.
        fs::remove_dir_all(tmp.path().join("test")).unwrap();
        let msg = chain(&load(&source, Split::Test).unwrap_err());
        assert!(msg.contains("missing split folder"), "{msg}");
        assert!(
            msg.contains(&tmp.path().join("test").display().to_string()),
            "{msg}"
        );
        fs::create_dir_all(tmp.path().join("test")).unwrap();
        let msg = chain(&load(&source, Split::Test).unwrap_err());
        assert!(msg.contains("holds no images"), "{msg}");
        // An empty class folder is an error naming it.
        let ship = tmp.path().join("test/ship");
        fs::create_dir_all(&ship).unwrap();
        let msg = chain(&load(&source, Split::Test).unwrap_err());
        assert!(
            msg.contains(&ship.display().to_string()) && msg.contains("holds no images"),
            "{msg}"
        );
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
