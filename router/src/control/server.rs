//! The control socket: a Unix stream socket, mode 0660, owned by the
//! daemon's user and the configured group. Clients are checked with
//! SO_PEERCRED: root, the daemon's own uid, or the group's members.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::protocol::{ApiError, Request, Response, MAX_REQUEST_BYTES, PROTOCOL_VERSION};
use super::Control;

/// Who may talk to the daemon.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub owner_uid: u32,
    pub group_gid: Option<u32>,
}

/// Binds the control socket at `path`. A socket file nobody answers on is
/// stale and replaced; one a live daemon answers on is an error.
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<(UnixListener, Access)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another m2m-router is serving the control socket {} (stop it, or set [control] socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
        tracing::info!(path = %path.display(), "replaced a stale control socket");
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    let group_gid = match group {
        Some(name) => {
            let gid = group_id(name).with_context(|| format!("[control] group {name:?}"))?;
            std::os::unix::fs::chown(path, None, Some(gid))?;
            Some(gid)
        }
        None => None,
    };
    // SAFETY: geteuid has no preconditions.
    let owner_uid = unsafe { libc::geteuid() };
    Ok((
        listener,
        Access {
            owner_uid,
            group_gid,
        },
    ))
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: getgrnam returns a pointer to static storage or null; read at once.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        bail!("no such group");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

pub async fn serve(listener: UnixListener, control: Arc<Mutex<Control>>, access: Access) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, control.clone(), access));
            }
            Err(err) => {
                tracing::warn!(%err, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn allowed(stream: &UnixStream, access: Access) -> bool {
    match stream.peer_cred() {
        Ok(cred) => {
            cred.uid() == 0
                || cred.uid() == access.owner_uid
                || Some(cred.gid()) == access.group_gid
        }
        Err(_) => false,
    }
}

async fn connection(stream: UnixStream, control: Arc<Mutex<Control>>, access: Access) {
    let permitted = allowed(&stream, access);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    if !permitted {
        let refusal = response(
            Value::Null,
            Err(ApiError::new(
                "forbidden",
                "not allowed on this control socket",
                None,
            )),
        );
        let _ = write.write_all(refusal.as_bytes()).await;
        tracing::warn!("refused a control client (SO_PEERCRED)");
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded read: `take` stops a line that never ends at the limit.
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST_BYTES {
            let err = ApiError::new(
                "too_large",
                format!("requests are limited to {MAX_REQUEST_BYTES} bytes"),
                None,
            );
            let _ = write
                .write_all(response(Value::Null, Err(err)).as_bytes())
                .await;
            return;
        }
        let request = match parse(&line) {
            Ok(r) => r,
            Err((id, err)) => {
                if write
                    .write_all(response(id, Err(err)).as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let watch = request.command == "stats"
            && request.args.get("watch").and_then(Value::as_bool) == Some(true);
        let interval = Duration::from_millis(
            request
                .args
                .get("interval_ms")
                .and_then(Value::as_u64)
                .unwrap_or(1000)
                .max(100),
        );
        loop {
            let outcome = run(&control, &request).await;
            let failed = outcome.is_err();
            if request.command.contains('.') && !request.command.ends_with(".ls") {
                match &outcome {
                    Ok(_) => {
                        tracing::info!(command = %request.command, args = %summary(&request.args), "control change applied")
                    }
                    Err(e) => {
                        tracing::info!(command = %request.command, error = %e, "control change refused")
                    }
                }
            }
            if write
                .write_all(response(request.id.clone(), outcome).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            if !watch || failed {
                break;
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// A short, log-friendly view of a request's arguments (a bulk import's
/// 100,000 peers are counted, not printed).
fn summary(args: &Value) -> String {
    match args.get("peers").and_then(Value::as_array) {
        Some(peers) => format!("{} peers", peers.len()),
        None => {
            let s = args.to_string();
            if s.len() > 200 {
                format!(
                    "{}...",
                    &s[..s
                        .char_indices()
                        .take_while(|(i, _)| *i < 200)
                        .last()
                        .map_or(0, |(i, _)| i)]
                )
            } else {
                s
            }
        }
    }
}

fn parse(line: &[u8]) -> Result<Request, (Value, ApiError)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Value::Null,
            ApiError::new("invalid_json", e.to_string(), None),
        )
    })?;
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let request: Request = serde_json::from_value(value)
        .map_err(|e| (id.clone(), ApiError::from_json(&e, "request")))?;
    if request.version != PROTOCOL_VERSION {
        return Err((
            id,
            ApiError::new(
                "unsupported_version",
                format!("protocol version {PROTOCOL_VERSION} is spoken here"),
                Some("version"),
            ),
        ));
    }
    Ok(request)
}

/// Commands run on the blocking pool: a bulk import writes 100,000 map
/// entries, which must not stall the broker on the runtime thread.
async fn run(control: &Arc<Mutex<Control>>, request: &Request) -> Result<Value, ApiError> {
    let control = control.clone();
    let command = request.command.clone();
    let args = request.args.clone();
    tokio::task::spawn_blocking(move || control.lock().unwrap().execute(&command, &args))
        .await
        .unwrap_or_else(|e| Err(ApiError::new("internal", e.to_string(), None)))
}

fn response(id: Value, outcome: Result<Value, ApiError>) -> String {
    let (result, error) = match outcome {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let mut line =
        serde_json::to_string(&Response { id, result, error }).expect("responses serialise");
    line.push('\n');
    line
}
