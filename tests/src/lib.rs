//! Cross-crate integration checks live in `tests/tests/*.rs`.
