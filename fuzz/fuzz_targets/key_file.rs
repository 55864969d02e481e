//! Any bytes as a key file: never a panic, and no secret-looking value from the file
//! in an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tower_api_key::FileSource;

fuzz_target!(|data: &[u8]| {
    match FileSource::parse(Path::new("keys.toml"), data) {
        Ok(set) => {
            for key in set.iter() {
                let _ = format!("{key:?}");
            }
        }
        Err(error) => {
            let message = error.to_string();
            // A value written as `secret = "<value>"` never reaches the message.
            if let Ok(text) = std::str::from_utf8(data) {
                for line in text.lines() {
                    if let Some(value) = line.trim().strip_prefix("secret = \"") {
                        let value = value.trim_end_matches('"');
                        // Only where the value stands nowhere else in the file (an id
                        // or a field name may legitimately be named).
                        if value.len() >= 8
                            && value.bytes().all(|b| b.is_ascii_alphanumeric())
                            && text.matches(value).count() == 1
                        {
                            assert!(!message.contains(value), "{message}");
                        }
                    }
                }
            }
        }
    }
});
