//! Control socket lines: parsed as the protocol says, then run against a
//! live control plane (no fast path, so no kernel maps), one change after
//! another. No input may panic; every refusal is an error response; the
//! running configuration stays valid, so `status` and `stats` keep working.

#![no_main]

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use m2m_router::config::ConfigFile;
use m2m_router::control::{server, Control};
use m2m_router::daemon::Running;
use m2m_router::mapping::{Mapper, SharedMapper};
use m2m_router::mqtt::{Broker, BrokerConfig};

fn control() -> &'static Mutex<Control> {
    static CONTROL: OnceLock<Mutex<Control>> = OnceLock::new();
    CONTROL.get_or_init(|| {
        let raw = ConfigFile::parse(
            "[[peer]]\nname = \"meter\"\nprefix = [\"10.0.0.0/24\"]\n",
            Path::new("fuzz.toml"),
        )
        .unwrap();
        let config = raw.clone().validate().unwrap();
        Mutex::new(Control {
            mappers: SharedMapper::new(Mapper::from_config(&config)),
            raw,
            config,
            config_path: None,
            running: Running::detached(Broker::new(BrokerConfig::default())),
            started: Instant::now(),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = server::parse(data) else {
        return;
    };
    // `config.save` writes wherever it is told: not from a fuzzer.
    if request.command.contains("save") {
        return;
    }
    let mut control = control().lock().unwrap();
    let _ = control.execute(&request.command, &request.args);
    // Whatever was accepted left a valid configuration behind.
    assert!(control.raw.clone().validate().is_ok());
    control.execute("status", &serde_json::Value::Null).unwrap();
    control.execute("stats", &serde_json::Value::Null).unwrap();
});
