//! Prints a new API key and the key-file entry that holds only its SHA-256.
//!
//! ```sh
//! cargo run --example keygen -- acme billing-2026-12
//! ```
//!
//! Give the key to the client once; paste the entry into the key file.

fn main() {
    let mut args = std::env::args().skip(1);
    let prefix = args.next().unwrap_or_else(|| "key".into());
    let id = args.next().unwrap_or_else(|| format!("{prefix}-new"));
    match tower_api_key::generate(&prefix).and_then(|key| Ok((key.toml_entry(&id)?, key))) {
        Ok((entry, key)) => {
            println!(
                "key (give it to the client, it is not stored anywhere):\n\n  {}\n",
                key.secret()
            );
            println!("key-file entry:\n{entry}");
        }
        Err(error) => {
            eprintln!("keygen: {error}");
            std::process::exit(2);
        }
    }
}
