//! The control socket: a Unix stream socket, mode 0660, owned by the
//! daemon's user and the configured group. Clients are checked with
//! SO_PEERCRED: root, the daemon's own uid, or the group's members.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

use super::protocol::{ApiError, Request, Response, MAX_REQUEST_BYTES, PROTOCOL_VERSION};
use super::Control;
use crate::listener::{AcceptFailures, ListenerStats, Slot};

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

/// How much the control socket takes from its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// A client that sends no complete request, or does not read its
    /// response, for this long is disconnected.
    pub idle_timeout: Duration,
}

/// Bytes of requests being read or run, all connections together: room for
/// two bulk imports at once, and a bound however many clients send.
pub const MAX_BUFFERED_BYTES: usize = 2 * MAX_REQUEST_BYTES;

pub async fn serve(
    listener: UnixListener,
    control: Arc<Mutex<Control>>,
    access: Access,
    limits: Limits,
    stats: Arc<ListenerStats>,
) {
    let buffered = Arc::new(AtomicUsize::new(0));
    let mut failures = AcceptFailures::new("control");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failures.accepted();
                let Some(slot) = stats.admit(limits.max_connections) else {
                    let busy = ApiError::new(
                        "busy",
                        format!(
                            "{} control connections are open; retry later",
                            limits.max_connections
                        ),
                        None,
                    );
                    // Best effort: the socket buffer of a new connection has room.
                    let _ = stream.try_write(response(Value::Null, Err(busy)).as_bytes());
                    continue;
                };
                let session = Session {
                    control: control.clone(),
                    limits,
                    stats: stats.clone(),
                    buffered: buffered.clone(),
                    _slot: slot,
                };
                tokio::spawn(session.run(stream, access));
            }
            Err(err) => failures.failed(err, &stats.accept_errors).await,
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

/// One client connection.
struct Session {
    control: Arc<Mutex<Control>>,
    limits: Limits,
    stats: Arc<ListenerStats>,
    buffered: Arc<AtomicUsize>,
    _slot: Slot,
}

/// How reading one request ended.
enum Read {
    Request,
    Closed,
    TooLarge,
    /// The shared [`MAX_BUFFERED_BYTES`] were taken by other clients.
    Busy,
}

impl Session {
    async fn run(self, stream: UnixStream, access: Access) {
        let permitted = allowed(&stream, access);
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        if !permitted {
            let refusal = ApiError::new("forbidden", "not allowed on this control socket", None);
            let _ = self.send(&mut write, Value::Null, Err(refusal)).await;
            tracing::warn!("refused a control client (SO_PEERCRED)");
            return;
        }
        loop {
            // A fresh buffer and reservation per request: neither a bulk
            // import's 64 MiB nor its share of the budget outlives it.
            let mut line = Vec::new();
            let mut reservation = Reservation {
                budget: &self.buffered,
                bytes: 0,
            };
            let read = timeout(
                self.limits.idle_timeout,
                read_request(&mut reader, &mut line, &mut reservation),
            )
            .await;
            let refusal = match read {
                Ok(Read::Request) => None,
                Ok(Read::Closed) => return,
                Ok(Read::TooLarge) => Some(ApiError::new(
                    "too_large",
                    format!("requests are limited to {MAX_REQUEST_BYTES} bytes"),
                    None,
                )),
                Ok(Read::Busy) => Some(ApiError::new(
                    "busy",
                    format!(
                        "other clients' requests fill the control socket's {MAX_BUFFERED_BYTES} bytes; retry later"
                    ),
                    None,
                )),
                Err(_) => {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    Some(ApiError::new(
                        "timeout",
                        format!(
                            "no complete request in {} s",
                            self.limits.idle_timeout.as_secs()
                        ),
                        None,
                    ))
                }
            };
            if let Some(refusal) = refusal {
                let _ = self.send(&mut write, Value::Null, Err(refusal)).await;
                return;
            }
            let parsed = parse(&line);
            drop(line);
            let request = match parsed {
                Ok(r) => r,
                Err((id, err)) => {
                    if self.send(&mut write, id, Err(err)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            // The budget share stays while a request is parsed and run (its
            // parsed form is what costs), except for a watch, which never
            // ends and holds only its small arguments.
            if is_watch(&request) {
                drop(reservation);
            }
            if self.answer(&mut write, &request).await.is_err() {
                return;
            }
        }
    }

    /// Runs `request` and writes its response; a `stats` watch repeats
    /// until the client goes away.
    async fn answer(&self, write: &mut OwnedWriteHalf, request: &Request) -> Result<(), ()> {
        let watch = is_watch(request);
        let interval = Duration::from_millis(
            request
                .args
                .get("interval_ms")
                .and_then(Value::as_u64)
                .unwrap_or(1000)
                .max(100),
        );
        loop {
            let outcome = run(&self.control, request).await;
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
            self.send(write, request.id.clone(), outcome).await?;
            if !watch || failed {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Writes one response; a client that does not take it within the
    /// idle timeout is given up.
    async fn send(
        &self,
        write: &mut OwnedWriteHalf,
        id: Value,
        outcome: Result<Value, ApiError>,
    ) -> Result<(), ()> {
        match timeout(
            self.limits.idle_timeout,
            write.write_all(response(id, outcome).as_bytes()),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(()),
            Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(())
            }
        }
    }
}

fn is_watch(request: &Request) -> bool {
    request.command == "stats" && request.args.get("watch").and_then(Value::as_bool) == Some(true)
}

/// One request's share of [`MAX_BUFFERED_BYTES`], given back on drop.
struct Reservation<'a> {
    budget: &'a AtomicUsize,
    bytes: usize,
}

impl Reservation<'_> {
    fn grow(&mut self, n: usize) -> bool {
        let taken = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= MAX_BUFFERED_BYTES).then_some(used + n)
            })
            .is_ok();
        if taken {
            self.bytes += n;
        }
        taken
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads one request line (its newline included) into `line`, taking each
/// chunk from the shared budget before keeping it. A last line without a
/// newline before the client shuts its side counts as a request.
async fn read_request(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    reservation: &mut Reservation<'_>,
) -> Read {
    loop {
        let available = match reader.fill_buf().await {
            Ok([]) if !line.is_empty() => return Read::Request,
            Ok([]) | Err(_) => return Read::Closed,
            Ok(bytes) => bytes,
        };
        let (take, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > MAX_REQUEST_BYTES {
            return Read::TooLarge;
        }
        if !reservation.grow(take) {
            return Read::Busy;
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if complete {
            return Read::Request;
        }
    }
}

/// A short, log-friendly view of a request's arguments (a bulk import's
/// 100,000 peers are counted, not printed).
/// What the log says of a request's arguments: short, and never a key.
fn summary(args: &Value) -> String {
    match args.get("peers").and_then(Value::as_array) {
        Some(peers) => format!("{} peers", peers.len()),
        None => {
            let mut args = args.clone();
            if let Some(key) = args.get_mut("psk_hex") {
                *key = Value::from("(set)");
            }
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

/// One request line as the protocol defines it; on refusal, the id to
/// echo (when one could be read) and the error.
pub fn parse(line: &[u8]) -> Result<Request, (Value, ApiError)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_never_shows_a_key() {
        let args = serde_json::json!({ "name": "v", "psk_identity": "v-1", "psk_hex": "0011aabb" });
        let logged = summary(&args);
        assert!(!logged.contains("0011aabb"), "{logged}");
        assert!(
            logged.contains("v-1") && logged.contains("(set)"),
            "{logged}"
        );
    }
}
