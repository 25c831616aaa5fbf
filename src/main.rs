//! The one `clup` binary. It is `clupserver`, `clupadm` or `cstlb` depending
//! on the name it is called by (install links), or on its first argument
//! (`clup server|adm|lb ...`).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "\
usage: clup <program> [arguments]
    program can be one of the following:
      server (clupserver) : the HA monitor daemon
      adm    (clupadm)    : the administration tool
      lb     (cstlb)      : the read load balancer
    clup --version | --help
";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let name = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest: Vec<OsString> = args.drain(1..).collect();
    dispatch(&name, rest)
}

fn dispatch(name: &str, args: Vec<OsString>) -> ExitCode {
    match name {
        "clupserver" => clup::server::main(args),
        "clupadm" => clup::cli::main(args),
        "cstlb" => clup::lb::main(args),
        _ => {
            let mut it = args.into_iter();
            let first = it.next();
            let rest: Vec<OsString> = it.collect();
            match first.as_ref().and_then(|f| f.to_str()) {
                Some("server" | "clupserver") => clup::server::main(rest),
                Some("adm" | "clupadm") => clup::cli::main(rest),
                Some("lb" | "cstlb") => clup::lb::main(rest),
                Some("--version" | "-V") => {
                    println!("clup {}", clup::VERSION);
                    ExitCode::SUCCESS
                }
                Some("--help" | "-h") => {
                    print!("{USAGE}");
                    ExitCode::SUCCESS
                }
                Some(other) => {
                    eprintln!("clup: unknown program '{other}'\n{USAGE}");
                    ExitCode::from(2)
                }
                None => {
                    eprint!("{USAGE}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
