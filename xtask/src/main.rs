//! `cargo xtask <command>`: sets up what a fresh machine lacks, then builds,
//! runs or tests m2m-router. Every step says what it does and is skipped when
//! already done, so running it twice costs nothing.
//!
//!   cargo xtask build            toolchain + eBPF object + release daemon
//!   cargo xtask run -- ARGS      build, then `m2m-router ARGS` (as root)
//!   cargo xtask test             toolchain + test tools, fmt, clippy, all tests
//!   cargo xtask bootstrap        only install what is missing
//!   cargo xtask bench-peers      the systems the benchmarks compare against
//!   cargo xtask bench [--quick]  run every benchmark, rewrite the generated
//!                                part of BENCHMARKS.md
//!   cargo xtask fuzz [--seconds N] [TARGET...]
//!                                run the fuzz targets (default 60 s each)

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

mod bench;
mod fuzz;

/// Debian packages for building the eBPF side (see TOOLCHAIN notes):
/// Debian's Rust 1.96 with a ready-built `core` for bpfel-unknown-none, and
/// the LLVM 22 library bpf-linker links against.
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "libllvm22",
    // The openssl crate links Debian's OpenSSL 3 (DTLS), found by pkg-config.
    "libssl-dev",
    "pkg-config",
];
/// Extra packages the tests use: `ip` for network namespaces, `ping`,
/// `coap-client` as a real device, `mosquitto_sub` as a real subscriber and
/// `mosquitto` as a real upstream broker,
/// bpftool to inspect attachments, nft to count what reaches a gateway's IP
/// stack, promtool (package prometheus) to check
/// the metrics exposition, openssl to make test certificates.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "libcoap3-bin",
    "mosquitto",
    "mosquitto-clients",
    "bpftool",
    "prometheus",
    "openssl",
    "e2fsprogs", // mkfs.ext4 for the spool-on-a-loop-device test
    "nftables",  // nft counts what reaches the gateway's IP stack (restart test)
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS_IN_TESTS: u32 = 10;

fn main() -> ExitCode {
    let args: Vec<OsString> = env::args_os().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[OsString]) -> Result<()> {
    let command = args.first().and_then(|a| a.to_str()).unwrap_or("help");
    let rest = args.get(1..).unwrap_or_default();
    let rest = match rest.first().and_then(|a| a.to_str()) {
        Some("--") => &rest[1..],
        _ => rest,
    };
    match command {
        "bootstrap" => {
            ensure_packages(BUILD_PACKAGES)?;
            ensure_packages(TEST_PACKAGES)?;
            ensure_bpf_linker()
        }
        "build" => build(),
        "run" => {
            build()?;
            let binary = workspace().join("target/release/m2m-router");
            step(&format!("running {} {}", binary.display(), join(rest)));
            let err = exec(Command::new(&binary).args(rest));
            Err(err).context("starting m2m-router")
        }
        "test" => test(rest),
        "bench-peers" => bench_peers(),
        "bench" => bench(rest.iter().any(|a| a == "--quick")),
        "soak" => soak(rest),
        "fuzz" => {
            let mut seconds = 60;
            let mut targets = Vec::new();
            let mut args = rest.iter().map(|a| a.to_string_lossy().into_owned());
            while let Some(arg) = args.next() {
                if arg == "--seconds" {
                    seconds = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .context("--seconds takes a number")?;
                } else {
                    targets.push(arg);
                }
            }
            ensure_packages(BUILD_PACKAGES)?;
            ensure_bpf_linker()?;
            fuzz::fuzz(seconds, &targets)
        }
        "help" | "--help" | "-h" => {
            println!(
                "usage: cargo xtask <bootstrap | build | run -- ARGS | test [-- CARGO TEST ARGS] | bench-peers | bench [--quick] | soak [-- SOAK ARGS] | fuzz [--seconds N] [TARGET...]>"
            );
            Ok(())
        }
        other => bail!("unknown command {other:?}; try `cargo xtask help`"),
    }
}

/// The systems m2m-router is measured beside (benches/src/e2e.rs): a Python
/// venv with aiocoap and paho-mqtt (PyPI), Node-RED 4 with
/// node-red-contrib-coap (npm; Node-RED 5 needs Node 22, the machine has 20),
/// and nftables.
fn bench_peers() -> Result<()> {
    ensure_packages(TEST_PACKAGES)?;
    ensure_packages(&["nftables"])?;
    let peers = tools_root().parent().unwrap().join("peers");
    let node_red = peers.join("node-red");
    if !node_red.join("node_modules/.bin/node-red").exists() {
        step(&format!(
            "installing node-red@4 and node-red-contrib-coap@0.6.0 into {}",
            node_red.display()
        ));
        std::fs::create_dir_all(&node_red)?;
        if !node_red.join("package.json").exists() {
            std::fs::write(
                node_red.join("package.json"),
                "{\"name\": \"m2m-router-bench-peers\", \"private\": true}\n",
            )?;
        }
        run(Command::new("npm").current_dir(&node_red).args([
            "install",
            "--no-audit",
            "--no-fund",
            "node-red@4",
            "node-red-contrib-coap@0.6.0",
        ]))?;
    }
    ensure_python_peers().map(drop)
}

/// A Python venv with aiocoap and paho-mqtt (PyPI), for the benchmarks'
/// peers and the tests that use aiocoap as a device; returns its python.
fn ensure_python_peers() -> Result<PathBuf> {
    let venv = tools_root().parent().unwrap().join("peers").join("venv");
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import aiocoap, paho.mqtt"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(python);
    }
    ensure_packages(&["python3-venv"])?;
    step(&format!(
        "installing aiocoap 0.4.17 and paho-mqtt 2.2 into {}",
        venv.display()
    ));
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "aiocoap==0.4.17",
        "paho-mqtt==2.2.*",
    ]))?;
    Ok(python)
}

/// Runs the benchmarks (root: namespaces and XDP) and rewrites the
/// generated part of BENCHMARKS.md; see bench.rs.
fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load XDP programs and create network namespaces: run as root");
    }
    ensure_packages(BUILD_PACKAGES)?;
    ensure_bpf_linker()?;
    bench_peers()?;
    // perf profiles the router at its capacity (bench.rs); xdp-cost runs
    // xdp-filter (xdp-tools) beside the fast path.
    ensure_packages(&["linux-perf", "xdp-tools"])?;
    build_release()?;
    let generated = bench::run(&workspace().join("target/release"), quick)?;
    let path = workspace().join("BENCHMARKS.md");
    bench::write(&path, &generated)?;
    step(&format!("wrote {}", path.display()));
    Ok(())
}

/// The soak benchmark (benches/src/soak): half an hour at half capacity
/// with churn; writes docs/soak.csv and docs/soak.png and prints a summary
/// for BENCHMARKS.md. `rest` goes to the soak binary (`--minutes`, ...).
fn soak(rest: &[OsString]) -> Result<()> {
    if !is_root() {
        bail!("the soak loads XDP programs and creates network namespaces: run as root");
    }
    ensure_packages(BUILD_PACKAGES)?;
    ensure_packages(TEST_PACKAGES)?;
    // The plot's labels are drawn with DejaVu Sans.
    ensure_packages(&["fonts-dejavu-core"])?;
    ensure_bpf_linker()?;
    build_release()?;
    let soak = workspace().join("target/release/soak");
    step(&format!("running {} {}", soak.display(), join(rest)));
    run(Command::new(soak).args(rest).current_dir(workspace()))
}

/// The router and the benchmark binaries, optimised.
fn build_release() -> Result<()> {
    step("building everything (release)");
    cargo(&[
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "router-ebpf",
    ])
}

fn build() -> Result<()> {
    ensure_packages(BUILD_PACKAGES)?;
    ensure_bpf_linker()?;
    step("building the XDP program and the daemon (release)");
    cargo(&["build", "--release", "--package", "m2m-router"])
}

fn test(extra: &[OsString]) -> Result<()> {
    if !is_root() {
        bail!(
            "the test suite loads XDP programs and creates network namespaces: run it as root \
             (the privileged tests would fail, not skip)"
        );
    }
    ensure_packages(BUILD_PACKAGES)?;
    ensure_packages(TEST_PACKAGES)?;
    ensure_bpf_linker()?;
    step("checking formatting (cargo fmt --check)");
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"])?;
    step("linting (cargo clippy, warnings are errors)");
    // Default members only (no --workspace): router-ebpf builds for the BPF
    // target alone; router/build.rs builds it and the tests load it.
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    step("running every test, the privileged ones included");
    // aiocoap is a device in the tests, as libcoap's clients are.
    let python = ensure_python_peers()?;
    let mut args: Vec<OsString> = ["test"].iter().map(Into::into).collect();
    args.extend(extra.iter().cloned());
    let status = Command::new(cargo_bin())
        .current_dir(workspace())
        .args(&args)
        .env("M2M_TEST_PYTHON", &python)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("tests failed");
    }
    step("all tests passed");
    // The whole suite (no test filter given) also runs every fuzz target
    // briefly: the parsers' seeds and a few seconds of mutations each.
    if extra.is_empty() {
        fuzz::fuzz(FUZZ_SECONDS_IN_TESTS, &[])?;
    }
    Ok(())
}

/// Installs the Debian packages of `wanted` that are not installed yet.
fn ensure_packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: install them with `sudo apt-get install {}` or run as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get")
        .arg("update")
        .arg("-q")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

/// Where bpf-linker is installed; router/build.rs looks in the same place.
fn tools_root() -> PathBuf {
    if let Some(dir) = env::var_os("M2M_ROUTER_TOOLS") {
        return PathBuf::from(dir);
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("m2m-router").join("tools")
}

/// bpf-linker 0.13.0 built against Debian's LLVM 22. A plain
/// `cargo install bpf-linker` would find LLVM 14's llvm-config and fail, so
/// its build script gets a prefix whose lib/ holds an unversioned libLLVM.so.
fn ensure_bpf_linker() -> Result<()> {
    let root = tools_root();
    let linker = root.join("bin/bpf-linker");
    let current = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if current {
        return Ok(());
    }
    let libllvm = find_libllvm22().context("libLLVM 22 not found (Debian package libllvm22)")?;
    let prefix = root.join("llvm22");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22) into {} (about 90 s, once)",
        root.display()
    ));
    run(Command::new(cargo_bin())
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix))
}

fn find_libllvm22() -> Option<PathBuf> {
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ];
    dirs.iter().find_map(|dir| {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so.22") || n == "libLLVM-22.so")
            })
    })
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo_bin() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(cargo_bin())
        .current_dir(workspace())
        .args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn exec(cmd: &mut Command) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    cmd.exec()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn join(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
