//! Weight gradients collected beside candle's autograd rather than through it.
//!
//! candle's backward pass adds every incoming gradient to a freshly allocated zero tensor of the argument's
//! shape (`GradStore::or_insert` then `add`). For activations that is small; for the weights it zeroes, adds and
//! frees another copy of all 135 M parameters of SmolLM2 on every step, single-threaded, about a sixth of a step.
//! The fused projection and embedding ops ([`super::train_ops`]) instead add their weight gradient straight
//! into one buffer per weight here, when the model carries a [`WeightGrads`] ([`super::Llama::with_weight_grads`]);
//! the trainer moves them into the `GradStore` after `backward` (`PolicyModel::backward`). Without one, the ops
//! hand the gradients to candle as usual.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId};

/// Per-weight gradient buffers, shared by clones (the model and whoever runs `backward`).
#[derive(Debug, Clone, Default)]
pub struct WeightGrads {
    buffers: Arc<Mutex<HashMap<TensorId, Vec<f32>>>>,
}

impl WeightGrads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `write(buffer, fresh)` on `weight`'s buffer of `len` floats: `fresh` when this is the first
    /// contribution since the last [`WeightGrads::take_all`] (the buffer is zeroed; overwriting is fine),
    /// otherwise the writer must add to what is there.
    pub(crate) fn contribute(&self, weight: &Tensor, len: usize, write: impl FnOnce(&mut [f32], bool)) {
        let mut buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        match buffers.get_mut(&weight.id()) {
            Some(buffer) if buffer.len() == len => write(buffer, false),
            _ => {
                let mut buffer = vec![0f32; len];
                write(&mut buffer, true);
                buffers.insert(weight.id(), buffer);
            }
        }
    }

    /// Every collected gradient, keyed by its weight's id (each shaped like `shape_of(id)`), leaving the
    /// collection empty.
    pub fn take_all(&self) -> Vec<(TensorId, Vec<f32>)> {
        let mut buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        buffers.drain().collect()
    }

    /// Drops whatever was collected (a backward pass whose gradients nobody took).
    pub fn clear(&self) {
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Moves every collected gradient into `store` as the gradient of the matching tensor among `weights`,
    /// added to any gradient candle already put there. Buffers of weights not listed are dropped.
    pub fn drain_into(&self, store: &mut candle_core::backprop::GradStore, weights: &[&Tensor]) -> Result<()> {
        let mut collected: HashMap<TensorId, Vec<f32>> = self.take_all().into_iter().collect();
        for weight in weights {
            let Some(buffer) = collected.remove(&weight.id()) else { continue };
            let grad = Tensor::from_vec(buffer, weight.shape(), weight.device())?;
            let grad = match store.remove(weight) {
                Some(existing) => (existing + grad)?,
                None => grad,
            };
            store.insert(weight, grad);
        }
        Ok(())
    }
}
