//! The coordinator's distillation, in process, for `distill_every`: the global model as the
//! teacher, an int8 student as devices would run it.

use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::dataset::Dataset;
use fedge_core::rng::{derive_rng, stream};
use fedge_core::wire::Message;
use fedge_learn::{Trainer, WarmStudent};
use rand::RngExt;

use crate::config::SimConfig;
use crate::run::SimError;

/// What one distillation produced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Distilled {
    pub accuracy: f64,
    pub f32_accuracy: f64,
    pub bytes: u64,
    pub parameters: usize,
    pub teacher_latency_us: f64,
    pub student_latency_us: f64,
}

/// The coordinator-side pipeline, in process: teacher logits on the proxy set, distillation
/// into the student (warm-started from the previous student), int8 quantisation, evaluation of
/// the quantised student as devices would run it.
pub(crate) struct Distiller {
    student: WarmStudent,
    rng: fedge_core::rng::SeededRng,
    /// The last student, quantised and dequantised.
    pub int8: Option<ModelParams>,
}

impl Distiller {
    pub(crate) fn new(config: &SimConfig, num_classes: usize, proxy: Vec<usize>) -> Result<Self, SimError> {
        let mut student = Trainer::new(config.student_model, num_classes, config.backend)?;
        let params = student.initial_params(derive_rng(config.seed, &[stream::INIT, 1]).random());
        Ok(Self {
            student: WarmStudent::new(student, params, proxy, config.distill),
            rng: derive_rng(config.seed, &[stream::DISTILL]),
            int8: None,
        })
    }

    pub(crate) fn teacher_bytes(&self, teacher: &ModelParams) -> u64 {
        let msg = Message::Model { version: 0, hash: teacher.content_hash(), params: teacher.clone() };
        codec::encode(&msg).len() as u64
    }

    pub(crate) fn distill(
        &mut self,
        evaluator: &mut Trainer,
        teacher: &ModelParams,
        train: &Dataset,
        test: &Dataset,
    ) -> Result<Distilled, SimError> {
        let q = self.student.distil(evaluator, teacher, train, test, &mut self.rng)?;
        self.int8 = Some(q.int8);
        Ok(Distilled {
            accuracy: q.accuracy,
            f32_accuracy: q.f32_accuracy,
            bytes: q.blob.len() as u64,
            parameters: self.student.params().numel(),
            teacher_latency_us: q.teacher_latency_us,
            student_latency_us: q.student_latency_us,
        })
    }
}
