//! The `m3ae` command-line tool.
//!
//! Subcommands: `info` (a configuration, its parameter count and FLOPs), `pretrain`, `bench`,
//! `doctor` (a device check), `convert`, and the evaluation commands `embed`, `probe`, `ood`,
//! `reconstruct`. Each lives in
//! `m3ae::cli` (arguments, and the calls of the library that do the work); this file parses the
//! command line, installs the logger and prints errors as one line.
//!
//! Log output (per-sample data warnings, ...) goes to stderr at level `warn` unless `RUST_LOG`
//! says otherwise (e.g. `RUST_LOG=info`, `RUST_LOG=m3ae_data=debug`).

use clap::Parser;
use m3ae::cli::{one_line, run, Cli};

fn main() {
    // Freed tensor buffers stay in the heap (fewer page faults per step); see the function's docs.
    m3ae_kernels::alloc::keep_freed_memory();
    let cli = Cli::parse();
    if cli.offline {
        // Before any other thread exists; every Hub lookup reads it (m3ae_data::hub).
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    // Errors print as one line (the causes joined with ": "), without a backtrace.
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}
