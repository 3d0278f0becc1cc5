//! Builds the XDP program (`router-ebpf`) and hands its path to the daemon,
//! which embeds the object with `include_bytes_aligned!`.
//!
//! The eBPF crate needs Debian's rustc 1.96 with its ready-built `core` for
//! `bpfel-unknown-none`, and bpf-linker on PATH: rustup's toolchains here have
//! no `rust-src` (see the project's TOOLCHAIN notes). `cargo xtask build`
//! installs both; this script only uses them, so a plain `cargo build` works
//! once they are installed and says what to run when they are not.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    println!("cargo:rerun-if-env-changed=M2M_ROUTER_EBPF_OBJ");
    if let Ok(prebuilt) = env::var("M2M_ROUTER_EBPF_OBJ") {
        println!("cargo:rustc-env=M2M_ROUTER_EBPF_OBJ={prebuilt}");
        return;
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().expect("router/ sits in the workspace");
    for dir in [
        "router-ebpf/src",
        "router-ebpf/Cargo.toml",
        "router-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("ebpf");
    let tools_bin = tools_bin();
    for (what, path) in [
        (
            "Debian's rustc (package rustc-web)",
            PathBuf::from(DEBIAN_RUSTC),
        ),
        (
            "Debian's cargo (package cargo-web)",
            PathBuf::from(DEBIAN_CARGO),
        ),
        ("bpf-linker 0.13.0", tools_bin.join("bpf-linker")),
    ] {
        if !path.exists() {
            panic!(
                "\n\nThe eBPF toolchain is not installed: {what} is missing at {}.\n\
                 Run `cargo xtask build` once; it installs the toolchain and builds everything.\n",
                path.display()
            );
        }
    }

    let mut cargo = Command::new(DEBIAN_CARGO);
    cargo
        .current_dir(workspace)
        .args([
            "build",
            "--package",
            "router-ebpf",
            "--release",
            "--target",
            BPF_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Start from a clean environment: the outer cargo exports RUSTC,
    // RUSTC_WORKSPACE_WRAPPER (clippy), RUSTFLAGS and dozens of CARGO_* build
    // script variables that would steer the inner build to the wrong compiler.
    cargo.env_clear();
    for (key, value) in env::vars_os() {
        let key_str = key.to_string_lossy();
        let keep = matches!(&*key_str, "HOME" | "TMPDIR" | "CARGO_HOME" | "TERM")
            || key_str.ends_with("_proxy")
            || key_str.ends_with("_PROXY")
            || key_str.starts_with("CARGO_NET_")
            || key_str.starts_with("CARGO_HTTP_")
            || key_str.starts_with("CARGO_REGISTRIES_");
        if keep {
            cargo.env(key, value);
        }
    }
    let path = env::var("PATH").unwrap_or_default();
    cargo
        .env("PATH", format!("{}:{path}", tools_bin.display()))
        .env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf and our CAS use unstable features; Debian's stable rustc
        // allows them with this switch.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF (for the verifier log and bpftool) needs debuginfo plus --btf.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    let output = cargo.output().expect("run Debian's cargo");
    if !output.status.success() {
        panic!(
            "\n\nbuilding the XDP program failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join("router-ebpf");
    println!("cargo:rustc-env=M2M_ROUTER_EBPF_OBJ={}", object.display());
}

/// Where `cargo xtask` installs bpf-linker (kept in step with xtask).
fn tools_bin() -> PathBuf {
    if let Some(dir) = env::var_os("M2M_ROUTER_TOOLS") {
        return Path::new(&dir).join("bin");
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("m2m-router").join("tools").join("bin")
}
