//! `vedfolnir-sessions`: the operator CLI. See [`vedfolnir_sessions::cli`].

// The store and the audit worker allocate many small, short-lived values
// (replies, JSON maps, strings); mimalloc serves them faster than glibc's
// malloc (BENCHMARKS.md, "Allocator").
#[cfg(feature = "allocator")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vedfolnir_sessions::cli::main()
}
