//! `vedfolnir-sessions`: the operator CLI. See [`vedfolnir_sessions::cli`].

fn main() -> std::process::ExitCode {
    vedfolnir_sessions::cli::main()
}
