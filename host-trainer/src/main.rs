//! host-trainer: not implemented yet (see issue 3). It exits with an error
//! rather than pretend to train.

fn main() -> std::process::ExitCode {
    eprintln!(
        "host-trainer: training is not implemented yet; this build only ships the \
         `shared` int8 kernels ({} input values per image).",
        shared::preprocess::INPUT_LEN
    );
    std::process::ExitCode::FAILURE
}
