//! `cargo xtask bench-mcu`: exact instruction counts of the shipped model on
//! the Cortex-M7 (QEMU `mps2-an500`, `-icount`), flash and RAM of the board
//! image, and peak activation memory, beside CMSIS-NN's figures for the
//! same network measured the same way.

use std::path::Path;

use object::{Object, ObjectSection, SectionFlags};
use shared::model::{LayerKind, Model};
use tests::qemu::{build_firmware, build_qemu_image, run_qemu, write_frames, FrameFormat, Image};
use tests::snapshot::Snapshot;

/// CMSIS-NN (arm-none-eabi-gcc -Ofast, DSP path) on this Mini-ResNet under
/// the same QEMU with `-icount shift=0` and SysTick reads.
mod cmsis {
    pub const TOTAL: f64 = 39.5e6;
    pub const PER_MAC: f64 = 2.13;
    pub const CONV_PER_MAC: &str = "1.7-2.3";
    pub const STEM_PER_MAC: f64 = 4.86;
    pub const SHORTCUT_PER_MAC: &str = "3.7-4.6";
    pub const ADD_PER_ELEMENT: f64 = 80.0;
    pub const MAXPOOL_PER_OUTPUT: f64 = 83.0;
}

/// Assumed core clock for the latency estimate.
const CLOCK_HZ: f64 = 480e6;

/// The layer groups of the summary, with CMSIS-NN's figure for each.
fn group_of(r: &LayerRow, k: Option<usize>) -> (&'static str, &'static str) {
    match r.op {
        "conv" if r.name.starts_with("stem") => ("stem conv 3x3 (3 in)", "4.86"),
        "conv" if k == Some(1) => ("shortcut conv 1x1 s2", cmsis::SHORTCUT_PER_MAC),
        "conv" if r.name.starts_with("layer1") => ("conv 3x3, stage 1", cmsis::CONV_PER_MAC),
        "conv" if r.name.starts_with("layer2") => ("conv 3x3, stage 2", cmsis::CONV_PER_MAC),
        "conv" if r.name.starts_with("layer3") => ("conv 3x3, stage 3", cmsis::CONV_PER_MAC),
        "conv" if r.name.starts_with("layer4") => ("conv 3x3, stage 4", cmsis::CONV_PER_MAC),
        "conv" => ("conv, other", cmsis::CONV_PER_MAC),
        "add" => ("residual add", "80"),
        "maxpool" => ("max pool", "83"),
        "avgpool" => ("global avg pool", "-"),
        "fc" => ("fully connected", "-"),
        _ => ("other", "-"),
    }
}

struct LayerRow {
    name: String,
    op: &'static str,
    work: u64,
    unit: &'static str,
    insn: u64,
    cmsis: String,
}

fn work_of(m: &Model<'_>, i: u16) -> Result<(&'static str, u64, &'static str), String> {
    let l = m
        .layer(i)
        .ok_or_else(|| format!("QEMU reported layer {i}; the model has {}", m.layer_count()))?;
    // Both indices were validated by `Model::parse`.
    let (inp, out) = match (m.tensor(l.input), m.tensor(l.output)) {
        (Some(a), Some(b)) => (a.dims, b.dims),
        _ => return Err(format!("layer {i}: tensor index out of range")),
    };
    Ok(match l.kind {
        LayerKind::Conv(c) => ("conv", c.params.macs(inp, out) as u64, "MAC"),
        LayerKind::FullyConnected(_) => ("fc", (inp.len() * out.len()) as u64, "MAC"),
        LayerKind::Add(_) => ("add", out.len() as u64, "element"),
        LayerKind::MaxPool(_) => ("maxpool", out.len() as u64, "output"),
        LayerKind::AvgPool(_) => ("avgpool", inp.len() as u64, "input"),
    })
}

fn cmsis_figure(name: &str, op: &str, k: Option<usize>) -> String {
    match op {
        "conv" if name.starts_with("stem") => format!("{:.2}", cmsis::STEM_PER_MAC),
        "conv" if k == Some(1) => cmsis::SHORTCUT_PER_MAC.into(),
        "conv" => cmsis::CONV_PER_MAC.into(),
        "add" => format!("{:.0}", cmsis::ADD_PER_ELEMENT),
        "maxpool" => format!("{:.0}", cmsis::MAXPOOL_PER_OUTPUT),
        _ => "-".into(),
    }
}

/// Flash bytes, static RAM bytes, and `(name, address, size)` of every
/// allocated section.
struct ElfSizes {
    flash: u64,
    ram: u64,
    sections: Vec<(String, u64, u64)>,
}

/// Flash and static RAM of an ELF: allocated sections in the flash region
/// (0x0800_0000..) count as flash, those in RAM as RAM; `.data` counts in
/// both (stored in flash, copied to RAM).
fn elf_sizes(path: &Path) -> Result<ElfSizes, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let file = object::File::parse(&*bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut flash, mut ram) = (0u64, 0u64);
    let mut rows = Vec::new();
    for s in file.sections() {
        let SectionFlags::Elf { sh_flags } = s.flags() else {
            continue;
        };
        if sh_flags & u64::from(object::elf::SHF_ALLOC) == 0 || s.size() == 0 {
            continue;
        }
        let name = s.name().unwrap_or("?").to_string();
        let addr = s.address();
        let in_flash = (0x0800_0000..0x0820_0000).contains(&addr);
        let is_nobits = s.kind() == object::SectionKind::UninitializedData;
        if in_flash {
            flash += s.size();
        } else {
            ram += s.size();
            if !is_nobits {
                flash += s.size(); // load image of .data
            }
        }
        rows.push((name, addr, s.size()));
    }
    Ok(ElfSizes {
        flash,
        ram,
        sections: rows,
    })
}

/// The median of instruction counts (exact: they are far below 2^53).
fn median_count(v: &[u64]) -> u64 {
    let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    workspace_util::median(&v).round() as u64
}

/// Runs the benchmark; `json` prints machine-readable output,
/// `update_snapshot` writes `tests/snapshots/mcu-instructions.json`.
pub fn bench_mcu(json: bool, update_snapshot: bool) -> Result<(), String> {
    let model = shared::model::default_model().map_err(|e| format!("the model in shared: {e}"))?;
    let elf = build_qemu_image()?;
    // Three deterministic pseudo-random 160x120 RGB565 frames.
    let (w, h) = (160usize, 120usize);
    let frames: Vec<Vec<u8>> = (0..3u64)
        .map(|f| {
            (0..w * h * 2)
                .map(|i| ((i as u64 ^ (f << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                .collect()
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("bench-mcu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_frames(
        &dir.join("frames.bin"),
        &frames,
        w,
        h,
        FrameFormat::Rgb565Be,
    )
    .map_err(|e| e.to_string())?;
    let run = run_qemu(&elf, &dir, 600)?;
    let _ = std::fs::remove_dir_all(&dir);
    let total = median_count(&run.network_insn);
    let pre = median_count(&run.preprocess_insn);

    let mut rows = Vec::new();
    let mut total_macs = 0u64;
    for (i, (name, insn)) in run.layers.iter().enumerate() {
        let (op, work, unit) = work_of(&model, i as u16)?;
        if unit == "MAC" {
            total_macs += work;
        }
        let k = match model.layer(i as u16).map(|l| l.kind) {
            Some(LayerKind::Conv(c)) => Some(c.params.kernel_h),
            _ => None,
        };
        rows.push(LayerRow {
            name: name.clone(),
            op,
            work,
            unit,
            insn: *insn,
            cmsis: cmsis_figure(name, op, k),
        });
    }
    let board = build_firmware(Image::Board)?;
    let ElfSizes {
        flash,
        ram,
        sections,
    } = elf_sizes(&board)?;
    let arena = model.arena_len();
    // The firmware's scratch: the fast conv's fastest path everywhere.
    let scratch_bytes = shared::model::SCRATCH_LEN_FAST * 2;
    let per_mac = total as f64 / total_macs as f64;
    let kernels: Vec<Option<usize>> = (0..rows.len())
        .map(|i| match model.layer(i as u16).map(|l| l.kind) {
            Some(LayerKind::Conv(c)) => Some(c.params.kernel_h),
            _ => None,
        })
        .collect();
    // Per group: (name, CMSIS-NN per unit, unit, work, instructions).
    let mut groups: Vec<(&str, &str, &str, u64, u64)> = Vec::new();
    for (r, &k) in rows.iter().zip(&kernels) {
        let (g, c) = group_of(r, k);
        match groups.iter_mut().find(|x| x.0 == g) {
            Some(x) => {
                x.3 += r.work;
                x.4 += r.insn;
            }
            None => groups.push((g, c, r.unit, r.work, r.insn)),
        }
    }
    let layer_sum: u64 = rows.iter().map(|r| r.insn).sum();
    if update_snapshot {
        Snapshot {
            total,
            layers: rows.iter().map(|r| (r.name.clone(), r.insn)).collect(),
        }
        .write()?;
        eprintln!(
            "wrote {} (total {total})",
            tests::snapshot::path().display()
        );
    } else if let Ok(snap) = Snapshot::read() {
        match snap.check(total) {
            Ok(None) => eprintln!("snapshot: within 2% of {}", snap.total),
            Ok(Some(hint)) | Err(hint) => eprintln!("snapshot: {hint}"),
        }
    }

    if json {
        let layers: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "op": r.op, "work": r.work, "unit": r.unit, "instructions": r.insn}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "instructions_total": total,
                "instructions_preprocess": pre,
                "macs": total_macs,
                "instructions_per_mac": per_mac,
                "cmsis_nn_instructions_total": cmsis::TOTAL,
                "flash_bytes": flash,
                "ram_bytes": ram,
                "arena_bytes": arena,
                "scratch_bytes": scratch_bytes,
                "peak_activation_bytes": arena + scratch_bytes,
                "estimated_ms_at_480mhz_ipc1": (total + pre) as f64 / CLOCK_HZ * 1e3,
                "layers": layers,
            }))
            .map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("Mini-ResNet int8 on Cortex-M7 (QEMU mps2-an500, -icount shift=0, SysTick: exact to ±40 instructions)\n");
    println!(
        "{:<16} {:<8} {:>10} {:>8} {:>12} {:>9} {:>10}",
        "layer", "op", "work", "unit", "instructions", "per unit", "CMSIS-NN"
    );
    for r in &rows {
        println!(
            "{:<16} {:<8} {:>10} {:>8} {:>12} {:>9.2} {:>10}",
            r.name,
            r.op,
            r.work,
            r.unit,
            r.insn,
            r.insn as f64 / r.work.max(1) as f64,
            r.cmsis
        );
    }
    println!();
    println!(
        "{:<24} {:>10} {:>8} {:>12} {:>6} {:>9} {:>10}",
        "by kind", "work", "unit", "instructions", "share", "per unit", "CMSIS-NN"
    );
    for (g, c, unit, work, insn) in &groups {
        println!(
            "{:<24} {:>10} {:>8} {:>12} {:>5.1}% {:>9.2} {:>10}",
            g,
            work,
            unit,
            insn,
            100.0 * *insn as f64 / layer_sum.max(1) as f64,
            *insn as f64 / (*work).max(1) as f64,
            c
        );
    }
    println!();
    println!(
        "network: {total} instructions per inference ({:.2} M), {per_mac:.2} per MAC over {:.2} M MACs",
        total as f64 / 1e6,
        total_macs as f64 / 1e6
    );
    println!(
        "CMSIS-NN: {:.1} M instructions, {:.2} per MAC  →  ours / CMSIS-NN = {:.2}x",
        cmsis::TOTAL / 1e6,
        cmsis::PER_MAC,
        total as f64 / cmsis::TOTAL
    );
    println!("preprocess (160x120 RGB565 → 32x32x3): {pre} instructions");
    println!(
        "estimated latency at {:.0} MHz (preprocess + network), assuming 1 instruction per cycle \
         (the M7's dual issue not counted, and neither are stalls: flash wait states for the \
         weights behind the 16 KiB D-cache, load-use and multiply latencies): {:.1} ms",
        CLOCK_HZ / 1e6,
        (total + pre) as f64 / CLOCK_HZ * 1e3
    );
    println!(
        "peak activation memory (static plan from the exporter): arena {arena} B + conv scratch \
         {scratch_bytes} B (a 4-pixel im2col block and the conv's input widened to i16 with \
         its padding) = {} B (frame buffers apart)",
        arena + scratch_bytes
    );
    println!("board image (NUCLEO-H743ZI2): flash {flash} B of 2 MiB, static RAM {ram} B");
    for (name, addr, size) in sections {
        println!("  {name:<20} {addr:#010x} {size:>9}");
    }
    Ok(())
}
