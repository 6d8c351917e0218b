//! Cortex-M7 fast paths (SMLAD / SXTB16), also compiled for the host where
//! [`isa`] emulates the instructions, so one test suite checks them
//! everywhere. Each fast kernel gives the same bytes as its reference.

pub mod isa;

pub(crate) mod add;
pub(crate) mod conv;
pub(crate) mod pool;
pub mod requant;
