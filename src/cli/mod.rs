//! The subcommands of the `m3ae` tool: their arguments (clap) and the code that runs them on the
//! library and prints what it did.

pub mod convert;
pub mod eval;
