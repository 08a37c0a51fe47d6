//! FLTrust's reference update (`strategy = "fltrust"`): when the open round wants the
//! server's own update (the engine's `wanted_reference`), a task trains the round's model on
//! the root set on a blocking thread, never under a lock, and hands the result to the engine
//! as a transition under the order lock. The round opens at once, so devices train while the
//! server does; it closes on their results only once the reference is in, and fails at its
//! deadline without one. Nothing is stored: after a restart the resumed round asks again and
//! the same reference is trained (its batch order is seeded by the model version).

use std::sync::{Arc, Weak};

use fedge_core::ModelParams;
use fedge_core::wire::TrainConfig;
use tokio::sync::Notify;

use super::Coordinator;

/// Trains the server's reference update on its root set.
pub trait RootTrainer: Send + 'static {
    /// The update from `global` (model `version`) after local training on the root set with
    /// the devices' settings `config`: trained minus `global`.
    fn reference(&mut self, version: u64, global: &ModelParams, config: &TrainConfig) -> Result<ModelParams, String>;
}

impl Coordinator {
    /// Trains FLTrust's reference updates with `trainer` whenever the open round wants one.
    /// Call once, within a tokio runtime; a second call is ignored (returns false).
    pub fn set_root_trainer(self: &Arc<Self>, trainer: Box<dyn RootTrainer>) -> bool {
        if self.root_trainer_set.set(()).is_err() {
            return false;
        }
        tokio::spawn(drive_references(Arc::downgrade(self), self.references.clone(), trainer));
        true
    }

    /// The reference for `round` arrived (or could not be made): hands it to the engine.
    fn provide_reference(&self, round: u64, reference: Result<ModelParams, String>) {
        let order = self.ordered();
        let handed = reference.and_then(|r| {
            let mut s = self.lock();
            let now = self.now();
            match s.rounds.engine.rounds_mut() {
                Some(engine) => engine.handle_reference(now, round, &r).map_err(|e| e.to_string()),
                None => Err("FedBuff mode takes no reference update".into()),
            }
        });
        match handed {
            Ok(()) => tracing::info!("round {round}: the server's reference update is in (FLTrust)"),
            Err(e) => tracing::warn!("round {round}: no reference update: {e}; the round fails at its deadline"),
        }
        self.settle(&order);
    }
}

/// Waits for rounds that want a reference and trains it; returns when the coordinator is
/// gone. Each round is tried once: a failure is logged and the round fails at its deadline.
async fn drive_references(me: Weak<Coordinator>, wake: Arc<Notify>, mut trainer: Box<dyn RootTrainer>) {
    let mut tried = None;
    loop {
        let job = {
            let Some(c) = me.upgrade() else { return };
            let s = c.lock();
            let Some(engine) = s.rounds.engine.rounds() else { return };
            engine
                .wanted_reference()
                .filter(|&(round, _)| tried != Some(round))
                .map(|(round, version)| (round, version, engine.global().clone(), engine.config().train))
        };
        let Some((round, version, global, config)) = job else {
            // `notify_one` keeps a permit: a round opened since the check is not missed.
            wake.notified().await;
            continue;
        };
        tried = Some(round);
        let done = tokio::task::spawn_blocking(move || {
            let reference = trainer.reference(version, &global, &config);
            (trainer, reference)
        })
        .await;
        let Ok((back, reference)) = done else {
            tracing::error!("FLTrust's reference training thread failed; no more reference updates");
            return;
        };
        trainer = back;
        let Some(c) = me.upgrade() else { return };
        c.provide_reference(round, reference);
    }
}
