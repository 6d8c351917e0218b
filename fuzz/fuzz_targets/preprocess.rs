//! `shared::preprocess` on arbitrary frames: it must return (Ok for a
//! frame whose size and data length are valid, an error otherwise) and
//! never panic.
//!
//! Input: width (u16), height (u16, used only in mode 0), a mode byte,
//! then pixels. Mode 0 passes the width, height and data as given (most
//! lengths mismatch: the error paths). Modes 1-3 pick RGB565 LE/BE or
//! RGB888 and derive the height from the data length, so the frame is
//! well-formed and the resampling runs on fuzzed pixels and sizes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::preprocess::{preprocess, Frame, PixelFormat, INPUT_LEN, INPUT_SIZE, MAX_CROP};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let width = u16::from_le_bytes([data[0], data[1]]) as usize;
    let height = u16::from_le_bytes([data[2], data[3]]) as usize;
    let pixels = &data[5..];
    let mut out = [0i8; INPUT_LEN];
    let format = match data[4] % 4 {
        0 => {
            for format in [
                PixelFormat::Rgb565Le,
                PixelFormat::Rgb565Be,
                PixelFormat::Rgb888,
            ] {
                let frame = Frame {
                    data: pixels,
                    width,
                    height,
                    format,
                };
                let _ = preprocess(&frame, &mut out);
            }
            return;
        }
        1 => PixelFormat::Rgb565Le,
        2 => PixelFormat::Rgb565Be,
        _ => PixelFormat::Rgb888,
    };
    let bpp = if format == PixelFormat::Rgb888 { 3 } else { 2 };
    let width = width % 600 + 1;
    let height = pixels.len() / (width * bpp);
    let frame = Frame {
        data: &pixels[..width * height * bpp],
        width,
        height,
        format,
    };
    let valid = (INPUT_SIZE..=MAX_CROP).contains(&width.min(height));
    assert_eq!(
        preprocess(&frame, &mut out).is_ok(),
        valid,
        "{width}x{height}"
    );
});
