//! The crate's one error type.

use core::fmt;

/// Everything that can be wrong with the arguments of a kernel, a frame or a
/// model blob. Kernels validate their arguments up front and return one of
/// these instead of panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// A buffer does not have the length its dimensions call for.
    BufferLength {
        /// Which buffer (`"input"`, `"filter"`, `"bias"`, …).
        buffer: &'static str,
        /// The length the dimensions require (a minimum for scratch buffers).
        expected: usize,
        /// The length that was passed.
        actual: usize,
    },
    /// A parameter is outside its documented range.
    Parameter {
        /// The parameter's name (`"stride_h"`, `"shift[3]"` is reported as `"shift"`, …).
        name: &'static str,
    },
    /// The output dimensions do not follow from the input and the parameters.
    OutputDims {
        /// The output dimensions `[h, w, c]` the parameters produce.
        expected: [usize; 3],
        /// The output dimensions that were passed.
        actual: [usize; 3],
    },
    /// A camera frame is smaller than the network input or larger than the
    /// fixed-point resampler supports.
    FrameSize {
        /// Frame width in pixels.
        width: usize,
        /// Frame height in pixels.
        height: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BufferLength {
                buffer,
                expected,
                actual,
            } => write!(
                f,
                "buffer `{buffer}` has length {actual}, expected {expected}"
            ),
            Error::Parameter { name } => write!(f, "parameter `{name}` is out of range"),
            Error::OutputDims { expected, actual } => write!(
                f,
                "output dims {actual:?} do not match the {expected:?} the parameters give"
            ),
            Error::FrameSize { width, height } => write!(
                f,
                "frame {width}x{height} is outside the supported size \
                 (shorter side 32..=4096 pixels)"
            ),
        }
    }
}

impl core::error::Error for Error {}

/// Returns `Err(BufferLength)` unless `actual == expected`.
#[inline]
pub(crate) fn check_len(buffer: &'static str, expected: usize, actual: usize) -> Result<(), Error> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::BufferLength {
            buffer,
            expected,
            actual,
        })
    }
}

/// Returns `Err(Parameter)` unless `ok`.
#[inline]
pub(crate) fn check_param(name: &'static str, ok: bool) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::Parameter { name })
    }
}
