//! The `m2m-router` binary run inside a test namespace, its output lines
//! collected so tests can wait for what it says.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use crate::netns::{Netns, DEADLINE};

pub struct Daemon {
    child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    /// The daemon's control socket (unique per test unless given).
    pub socket: String,
    bin: String,
}

impl Daemon {
    /// `BIN run ARGS` inside `ns`, logging at info.
    pub fn start(ns: &Netns, bin: &str, args: &[&str]) -> Daemon {
        // The file system is shared by all namespaces: each daemon gets its
        // own control socket unless the test names one.
        let socket = match args.iter().position(|a| *a == "--control-socket") {
            Some(i) => args[i + 1].to_owned(),
            None => format!("/tmp/{}.sock", ns.name()),
        };
        let mut cmd = ns.command(bin);
        cmd.arg("run").args(args);
        if !args.contains(&"--control-socket") {
            cmd.args(["--control-socket", &socket]);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start m2m-router");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
            socket,
            bin: bin.to_owned(),
        }
    }

    /// `BIN run --iface <gateway veth> --xdp-mode native --config CONFIG`
    /// in the gateway namespace `ns`, once it says it is running: how most
    /// tests run the router.
    pub fn on_gateway(ns: &Netns, bin: &str, config: &str) -> Daemon {
        Daemon::running(
            ns,
            bin,
            &[
                "--iface",
                crate::netns::GW_IF,
                "--xdp-mode",
                "native",
                "--config",
                config,
            ],
        )
    }

    /// Starts and waits until the daemon says it is running.
    pub fn running(ns: &Netns, bin: &str, args: &[&str]) -> Daemon {
        let mut d = Daemon::start(ns, bin, args);
        d.expect_line("m2m-router running");
        d
    }

    /// `m2m-router ctl --json ARGS` against this daemon.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        self.ctl().json(args)
    }

    /// A handle on the control socket that other threads may use.
    pub fn ctl(&self) -> Ctl {
        Ctl {
            bin: self.bin.clone(),
            socket: self.socket.clone(),
        }
    }

    /// Polls `ctl --json ARGS` until `done` holds (failing after `limit`);
    /// returns the answer that satisfied it.
    pub fn wait_ctl(
        &self,
        args: &[&str],
        limit: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.ctl_json(args);
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "ctl {args:?} did not reach the expected state within {limit:?}: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to [`DEADLINE`]) for an output line containing `needle`.
    pub fn expect_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no line containing {needle:?}; output so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// The counter `section.name` of `ctl stats` (e.g. `coap`, `duplicates`).
    /// Through the control socket, not a SIGUSR1 report: lines of an older
    /// report still queued would be read first.
    pub fn counter(&self, section: &str, name: &str) -> u64 {
        let stats = self.ctl_json(&["stats"]);
        stats[section][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {section}.{name} in {stats}"))
    }

    /// The daemon's pid (`ip netns exec` execs the binary).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // `ip netns exec` execs the binary, so the child's pid is the daemon's.
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Like `stop`, printing the daemon's output to stderr if `show`.
    pub fn stop_and_show(mut self, show: bool) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        self.expect_line("m2m-router stopped");
        if show {
            eprintln!("{}", self.seen.join("\n"));
        }
        assert!(status.success(), "exit {status}");
    }

    /// SIGTERM; the daemon must exit successfully.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        self.expect_line("m2m-router stopped");
        assert!(
            status.success(),
            "exit {status}; output:\n{}",
            self.seen.join("\n")
        );
    }
}

/// `m2m-router ctl` against one daemon's control socket.
#[derive(Clone, Debug)]
pub struct Ctl {
    bin: String,
    socket: String,
}

impl Ctl {
    /// `ctl --json ARGS`; the request must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.try_json(args)
            .unwrap_or_else(|err| panic!("ctl {args:?}: {err}"))
    }

    /// `ctl --json ARGS`, or what it printed on failure.
    pub fn try_json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = std::process::Command::new(&self.bin)
            .args(["ctl", "--socket", &self.socket, "--json"])
            .args(args)
            .output()
            .expect("m2m-router ctl");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("ctl --json prints JSON"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave the daemon behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            // A killed daemon leaves its control socket file behind.
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}
