//! Camera drivers (register setup over SCCB/I2C, host-testable).
