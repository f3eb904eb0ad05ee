//! LoRA adapters (Hu et al. 2021) on a frozen model's projections: `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`.
//!
//! [`super::Llama::with_lora`] freezes every base weight (detached views: no weight gradient is computed for
//! them, which skips the weight-gradient GEMMs of the backward pass) and gives the chosen projections of each
//! trainable layer a rank-`r` pair: `A` `[r, in]` drawn like PyTorch's `nn.Linear` init (uniform in
//! `±1/√in`), `B` `[out, r]` zero, so the adapted model starts out equal to the base. Both training paths (the
//! whole-layer node and the op-by-op layer) and the serving path apply the adapters, so PPO samples from the
//! adapted policy. [`Adapter::merged`] folds an adapter into its weight (`W + (α/r)·B·A`) for saving: the
//! checkpoint is then a plain model directory.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Linear;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::WeightGrads;
use crate::error::{Error, Result};

/// A projection of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// Every projection, in the layer's order (attention, then MLP).
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Its weight's tensor name within a layer (`model.layers.{i}.` + this).
    pub fn weight_name(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj.weight",
            Projection::K => "self_attn.k_proj.weight",
            Projection::V => "self_attn.v_proj.weight",
            Projection::O => "self_attn.o_proj.weight",
            Projection::Gate => "mlp.gate_proj.weight",
            Projection::Up => "mlp.up_proj.weight",
            Projection::Down => "mlp.down_proj.weight",
        }
    }

    /// Index into a layer's `[Option<Adapter>; 7]`.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Which projections get adapters, their rank and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
    pub targets: Vec<Projection>,
    /// Seeds the draw of every `A` (each adapter's own stream), so runs repeat.
    pub seed: u64,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }
}

/// One adapter's pair of matrices and its scale `α/r`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scale: f64,
}

/// An adapter created by [`super::Llama::with_lora`], with the name of the weight it adapts
/// (`model.layers.3.self_attn.q_proj.weight`) and its trainable variables.
#[derive(Debug, Clone)]
pub struct NamedAdapter {
    pub weight: String,
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

impl NamedAdapter {
    /// The variables' tensor names, PEFT's spelling: `<module>.lora_A.weight`, `<module>.lora_B.weight`.
    pub fn var_names(&self) -> [String; 2] {
        let module = self.weight.strip_suffix(".weight").unwrap_or(&self.weight);
        [format!("{module}.lora_A.weight"), format!("{module}.lora_B.weight")]
    }

    pub fn adapter(&self) -> Adapter {
        Adapter { a: self.a.as_tensor().clone(), b: self.b.as_tensor().clone(), scale: self.scale }
    }
}

impl Adapter {
    /// A fresh pair for a `[out, in]` weight of `dtype`: `A` uniform in `±1/√in` from `seed`, `B` zero.
    pub(super) fn create(
        (out, inner): (usize, usize),
        spec: &LoraSpec,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<(Var, Var)> {
        let bound = 1.0 / (inner.max(1) as f32).sqrt();
        let mut rng = StdRng::seed_from_u64(seed);
        let a: Vec<f32> = (0..spec.rank * inner).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inner), device)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, spec.rank), dtype, device)?)?;
        Ok((a, b))
    }

    /// `(α/r)·(x·Aᵀ)·Bᵀ` of `x` `[..., in]`, differentiable (the training paths' op-by-op form).
    pub(super) fn delta_train(&self, x: &Tensor, sink: Option<&WeightGrads>) -> Result<Tensor> {
        let hidden = super::linear_rows(&Linear::new(self.a.clone(), None), x, sink)?;
        let y = super::linear_rows(&Linear::new(self.b.clone(), None), &hidden, sink)?;
        Ok((y * self.scale)?)
    }

    /// The same on the serving path's kernels, for `x` `[N, in]`.
    pub(super) fn delta_serving(&self, x: &Tensor) -> Result<Tensor> {
        let a = Linear::new(self.a.detach(), None);
        let b = Linear::new(self.b.detach(), None);
        Ok((super::serve(&b, &super::serve(&a, x)?)? * self.scale)?)
    }

    /// `W + (α/r)·B·A`: the weight with the adapter folded in, in `w`'s dtype.
    pub fn merged(&self, w: &Tensor) -> Result<Tensor> {
        let delta =
            (self.b.detach().to_dtype(DType::F32)?.matmul(&self.a.detach().to_dtype(DType::F32)?)? * self.scale)?;
        let merged = (w.detach().to_dtype(DType::F32)? + delta)?;
        Ok(merged.to_dtype(w.dtype())?)
    }
}

/// Checks a spec before any adapter is made.
pub(super) fn validate(spec: &LoraSpec) -> Result<()> {
    if spec.rank == 0 {
        return Err(Error::invalid("lora_rank", "LoRA needs a rank of at least 1"));
    }
    if spec.targets.is_empty() {
        return Err(Error::invalid("lora_targets", "LoRA needs at least one target projection"));
    }
    if !spec.alpha.is_finite() || spec.alpha <= 0.0 {
        return Err(Error::invalid("lora_alpha", "lora_alpha must be a positive number"));
    }
    Ok(())
}
