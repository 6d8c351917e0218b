//! Running the firmware's QEMU image (`mps2-an500`, Cortex-M7).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use workspace_util::workspace_root;

/// The cargo target folder: `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Which firmware image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// The NUCLEO-H743ZI2 image (default features), in the target folder ([`target_dir`]).
    Board,
    /// The QEMU `mps2-an500` image, in `<target>/qemu-firmware` so it can be
    /// built while an outer `cargo` holds the workspace's target folder.
    Qemu,
}

/// Builds a firmware image (release, thumbv7em-none-eabihf) and returns its ELF path.
pub fn build_firmware(image: Image) -> Result<PathBuf, String> {
    let root = workspace_root();
    let mut args = vec![
        "build",
        "-p",
        "firmware",
        "--release",
        "--target",
        "thumbv7em-none-eabihf",
    ];
    let target = target_dir();
    let target_dir = match image {
        Image::Board => target,
        Image::Qemu => {
            args.extend(["--no-default-features", "--features", "qemu"]);
            target.join("qemu-firmware")
        }
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(&args)
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the {image:?} firmware image failed: {status}"
        ));
    }
    Ok(target_dir.join("thumbv7em-none-eabihf/release/firmware"))
}

/// Builds the QEMU image; see [`build_firmware`].
pub fn build_qemu_image() -> Result<PathBuf, String> {
    build_firmware(Image::Qemu)
}

/// Pixel formats of `frames.bin` (the firmware's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFormat {
    /// RGB565, low byte first.
    Rgb565Le = 0,
    /// RGB565, high byte first.
    Rgb565Be = 1,
    /// RGB888.
    Rgb888 = 2,
}

/// Writes `frames` (each `width * height * bpp` bytes) as `frames.bin`.
pub fn write_frames(
    path: &Path,
    frames: &[Vec<u8>],
    width: usize,
    height: usize,
    format: FrameFormat,
) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"FRM1")?;
    for v in [frames.len(), width, height, format as usize] {
        f.write_all(&(v as u32).to_le_bytes())?;
    }
    for fr in frames {
        f.write_all(fr)?;
    }
    f.flush()
}

/// What the QEMU image reported.
#[derive(Debug, Clone, Default)]
pub struct QemuRun {
    /// Int8 logits per frame.
    pub logits: Vec<Vec<i8>>,
    /// Instructions for preprocessing, per frame.
    pub preprocess_insn: Vec<u64>,
    /// Instructions for the network, per frame.
    pub network_insn: Vec<u64>,
    /// `(name, instructions)` per layer, measured on frame 0.
    pub layers: Vec<(String, u64)>,
    /// The `MODEL` line.
    pub model_line: String,
    /// Class names, from the `CLASS` lines.
    pub classes: Vec<String>,
    /// `(class index, confidence per-mille, class name)` per frame, from
    /// the `TOP1` lines.
    pub top1: Vec<(usize, u16, String)>,
}

/// Runs `elf` under QEMU with `frames.bin` in `dir` and exact instruction
/// counting (`-icount shift=0,align=off,sleep=off`).
pub fn run_qemu(elf: &Path, dir: &Path, timeout_s: u64) -> Result<QemuRun, String> {
    let out = Command::new("timeout")
        .arg(timeout_s.to_string())
        .arg("qemu-system-arm")
        .current_dir(dir)
        .args([
            "-M",
            "mps2-an500",
            "-cpu",
            "cortex-m7",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-semihosting-config",
            "enable=on,target=native",
            "-icount",
            "shift=0,align=off,sleep=off",
            "-kernel",
        ])
        .arg(elf)
        .output()
        .map_err(|e| {
            format!("cannot run qemu-system-arm (apt-get install qemu-system-arm): {e}")
        })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "QEMU exited with {}:\n{}\n{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&text)
}

/// `line` after its first `words` space-separated words.
fn rest(line: &str, words: usize) -> &str {
    line.splitn(words + 1, ' ').nth(words).unwrap_or("")
}

fn parse(text: &str) -> Result<QemuRun, String> {
    let mut r = QemuRun::default();
    let mut done = false;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("MODEL") => r.model_line = line.to_string(),
            Some("LOGITS") => {
                let n: usize = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("bad line `{line}`"))?;
                if n != r.logits.len() {
                    return Err(format!("frame {n} out of order"));
                }
                r.logits.push(
                    it.map(|v| v.parse::<i8>().map_err(|e| format!("`{line}`: {e}")))
                        .collect::<Result<_, _>>()?,
                );
            }
            Some("INSN") => {
                let _n = it.next();
                for kv in it {
                    let (k, v) = kv.split_once('=').ok_or(format!("bad line `{line}`"))?;
                    let v: u64 = v.parse().map_err(|e| format!("`{line}`: {e}"))?;
                    match k {
                        "preprocess" => r.preprocess_insn.push(v),
                        "network" => r.network_insn.push(v),
                        _ => return Err(format!("bad line `{line}`")),
                    }
                }
            }
            Some("LAYER") => {
                let _i = it.next();
                let name = it.next().ok_or(format!("bad line `{line}`"))?.to_string();
                let v: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("bad line `{line}`"))?;
                r.layers.push((name, v));
            }
            Some("CLASS") => {
                let (i, name) = rest(line, 1)
                    .split_once(' ')
                    .ok_or(format!("bad line `{line}`"))?;
                if i.parse::<usize>().ok() != Some(r.classes.len()) {
                    return Err(format!("class {i} out of order"));
                }
                r.classes.push(name.to_string());
            }
            Some("TOP1") => {
                let f = |v: Option<&str>| v.and_then(|v| v.parse::<usize>().ok());
                let (n, class, permille) = (f(it.next()), f(it.next()), f(it.next()));
                let (Some(n), Some(class), Some(permille)) = (n, class, permille) else {
                    return Err(format!("bad line `{line}`"));
                };
                if n != r.top1.len() {
                    return Err(format!("frame {n} out of order"));
                }
                r.top1
                    .push((class, permille as u16, rest(line, 4).to_string()));
            }
            Some("ERROR") => return Err(format!("firmware: {line}")),
            Some("DONE") => done = true,
            _ => {}
        }
    }
    if !done {
        return Err(format!("the firmware did not finish:\n{text}"));
    }
    Ok(r)
}

/// A camera-sized RGB565 frame showing a 32x32 RGB image: nearest-neighbour
/// upscaled into the centered `height x height` square, black elsewhere.
pub fn camera_frame(img: &[u8], width: usize, height: usize, format: FrameFormat) -> Vec<u8> {
    let s = width.min(height);
    let (x0, y0) = ((width - s) / 2, (height - s) / 2);
    let mut out = Vec::with_capacity(width * height * 2);
    for y in 0..height {
        for x in 0..width {
            let (r, g, b) = if x >= x0 && x < x0 + s && y >= y0 && y < y0 + s {
                let (sx, sy) = ((x - x0) * 32 / s, (y - y0) * 32 / s);
                let p = &img[(sy * 32 + sx) * 3..][..3];
                (p[0] as u16, p[1] as u16, p[2] as u16)
            } else {
                (0, 0, 0)
            };
            match format {
                FrameFormat::Rgb888 => out.extend_from_slice(&[r as u8, g as u8, b as u8]),
                _ => {
                    let v = ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3);
                    if format == FrameFormat::Rgb565Le {
                        out.extend_from_slice(&v.to_le_bytes());
                    } else {
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firmware_output() {
        let r = parse("MODEL arena=1 scratch=2 layers=3\nCLASS 0 part OK\nCLASS 1 b\nCLASS 2 c\nLOGITS 0 1 -2 3\nTOP1 0 2 510 c\nINSN 0 preprocess=40 network=80\nLAYER 0 stem.conv 120\nDONE 1\n").unwrap();
        assert_eq!(r.logits, vec![vec![1, -2, 3]]);
        assert_eq!(r.classes, ["part OK", "b", "c"]);
        assert_eq!(r.top1, vec![(2, 510, "c".to_string())]);
        assert!(parse("CLASS 1 b\nDONE 0\n").is_err());
        assert_eq!((r.preprocess_insn[0], r.network_insn[0]), (40, 80));
        assert_eq!(r.layers, vec![("stem.conv".to_string(), 120)]);
        assert!(parse("LOGITS 0 1\n").is_err());
        assert!(parse("ERROR model\n").is_err());
    }

    #[test]
    fn camera_frame_upscales_into_the_center() {
        let mut img = vec![0u8; 32 * 32 * 3];
        img[0] = 255; // top-left pixel red
        let f = camera_frame(&img, 160, 120, FrameFormat::Rgb565Be);
        assert_eq!(f.len(), 160 * 120 * 2);
        // The square starts at x = 20; source pixel (0,0) covers 3-4 frame pixels.
        assert_eq!(&f[(20) * 2..(20) * 2 + 2], &[0xF8, 0x00]);
        assert_eq!(&f[..2], &[0, 0]); // left border black
    }
}
