//! The gateway observing devices: the endpoint task's side of
//! `coap::watch`. It registers each watch on its peer's endpoint (the
//! configured one, else the latest uplink source, as commands do), and
//! publishes every fresh notification on the topic a POST of that path
//! from that endpoint maps to, so subscribers see device data the same way
//! whether the device pushed it by POST or by Observe. A CON notification
//! is acknowledged only once its publication is durable (invariant 1). A
//! notification larger than a block carries its first Block2 block: the
//! rest is fetched with GET, checked against its ETag, and the whole value
//! published once (RFC 7959 section 3.4; the notification itself is
//! acknowledged at once, as the RFC has it).

use crate::coap::Endpoint;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

use super::{count, Command, Downlink, Key, MAX_RESPONSE_BODY};
use crate::coap::block::Block;
use crate::coap::client;
use crate::coap::message::{self, code, option, Message, ACK, CON};
use crate::coap::request::content_type;
use crate::coap::watch::{self, Fresh, Origin, WatchId, Watches, DEFAULT_MAX_AGE};
use crate::mapping;
use crate::mqtt::Message as MqttMessage;

/// Notifications whose publication is being made durable, at most: past
/// it a CON notification is left unacknowledged, so the device sends it
/// again later.
const MAX_COMMITTING: usize = 4096;

/// A notification whose value comes in Block2 blocks, being fetched.
pub struct Fetch {
    endpoint: Endpoint,
    path: String,
    body: Vec<u8>,
    etag: Option<Vec<u8>>,
    format: Option<u32>,
}

/// What became of a notification handed to the broker.
enum Publish {
    /// Staged: durable once the ticket's commit succeeds (None: already).
    Staged(Option<crate::mqtt::sink::Ticket>),
    /// It can never be published (no topic for it, a partial value).
    Never(String),
    /// Storage refused it for now.
    Refused,
}

/// A notification's publication made durable, or not.
pub struct Committed {
    id: WatchId,
    /// The relation's token: a failure undoes freshness only if the watch
    /// is still in that relation.
    token: Vec<u8>,
    src: Endpoint,
    mid: u16,
    seq: Option<u32>,
    before: Option<(u32, Instant)>,
    ok: bool,
}

impl Downlink {
    fn watches(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.watches.lock().unwrap()
    }

    pub(super) fn next_watch_due(&self) -> Option<Instant> {
        self.watches().next_due()
    }

    /// Follows `[[peer]] observe` when the configuration changed.
    pub(super) fn sync_watches(&mut self) {
        let (generation, mapper) = self.mappers.load();
        if self.watches_generation == Some(generation) {
            return;
        }
        self.watches_generation = Some(generation);
        let configured = mapper.peers().filter(|p| !p.deny).flat_map(|p| {
            p.observe
                .iter()
                .map(move |path| (p.name.as_str(), path.as_str()))
        });
        let exists = |peer: &str| mapper.peer_by_name(peer).is_some_and(|p| !p.deny);
        let (removed, refused) = self.watches().sync(configured, exists, Instant::now());
        for (id, w) in removed {
            self.drop_watch(id, &w);
        }
        // A configured endpoint that changed: the relation moves there.
        let now = Instant::now();
        let peers = self.watches().peers();
        for (id, peer) in peers {
            let target = self.endpoint_of(&mapper, &peer);
            let moved = self
                .watches()
                .get_mut(id)
                .is_some_and(|w| w.endpoint.is_some() && target.is_some() && w.endpoint != target);
            if moved {
                self.register_watch(id, now);
            }
        }
        if refused > 0 {
            tracing::warn!(
                refused,
                max = watch::MAX_WATCHES,
                "observe: too many watches"
            );
            self.stats
                .watch_refused
                .fetch_add(refused as u64, Ordering::Relaxed);
        }
        self.update_watching();
    }

    /// Ends watch `id`'s exchange and relation: the device's next
    /// notification is answered RST (RFC 7641 section 3.6).
    fn drop_watch(&mut self, id: WatchId, w: &watch::Watch) {
        self.client.cancel(&Key::Watch(id));
        self.client.cancel(&Key::WatchBlock(id));
        self.fetches.remove(&id);
        if let (Some(endpoint), Some(token)) = (w.endpoint, w.token) {
            self.client.forget(endpoint, token);
        }
    }

    /// Registers (or renews) the watches whose time came.
    pub(super) fn watches_due(&mut self) {
        let now = Instant::now();
        let due = self.watches().due(now);
        for id in due {
            let lost = self
                .watches()
                .get_mut(id)
                .is_some_and(|w| w.state == watch::State::Observing);
            if lost {
                count(&self.stats.watch_lost);
                self.log_watch(id, "no notification within Max-Age: registering again");
            }
            self.register_watch(id, now);
        }
    }

    /// Sends watch `id`'s registration: GET with Observe 0 (RFC 7641
    /// section 3.1), renewing the relation's token at the same endpoint.
    fn register_watch(&mut self, id: WatchId, now: Instant) {
        let (_, mapper) = self.mappers.load();
        let peer = match self.watches().get_mut(id) {
            Some(w) => w.peer.clone(),
            None => return,
        };
        let endpoint = self.endpoint_of(&mapper, &peer);
        let mut watches = self.watches.lock().unwrap();
        let Some(w) = watches.get_mut(id) else {
            return;
        };
        let Some(endpoint) = endpoint else {
            return w.unreachable(now);
        };
        let mut token = w.token;
        if w.endpoint != Some(endpoint) {
            // Another endpoint: the old relation is dropped there.
            if let (Some(old), Some(t)) = (w.endpoint, w.token) {
                self.client.forget(old, t);
            }
            token = None;
        }
        let mut opts: Vec<(u16, &[u8])> = vec![(option::OBSERVE, &[])];
        opts.extend(w.segments().map(|s| (option::URI_PATH, s.as_bytes())));
        let (token, datagram) =
            self.client
                .register(Key::Watch(id), endpoint, token, code::GET, &opts, now);
        self.transport.send(endpoint, datagram);
        w.registering(endpoint, token);
        count(&self.stats.watch_registrations);
    }

    /// The device of `peer` was heard from (after a failure, or at a new
    /// address): its waiting watches, and those with a relation at another
    /// endpoint, register now.
    pub(super) fn watch_heard_from(&mut self, peer: &str) {
        let (_, mapper) = self.mappers.load();
        let Some(endpoint) = self.endpoint_of(&mapper, peer) else {
            return;
        };
        let ids = self.watches().of(peer);
        let now = Instant::now();
        for id in ids {
            let register = self
                .watches()
                .get_mut(id)
                .is_some_and(|w| w.heard_from(endpoint));
            if register {
                self.register_watch(id, now);
            }
        }
    }

    /// The registration of watch `id` failed, or its relation ended.
    pub(super) fn watch_failed(&mut self, id: WatchId, why: &str) {
        count(&self.stats.watch_lost);
        self.log_watch(id, why);
        let mut watches = self.watches.lock().unwrap();
        if let Some(w) = watches.get_mut(id) {
            if let (Some(endpoint), Some(token)) = (w.endpoint, w.token) {
                self.client.forget(endpoint, token);
            }
            w.token = None;
            w.failed(Instant::now());
            // The device's next uplink, even from the same address, tries
            // again at once.
            self.last_seen.await_uplink(&w.peer);
        }
        drop(watches);
        self.update_watching();
    }

    fn log_watch(&self, id: WatchId, why: &str) {
        if let Some(w) = self.watches().get_mut(id) {
            tracing::info!(peer = %w.peer, path = %w.path, endpoint = ?w.endpoint, "observe: {why}");
        }
    }

    fn update_watching(&self) {
        let observing = self.watches().observing();
        self.stats
            .watching
            .store(observing as u64, Ordering::Relaxed);
    }

    /// A response to watch `id`'s registration (piggybacked, `separate`
    /// false) or one of its notifications (`separate`: a CON one is to be
    /// acknowledged).
    pub(super) fn watched(&mut self, id: WatchId, src: Endpoint, msg: &Message, separate: bool) {
        let con = separate && msg.mtype == CON;
        if con && self.committing.contains(&(src, msg.mid)) {
            return; // retransmitted while the first copy is being kept
        }
        let now = Instant::now();
        let option_value = |number| {
            msg.options()
                .find(|(n, _)| *n == number)
                .and_then(|(_, v)| message::uint_option(v))
        };
        // RFC 7641 section 3.2: a response other than 2.xx ends the relation.
        if msg.code >> 5 != 2 {
            if con {
                self.ack(src, msg.mid);
            }
            let why = format!("the device answered {}", super::coap_code(msg.code));
            return self.watch_failed(id, &why);
        }
        // Observe numbers are 24 bits (RFC 7641 section 2).
        let seq = option_value(option::OBSERVE).map(|v| v & 0xff_ffff);
        let max_age = option_value(option::MAX_AGE).unwrap_or(DEFAULT_MAX_AGE);
        let fresh = self.watches().get_mut(id).map(|w| {
            (
                w.notified(seq, max_age, now),
                w.peer.clone(),
                w.path.clone(),
            )
        });
        self.update_watching();
        let (before, path) = match fresh {
            None => return, // removed meanwhile; its token is forgotten
            Some((Fresh::No, ..)) => {
                count(&self.stats.watch_stale);
                if con {
                    self.ack(src, msg.mid);
                }
                return;
            }
            Some((Fresh::Yes(before), _, path)) => (before, path),
        };
        if con && self.committing.len() >= MAX_COMMITTING {
            // Too many being stored: not taken, not acknowledged; the
            // device sends it again, fresh again then.
            return self.unpublished(id, seq, before);
        }
        // A newer state: a fetch of an older one in blocks is moot.
        if self.fetches.remove(&id).is_some() {
            self.client.cancel(&Key::WatchBlock(id));
        }
        let format = option_value(option::CONTENT_FORMAT);
        let block2 = msg
            .options()
            .find(|(n, _)| *n == option::BLOCK2)
            .and_then(|(_, v)| Block::parse(v));
        let published = match block2 {
            Some(b) if b.num == 0 && b.more && msg.payload.len() == b.size() => {
                if con {
                    self.ack(src, msg.mid);
                }
                let etag = msg
                    .options()
                    .find(|(n, _)| *n == option::ETAG)
                    .map(|(_, v)| v.to_vec());
                let fetch = Fetch {
                    endpoint: src,
                    path,
                    body: msg.payload.to_vec(),
                    etag,
                    format,
                };
                let next = Block {
                    num: 1,
                    more: false,
                    szx: b.szx,
                };
                self.request_block(id, fetch, next);
                return;
            }
            Some(b) if b.num != 0 || b.more => Publish::Never(
                "a notification with a Block2 block that is not a whole first block".to_owned(),
            ),
            _ => {
                let payload = Bytes::copy_from_slice(msg.payload);
                self.publish_watched(id, src, &path, payload, format)
            }
        };
        match published {
            Publish::Staged(Some(ticket)) if con => {
                self.committing.insert((src, msg.mid));
                let (broker, done) = (self.broker.clone(), self.committed.clone());
                let (mid, token) = (msg.mid, msg.token.to_vec());
                tokio::spawn(async move {
                    let ok = broker.commit_async(ticket).await.is_ok();
                    let _ = done.send(Committed {
                        id,
                        token,
                        src,
                        mid,
                        seq,
                        before,
                        ok,
                    });
                });
            }
            // Storage refused it: not acknowledged, so the device sends it
            // again, fresh again then.
            Publish::Refused => self.unpublished(id, seq, before),
            Publish::Staged(_) => {
                count(&self.stats.watch_notifications);
                if con {
                    self.ack(src, msg.mid);
                }
            }
            Publish::Never(why) => {
                // Never publishable: acknowledged (the device must not
                // retry it forever) and counted.
                tracing::warn!(%src, %path, "observe: notification not published: {why}");
                count(&self.stats.watch_unpublished);
                if con {
                    self.ack(src, msg.mid);
                }
            }
        }
    }

    /// Asks for block `block` of the value `fetch` holds the start of.
    fn request_block(&mut self, id: WatchId, fetch: Fetch, block: Block) {
        let mut b2 = [0u8; 4];
        let mut opts: Vec<(u16, &[u8])> = fetch
            .path
            .split('/')
            .map(|s| (option::URI_PATH, s.as_bytes()))
            .collect();
        opts.push((option::BLOCK2, message::uint_bytes(block.value(), &mut b2)));
        let endpoint = fetch.endpoint;
        let datagram = self.client.request(
            Key::WatchBlock(id),
            endpoint,
            code::GET,
            &opts,
            &[],
            Instant::now(),
        );
        self.transport.send(endpoint, datagram);
        count(&self.stats.blocks);
        self.fetches.insert(id, fetch);
    }

    /// The answer to a Block2 GET of a watch's notification: the next
    /// block is asked for, or the whole value published.
    pub(super) fn watch_block(&mut self, id: WatchId, msg: &Message) {
        let Some(mut fetch) = self.fetches.remove(&id) else {
            return;
        };
        let block = msg
            .options()
            .find(|(n, _)| *n == option::BLOCK2)
            .and_then(|(_, v)| Block::parse(v));
        let etag = msg
            .options()
            .find(|(n, _)| *n == option::ETAG)
            .map(|(_, v)| v.to_vec());
        let why = match block {
            _ if msg.code != code::CONTENT => {
                Some(format!("answered {}", super::coap_code(msg.code)))
            }
            None => Some("a block without a Block2 option".to_owned()),
            Some(b) if b.offset() != fetch.body.len() => {
                Some(format!("block {} out of order", b.num))
            }
            // RFC 7959 section 2.4: a changed ETag means another value; the
            // notification of that one follows.
            Some(_) if etag != fetch.etag => {
                Some("the value changed while it was fetched (ETag)".to_owned())
            }
            Some(_) if fetch.body.len() + msg.payload.len() > MAX_RESPONSE_BODY => Some(format!(
                "the value is larger than {MAX_RESPONSE_BODY} bytes"
            )),
            Some(_) => None,
        };
        if let Some(why) = why {
            self.fetches.insert(id, fetch);
            return self.abandon_fetch(id, &why);
        }
        let block = block.expect("checked");
        fetch.body.extend_from_slice(msg.payload);
        if block.more {
            let next = Block {
                num: block.num + 1,
                more: false,
                szx: block.szx,
            };
            return self.request_block(id, fetch, next);
        }
        let Fetch {
            endpoint,
            path,
            body,
            format,
            ..
        } = fetch;
        match self.publish_watched(id, endpoint, &path, Bytes::from(body), format) {
            Publish::Staged(_) => count(&self.stats.watch_notifications),
            Publish::Never(why) => self.abandon_fetch(id, &why),
            Publish::Refused => self.abandon_fetch(id, "storage refused it"),
        }
    }

    /// Gives up on a value in blocks (counted; the next notification brings
    /// a newer one).
    pub(super) fn abandon_fetch(&mut self, id: WatchId, why: &str) {
        self.client.cancel(&Key::WatchBlock(id));
        if let Some(f) = self.fetches.remove(&id) {
            tracing::warn!(endpoint = %f.endpoint, path = %f.path, "observe: a notification in blocks not published: {why}");
        }
        count(&self.stats.watch_unpublished);
    }

    /// Publishes a notification's value where a POST of the watched path
    /// from `src` goes, in Content-Format `format`. A storage refusal
    /// counts as not kept: the notification is fresh again when the device
    /// retransmits it.
    fn publish_watched(
        &mut self,
        id: WatchId,
        src: Endpoint,
        path: &str,
        payload: Bytes,
        format: Option<u32>,
    ) -> Publish {
        let (_, mapper) = self.mappers.load();
        let segments: Vec<&str> = path.split('/').collect();
        // Over DTLS the device is the watch's peer, not its address's.
        let peer = src
            .secure
            .then(|| self.watches().get_mut(id).map(|w| w.peer.clone()))
            .flatten();
        let req = mapping::Request {
            src: src.addr,
            identity: peer.as_deref(),
            method: code::POST,
            path: &segments,
        };
        let mut topic = String::new();
        let delivery = match mapper.map(&req, &mut topic) {
            Ok(d) => d,
            Err(e) => return Publish::Never(e.message().to_owned()),
        };
        let message = MqttMessage {
            topic: Bytes::from(topic.clone()),
            payload,
            qos: delivery.qos,
            retain: delivery.retain,
            content_type: format
                .and_then(|f| u16::try_from(f).ok())
                .and_then(content_type)
                .map(|t| Bytes::from_static(t.as_bytes())),
            properties: None,
        };
        match self.broker.publish_deferred(message, None) {
            Ok(ticket) => {
                if let Some(w) = self.watches().get_mut(id) {
                    w.topic = Some(topic);
                }
                Publish::Staged(ticket)
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Publish::Never(e.to_string()),
            Err(e) => {
                tracing::warn!(%src, %path, %e, "observe: storage refused a notification");
                Publish::Refused
            }
        }
    }

    fn unpublished(&mut self, id: WatchId, seq: Option<u32>, before: Option<(u32, Instant)>) {
        count(&self.stats.watch_unpublished);
        if let (Some(seq), Some(w)) = (seq, self.watches().get_mut(id)) {
            w.unpublished(seq, before);
        }
    }

    /// A notification's publication was made durable (acknowledge it) or
    /// not (leave it unacknowledged: the device sends it again).
    pub(super) fn watch_committed(&mut self, c: Committed) {
        self.committing.remove(&(c.src, c.mid));
        if c.ok {
            count(&self.stats.watch_notifications);
            self.ack(c.src, c.mid);
        } else {
            let same = self
                .watches()
                .get_mut(c.id)
                .is_some_and(|w| w.token.is_some_and(|t| t[..] == c.token[..]));
            if same {
                self.unpublished(c.id, c.seq, c.before);
            } else {
                count(&self.stats.watch_unpublished);
            }
        }
    }

    fn ack(&self, to: Endpoint, mid: u16) {
        let mut out = Vec::with_capacity(4);
        client::empty(&mut out, ACK, mid);
        self.transport.send(to, &out);
    }

    /// An MQTT command with method `observe` (`start`) or `unobserve` on
    /// `<command_prefix>/<peer>/<path>`: adds or removes the watch, and
    /// answers on the response topic at once ("observing" or "unobserved").
    pub(super) fn watch_command(&mut self, command: &Command, start: bool) {
        let (_, mapper) = self.mappers.load();
        match mapper.peer_by_name(&command.peer) {
            None => {
                return self.refuse(command, "unknown peer: only configured peers are observed")
            }
            Some(p) if p.deny => return self.refuse(command, "the peer is denied by policy"),
            Some(_) => {}
        }
        let path = match crate::config::observe_path(&command.path.join("/")) {
            Ok(path) => path,
            Err(why) => return self.refuse(command, &format!("the path to observe: {why}")),
        };
        let now = Instant::now();
        let answer = if start {
            let new = self.watches().find(&command.peer, &path).is_none();
            if new && self.watches().commanded(&command.peer) >= watch::MAX_PER_PEER {
                count(&self.stats.watch_refused);
                let why = format!(
                    "the peer has {} watches from commands already",
                    watch::MAX_PER_PEER
                );
                return self.refuse(command, &why);
            }
            let added = self
                .watches()
                .add(&command.peer, &path, Origin::Command, now);
            let Ok(id) = added else {
                count(&self.stats.watch_refused);
                return self.refuse(command, "too many watches");
            };
            let idle = self
                .watches()
                .get_mut(id)
                .is_some_and(|w| w.state == watch::State::Idle);
            if idle {
                self.register_watch(id, now);
            }
            "observing"
        } else {
            let found = self.watches().find(&command.peer, &path);
            let configured = found
                .and_then(|id| {
                    self.watches()
                        .get_mut(id)
                        .map(|w| w.origin == Origin::Config)
                })
                .unwrap_or(false);
            if configured {
                return self.refuse(
                    command,
                    "the path is observed by the configuration ([[peer]] observe)",
                );
            }
            let removed = found.and_then(|id| self.watches().remove(id).map(|w| (id, w)));
            if let Some((id, w)) = removed {
                self.drop_watch(id, &w);
            }
            self.update_watching();
            "unobserved"
        };
        let body = serde_json::json!({ "peer": command.peer, "path": path });
        self.respond(
            command,
            answer,
            Bytes::from(body.to_string()),
            Some("application/json"),
        );
    }
}
