//! The sessions: a device's (hello, task requests, model and blob downloads, result
//! uploads, inference requests) and an operator's (round commands, listings, promotion), one
//! request and one answer per QUIC stream.
//!
//! Requests that only read are answered under the state lock alone; an upload, a connection
//! and a disconnection are durable transitions under the order lock (see the parent module).

use std::sync::Arc;
use std::time::Duration;

use fedge_core::codec::FrameKind;
use fedge_core::wire::{DeviceId, ErrorCode, Message, OperatorCommand, SessionPurpose, TrainResult};

use super::Coordinator;
use super::downloads::{Reply, not_kept};
use crate::certs::Role;
use crate::listener::{Peer, answer_hello_then};
use crate::store::Settings;

/// Most rounds an operator may have queued at once.
pub const MAX_QUEUED_ROUNDS: u64 = 1_000_000;

/// How long an idle device waits before asking for work again.
const RETRY_MS: u32 = 50;

/// Why a device certificate may not open a relay session.
const NOT_A_RELAY: &str = "only an aggregator certificate relays its devices' messages";

/// Why a secure coordinator refuses a region (a relaying shard is welcome).
const NO_REGIONS_WHEN_SECURE: &str = "this coordinator aggregates securely: each device's masked update must reach it, not a region's mean (a simulation shard relays its devices: SessionPurpose::Relay)";

impl Coordinator {
    /// A device's session, or a regional aggregator's (`peer.identity.role`), which speaks the
    /// device protocol under the fleet name `aggregator:NAME`: its results may claim all its
    /// devices' samples, and its task stands while it restarts.
    pub(super) async fn device_session(self: Arc<Self>, peer: Peer) {
        let aggregator = peer.identity.role == Role::Aggregator;
        let (versions, refusal) = {
            let s = self.lock();
            let version = s.rounds.version();
            let refusal = aggregator.then(|| s.rounds.engine.aggregator_refusal()).flatten();
            ((version, self.teacher_version(version)), (refusal, s.rounds.secure_settings.is_some()))
        };
        let refusal = |hello: &fedge_core::wire::Hello| match (aggregator, hello.purpose, refusal) {
            (false, SessionPurpose::Relay, _) => Some(NOT_A_RELAY.to_string()),
            (true, _, (Some(why), _)) => Some(why),
            (true, SessionPurpose::Train, (None, true)) => Some(NO_REGIONS_WHEN_SECURE.to_string()),
            _ => None,
        };
        let name = match aggregator {
            true => format!("aggregator:{}", peer.identity.id),
            false => peer.identity.id.clone(),
        };
        // Registered before its Welcome goes out: a round started once the device has its
        // Welcome counts it.
        let admit = |hello: &fedge_core::wire::Hello| {
            let training = hello.purpose != SessionPurpose::Inference;
            let session = training.then(|| (hello.capabilities.clone(), peer.closer()));
            self.handle_connected(&name, session, aggregator).ok_or_else(|| {
                "the coordinator cannot register devices now (its storage failed); try again later".to_string()
            })
        };
        let (hello, (id, session)) = match answer_hello_then(&peer, versions, refusal, admit).await {
            Ok(admitted) => admitted,
            Err(e) => {
                self.metrics.rejected(e.code());
                tracing::warn!("{}: {e}", peer.identity.id);
                // Let the refusal reach the device before the connection goes.
                let _ = tokio::time::timeout(Duration::from_secs(5), peer.connection.closed()).await;
                return;
            }
        };
        let training = hello.purpose != SessionPurpose::Inference;
        while let Ok((mut send, mut recv)) = peer.connection.accept_bi().await {
            let read = fedge_net::read_message_limited(&mut recv, |kind| self.device_frame_limit(kind)).await;
            let (request, received) = match read {
                Ok((m, bytes)) => {
                    self.metrics.received(bytes.len() + 4);
                    (m, bytes)
                }
                Err(e) => {
                    let code = match e {
                        fedge_net::FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                        _ => ErrorCode::Malformed,
                    };
                    self.metrics.rejected(code);
                    tracing::warn!("device {}: bad frame: {e}", peer.identity.id);
                    let reply = Message::Error { code, message: e.to_string() };
                    let _ = fedge_net::write_message(&mut send, &reply).await;
                    continue;
                }
            };
            let reply = match request {
                Message::InferRequest(r) => {
                    // Answered on its own task: the teacher's batch window must not hold up
                    // this device's other requests.
                    let (me, name) = (self.clone(), peer.identity.id.clone());
                    tokio::spawn(async move {
                        let reply = match me.infer(&name, r).await {
                            Ok(a) => Message::InferAnswer(a),
                            Err(e) => Message::Error { code: e.code(), message: e.to_string() },
                        };
                        let bytes = fedge_core::codec::encode(&reply);
                        me.metrics.sent(bytes.len() + 4);
                        if fedge_net::write_encoded(&mut send, &bytes).await.is_ok() {
                            let _ = send.finish();
                        }
                    });
                    continue;
                }
                other => self.device_request(id, &peer.identity.id, training, other, &received).await,
            };
            let written = match reply {
                Reply::Message(m) => {
                    let bytes = fedge_core::codec::encode(&m);
                    self.metrics.sent(bytes.len() + 4);
                    fedge_net::write_encoded(&mut send, &bytes).await
                }
                Reply::Encoded(bytes) => {
                    self.metrics.sent(bytes.len() + 4);
                    fedge_net::write_encoded(&mut send, &bytes).await
                }
                Reply::Chunk(prefix, model, range) => {
                    self.metrics.sent(prefix.len() + range.len() + 4);
                    fedge_net::write_parts(&mut send, &prefix, &model[range]).await
                }
            };
            if written.is_err() {
                break;
            }
            let _ = send.finish();
        }
        if let Some(session) = session {
            self.handle_disconnected(id, session);
        }
    }

    /// The answer to one decoded request from device `id` (certificate id `name`) on a
    /// training session or not (`training`); `received` is the request's frame as it arrived
    /// (what an accepted update is stored as). Everything a device asks but inference, which
    /// the caller answers on its own task (here it would be refused as unexpected). The QUIC
    /// loop and the in-memory harness both call this.
    pub(super) async fn device_request(
        &self,
        id: DeviceId,
        name: &str,
        training: bool,
        request: Message,
        received: &[u8],
    ) -> Reply {
        match request {
            Message::TaskRequest { .. } | Message::TrainResult(_) if !training => {
                self.metrics.rejected(ErrorCode::Unauthorized);
                Reply::Message(Message::Error {
                    code: ErrorCode::Unauthorized,
                    message: "an inference session does not train: connect for training".into(),
                })
            }
            Message::SecureReady { .. } | Message::SecurePoll { .. } | Message::SecureSend { .. } if !training => {
                self.metrics.rejected(ErrorCode::Unauthorized);
                Reply::Message(Message::Error {
                    code: ErrorCode::Unauthorized,
                    message: "an inference session does not train: connect for training".into(),
                })
            }
            msg @ (Message::SecureReady { .. } | Message::SecurePoll { .. } | Message::SecureSend { .. }) => {
                Reply::Message(self.handle_secure(id, msg))
            }
            Message::TrainResult(_) if self.lock().rounds.secure_settings.is_some() => {
                self.metrics.rejected(ErrorCode::InvalidUpdate);
                Reply::Message(Message::Error {
                    code: ErrorCode::InvalidUpdate,
                    message: "rounds here aggregate securely: enter the update into the round's secure sum (SecureReady), do not upload it".into(),
                })
            }
            Message::TrainResult(result) => Reply::Message(self.handle_train_result(id, name, result, received)),
            // An aggregator may read the root's status (its rounds' history): a sharded
            // simulation's recorder takes each round's training loss from it. Nothing else an
            // operator may do is open to it.
            Message::Operator(OperatorCommand::Status) if self.lock().fleet.aggregators.contains(&id) => {
                Reply::Message(Message::Status(self.status()))
            }
            other => {
                self.prepare_download(&other).await;
                self.answer(id, other)
            }
        }
    }

    /// The largest frame a device may send of `kind`: a `TrainResult` as large as a delta of
    /// the model (plus slack), an `InferRequest` as large as the teacher's image (plus slack),
    /// anything else [`fedge_net::SMALL_FRAME_BYTES`].
    fn device_frame_limit(&self, kind: FrameKind) -> usize {
        let small = fedge_net::SMALL_FRAME_BYTES;
        match kind {
            FrameKind::TrainResult => self.train_result_limit,
            // A masked update: its words packed at the ring's width (at most 8 bytes a
            // coordinate, where a delta takes 4), its rejected neighbours; a neighbourhood's
            // shares; or a relaying aggregator's members (`MAX_MEMBERS`, at most 10 bytes each).
            FrameKind::Secure => self.train_result_limit.saturating_mul(9) / 4 + (1 << 20),
            FrameKind::InferRequest => {
                small + self.inference.get().map_or(0, |i| i.input_shape().0 * i.input_shape().1)
            }
            _ => small,
        }
    }

    /// Device `name` said hello (with its capabilities and connection if it came to train):
    /// its numeric id, registered on first sight, and the training session's number; `None` if
    /// that cannot be recorded. A training session supersedes the device's older one, which
    /// is closed.
    pub(super) fn handle_connected(
        &self,
        name: &str,
        training: Option<(fedge_core::wire::Capabilities, crate::listener::Closer)>,
        aggregator: bool,
    ) -> Option<(DeviceId, Option<u64>)> {
        let order = self.ordered();
        let known = {
            let s = self.lock();
            s.fleet.ids.get(name).copied().ok_or(s.fleet.ids.len() as DeviceId)
        };
        let id = match (known, &self.store) {
            (Ok(id), _) => id,
            (Err(_), Some(store)) => match store.device_id(name) {
                Ok(id) => id,
                Err(e) => {
                    tracing::error!("device {name}: cannot register: {e}");
                    return None;
                }
            },
            (Err(next), None) => next,
        };
        let (session, superseded) = {
            let mut s = self.lock();
            s.fleet.ids.insert(name.to_string(), id);
            s.fleet.seen(id);
            match training {
                Some((capabilities, connection)) => {
                    let session = s.fleet.next_session;
                    s.fleet.next_session += 1;
                    let old = s.fleet.sessions.insert(id, (session, connection));
                    s.fleet.connected.insert(id);
                    s.fleet.capabilities.insert(id, capabilities);
                    s.rounds.engine.handle_device_available(id);
                    if aggregator {
                        s.fleet.aggregators.insert(id);
                        let cap = self.max_samples_per_region.load(std::sync::atomic::Ordering::Relaxed);
                        s.rounds.engine.set_sample_cap(id, Some(cap));
                    }
                    (Some(session), old.map(|(_, c)| c))
                }
                None => (None, None),
            }
        };
        self.settle(&order);
        if let Some(old) = superseded {
            old.close("superseded by a newer session of this device");
        }
        Some((id, session))
    }

    /// Training session `session` of device `id` ended: the device is gone unless a newer
    /// session of it is live.
    pub(super) fn handle_disconnected(&self, id: DeviceId, session: u64) {
        let order = self.ordered();
        {
            let mut s = self.lock();
            if s.fleet.sessions.get(&id).is_none_or(|(newest, _)| *newest != session) {
                return;
            }
            s.fleet.sessions.remove(&id);
            s.fleet.connected.remove(&id);
            let now = self.now();
            let in_secure_sum = s.rounds.secure_round.as_ref().is_some_and(|r| r.holds(id));
            if s.fleet.aggregators.contains(&id) || in_secure_sum {
                // A region restarting resumes its own round: its task stands until the deadline.
                // A device in a secure session may be in the sum already: the session decides.
                s.rounds.engine.handle_device_away(now, id);
                if s.rounds.engine.rounds().is_none() {
                    s.rounds.tasks.remove(&id);
                    s.rounds.assigned_at.remove(&id);
                }
            } else {
                s.rounds.tasks.remove(&id);
                s.rounds.assigned_at.remove(&id);
                s.rounds.engine.handle_device_gone(now, id);
            }
        }
        self.settle(&order);
    }

    /// Device `id` (certificate id `name`) uploaded `result` (`received`: its frame as it arrived): checked, then
    /// made durable as received (the state lock released), then counted, then acknowledged:
    /// an `Ack` means the update survives a crash.
    fn handle_train_result(&self, id: DeviceId, name: &str, result: TrainResult, received: &[u8]) -> Message {
        let order = self.ordered();
        let checked = match self.storage_failure() {
            // The device keeps it and sends it again once the coordinator runs again.
            Some(why) => Err((ErrorCode::Unavailable, format!("the coordinator's storage failed ({why})"))),
            None => self.lock().rounds.engine.check_train_result(id, &result),
        };
        let reply = match checked {
            // Refused by the engine (not for a storage failure, which the device retries).
            Err(refused) if self.storage_failure().is_none() => {
                let mut s = self.lock();
                let now = self.now();
                if !s.rounds.engine.refused(now, id, &result) {
                    s.rounds.tasks.remove(&id);
                    s.rounds.assigned_at.remove(&id);
                }
                Err(refused)
            }
            Err(refused) => Err(refused),
            Ok(()) => match self.store.as_ref().map(|st| {
                // The round it counts in (FedBuff: the open buffer), read under the order lock.
                let round = self.lock().rounds.engine.storage_round(&result);
                st.save_update_bytes(round, id, received)
            }) {
                Some(Err(e)) => {
                    self.storage_failed(format_args!("cannot record an update of round {}", result.round), &e);
                    Err((ErrorCode::Unavailable, format!("cannot record the update: {e}")))
                }
                // Nothing changed the round since the check: changes hold the order lock.
                _ => {
                    let mut s = self.lock();
                    let now = self.now();
                    match s.rounds.engine.handle_train_result(now, id, &result) {
                        Ok(()) => {
                            s.rounds.tasks.remove(&id);
                            let since = s.rounds.assigned_at.remove(&id).unwrap_or(now);
                            self.metrics.update_accepted(now.saturating_sub(since));
                            Ok(result.round)
                        }
                        Err(refused) => Err(refused),
                    }
                }
            },
        };
        self.settle(&order);
        match reply {
            Ok(round) => Message::Ack { round },
            Err((code, message)) => {
                self.metrics.rejected(code);
                tracing::warn!("device {name}: update refused ({code:?}): {message}");
                Message::Error { code, message }
            }
        }
    }

    /// The answer to a request that only reads, from device `id`, under the state lock.
    fn answer(&self, id: DeviceId, request: Message) -> Reply {
        let mut s = self.lock();
        let reply = match request {
            Message::TaskRequest { running } => {
                s.fleet.running.insert(id, running);
                s.fleet.seen(id);
                match s.rounds.tasks.get(&id) {
                    Some(task) => Message::TrainTask(task.clone()),
                    None => Message::NoTask {
                        retry_after_ms: RETRY_MS,
                        model_version: s.rounds.version(),
                        deployed: s.registry.latest.clone(),
                    },
                }
            }
            Message::RegionalRequest => {
                match s.registry.records.values().rev().find(|r| r.role == fedge_core::registry::ModelRole::Regional) {
                    Some(record) => Message::Deployed(record.clone()),
                    None => Message::Error {
                        code: ErrorCode::Unavailable,
                        message: "no regional model is registered yet".into(),
                    },
                }
            }
            Message::DeployedRequest { version } => match s.registry.records.get(&version) {
                Some(record) => Message::Deployed(record.clone()),
                None => not_kept(version),
            },
            Message::BlobChunkRequest { version, offset, max_len } => {
                s.blob_chunk(version, offset, max_len, &self.metrics)
            }
            Message::ModelRequest { version } => return s.model_download(version),
            Message::ModelChunkRequest { version, offset, max_len } => return s.model_chunk(version, offset, max_len),
            Message::Ping { nonce } => Message::Pong { nonce },
            Message::Operator(_) => {
                self.metrics.rejected(ErrorCode::Unauthorized);
                Message::Error {
                    code: ErrorCode::Unauthorized,
                    message: "a device certificate cannot run operator commands".into(),
                }
            }
            _ => {
                self.metrics.rejected(ErrorCode::Malformed);
                Message::Error { code: ErrorCode::Malformed, message: "unexpected message from a device".into() }
            }
        };
        Reply::Message(reply)
    }

    pub(super) async fn operator_session(self: Arc<Self>, peer: Peer) {
        while let Ok((mut send, mut recv)) = peer.connection.accept_bi().await {
            let read = fedge_net::read_message_limited(&mut recv, |_| fedge_net::SMALL_FRAME_BYTES).await;
            let reply = match read.map(|(m, _)| m) {
                Ok(Message::Operator(OperatorCommand::StartRounds {
                    rounds,
                    fraction,
                    min_train_clients,
                    deadline_secs,
                })) => self.handle_start_rounds(rounds, fraction, min_train_clients, deadline_secs),
                Ok(Message::Operator(OperatorCommand::Status)) => Message::Status(self.status()),
                Ok(Message::Operator(OperatorCommand::Devices)) => Message::Devices(self.devices()),
                Ok(Message::Operator(OperatorCommand::Models)) => Message::Models(self.models()),
                Ok(Message::Operator(OperatorCommand::Promote { version })) => match self.promote(version) {
                    Ok(()) => Message::Models(self.models()),
                    Err(e) => Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                },
                Ok(Message::Operator(OperatorCommand::Rollback)) => match self.rollback() {
                    Ok(_) => Message::Models(self.models()),
                    Err(e) => Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
                },
                Ok(_) => {
                    Message::Error { code: ErrorCode::Unauthorized, message: "operators send operator commands".into() }
                }
                Err(e @ fedge_net::FrameError::TooLarge { .. }) => {
                    Message::Error { code: ErrorCode::TooLarge, message: e.to_string() }
                }
                Err(e) => Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
            };
            if fedge_net::write_message(&mut send, &reply).await.is_err() {
                break;
            }
            let _ = send.finish();
        }
    }

    /// `round start`: new settings (kept across restarts), a budget check, more rounds.
    fn handle_start_rounds(
        &self,
        rounds: u64,
        fraction: Option<f64>,
        min_train_clients: Option<u64>,
        deadline_secs: Option<u64>,
    ) -> Message {
        if self.is_region() {
            return Message::Error {
                code: ErrorCode::Malformed,
                message: "this coordinator is a regional aggregator: its rounds are its root's tasks; start rounds at the root".into(),
            };
        }
        let order = self.ordered();
        let queued = self.lock().rounds.rounds_left;
        if rounds > MAX_QUEUED_ROUNDS.saturating_sub(queued) {
            return Message::Error {
                code: ErrorCode::Malformed,
                message: format!(
                    "rounds must be 0 to {}: {queued} already queued, at most {MAX_QUEUED_ROUNDS} in all",
                    MAX_QUEUED_ROUNDS.saturating_sub(queued)
                ),
            };
        }
        if self.lock().rounds.engine.rounds().is_none() {
            // FedBuff: an aggregation is a round; there is no sampling or round deadline to set.
            if fraction.is_some() || min_train_clients.is_some() || deadline_secs.is_some() {
                return Message::Error {
                    code: ErrorCode::Malformed,
                    message: "this coordinator runs FedBuff: fraction, min_train_clients and the round deadline do not apply (its [fedbuff] table sets buffer_size and max_concurrency)".into(),
                };
            }
            self.add_rounds(&order, rounds);
            drop(order);
            return Message::Status(self.status());
        }
        let (changed, settings) = {
            let mut s = self.lock();
            let engine = s.rounds.engine.rounds_mut().expect("checked: synchronous rounds");
            let changed = engine.reconfigure(|c| {
                if let Some(f) = fraction {
                    c.fraction = f;
                }
                if let Some(k) = min_train_clients {
                    c.min_train_clients = usize::try_from(k).unwrap_or(usize::MAX);
                }
                if let Some(d) = deadline_secs {
                    c.round_timeout = Duration::from_secs(d);
                }
            });
            (changed, Settings::of(engine.config()))
        };
        if changed.is_ok()
            && let Some(store) = &self.store
            && let Err(e) = store.save_settings(&settings)
        {
            self.storage_failed(format_args!("cannot record the new settings"), &e);
        }
        let changed = changed.map_err(|e| e.to_string()).and_then(|()| match self.lock().rounds.engine.rounds() {
            Some(engine) => engine.check_budget(rounds).map_err(|e| e.to_string()),
            None => Ok(()),
        });
        match changed {
            Ok(()) => {
                self.add_rounds(&order, rounds);
                drop(order);
                Message::Status(self.status())
            }
            Err(message) => Message::Error { code: ErrorCode::Malformed, message },
        }
    }
}
