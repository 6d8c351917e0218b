//! The NUCLEO-H743ZI2 image: OV7670 on DCMI → [`Engine`] → defmt over RTT.
//!
//! # Clocks (480 MHz, VOS0)
//!
//! ```text
//! ST-LINK MCO 8 MHz ─► HSE (bypass) ─► /M=1 ─► 8 MHz ─► ×N=120 ─► VCO 960 MHz
//!   PLL1_P /2 = 480 MHz ─► SYSCLK ─► D1CPRE /1 ─► CPU 480 MHz (DWT counts these)
//!                                  └► HPRE /2 ─► AHB/AXI 240 MHz ─► APB1-4 /2 = 120 MHz
//!   PLL1_Q /8 = 120 MHz ─► MCO1 /5 = 24 MHz on PA8 ─► OV7670 XCLK
//! ```
//!
//! VOS0 (`VoltageScale::Scale0`; embassy goes VOS1 → ODEN itself) is needed
//! for 480 MHz and exists on revision V silicon only, which every
//! NUCLEO-H743ZI2 carries. For a revision Y part, set `Scale1` and
//! `PllMul::MUL100` (400 MHz); everything else stays valid.
//!
//! # Camera
//!
//! * XCLK 24 MHz from MCO1; SCCB on I2C1 (PB8 SCL, PB9 SDA, 100 kHz); the
//!   register table is [`crate::camera::ov7670`].
//! * DCMI, 8-bit, hardware sync: VSYNC high = blanking, HREF high = valid
//!   (the DCMI's HSYNC input, "low = blanking"), sampled on PCLK rising.
//! * DMA1 stream 0 moves each 38 400-byte QQVGA frame into one of two
//!   buffers in AXI SRAM (`.axisram`; DMA1 cannot reach DTCM).
//!
//! **Byte order.** In 8-bit mode the DCMI packs four captured bytes into a
//! 32-bit `DR` word with the *first* byte in bits 7:0, and the DMA stores the
//! word little-endian, so memory holds the bytes in bus order. The OV7670
//! sends each RGB565 pixel high byte first (`R4..R0 G5..G3`, then
//! `G2..G0 B4..B0`), hence [`PixelFormat::Rgb565Be`]. If colours come out
//! swapped on hardware (red ↔ blue-ish noise), this is the place to check.
//!
//! **Double buffering.** embassy-stm32 0.6 `Dcmi::capture` is snapshot-only
//! (one frame per call, `CR.CM = 1`) and has no double-buffer/circular API.
//! Overlap is still obtained: the capture future of buffer B is polled once
//! (which programs the DMA and enables DCMI), then frame A is classified on
//! the CPU while the DMA fills B, then the capture future is awaited. Two
//! captures are never in flight at once.
//!
//! **D-cache.** I- and D-cache are on (the model weights stream from flash).
//! The CPU never writes the frame buffers, so they never hold dirty lines;
//! a buffer's lines are invalidated after its DMA completes, before reading.
//! defmt-rtt's buffer is cacheable too: probe-rs sets the cacheable bit on
//! its debug accesses (probe-rs#1517), so it sees what the core wrote.
//!
//! # Errors
//!
//! Init failures are `defmt::unwrap!` (a panic, printed by panic-probe). In
//! the loop nothing panics: timeouts and DCMI errors bump the static
//! counters, are logged with `defmt::warn!` and the frame is skipped. The
//! model is the blob committed in `shared` (built in; a blob of another
//! format version does not compile). Should it still fail validation or
//! not fit the static arena and scratch, that is logged once with
//! `defmt::error!` and the camera loop keeps running without
//! classification.

use core::future::{poll_fn, Future};
use core::pin::pin;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use core::task::Poll;

use cortex_m::peripheral::DWT;
use defmt::{error, info, unwrap, warn};
use embassy_executor::Spawner;
use embassy_stm32::dcmi::{
    self, Dcmi, HSyncDataInvalidLevel, PixelClockPolarity, VSyncDataInvalidLevel,
};
use embassy_stm32::i2c::{self, I2c};
use embassy_stm32::rcc::{Mco, Mco1Source, McoConfig, McoPrescaler};
use embassy_stm32::time::Hertz;
use embassy_stm32::{bind_interrupts, dma, peripherals};
use embassy_time::{with_timeout, Delay, Duration, Instant, Timer};
use shared::model::{Scratch, ARENA_LEN, SCRATCH_LEN_FAST};
use shared::preprocess::{Frame, PixelFormat};
use {defmt_rtt as _, panic_probe as _};

use crate::app::Engine;
use crate::camera::ov7670;

/// Words of one QQVGA RGB565 frame (what `Dcmi::capture` takes).
const FRAME_WORDS: usize = ov7670::FRAME_BYTES / 4;
const _: () = assert!(
    ov7670::FRAME_BYTES.is_multiple_of(32),
    "frame must be whole cache lines"
);
const _: () = assert!(FRAME_WORDS <= 0xFFFF, "one DMA transfer (NDTR is 16 bits)");

/// A frame is 15 fps (67 ms); a snapshot starts at the next VSYNC, so a good
/// capture finishes within two frame times. Anything past this is a dead
/// camera or a lost sync.
const CAPTURE_TIMEOUT: Duration = Duration::from_millis(500);
/// Without a model, log one line per this many frames.
const NO_MODEL_LOG_EVERY: u32 = 30;

/// A DCMI DMA target: whole, aligned D-cache lines.
#[repr(C, align(32))]
struct FrameBuffer([u32; FRAME_WORDS]);

/// The two frame buffers (2 × 38 400 B) in AXI SRAM, the DMA-reachable RAM.
#[link_section = ".axisram.frames"]
static mut FRAMES: [FrameBuffer; 2] =
    [FrameBuffer([0; FRAME_WORDS]), FrameBuffer([0; FRAME_WORDS])];
/// The model's activation arena and conv scratch (CPU only, AXI SRAM .bss).
static mut ARENA: [i8; ARENA_LEN] = [0; ARENA_LEN];
static mut SCRATCH: Scratch<SCRATCH_LEN_FAST> = Scratch::new();

/// Frames captured successfully.
static FRAMES_OK: AtomicU32 = AtomicU32::new(0);
/// Captures that did not finish within [`CAPTURE_TIMEOUT`].
static CAPTURE_TIMEOUTS: AtomicU32 = AtomicU32::new(0);
/// DCMI overruns (the DMA did not drain the DCMI FIFO in time).
static DCMI_OVERRUNS: AtomicU32 = AtomicU32::new(0);
/// Other DCMI errors (synchronisation errors).
static DCMI_ERRORS: AtomicU32 = AtomicU32::new(0);
/// Frames the engine rejected.
static CLASSIFY_ERRORS: AtomicU32 = AtomicU32::new(0);
/// Whether the per-layer profile was logged.
static PROFILED: AtomicBool = AtomicBool::new(false);

bind_interrupts!(struct Irqs {
    DCMI => dcmi::InterruptHandler<peripherals::DCMI>;
    DMA1_STREAM0 => dma::InterruptHandler<peripherals::DMA1_CH0>;
});

/// 480 MHz from the 8 MHz ST-LINK clock; see the module docs.
fn clocks() -> embassy_stm32::Config {
    use embassy_stm32::rcc::*;
    let mut config = embassy_stm32::Config::default();
    config.rcc.hse = Some(Hse {
        freq: Hertz::mhz(8),
        mode: HseMode::Bypass,
    });
    config.rcc.pll1 = Some(Pll {
        source: PllSource::HSE,
        prediv: PllPreDiv::DIV1,
        mul: PllMul::MUL120,
        fracn: None,
        divp: Some(PllDiv::DIV2),
        divq: Some(PllDiv::DIV8),
        divr: None,
    });
    config.rcc.sys = Sysclk::PLL1_P;
    config.rcc.d1c_pre = AHBPrescaler::DIV1;
    config.rcc.ahb_pre = AHBPrescaler::DIV2;
    config.rcc.apb1_pre = APBPrescaler::DIV2;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config.rcc.apb3_pre = APBPrescaler::DIV2;
    config.rcc.apb4_pre = APBPrescaler::DIV2;
    config.rcc.voltage_scale = VoltageScale::Scale0;
    config
}

#[embassy_executor::main]
async fn main(_spawner: Spawner) {
    let p = embassy_stm32::init(clocks());
    let mut cp = unwrap!(cortex_m::Peripherals::take());

    // Caches (the frame buffers are handled by hand, see the module docs)
    // and the DWT cycle counter (the Cortex-M7 DWT needs its lock lifted).
    cp.SCB.enable_icache();
    cp.SCB.enable_dcache(&mut cp.CPUID);
    cp.DCB.enable_trace();
    DWT::unlock();
    cp.DWT.enable_cycle_counter();
    info!("NUCLEO-H743ZI2 up: CPU 480 MHz, caches on");

    // SAFETY: `main` runs once; these statics are borrowed here only.
    let (frames, arena, scratch) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(FRAMES),
            &mut *core::ptr::addr_of_mut!(ARENA),
            &mut (*core::ptr::addr_of_mut!(SCRATCH)).0,
        )
    };
    // `enable_dcache` invalidated the whole cache and nothing has touched the
    // frame buffers since (cortex-m-rt zeroed them with the cache off), so
    // they start with no cached lines at all.

    // Camera clock first: without XCLK the OV7670 does not answer on SCCB.
    let mut mco_config = McoConfig::default();
    mco_config.prescaler = McoPrescaler::DIV5; // PLL1_Q 120 MHz / 5 = 24 MHz
    let _xclk = Mco::new(p.MCO1, p.PA8, Mco1Source::PLL1_Q, mco_config);
    Timer::after_millis(10).await;

    let mut i2c_config = i2c::Config::default();
    i2c_config.frequency = Hertz::khz(100);
    // Weak (~40 kΩ) internal pull-ups as a fallback; fit 4.7 kΩ to 3V3.
    i2c_config.scl_pullup = true;
    i2c_config.sda_pullup = true;
    let mut sccb = I2c::new_blocking(p.I2C1, p.PB8, p.PB9, i2c_config);
    unwrap!(ov7670::init(&mut sccb, &mut Delay));
    info!("OV7670 configured: QQVGA RGB565");

    let mut dcmi_config = dcmi::Config::default();
    dcmi_config.vsync_level = VSyncDataInvalidLevel::High;
    dcmi_config.hsync_level = HSyncDataInvalidLevel::Low;
    dcmi_config.pixclk_polarity = PixelClockPolarity::RisingEdge;
    #[rustfmt::skip]
    let mut dcmi = Dcmi::new_8bit(
        p.DCMI, p.DMA1_CH0, Irqs,
        p.PC6, p.PC7, p.PC8, p.PC9, p.PC11, p.PD3, p.PE5, p.PE6, // D0..D7
        p.PB7, p.PA4, p.PA6, // VSYNC, HSYNC (HREF), PIXCLK
        dcmi_config,
    );
    crop_to_frame();

    let mut engine = match shared::model::default_model() {
        Ok(model) => match Engine::new(model, arena, scratch) {
            Ok(engine) => {
                let m = engine.model();
                info!(
                    "model: {} layers, arena {} B, scratch {} i16, {} classes",
                    m.layer_count(),
                    m.arena_len(),
                    m.scratch_len(),
                    m.class_count()
                );
                for (i, name) in m.class_names().enumerate() {
                    info!("class {}: {=str}", i, name);
                }
                Some(engine)
            }
            Err(e) => {
                error!(
                    "model does not fit its buffers: {}; capturing without classifying",
                    e
                );
                None
            }
        },
        Err(e) => {
            error!("no valid model ({}); capturing without classifying", e);
            None
        }
    };

    let [buf_a, buf_b] = frames;
    let (mut front, mut back) = (&mut buf_a.0, &mut buf_b.0);
    // `front` holds a captured frame not classified yet.
    let mut front_ready = false;
    loop {
        let result = {
            let mut capture = pin!(with_timeout(CAPTURE_TIMEOUT, dcmi.capture(&mut back[..])));
            // The first poll programs the DMA and enables DCMI; the frame
            // then lands in `back` while the CPU works on `front`.
            let started = poll_fn(|cx| Poll::Ready(capture.as_mut().poll(cx))).await;

            if front_ready {
                // SAFETY: the DMA into `front` has completed (its capture
                // returned Ok) and the CPU never wrote it: no dirty lines lost.
                unsafe { cp.SCB.invalidate_dcache_by_slice(&mut front[..]) };
                process(engine.as_mut(), &front[..]);
            }

            match started {
                Poll::Ready(r) => r,
                Poll::Pending => capture.await,
            }
        };
        front_ready = match result {
            Ok(Ok(())) => {
                FRAMES_OK.fetch_add(1, Ordering::Relaxed);
                core::mem::swap(&mut front, &mut back);
                true
            }
            Ok(Err(e)) => {
                let n = match e {
                    dcmi::Error::Overrun => DCMI_OVERRUNS.fetch_add(1, Ordering::Relaxed) + 1,
                    _ => DCMI_ERRORS.fetch_add(1, Ordering::Relaxed) + 1,
                };
                warn!("DCMI {} (#{}), frame skipped", e, n);
                stop_capture();
                false
            }
            Err(_) => {
                let n = CAPTURE_TIMEOUTS.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(
                    "camera timeout after {} ms (#{}), frame skipped",
                    CAPTURE_TIMEOUT.as_millis(),
                    n
                );
                stop_capture();
                false
            }
        };
    }
}

/// Classifies one captured frame and logs the result (or, without a model,
/// counts it).
fn process(engine: Option<&mut Engine<'_>>, words: &[u32]) {
    // SAFETY: `[u32]` → `[u8]` of the same memory: u8 has no alignment or
    // validity requirements and the length is exactly the byte size.
    let data =
        unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), ov7670::FRAME_BYTES) };
    let frame = Frame {
        data,
        width: ov7670::WIDTH,
        height: ov7670::HEIGHT,
        format: PixelFormat::Rgb565Be,
    };
    let Some(engine) = engine else {
        let n = FRAMES_OK.load(Ordering::Relaxed);
        if n % NO_MODEL_LOG_EVERY == 1 {
            let first = u16::from_be_bytes([data[0], data[1]]);
            info!(
                "frame {} captured (no model), first pixel {=u16:#x}",
                n, first
            );
        }
        return;
    };
    let t0 = Instant::now();
    let c0 = DWT::cycle_count();
    let result = engine.classify(&frame);
    let cycles = DWT::cycle_count().wrapping_sub(c0);
    let ms = t0.elapsed().as_millis();
    match result {
        Ok(c) => {
            info!(
                "class={=str} conf={}‰ cycles={} ({} ms)",
                c.name, c.confidence_permille, cycles, ms
            );
            if !PROFILED.swap(true, Ordering::Relaxed) {
                profile_layers(engine);
            }
        }
        Err(e) => {
            let n = CLASSIFY_ERRORS.fetch_add(1, Ordering::Relaxed) + 1;
            warn!("classify failed: {} (#{}), frame skipped", e, n);
        }
    }
}

/// Once, on the first classified frame: DWT cycles of every layer, rerun
/// on the same (already preprocessed) input.
fn profile_layers(engine: &mut Engine<'_>) {
    if let Err(e) = engine.load_input() {
        warn!("layer profile skipped: {}", e);
        return;
    }
    for i in 0..engine.model().layer_count() {
        let c0 = DWT::cycle_count();
        let r = engine.run_layer(i);
        let cycles = DWT::cycle_count().wrapping_sub(c0);
        let name = engine.model().layer(i).map_or("?", |l| l.name);
        match r {
            Ok(()) => info!("layer {} {} cycles={}", i, name, cycles),
            Err(e) => {
                warn!("layer {} {} failed: {}", i, name, e);
                return;
            }
        }
    }
}

/// Makes the DCMI keep exactly 160x120 pixels (320 PCLKs per line, 120
/// lines) whatever the sensor sends, so an odd line length cannot shift the
/// DMA out of step with the frame. Survives `capture`, which only toggles
/// `CR.ENABLE`/`CR.CAPTURE`.
fn crop_to_frame() {
    let r = embassy_stm32::pac::DCMI;
    r.cwstrt().write(|w| {
        w.set_hoffcnt(0);
        w.set_vst(0);
    });
    r.cwsize().write(|w| {
        w.set_capcnt((ov7670::WIDTH * ov7670::BYTES_PER_PIXEL - 1) as u16);
        w.set_vline((ov7670::HEIGHT - 1) as u16);
    });
    r.cr().modify(|w| w.set_crop(true));
}

/// After a timeout or an error `capture` was dropped (its DMA transfer is
/// stopped by its `Drop`) but DCMI is left enabled; stop it and clear its
/// flags so the next capture starts at a frame boundary.
fn stop_capture() {
    let r = embassy_stm32::pac::DCMI;
    r.cr().modify(|w| {
        w.set_capture(false);
        w.set_enable(false);
    });
    r.icr().write(|w| {
        w.set_frame_isc(true);
        w.set_ovr_isc(true);
        w.set_err_isc(true);
    });
}
