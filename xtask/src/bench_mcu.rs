//! `cargo xtask bench-mcu`: exact instruction counts of the shipped model on
//! the Cortex-M7 (QEMU `mps2-an500`, `-icount`), flash and RAM of the board
//! image, and peak activation memory, beside CMSIS-NN's figures for the
//! same network measured the same way.

use std::path::Path;

use object::{Object, ObjectSection, SectionFlags};
use shared::model::{LayerKind, Model};
use tests::qemu::{
    build_firmware, build_qemu_image, run_qemu, write_frames, FrameFormat, Image, QemuRun,
};
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

/// The layer group of the summary a row belongs to.
fn group_of(r: &LayerRow) -> &'static str {
    match r.op {
        "conv" if r.name.starts_with("stem") => "stem conv 3x3 (3 in)",
        "conv" if r.kernel == Some(1) => "shortcut conv 1x1 s2",
        "conv" if r.name.starts_with("layer1") => "conv 3x3, stage 1",
        "conv" if r.name.starts_with("layer2") => "conv 3x3, stage 2",
        "conv" if r.name.starts_with("layer3") => "conv 3x3, stage 3",
        "conv" if r.name.starts_with("layer4") => "conv 3x3, stage 4",
        "conv" => "conv, other",
        "add" => "residual add",
        "maxpool" => "max pool",
        "avgpool" => "global avg pool",
        "fc" => "fully connected",
        _ => "other",
    }
}

/// One layer of the report.
struct LayerRow {
    name: String,
    op: &'static str,
    /// Kernel rows of a conv.
    kernel: Option<usize>,
    work: u64,
    unit: &'static str,
    insn: u64,
    /// CMSIS-NN's instructions per unit for this kind of layer.
    cmsis: String,
}

/// A group of layers of one kind (see [`group_of`]), summed.
struct Group {
    name: &'static str,
    /// CMSIS-NN's instructions per unit (the figure of its layers).
    cmsis: String,
    unit: &'static str,
    work: u64,
    insn: u64,
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

/// Everything the benchmark reports.
struct Report {
    /// Network instructions per inference (median over the frames).
    total: u64,
    /// Preprocessing instructions per frame (median).
    pre: u64,
    total_macs: u64,
    rows: Vec<LayerRow>,
    groups: Vec<Group>,
    /// The board image's flash and RAM.
    board: ElfSizes,
    arena: usize,
    scratch_bytes: usize,
}

impl Report {
    fn per_mac(&self) -> f64 {
        self.total as f64 / self.total_macs as f64
    }

    /// Estimated milliseconds per frame (preprocess + network) at
    /// [`CLOCK_HZ`], one instruction per cycle.
    fn estimated_ms(&self) -> f64 {
        (self.total + self.pre) as f64 / CLOCK_HZ * 1e3
    }
}

/// Runs the benchmark; `json` prints machine-readable output,
/// `update_snapshot` writes `tests/snapshots/mcu-instructions.json`.
pub fn bench_mcu(json: bool, update_snapshot: bool) -> Result<(), String> {
    let model = shared::model::default_model().map_err(|e| format!("the model in shared: {e}"))?;
    let run = measure(&build_qemu_image()?)?;
    let total = median_count(&run.network_insn);
    let pre = median_count(&run.preprocess_insn);
    let rows = layer_rows(&model, &run)?;
    let total_macs = rows
        .iter()
        .filter(|r| r.unit == "MAC")
        .map(|r| r.work)
        .sum();
    let board = elf_sizes(&build_firmware(Image::Board)?)?;
    let report = Report {
        total,
        pre,
        total_macs,
        groups: groups(&rows),
        rows,
        board,
        arena: model.arena_len(),
        // The firmware's scratch: the fast conv's fastest path everywhere.
        scratch_bytes: shared::model::SCRATCH_LEN_FAST * 2,
    };
    snapshot(&report, update_snapshot)?;
    if json {
        print_json(&report)
    } else {
        print_text(&report);
        Ok(())
    }
}

/// Three deterministic pseudo-random 160x120 RGB565 frames through the
/// QEMU image `elf`.
fn measure(elf: &Path) -> Result<QemuRun, String> {
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
    let run = run_qemu(elf, &dir, 600)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(run)
}

/// The per-layer rows of `run`, with each layer's work from `model`.
fn layer_rows(model: &Model<'_>, run: &QemuRun) -> Result<Vec<LayerRow>, String> {
    run.layers
        .iter()
        .enumerate()
        .map(|(i, (name, insn))| {
            let (op, work, unit) = work_of(model, i as u16)?;
            let kernel = match model.layer(i as u16).map(|l| l.kind) {
                Some(LayerKind::Conv(c)) => Some(c.params.kernel_h),
                _ => None,
            };
            Ok(LayerRow {
                name: name.clone(),
                op,
                kernel,
                work,
                unit,
                insn: *insn,
                cmsis: cmsis_figure(name, op, kernel),
            })
        })
        .collect()
}

/// The rows summed by [`group_of`], in order of first appearance.
fn groups(rows: &[LayerRow]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for r in rows {
        let name = group_of(r);
        match groups.iter_mut().find(|g| g.name == name) {
            Some(g) => {
                g.work += r.work;
                g.insn += r.insn;
            }
            None => groups.push(Group {
                name,
                cmsis: r.cmsis.clone(),
                unit: r.unit,
                work: r.work,
                insn: r.insn,
            }),
        }
    }
    groups
}

/// Writes the instruction-count snapshot (`update`), or compares the
/// total with it.
fn snapshot(report: &Report, update: bool) -> Result<(), String> {
    let total = report.total;
    if update {
        Snapshot {
            total,
            layers: report
                .rows
                .iter()
                .map(|r| (r.name.clone(), r.insn))
                .collect(),
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
    Ok(())
}

fn print_json(r: &Report) -> Result<(), String> {
    let layers: Vec<_> = r
        .rows
        .iter()
        .map(|r| serde_json::json!({"name": r.name, "op": r.op, "work": r.work, "unit": r.unit, "instructions": r.insn}))
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "instructions_total": r.total,
            "instructions_preprocess": r.pre,
            "macs": r.total_macs,
            "instructions_per_mac": r.per_mac(),
            "cmsis_nn_instructions_total": cmsis::TOTAL,
            "flash_bytes": r.board.flash,
            "ram_bytes": r.board.ram,
            "arena_bytes": r.arena,
            "scratch_bytes": r.scratch_bytes,
            "peak_activation_bytes": r.arena + r.scratch_bytes,
            "estimated_ms_at_480mhz_ipc1": r.estimated_ms(),
            "layers": layers,
        }))
        .map_err(|e| e.to_string())?
    );
    Ok(())
}

fn print_text(r: &Report) {
    println!("Mini-ResNet int8 on Cortex-M7 (QEMU mps2-an500, -icount shift=0, SysTick: exact to ±40 instructions)\n");
    print_layers(&r.rows);
    println!();
    print_groups(&r.groups);
    println!();
    print_summary(r);
}

fn print_layers(rows: &[LayerRow]) {
    println!(
        "{:<16} {:<8} {:>10} {:>8} {:>12} {:>9} {:>10}",
        "layer", "op", "work", "unit", "instructions", "per unit", "CMSIS-NN"
    );
    for r in rows {
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
}

fn print_groups(groups: &[Group]) {
    let layer_sum: u64 = groups.iter().map(|g| g.insn).sum();
    println!(
        "{:<24} {:>10} {:>8} {:>12} {:>6} {:>9} {:>10}",
        "by kind", "work", "unit", "instructions", "share", "per unit", "CMSIS-NN"
    );
    for g in groups {
        println!(
            "{:<24} {:>10} {:>8} {:>12} {:>5.1}% {:>9.2} {:>10}",
            g.name,
            g.work,
            g.unit,
            g.insn,
            100.0 * g.insn as f64 / layer_sum.max(1) as f64,
            g.insn as f64 / g.work.max(1) as f64,
            g.cmsis
        );
    }
}

fn print_summary(r: &Report) {
    let (total, pre, arena, scratch_bytes) = (r.total, r.pre, r.arena, r.scratch_bytes);
    println!(
        "network: {total} instructions per inference ({:.2} M), {:.2} per MAC over {:.2} M MACs",
        total as f64 / 1e6,
        r.per_mac(),
        r.total_macs as f64 / 1e6
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
        r.estimated_ms()
    );
    println!(
        "peak activation memory (static plan from the exporter): arena {arena} B + conv scratch \
         {scratch_bytes} B (a 4-pixel im2col block and the conv's input widened to i16 with \
         its padding) = {} B (frame buffers apart)",
        arena + scratch_bytes
    );
    let ElfSizes {
        flash,
        ram,
        sections,
    } = &r.board;
    println!("board image (NUCLEO-H743ZI2): flash {flash} B of 2 MiB, static RAM {ram} B");
    for (name, addr, size) in sections {
        println!("  {name:<20} {addr:#010x} {size:>9}");
    }
}
