//! Writes the CRD YAML of peerfill into `crds/` (or checks it is current).
//!
//! ```text
//! cargo run -p peerfill-crds --bin crdgen            # write crds/*.yaml
//! cargo run -p peerfill-crds --bin crdgen -- --check # fail if they differ
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use peerfill_crds::crdgen::{Mismatch, check_dir, write_dir};

const USAGE: &str = "usage: crdgen [--check] [--dir DIR]\n\
    Writes the peerfill CRD YAML into DIR (default: the crds/ folder of the\n\
    source tree). With --check, writes nothing and exits 1 when a file\n\
    differs from what would be generated.";

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--dir" => match args.next() {
                Some(d) => dir = PathBuf::from(d),
                None => return usage_error("--dir needs a value"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    if check {
        run_check(&dir)
    } else {
        run_write(&dir)
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("crdgen: {msg}\n{USAGE}");
    ExitCode::from(2)
}

fn run_write(dir: &Path) -> ExitCode {
    match write_dir(dir) {
        Ok(written) => {
            for path in written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_check(dir: &Path) -> ExitCode {
    match check_dir(dir) {
        Ok(mismatches) if mismatches.is_empty() => ExitCode::SUCCESS,
        Ok(mismatches) => {
            for m in &mismatches {
                report(m);
            }
            eprintln!(
                "crdgen: {} CRD file(s) out of date; run `cargo run -p peerfill-crds --bin crdgen` and commit the result",
                mismatches.len()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(m: &Mismatch) {
    match &m.first_difference {
        None => eprintln!("{}: missing", m.path.display()),
        Some(d) => eprintln!(
            "{}:{}: differs from the generated YAML\n  checked in: {}\n  generated:  {}",
            m.path.display(),
            d.line,
            d.checked_in.as_deref().unwrap_or("<end of file>"),
            d.generated.as_deref().unwrap_or("<end of file>"),
        ),
    }
}
