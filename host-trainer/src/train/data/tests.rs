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
