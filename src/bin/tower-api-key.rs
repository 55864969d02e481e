//! The operator's command line: see `tower-api-key --help` and
//! [`tower_api_key::cli`].

fn main() -> std::process::ExitCode {
    tower_api_key::cli::main()
}
