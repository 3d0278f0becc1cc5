//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the cargo-fuzz
//! targets in fuzz/ (nightly, libFuzzer) and runs each for N seconds from
//! its committed seed corpus (fuzz/corpus/TARGET). What a run finds goes to
//! target/fuzz-corpus/TARGET, so the committed seeds change only when
//! someone regenerates them (tests/examples/fuzz_seeds.rs); a crash, hang
//! or runaway allocation is written to fuzz/artifacts/TARGET/ and fails
//! the command.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{cargo_bin, run, step, workspace};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
pub const TARGETS: &[&str] = &[
    "coap",
    "coap_client",
    "mqtt_codec",
    "bridge_frames",
    "config",
    "control",
    "spool",
    "classifier",
    "xdp",
];
/// libFuzzer's limits: an input that allocates past this many MiB, or runs
/// longer than this many seconds, is a finding.
const RSS_LIMIT_MB: u32 = 2048;
const TIMEOUT_S: u32 = 10;

pub fn fuzz(seconds: u32, only: &[String]) -> Result<()> {
    let targets: Vec<&str> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in only {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "no fuzz target {t:?}; the targets are {}",
                    TARGETS.join(", ")
                );
            }
        }
        only.iter().map(String::as_str).collect()
    };
    ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let dir = workspace().join("fuzz");
    step("building the fuzz targets (nightly, libFuzzer)");
    // Through rustup: the outer cargo is stable and exports its own paths.
    run(Command::new("rustup")
        .current_dir(&dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "build",
            "--sanitizer",
            "none",
        ])
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    let binaries = dir.join("target/x86_64-unknown-linux-gnu/release");
    for target in targets {
        run_target(&dir, &binaries.join(target), target, seconds)?;
    }
    step("fuzzing found nothing");
    Ok(())
}

fn run_target(dir: &Path, binary: &Path, target: &str, seconds: u32) -> Result<()> {
    let seeds = dir.join("corpus").join(target);
    let found = workspace().join("target/fuzz-corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&found)?;
    std::fs::create_dir_all(&artifacts)?;
    step(&format!("fuzzing {target} for {seconds} s"));
    let output = Command::new(binary)
        .arg(&found)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .output()
        .with_context(|| format!("starting {}", binary.display()))?;
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); the input is in {}:\n{}",
            output.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    if let Some(done) = log.lines().find(|l| l.starts_with("Done ")) {
        step(&format!("  {target}: {done}"));
    }
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("nightly"))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    step("installing the nightly Rust toolchain (cargo-fuzz needs it)");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

fn ensure_cargo_fuzz() -> Result<()> {
    let current = Command::new(cargo_bin())
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if current {
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 30 s, once)"
    ));
    run(Command::new(cargo_bin()).args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]))
}
