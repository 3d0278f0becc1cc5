//! Config file text: parsed and validated, never a panic; a file that is
//! valid is valid again after `config save` writes it back.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use m2m_router::config::ConfigFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = ConfigFile::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    if file.clone().validate().is_err() {
        return;
    }
    let saved = file.to_toml();
    let again = ConfigFile::parse(&saved, Path::new("saved.toml")).and_then(ConfigFile::validate);
    if let Err(err) = again {
        panic!("valid config invalid once saved: {err}\n--- saved:\n{saved}");
    }
});
