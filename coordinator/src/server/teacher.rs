//! Inference glue: devices' `InferRequest`s answered by the teacher on the current global
//! model (crate::inference's batching service), under a per-device rate limit.

use std::sync::{Arc, Mutex};

use fedge_core::wire::{InferAnswer, InferRequest};

use super::Coordinator;
use crate::inference::{InferError, InferenceConfig, InferenceCounts, InferenceService, RateLimiter, Teacher};

/// The teacher's inference service and the per-device rate limit in front of it.
pub(super) struct Inference {
    service: InferenceService,
    limiter: Mutex<RateLimiter>,
}

impl Inference {
    /// The image size the teacher takes (rows, cols).
    pub(super) fn input_shape(&self) -> (usize, usize) {
        self.service.input_shape()
    }
}

impl Coordinator {
    /// Answers devices' inference requests with `teacher` on the current global model, batched
    /// and rate-limited as `config` says. Call once, within a tokio runtime; a second call is
    /// ignored (returns false).
    pub fn set_inference(self: &Arc<Self>, config: InferenceConfig, teacher: Box<dyn Teacher>) -> bool {
        let me = Arc::downgrade(self);
        let model: crate::inference::ModelSource = Arc::new(move || me.upgrade().map(|c| c.global()));
        let metrics = self.metrics.clone();
        let service = InferenceService::spawn(config, teacher, model)
            .with_observer(Arc::new(move |batch, latency| metrics.inference_answered(batch, latency)));
        let limiter = Mutex::new(RateLimiter::new(config.rate_per_sec, config.burst));
        self.inference.set(Inference { service, limiter }).is_ok()
    }

    /// What the inference service answered so far (`None`: not serving inference).
    pub fn inference_counts(&self) -> Option<&InferenceCounts> {
        self.inference.get().map(|i| i.service.counts())
    }

    /// Answers one inference request from device `device` (certificate id).
    pub async fn infer(&self, device: &str, request: InferRequest) -> Result<InferAnswer, InferError> {
        let Some(inf) = self.inference.get() else {
            return Err(InferError::Unavailable("this coordinator does not serve inference".into()));
        };
        let checked = inf.limiter.lock().unwrap_or_else(|p| p.into_inner()).check(device, self.now());
        let out = match checked {
            Ok(()) => match self.infer_regional(&request).await {
                Some(answer) => answer,
                None => inf.service.infer(request).await.map(|mut a| {
                    if self.is_region() {
                        a.tier = fedge_core::wire::AnswerTier::Region;
                    }
                    a
                }),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &out {
            self.metrics.rejected(e.code());
        }
        out
    }
}
