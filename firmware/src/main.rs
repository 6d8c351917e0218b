//! firmware: not implemented yet (see issue 5). On the host this is a stub so
//! that `cargo build`/`cargo test` at the workspace root keep working.

fn main() -> std::process::ExitCode {
    eprintln!(
        "firmware: the Cortex-M7 image is not implemented yet; build it for \
         thumbv7em-none-eabihf once it exists (input is {} bytes).",
        shared::preprocess::INPUT_LEN
    );
    std::process::ExitCode::FAILURE
}
