//! cstlb, the read load balancer (placeholder until its module lands).

use std::process::ExitCode;

pub fn main(_args: Vec<std::ffi::OsString>) -> ExitCode {
    eprintln!("cstlb: not built yet");
    ExitCode::from(2)
}
