//! `m2m-router ctl`: one request to the control socket, the answer printed
//! as a table (or JSON with --json). Exit status: 0 done, 1 refused by the
//! daemon (or the daemon is unreachable), 2 usage (clap).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

use super::protocol::{Response, PROTOCOL_VERSION};

pub enum Outcome {
    Done,
    Refused,
}

/// Sends `command` with `args`; prints every response (several with
/// `stats --watch`) until the stream ends or a response is an error.
pub fn run(socket: &Path, command: &str, args: Value, as_json: bool) -> anyhow::Result<Outcome> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the daemon at {}: {e} (is `m2m-router run` up? --socket?)",
            socket.display()
        )
    })?;
    let request = json!({ "id": 1, "version": PROTOCOL_VERSION, "command": command, "args": args });
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    // A refusal (forbidden) may arrive and the socket close before our
    // request is written: the answer still waits to be read.
    let sent = stream.write_all(&line);
    let watch = args.get("watch").and_then(Value::as_bool) == Some(true);
    let mut reader = BufReader::new(stream);
    loop {
        let mut answer = String::new();
        if reader.read_line(&mut answer)? == 0 {
            sent?;
            anyhow::bail!("the daemon closed the connection without answering");
        }
        let response: Response = serde_json::from_str(&answer)?;
        if let Some(err) = response.error {
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "error": err }))?
                );
            } else {
                eprintln!("m2m-router ctl: refused: {err}");
            }
            return Ok(Outcome::Refused);
        }
        let result = response.result.unwrap_or(Value::Null);
        if as_json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            print!("{}", human(command, &result));
        }
        if !watch {
            return Ok(Outcome::Done);
        }
    }
}

fn human(command: &str, v: &Value) -> String {
    let mut out = String::new();
    match command {
        "peer.ls" => {
            out.push_str(&format!(
                "{:<20} {:<6} {:<10} {:<6} {:>10} {:>10}  {}\n",
                "NAME", "DENY", "RATE", "BURST", "ACCEPTED", "DROPPED", "PREFIXES"
            ));
            for p in v["peers"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<20} {:<6} {:<10} {:<6} {:>10} {:>10}  {}\n",
                    p["name"].as_str().unwrap_or(""),
                    p["deny"].as_bool().unwrap_or(false),
                    p["rate"].as_str().unwrap_or("default"),
                    p["burst"]
                        .as_u64()
                        .map_or("default".to_owned(), |b| b.to_string()),
                    p["accepted_packets"].as_u64().unwrap_or(0),
                    p["dropped_packets"].as_u64().unwrap_or(0),
                    p["prefix"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default()
                ));
            }
        }
        "route.ls" => {
            out.push_str(&format!(
                "{:<16} {:<20} {:<12} {:<7} {:<4} {:<6} {}\n",
                "NAME", "MATCH", "PEER", "METHOD", "QOS", "RETAIN", "TOPIC"
            ));
            for r in v["routes"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<16} {:<20} {:<12} {:<7} {:<4} {:<6} {}\n",
                    r["name"].as_str().unwrap_or(""),
                    r["match"].as_str().unwrap_or(""),
                    r["peer"].as_str().unwrap_or("*"),
                    r["method"].as_str().unwrap_or("*"),
                    r["qos"].as_u64().unwrap_or(0),
                    r["retain"].as_bool().unwrap_or(false),
                    r["topic"].as_str().unwrap_or("")
                ));
            }
        }
        "observe.ls" => {
            out.push_str(&format!(
                "{:<16} {:<24} {:<18} {:>8} {:>13} {:<4} {}\n",
                "PEER", "ENDPOINT", "TOKEN", "AGE_S", "NOTIFICATIONS", "ACK?", "TOPIC"
            ));
            for r in v["observers"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<16} {:<24} {:<18} {:>8} {:>13} {:<4} {}\n",
                    r["peer"].as_str().unwrap_or("-"),
                    r["endpoint"].as_str().unwrap_or(""),
                    r["token"].as_str().unwrap_or(""),
                    r["age_s"].as_u64().unwrap_or(0),
                    r["notifications"].as_u64().unwrap_or(0),
                    if r["awaiting_ack"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        ""
                    },
                    r["topic"].as_str().unwrap_or("")
                ));
            }
            // The other direction: the gateway observing devices.
            out.push_str(&format!(
                "\n{:<16} {:<24} {:<12} {:<24} {:>8} {:>13} {}\n",
                "PEER", "PATH", "STATE", "ENDPOINT", "AGE_S", "NOTIFICATIONS", "TOPIC"
            ));
            for w in v["watches"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<16} {:<24} {:<12} {:<24} {:>8} {:>13} {}\n",
                    w["peer"].as_str().unwrap_or(""),
                    w["path"].as_str().unwrap_or(""),
                    w["state"].as_str().unwrap_or(""),
                    w["endpoint"].as_str().unwrap_or("-"),
                    w["age_s"].as_u64().unwrap_or(0),
                    w["notifications"].as_u64().unwrap_or(0),
                    w["topic"].as_str().unwrap_or("")
                ));
            }
        }
        "dtls.ls" => {
            out.push_str(&format!(
                "{:<16} {:<40} {:<9} {:<28} {:<7} {:>8}\n",
                "PEER", "ADDRESS", "OPENED_BY", "CIPHER", "RESUMED", "AGE_S"
            ));
            for s in v["sessions"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<16} {:<40} {:<9} {:<28} {:<7} {:>8}\n",
                    s["peer"].as_str().unwrap_or(""),
                    s["address"].as_str().unwrap_or(""),
                    s["opened_by"].as_str().unwrap_or(""),
                    s["cipher"].as_str().unwrap_or(""),
                    if s["resumed"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        ""
                    },
                    s["age_s"].as_u64().unwrap_or(0),
                ));
            }
        }
        _ => flatten("", v, &mut out),
    }
    out
}

/// `a.b.c  value` lines for any JSON value.
fn flatten(prefix: &str, v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
            let list: Vec<String> = items.iter().map(|i| i.to_string()).collect();
            out.push_str(&format!("{prefix:<44} [{}]\n", list.join(", ")));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        Value::String(s) => out.push_str(&format!("{prefix:<44} {s}\n")),
        other => out.push_str(&format!("{prefix:<44} {other}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtls_sessions_are_a_table() {
        let v = serde_json::json!({ "sessions": [
            { "peer": "meter", "address": "[fd77::1]:40000", "opened_by": "gateway", "cipher": "PSK-AES128-CCM8", "resumed": true, "age_s": 12 }
        ]});
        let table = human("dtls.ls", &v);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("PEER") && lines[0].contains("CIPHER"),
            "{table}"
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "meter",
                "[fd77::1]:40000",
                "gateway",
                "PSK-AES128-CCM8",
                "yes",
                "12"
            ]
        );
    }
}
