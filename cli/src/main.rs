//! `vedfolnir-sessions`: the operator CLI of the session store. Sessions,
//! users, history, replay, verify, snapshots, dead letters, migrate, health
//! and stats (`cli`), the scripted demo (`demo`) and the load benchmarks
//! (`bench`). Every command prints JSON on stdout.

// The store and the audit worker allocate many small, short-lived values
// (replies, JSON maps, strings); mimalloc serves them faster than glibc's
// malloc (BENCHMARKS.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod cli;
mod demo;

fn main() -> std::process::ExitCode {
    cli::main()
}
