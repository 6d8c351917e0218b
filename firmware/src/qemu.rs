//! The QEMU `mps2-an500` image: the board's path (frame → preprocess →
//! network) with frames read from the host by semihosting and results
//! written back as text on semihosting stdout.
//!
//! Input `frames.bin` (in QEMU's working directory):
//! a 20-byte header: `b"FRM1"`, then u32 LE count, width, height, format
//! (0 = RGB565 LE, 1 = RGB565 BE, 2 = RGB888), then `count` frames.
//! Optional `model.bin` there: a model blob to run instead of the one
//! embedded (any classes; same arena and scratch limits), so another model
//! is tested without rebuilding the image.
//!
//! Output lines:
//! * `MODEL source=<embedded|model.bin> arena=<bytes> scratch=<i16> layers=<n> classes=<n>`
//! * `CLASS <index> <name>` per class, from the blob
//! * `SELFTEST <case> ok` per fast-kernel self-test case (`selftest.rs`)
//! * `LOGITS <frame> <l0> … <ln-1>` (int8, one per class)
//! * `TOP1 <frame> <index> <permille> <name>`
//! * `INSN <frame> preprocess=<n> network=<n>` (instructions)
//! * `LAYER <index> <name> <instructions>` for frame 0, one per layer
//! * `DONE <frames>`, then semihosting exit 0; any error prints
//!   `ERROR <what>` and exits 1.
//!
//! Instructions are counted exactly with `-icount shift=0,align=off,sleep=off`:
//! every instruction then takes 1 ns of virtual time, and SysTick, clocked
//! from the 25 MHz core clock of the `mps2` board, ticks once per 40
//! instructions (so each count is exact to within 40).

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::{debug, hio, nr, syscall};
use shared::model::{Aligned, Model, Scratch, ARENA_LEN, SCRATCH_LEN_FAST};
use shared::preprocess::{Frame, PixelFormat};

use crate::app::Engine;

/// Largest frame accepted (VGA RGB888).
const MAX_FRAME: usize = 640 * 480 * 3;
/// Instructions per SysTick reference tick under `-icount shift=0`.
const INSN_PER_TICK: u64 = 40;
const RELOAD: u32 = 0x00FF_FFFF;

static mut ARENA: [i8; ARENA_LEN] = [0; ARENA_LEN];
static mut SCRATCH: Scratch<SCRATCH_LEN_FAST> = Scratch::new();
static mut FRAME: [u8; MAX_FRAME] = [0; MAX_FRAME];
/// Largest `model.bin` accepted.
const MAX_MODEL: usize = 2 * 1024 * 1024;
static mut MODEL: Aligned<[u8; MAX_MODEL]> = Aligned([0; MAX_MODEL]);
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// A monotonically increasing instruction clock built on SysTick.
struct Clock;

impl Clock {
    fn start(mut syst: cortex_m::peripheral::SYST) -> Self {
        // The core clock: 25 MHz on mps2, i.e. one tick per 40 instructions
        // when every instruction takes 1 ns of virtual time (icount shift=0).
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(RELOAD);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        Clock
    }

    /// Instructions since `start` (to within one tick).
    fn now(&self) -> u64 {
        loop {
            let w1 = WRAPS.load(Ordering::Relaxed);
            let cur = cortex_m::peripheral::SYST::get_current();
            let w2 = WRAPS.load(Ordering::Relaxed);
            if w1 == w2 {
                let ticks = w1 as u64 * (RELOAD as u64 + 1) + (RELOAD - cur) as u64;
                return ticks * INSN_PER_TICK;
            }
        }
    }
}

/// A file on the host, opened through semihosting (a handle QEMU gave).
struct HostFile(isize);

impl HostFile {
    /// Opens `path` for reading; `path` carries its NUL terminator.
    fn open(path: &str) -> Result<Self, ()> {
        // The length passed excludes the terminator.
        let Some(len) = path.strip_suffix('\0').map(str::len) else {
            return Err(());
        };
        // SAFETY: SYS_OPEN reads the NUL-terminated string at `path` (`len`
        // bytes, then the NUL checked above), which lives across the call;
        // it writes no target memory.
        let fd = unsafe { syscall!(OPEN, path.as_ptr(), nr::open::R_BINARY, len) } as isize;
        if fd < 0 {
            Err(())
        } else {
            Ok(HostFile(fd))
        }
    }

    /// The file's length in bytes.
    fn len(&self) -> Result<usize, ()> {
        // SAFETY: SYS_FLEN of an open handle; it touches no target memory.
        let len = unsafe { syscall!(FLEN, self.0) } as isize;
        usize::try_from(len).map_err(|_| ())
    }

    fn read_exact(&self, buf: &mut [u8]) -> Result<(), ()> {
        // SYS_READ returns the number of bytes *not* read.
        // SAFETY: SYS_READ writes at most `buf.len()` bytes at `buf`, which
        // is exclusively borrowed for the call; `self.0` is an open handle.
        let left = unsafe { syscall!(READ, self.0, buf.as_mut_ptr(), buf.len()) };
        if left == 0 {
            Ok(())
        } else {
            Err(())
        }
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        // SAFETY: SYS_CLOSE of the handle `open` returned, closed once here;
        // it touches no target memory.
        unsafe { syscall!(CLOSE, self.0) };
    }
}

fn fail(out: &mut hio::HostStream, what: &str) -> ! {
    let _ = writeln!(out, "ERROR {what}");
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::nop();
    }
}

#[entry]
fn main() -> ! {
    let Ok(mut out) = hio::hstdout() else {
        debug::exit(debug::EXIT_FAILURE);
        loop {
            cortex_m::asm::nop();
        }
    };
    let Some(cp) = cortex_m::Peripherals::take() else {
        fail(&mut out, "peripherals taken")
    };
    let clock = Clock::start(cp.SYST);
    let (model, source) = load_model(&mut out);
    let mut engine = engine(&mut out, model);
    let m = engine.model();
    let _ = writeln!(
        out,
        "MODEL source={source} arena={} scratch={} layers={} classes={}",
        m.arena_len(),
        m.scratch_len(),
        m.layer_count(),
        m.class_count()
    );
    for (i, name) in m.class_names().enumerate() {
        let _ = writeln!(out, "CLASS {i} {name}");
    }
    selftest(&mut out);

    let frames = Frames::open(&mut out);
    // SAFETY: `main` runs once and FRAME is only borrowed here.
    let frame_buf = unsafe { &mut *core::ptr::addr_of_mut!(FRAME) };
    let buf = &mut frame_buf[..frames.frame_len()];
    for n in 0..frames.count {
        if frames.file.read_exact(buf).is_err() {
            fail(&mut out, "frames.bin: truncated");
        }
        let frame = Frame {
            data: buf,
            width: frames.width,
            height: frames.height,
            format: frames.format,
        };
        classify(&mut out, &clock, &mut engine, n, &frame);
        if n == 0 {
            // Per-layer counts, on the same input.
            count_layers(&mut out, &clock, &mut engine);
        }
    }
    let _ = writeln!(out, "DONE {}", frames.count);
    debug::exit(debug::EXIT_SUCCESS);
    loop {
        cortex_m::asm::nop();
    }
}

/// `model.bin` from the host if there is one, else the embedded model,
/// with where it came from; an invalid one ends the run. Called once, from
/// `main`.
fn load_model(out: &mut hio::HostStream) -> (Model<'static>, &'static str) {
    let (parsed, source) = match HostFile::open("model.bin\0") {
        Ok(file) => {
            // SAFETY: this runs once (from `main`) and MODEL is only
            // borrowed here.
            let buf = unsafe { &mut (*core::ptr::addr_of_mut!(MODEL)).0 };
            let len = match file.len() {
                Ok(len) if len <= MAX_MODEL => len,
                _ => fail(out, "model.bin: unreadable or over 2 MiB"),
            };
            if file.read_exact(&mut buf[..len]).is_err() {
                fail(out, "model.bin: truncated");
            }
            (Model::parse(&buf[..len]), "model.bin")
        }
        Err(()) => (shared::model::default_model(), "embedded"),
    };
    match parsed {
        Ok(m) => (m, source),
        Err(e) => {
            let _ = writeln!(out, "ERROR model ({source}): {e}");
            fail(out, "invalid model")
        }
    }
}

/// `model` with the static arena and scratch; any error is reported and
/// ends the run. Called once, from `main`.
fn engine(out: &mut hio::HostStream, model: Model<'static>) -> Engine<'static> {
    // SAFETY: this runs once (from `main`) and ARENA and SCRATCH are only
    // borrowed here.
    let (arena, scratch) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(ARENA),
            &mut (*core::ptr::addr_of_mut!(SCRATCH)).0,
        )
    };
    match Engine::new(model, arena, scratch) {
        Ok(e) => e,
        Err(e) => {
            let _ = writeln!(out, "ERROR engine: {e}");
            fail(out, "engine")
        }
    }
}

/// The fast kernels on the real instructions, against the references.
fn selftest(out: &mut hio::HostStream) {
    let passed = crate::selftest::run(|name, ok| {
        let _ = writeln!(out, "SELFTEST {name} {}", if ok { "ok" } else { "FAILED" });
    });
    if !passed {
        fail(out, "selftest: a fast kernel differs from its reference");
    }
}

/// `frames.bin`, its header read: `count` frames of `width` x `height`
/// pixels in `format` follow.
struct Frames {
    file: HostFile,
    count: usize,
    width: usize,
    height: usize,
    format: PixelFormat,
}

impl Frames {
    /// Opens `frames.bin` and reads its header; a bad one ends the run.
    fn open(out: &mut hio::HostStream) -> Self {
        let Ok(file) = HostFile::open("frames.bin\0") else {
            fail(out, "cannot open frames.bin")
        };
        let mut header = [0u8; 20];
        if file.read_exact(&mut header).is_err() || &header[..4] != b"FRM1" {
            fail(out, "frames.bin: bad header");
        }
        let word = |i: usize| {
            u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]) as usize
        };
        let format = match word(16) {
            0 => PixelFormat::Rgb565Le,
            1 => PixelFormat::Rgb565Be,
            2 => PixelFormat::Rgb888,
            _ => fail(out, "frames.bin: unknown pixel format"),
        };
        let frames = Frames {
            file,
            count: word(4),
            width: word(8),
            height: word(12),
            format,
        };
        if frames.frame_len() > MAX_FRAME {
            fail(out, "frames.bin: frame too large");
        }
        frames
    }

    /// Bytes of one frame.
    fn frame_len(&self) -> usize {
        self.width * self.height * self.format.bytes_per_pixel()
    }
}

/// Preprocesses and classifies frame `n`, and reports its logits and
/// instruction counts.
fn classify(
    out: &mut hio::HostStream,
    clock: &Clock,
    engine: &mut Engine<'_>,
    n: usize,
    frame: &Frame<'_>,
) {
    let t0 = clock.now();
    if let Err(e) = engine.preprocess(frame) {
        let _ = writeln!(out, "ERROR frame {n}: {e:?}");
        fail(out, "bad frame");
    }
    let t1 = clock.now();
    let result = match engine.infer() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "ERROR inference {n}: {e:?}");
            fail(out, "inference")
        }
    };
    let t2 = clock.now();
    let _ = write!(out, "LOGITS {n}");
    for l in result.logits() {
        let _ = write!(out, " {l}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "TOP1 {n} {} {} {}",
        result.class, result.confidence_permille, result.name
    );
    let _ = writeln!(out, "INSN {n} preprocess={} network={}", t1 - t0, t2 - t1);
}

/// Runs the network again on the last preprocessed input, layer by layer,
/// and reports each layer's instruction count.
fn count_layers(out: &mut hio::HostStream, clock: &Clock, engine: &mut Engine<'_>) {
    if engine.load_input().is_err() {
        fail(out, "load_input");
    }
    for i in 0..engine.model().layer_count() {
        let a = clock.now();
        if engine.run_layer(i).is_err() {
            fail(out, "run_layer");
        }
        let b = clock.now();
        let name = engine.model().layer(i).map_or("?", |l| l.name);
        let _ = writeln!(out, "LAYER {i} {name} {}", b - a);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if let Ok(mut out) = hio::hstdout() {
        let _ = writeln!(out, "ERROR panic: {info}");
    }
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::nop();
    }
}
