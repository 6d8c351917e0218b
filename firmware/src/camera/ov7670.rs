//! OV7670 register setup over SCCB for QQVGA (160x120) RGB565.
//!
//! Only the control bus lives here; pixels arrive on the parallel bus
//! (`D[7:0]`, `PCLK`, `HREF`, `VSYNC`), which the board captures with DCMI.
//! Everything is `no_std`, heap-free and generic over
//! [`embedded_hal::i2c::I2c`], so the exact SCCB traffic is unit-tested on
//! the host.
//!
//! # SCCB on an I2C master
//!
//! * The 7-bit address is [`ADDRESS`] (`0x42`/`0x43` in the datasheet's 8-bit
//!   notation).
//! * A register write is one I2C write `[reg, value]`.
//! * A register read is an I2C write `[reg]`, a STOP, then a one-byte I2C
//!   read. SCCB has no repeated START, so `write_read` is never used: many
//!   OV7670 modules answer garbage to a repeated START.
//!
//! # Output produced by [`init`]
//!
//! QQVGA is the VGA window (640x480) downsampled by 4 in both directions by
//! the sensor's DCW block (`COM3` + `COM14` + `SCALING_DCWCTR` +
//! `SCALING_PCLK_DIV`). Pixels are RGB565, full range (`COM15 = 0xD0`), sent
//! high byte first (`R4..R0 G5..G3`, then `G2..G0 B4..B0`). `VSYNC` is high
//! during vertical sync, `HREF` is high while a line's bytes are valid, and
//! data is stable on the rising edge of `PCLK` (`COM10 = 0x00`).
//!
//! Timing with `XCLK` = 24 MHz: `CLKRC = 0x01` halves it to a 12 MHz
//! internal clock, i.e. 15 frames/s; the QQVGA `PCLK` is 12 MHz / 4 = 3 MHz.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// 7-bit SCCB address of the OV7670.
pub const ADDRESS: u8 = 0x21;
/// Expected value of [`reg::PID`].
pub const PID_OV7670: u8 = 0x76;
/// Expected value of [`reg::VER`].
pub const VER_OV7670: u8 = 0x73;
/// Wait after the software reset (the datasheet asks for 1 ms; be generous).
pub const RESET_DELAY_MS: u32 = 10;

/// Frame width produced by [`init`].
pub const WIDTH: usize = 160;
/// Frame height produced by [`init`].
pub const HEIGHT: usize = 120;
/// Bytes per pixel (RGB565).
pub const BYTES_PER_PIXEL: usize = 2;
/// Bytes of one frame.
pub const FRAME_BYTES: usize = WIDTH * HEIGHT * BYTES_PER_PIXEL;

/// Register addresses (names from the datasheet / Linux `ov7670.c`).
#[allow(missing_docs)]
pub mod reg {
    pub const GAIN: u8 = 0x00;
    pub const BLUE: u8 = 0x01;
    pub const RED: u8 = 0x02;
    pub const VREF: u8 = 0x03;
    pub const COM1: u8 = 0x04;
    pub const PID: u8 = 0x0A;
    pub const VER: u8 = 0x0B;
    pub const COM3: u8 = 0x0C;
    pub const COM4: u8 = 0x0D;
    pub const COM5: u8 = 0x0E;
    pub const COM6: u8 = 0x0F;
    pub const AECH: u8 = 0x10;
    pub const CLKRC: u8 = 0x11;
    pub const COM7: u8 = 0x12;
    pub const COM8: u8 = 0x13;
    pub const COM9: u8 = 0x14;
    pub const COM10: u8 = 0x15;
    pub const HSTART: u8 = 0x17;
    pub const HSTOP: u8 = 0x18;
    pub const VSTART: u8 = 0x19;
    pub const VSTOP: u8 = 0x1A;
    pub const MVFP: u8 = 0x1E;
    pub const AEW: u8 = 0x24;
    pub const AEB: u8 = 0x25;
    pub const VPT: u8 = 0x26;
    pub const HREF: u8 = 0x32;
    pub const TSLB: u8 = 0x3A;
    pub const COM11: u8 = 0x3B;
    pub const COM12: u8 = 0x3C;
    pub const COM13: u8 = 0x3D;
    pub const COM14: u8 = 0x3E;
    pub const EDGE: u8 = 0x3F;
    pub const COM15: u8 = 0x40;
    pub const COM16: u8 = 0x41;
    pub const MTX1: u8 = 0x4F;
    pub const MTX2: u8 = 0x50;
    pub const MTX3: u8 = 0x51;
    pub const MTX4: u8 = 0x52;
    pub const MTX5: u8 = 0x53;
    pub const MTX6: u8 = 0x54;
    pub const MTXS: u8 = 0x58;
    pub const GFIX: u8 = 0x69;
    pub const SCALING_XSC: u8 = 0x70;
    pub const SCALING_YSC: u8 = 0x71;
    pub const SCALING_DCWCTR: u8 = 0x72;
    pub const SCALING_PCLK_DIV: u8 = 0x73;
    pub const RGB444: u8 = 0x8C;
    pub const HAECC1: u8 = 0x9F;
    pub const HAECC2: u8 = 0xA0;
    pub const SCALING_PCLK_DELAY: u8 = 0xA2;
    pub const BD50MAX: u8 = 0xA5;
    pub const HAECC3: u8 = 0xA6;
    pub const HAECC4: u8 = 0xA7;
    pub const HAECC5: u8 = 0xA8;
    pub const HAECC6: u8 = 0xA9;
    pub const HAECC7: u8 = 0xAA;
    pub const BD60MAX: u8 = 0xAB;
}

/// `COM7` bit: software reset of all registers.
pub const COM7_RESET: u8 = 0x80;
/// `COM7` bit: RGB output (VGA size, the DCW block scales it down).
pub const COM7_RGB: u8 = 0x04;
/// `COM15` bits: output range 00..FF (full range).
pub const COM15_R00FF: u8 = 0xC0;
/// `COM15` bits: RGB565.
pub const COM15_RGB565: u8 = 0x10;
const COM8_FASTAEC: u8 = 0x80;
const COM8_AECSTEP: u8 = 0x40;
const COM8_BFILT: u8 = 0x20;
const COM8_AGC: u8 = 0x04;
const COM8_AWB: u8 = 0x02;
const COM8_AEC: u8 = 0x01;
const COM11_HZAUTO: u8 = 0x10;
const COM11_EXP: u8 = 0x02;
const COM13_GAMMA: u8 = 0x80;
const COM13_UVSAT: u8 = 0x40;
const COM16_AWBGAIN: u8 = 0x08;

/// The software reset written before [`INIT_QQVGA_RGB565`], followed by
/// [`RESET_DELAY_MS`].
pub const RESET: (u8, u8) = (reg::COM7, COM7_RESET);

/// Register writes, in order, after the reset: the Linux `ov7670.c`
/// defaults (AEC/AGC/AWB, gamma, colour matrix and OmniVision's "magic"
/// reserved values), then RGB565 full range, then the QQVGA window and DCW
/// scaling.
pub const INIT_QQVGA_RGB565: &[(u8, u8)] = &[
    // --- Clock and base mode ---
    (reg::CLKRC, 0x01), // internal clock = XCLK / 2 (15 fps at XCLK 24 MHz)
    (reg::TSLB, 0x04),
    (reg::COM7, 0x00), // VGA YUV until the format block below
    // --- Default VGA window (overridden by the QQVGA block) ---
    (reg::HSTART, 0x13),
    (reg::HSTOP, 0x01),
    (reg::HREF, 0xB6),
    (reg::VSTART, 0x02),
    (reg::VSTOP, 0x7A),
    (reg::VREF, 0x0A),
    (reg::COM3, 0x00),
    (reg::COM14, 0x00),
    (reg::SCALING_XSC, 0x3A),
    (reg::SCALING_YSC, 0x35),
    (reg::SCALING_DCWCTR, 0x11),
    (reg::SCALING_PCLK_DIV, 0xF0),
    (reg::SCALING_PCLK_DELAY, 0x02),
    (reg::COM10, 0x00), // VSYNC high = sync, HREF high = valid, data on PCLK rising
    // --- Gamma curve ---
    (0x7A, 0x20),
    (0x7B, 0x10),
    (0x7C, 0x1E),
    (0x7D, 0x35),
    (0x7E, 0x5A),
    (0x7F, 0x69),
    (0x80, 0x76),
    (0x81, 0x80),
    (0x82, 0x88),
    (0x83, 0x8F),
    (0x84, 0x96),
    (0x85, 0xA3),
    (0x86, 0xAF),
    (0x87, 0xC4),
    (0x88, 0xD7),
    (0x89, 0xE8),
    // --- AEC/AGC: off while tuning, then on ---
    (reg::COM8, COM8_FASTAEC | COM8_AECSTEP | COM8_BFILT),
    (reg::GAIN, 0x00),
    (reg::AECH, 0x00),
    (reg::COM4, 0x40),
    (reg::COM9, 0x18),
    (reg::BD50MAX, 0x05),
    (reg::BD60MAX, 0x07),
    (reg::AEW, 0x95),
    (reg::AEB, 0x33),
    (reg::VPT, 0xE3),
    (reg::HAECC1, 0x78),
    (reg::HAECC2, 0x68),
    (0xA1, 0x03),
    (reg::HAECC3, 0xD8),
    (reg::HAECC4, 0xD8),
    (reg::HAECC5, 0xF0),
    (reg::HAECC6, 0x90),
    (reg::HAECC7, 0x94),
    (
        reg::COM8,
        COM8_FASTAEC | COM8_AECSTEP | COM8_BFILT | COM8_AGC | COM8_AEC,
    ),
    // --- Reserved values from OmniVision ---
    (reg::COM5, 0x61),
    (reg::COM6, 0x4B),
    (0x16, 0x02),
    (reg::MVFP, 0x07),
    (0x21, 0x02),
    (0x22, 0x91),
    (0x29, 0x07),
    (0x33, 0x0B),
    (0x35, 0x0B),
    (0x37, 0x1D),
    (0x38, 0x71),
    (0x39, 0x2A),
    (reg::COM12, 0x78),
    (0x4D, 0x40),
    (0x4E, 0x20),
    (reg::GFIX, 0x00),
    (0x6B, 0x4A),
    (0x74, 0x10),
    (0x8D, 0x4F),
    (0x8E, 0x00),
    (0x8F, 0x00),
    (0x90, 0x00),
    (0x91, 0x00),
    (0x96, 0x00),
    (0x9A, 0x00),
    (0xB0, 0x84),
    (0xB1, 0x0C),
    (0xB2, 0x0E),
    (0xB3, 0x82),
    (0xB8, 0x0A),
    // --- White balance ---
    (0x43, 0x0A),
    (0x44, 0xF0),
    (0x45, 0x34),
    (0x46, 0x58),
    (0x47, 0x28),
    (0x48, 0x3A),
    (0x59, 0x88),
    (0x5A, 0x88),
    (0x5B, 0x44),
    (0x5C, 0x67),
    (0x5D, 0x49),
    (0x5E, 0x0E),
    (0x6C, 0x0A),
    (0x6D, 0x55),
    (0x6E, 0x11),
    (0x6F, 0x9F),
    (0x6A, 0x40),
    (reg::BLUE, 0x40),
    (reg::RED, 0x60),
    (
        reg::COM8,
        COM8_FASTAEC | COM8_AECSTEP | COM8_BFILT | COM8_AGC | COM8_AEC | COM8_AWB,
    ),
    // --- Colour matrix (YUV defaults; RGB block overrides) ---
    (reg::MTX1, 0x80),
    (reg::MTX2, 0x80),
    (reg::MTX3, 0x00),
    (reg::MTX4, 0x22),
    (reg::MTX5, 0x5E),
    (reg::MTX6, 0x80),
    (reg::MTXS, 0x9E),
    (reg::COM16, COM16_AWBGAIN),
    (reg::EDGE, 0x00),
    (0x75, 0x05),
    (0x76, 0xE1),
    (0x4C, 0x00),
    (0x77, 0x01),
    (reg::COM13, 0xC3),
    (0x4B, 0x09),
    (0xC9, 0x60),
    (reg::COM16, 0x38),
    (0x56, 0x40),
    (0x34, 0x11),
    (reg::COM11, COM11_EXP | COM11_HZAUTO),
    (0xA4, 0x88),
    (0x96, 0x00),
    (0x97, 0x30),
    (0x98, 0x20),
    (0x99, 0x30),
    (0x9A, 0x84),
    (0x9B, 0x29),
    (0x9C, 0x03),
    (0x9D, 0x4C),
    (0x9E, 0x3F),
    (0x78, 0x04),
    // --- Multiplexed registers (0x79 selects, 0xC8 writes) ---
    (0x79, 0x01),
    (0xC8, 0xF0),
    (0x79, 0x0F),
    (0xC8, 0x00),
    (0x79, 0x10),
    (0xC8, 0x7E),
    (0x79, 0x0A),
    (0xC8, 0x80),
    (0x79, 0x0B),
    (0xC8, 0x01),
    (0x79, 0x0C),
    (0xC8, 0x0F),
    (0x79, 0x0D),
    (0xC8, 0x20),
    (0x79, 0x09),
    (0xC8, 0x80),
    (0x79, 0x02),
    (0xC8, 0xC0),
    (0x79, 0x03),
    (0xC8, 0x40),
    (0x79, 0x05),
    (0xC8, 0x30),
    (0x79, 0x26),
    // --- RGB565, full range ---
    (reg::COM7, COM7_RGB),
    (reg::RGB444, 0x00), // RGB444 off
    (reg::COM1, 0x00),   // no CCIR656
    (reg::COM15, COM15_R00FF | COM15_RGB565),
    (reg::COM9, 0x38), // 16x gain ceiling
    (reg::MTX1, 0xB3),
    (reg::MTX2, 0xB3),
    (reg::MTX3, 0x00),
    (reg::MTX4, 0x3D),
    (reg::MTX5, 0xA7),
    (reg::MTX6, 0xE4),
    (reg::COM13, COM13_GAMMA | COM13_UVSAT),
    // --- QQVGA: VGA window, DCW downsample by 4, PCLK / 4 ---
    (reg::COM3, 0x04),             // DCW enable
    (reg::COM14, 0x1A),            // manual scaling, scaled PCLK, PCLK / 4
    (reg::SCALING_DCWCTR, 0x22),   // downsample by 4 vertically and horizontally
    (reg::SCALING_PCLK_DIV, 0xF2), // DSP clock / 4
    (reg::SCALING_PCLK_DELAY, 0x02),
    (reg::HSTART, 0x16),
    (reg::HSTOP, 0x04),
    (reg::HREF, 0xA4),
    (reg::VSTART, 0x02),
    (reg::VSTOP, 0x7A),
    (reg::VREF, 0x0A),
];

/// What went wrong while talking to the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "board", derive(defmt::Format))]
pub enum CameraError<E> {
    /// The SCCB/I2C bus reported an error (typically a NACK: no camera, no
    /// XCLK, or missing pull-ups).
    Bus(E),
    /// Something answered at [`ADDRESS`] but it is not an OV7670.
    WrongId {
        /// Value read from `PID` (expected [`PID_OV7670`]).
        pid: u8,
        /// Value read from `VER` (expected [`VER_OV7670`]).
        ver: u8,
    },
}

impl<E> From<E> for CameraError<E> {
    fn from(e: E) -> Self {
        CameraError::Bus(e)
    }
}

/// Reads one register: write `[reg]`, STOP, read one byte (no repeated START).
pub fn read_register<I: I2c>(i2c: &mut I, register: u8) -> Result<u8, I::Error> {
    i2c.write(ADDRESS, &[register])?;
    let mut value = [0u8; 1];
    i2c.read(ADDRESS, &mut value)?;
    Ok(value[0])
}

/// Writes one register.
pub fn write_register<I: I2c>(i2c: &mut I, register: u8, value: u8) -> Result<(), I::Error> {
    i2c.write(ADDRESS, &[register, value])
}

/// Reads `PID`/`VER` and checks that they identify an OV7670.
pub fn check_id<I: I2c>(i2c: &mut I) -> Result<(), CameraError<I::Error>> {
    let pid = read_register(i2c, reg::PID)?;
    let ver = read_register(i2c, reg::VER)?;
    if pid == PID_OV7670 && ver == VER_OV7670 {
        Ok(())
    } else {
        Err(CameraError::WrongId { pid, ver })
    }
}

/// Identifies the sensor, resets it and configures QQVGA RGB565.
///
/// `XCLK` must already run: the OV7670 does not answer on SCCB without it.
/// Stops at the first error; nothing is written to a device with a wrong ID.
pub fn init<I: I2c>(i2c: &mut I, delay: &mut impl DelayNs) -> Result<(), CameraError<I::Error>> {
    check_id(i2c)?;
    write_register(i2c, RESET.0, RESET.1)?;
    delay.delay_ms(RESET_DELAY_MS);
    for &(register, value) in INIT_QQVGA_RGB565 {
        write_register(i2c, register, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::{ErrorKind, ErrorType, NoAcknowledgeSource, Operation};

    /// One I2C operation as the bus saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Op {
        Write(u8, Vec<u8>),
        Read(u8, usize),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct BusError;

    impl embedded_hal::i2c::Error for BusError {
        fn kind(&self) -> ErrorKind {
            ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
        }
    }

    /// An SCCB device model: a register file with an address pointer,
    /// recording every transaction (one `Vec<Op>` per START..STOP).
    struct MockSccb {
        regs: [u8; 256],
        pointer: u8,
        transactions: Vec<Vec<Op>>,
        /// Fail the transaction with this index (0-based).
        fail_at: Option<usize>,
    }

    impl MockSccb {
        fn ov7670() -> Self {
            let mut regs = [0u8; 256];
            regs[reg::PID as usize] = PID_OV7670;
            regs[reg::VER as usize] = VER_OV7670;
            Self {
                regs,
                pointer: 0,
                transactions: Vec::new(),
                fail_at: None,
            }
        }
    }

    impl ErrorType for MockSccb {
        type Error = BusError;
    }

    impl I2c for MockSccb {
        fn transaction(
            &mut self,
            address: u8,
            operations: &mut [Operation<'_>],
        ) -> Result<(), BusError> {
            if self.fail_at == Some(self.transactions.len()) {
                self.transactions.push(Vec::new());
                return Err(BusError);
            }
            let mut ops = Vec::new();
            for op in operations.iter_mut() {
                match op {
                    Operation::Write(bytes) => {
                        if let Some((&p, rest)) = bytes.split_first() {
                            self.pointer = p;
                            if let Some(&v) = rest.first() {
                                self.regs[p as usize] = v;
                            }
                        }
                        ops.push(Op::Write(address, bytes.to_vec()));
                    }
                    Operation::Read(buf) => {
                        for b in buf.iter_mut() {
                            *b = self.regs[self.pointer as usize];
                        }
                        ops.push(Op::Read(address, buf.len()));
                    }
                }
            }
            self.transactions.push(ops);
            Ok(())
        }
    }

    /// Records requested delays in nanoseconds.
    #[derive(Default)]
    struct MockDelay(Vec<u64>);

    impl DelayNs for MockDelay {
        fn delay_ns(&mut self, ns: u32) {
            self.0.push(ns as u64);
        }
        fn delay_us(&mut self, us: u32) {
            self.0.push(us as u64 * 1_000);
        }
        fn delay_ms(&mut self, ms: u32) {
            self.0.push(ms as u64 * 1_000_000);
        }
    }

    fn id_reads() -> Vec<Vec<Op>> {
        vec![
            vec![Op::Write(ADDRESS, vec![reg::PID])],
            vec![Op::Read(ADDRESS, 1)],
            vec![Op::Write(ADDRESS, vec![reg::VER])],
            vec![Op::Read(ADDRESS, 1)],
        ]
    }

    #[test]
    fn init_writes_the_exact_sequence() {
        let mut bus = MockSccb::ov7670();
        let mut delay = MockDelay::default();
        init(&mut bus, &mut delay).unwrap();

        let mut want = id_reads();
        want.push(vec![Op::Write(ADDRESS, vec![reg::COM7, COM7_RESET])]);
        for &(r, v) in INIT_QQVGA_RGB565 {
            want.push(vec![Op::Write(ADDRESS, vec![r, v])]);
        }
        assert_eq!(bus.transactions, want);
        // Exactly one wait, after the reset, of at least the datasheet's 1 ms.
        assert_eq!(delay.0.len(), 1);
        assert!(delay.0[0] >= 1_000_000, "{:?}", delay.0);
        // Every transaction is a single operation: STOP between the register
        // address and the read (SCCB has no repeated START).
        assert!(bus.transactions.iter().all(|t| t.len() == 1));
    }

    #[test]
    fn final_registers_select_qqvga_rgb565_full_range() {
        let mut bus = MockSccb::ov7670();
        init(&mut bus, &mut MockDelay::default()).unwrap();
        let r = |a: u8| bus.regs[a as usize];
        assert_eq!(r(reg::COM7), COM7_RGB);
        assert_eq!(r(reg::COM15), 0xD0);
        assert_eq!(r(reg::RGB444), 0x00);
        assert_eq!(r(reg::COM3), 0x04);
        assert_eq!(r(reg::COM14), 0x1A);
        assert_eq!(r(reg::SCALING_DCWCTR), 0x22);
        assert_eq!(r(reg::SCALING_PCLK_DIV), 0xF2);
        assert_eq!(r(reg::CLKRC), 0x01);
        assert_eq!(r(reg::COM10), 0x00);
        // The window spans 640x480 sensor pixels (downsampled by 4 to 160x120).
        let hstart = (r(reg::HSTART) as u32) << 3 | (r(reg::HREF) as u32 & 0x7);
        let hstop = (r(reg::HSTOP) as u32) << 3 | (r(reg::HREF) as u32 >> 3 & 0x7);
        let vstart = (r(reg::VSTART) as u32) << 2 | (r(reg::VREF) as u32 & 0x3);
        let vstop = (r(reg::VSTOP) as u32) << 2 | (r(reg::VREF) as u32 >> 2 & 0x3);
        assert_eq!((hstop + 784 - hstart) % 784, 640);
        assert_eq!(vstop - vstart, 480);
        assert_eq!(FRAME_BYTES, 38_400);
    }

    #[test]
    fn wrong_pid_is_an_error_and_nothing_is_written() {
        let mut bus = MockSccb::ov7670();
        bus.regs[reg::PID as usize] = 0x77;
        let mut delay = MockDelay::default();
        assert_eq!(
            init(&mut bus, &mut delay),
            Err(CameraError::WrongId {
                pid: 0x77,
                ver: VER_OV7670
            })
        );
        assert_eq!(bus.transactions, id_reads());
        assert!(delay.0.is_empty());
    }

    #[test]
    fn wrong_version_is_an_error() {
        let mut bus = MockSccb::ov7670();
        bus.regs[reg::VER as usize] = 0x00;
        assert_eq!(
            init(&mut bus, &mut MockDelay::default()),
            Err(CameraError::WrongId {
                pid: PID_OV7670,
                ver: 0x00
            })
        );
    }

    #[test]
    fn bus_errors_propagate_and_stop_the_sequence() {
        // First transaction (PID address write) NACKed: no camera.
        let mut bus = MockSccb::ov7670();
        bus.fail_at = Some(0);
        assert_eq!(
            init(&mut bus, &mut MockDelay::default()),
            Err(CameraError::Bus(BusError))
        );
        assert_eq!(bus.transactions.len(), 1);

        // A failure in the middle of the table stops there.
        let mut bus = MockSccb::ov7670();
        let fail = 4 + 1 + 10; // ID reads, reset, 10 table writes
        bus.fail_at = Some(fail);
        assert_eq!(
            init(&mut bus, &mut MockDelay::default()),
            Err(CameraError::Bus(BusError))
        );
        assert_eq!(bus.transactions.len(), fail + 1);
    }

    #[test]
    fn register_helpers() {
        let mut bus = MockSccb::ov7670();
        write_register(&mut bus, 0x55, 0xAB).unwrap();
        assert_eq!(read_register(&mut bus, 0x55), Ok(0xAB));
        assert_eq!(
            bus.transactions,
            vec![
                vec![Op::Write(ADDRESS, vec![0x55, 0xAB])],
                vec![Op::Write(ADDRESS, vec![0x55])],
                vec![Op::Read(ADDRESS, 1)],
            ]
        );
    }
}
