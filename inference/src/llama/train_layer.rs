//! A whole decoder layer of the training forward as one autograd node, with its backward pass written out.
//!
//! Built from the per-op kernels ([`super::train_kernels`] and the matmul), one layer is about seventeen candle
//! nodes, and candle's backward pass adds each node's incoming gradient to a freshly zeroed tensor before
//! passing it on: for SmolLM2 that zeroes and re-adds some 140 M floats of activation gradients per step on one
//! core. As a single node the layer keeps its activations in plain vectors between the passes, runs its
//! backward in one go, and adds its nine weight gradients into the model's [`WeightGrads`] (so it is used only
//! when the model has one, F32 on the CPU, without residual dropout or projection biases; otherwise the layer
//! runs op by op). A test checks it against the op-by-op layer, value and gradient.
//!
//! With LoRA ([`super::lora`]) the base weights are frozen: their weight-gradient GEMMs are skipped (only the
//! input's gradient flows through them) and each adapter's `A`/`B` gets its gradient here instead. With
//! gradient checkpointing the node keeps nothing between the passes and recomputes its activations in the
//! backward.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, bail};

use super::lora::{Adapter, Projection};
use super::train_kernels::{self as kernels, AttentionShape};
use super::weight_grads::WeightGrads;
use crate::gemm::{MatRef, sgemm};
use crate::simd;

/// A layer's weights (`[out, in]` projections, norm vectors) and its norms' epsilon.
#[derive(Clone)]
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// LoRA adapters by [`Projection::index`].
    pub lora: [Option<Adapter>; 7],
    pub eps: f32,
}

impl LayerWeights {
    fn base(&self, p: Projection) -> &Tensor {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down][p.index()]
    }

    /// A trainable tensor of the layer (candle records the node only when an argument is tracked).
    fn anchor(&self) -> &Tensor {
        let adapter = self.lora.iter().flatten().map(|a| &a.a).find(|a| a.is_variable());
        match adapter {
            Some(a) if !self.input_norm.is_variable() => a,
            _ => &self.input_norm,
        }
    }
}

/// `x` `[B, T, hidden]` through one pre-norm decoder layer (attention then SwiGLU MLP, each added to the
/// residual stream), differentiable wrt `x`; the trainable weights' gradients go to `grads` (a weight that is
/// not a variable gets none). `cos`/`sin` are the RoPE tables of positions `0..T`. `recompute`: gradient
/// checkpointing.
pub fn decoder_layer(
    x: &Tensor,
    weights: &LayerWeights,
    cos: &Tensor,
    sin: &Tensor,
    shape: AttentionShape,
    grads: &WeightGrads,
    recompute: bool,
) -> Result<Tensor> {
    let op = DecoderLayer {
        weights: weights.clone(),
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        shape,
        grads: grads.clone(),
        recompute,
        saved: Mutex::new(None),
    };
    // A trainable weight (the input norm's, or an adapter's) rides along as the op's second argument: candle
    // records an op only when an argument is tracked, and below a frozen layer the input `x` is not.
    let anchor = weights.anchor().clone();
    x.contiguous()?.apply_op2(&anchor, op)
}

struct DecoderLayer {
    weights: LayerWeights,
    cos: Tensor,
    sin: Tensor,
    shape: AttentionShape,
    grads: WeightGrads,
    /// Keep nothing from the forward; recompute it in the backward.
    recompute: bool,
    /// The forward's activations, for the backward (taken by it).
    saved: Mutex<Option<Activations>>,
}

/// What the backward pass needs from the forward, `n = B·T` rows each.
struct Activations {
    t: usize,
    normed_input: Vec<f32>,
    /// After RoPE.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attention: Vec<f32>,
    /// The residual stream after attention.
    mid: Vec<f32>,
    normed_mid: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    activation: Vec<f32>,
    /// Per projection with an adapter, `(α/r)·x·Aᵀ` `[n, r]` (empty without one).
    lora_hidden: [Vec<f32>; 7],
}

/// Runs `f` on the F32 values of a contiguous CPU tensor.
fn host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        bail!("train-decoder-layer: expects contiguous CPU tensors");
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// `x·Wᵀ` for `x` `[n, in]`, `w` `[out, in]`.
fn project(x: &[f32], w: &Tensor) -> Result<Vec<f32>> {
    let (out, inner) = w.dims2()?;
    let n = x.len() / inner.max(1);
    host(w, |w| {
        let mut y = vec![0f32; n * out];
        sgemm(MatRef::row_major(x, n, inner), MatRef::row_major(w, out, inner).t(), &mut y, false);
        Ok(y)
    })
}

/// `dx (+)= dy·W` for `dy` `[n, out]`, `w` `[out, in]`.
fn project_back(dy: &[f32], w: &Tensor, dx: &mut [f32], accumulate: bool) -> Result<()> {
    let (out, inner) = w.dims2()?;
    let n = dy.len() / out.max(1);
    host(w, |w| {
        sgemm(MatRef::row_major(dy, n, out), MatRef::row_major(w, out, inner), dx, accumulate);
        Ok(())
    })
}

fn scale_in_place(values: &mut [f32], factor: f32) {
    values.iter_mut().for_each(|v| *v *= factor);
}

impl DecoderLayer {
    /// Projection `p` of `x`, plus its adapter's `(α/r)·(x·Aᵀ)·Bᵀ`; the adapter's scaled hidden `(α/r)·x·Aᵀ` goes
    /// to `hidden` for the backward.
    fn project(&self, p: Projection, x: &[f32], hidden: &mut [Vec<f32>; 7]) -> Result<Vec<f32>> {
        let mut y = project(x, self.weights.base(p))?;
        if let Some(adapter) = &self.weights.lora[p.index()] {
            let mut h = project(x, &adapter.a)?;
            scale_in_place(&mut h, adapter.scale as f32);
            let (out, rank) = adapter.b.dims2()?;
            let n = h.len() / rank.max(1);
            host(&adapter.b, |b| {
                sgemm(MatRef::row_major(&h, n, rank), MatRef::row_major(b, out, rank).t(), &mut y, true);
                Ok(())
            })?;
            hidden[p.index()] = h;
        }
        Ok(y)
    }

    /// The backward of [`DecoderLayer::project`]: `dx (+)= dy·W` (+ the adapter's path), and the gradients of
    /// whichever of `W`, `A`, `B` train. `x` is the projection's input, `hidden` its saved adapter hidden.
    fn project_back(
        &self,
        p: Projection,
        dy: &[f32],
        x: &[f32],
        hidden: &[f32],
        dx: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let w = self.weights.base(p);
        project_back(dy, w, dx, accumulate)?;
        if w.is_variable() {
            self.weight_grad(w, dy, x)?;
        }
        let Some(adapter) = &self.weights.lora[p.index()] else { return Ok(()) };
        let (out, rank) = adapter.b.dims2()?;
        let n = dy.len() / out.max(1);
        // y = x·Wᵀ + h·Bᵀ with h = s·x·Aᵀ: dB = dyᵀ·h, dh = dy·B, dA = s·dhᵀ·x, dx += s·dh·A.
        if adapter.b.is_variable() {
            self.weight_grad(&adapter.b, dy, hidden)?;
        }
        let mut dh = vec![0f32; n * rank];
        host(&adapter.b, |b| {
            sgemm(MatRef::row_major(dy, n, out), MatRef::row_major(b, out, rank), &mut dh, false);
            Ok(())
        })?;
        scale_in_place(&mut dh, adapter.scale as f32);
        if adapter.a.is_variable() {
            self.weight_grad(&adapter.a, &dh, x)?;
        }
        project_back(&dh, &adapter.a, dx, true)
    }

    /// Adds `dyᵀ·x` (`[out, in]`) to `w`'s gradient.
    fn weight_grad(&self, w: &Tensor, dy: &[f32], x: &[f32]) -> Result<()> {
        let (out, inner) = w.dims2()?;
        let n = x.len() / inner.max(1);
        self.grads.contribute(w, out * inner, |buf, fresh| {
            sgemm(MatRef::row_major(dy, n, out).t(), MatRef::row_major(x, n, inner), buf, !fresh)
        });
        Ok(())
    }

    fn norm_grad(&self, w: &Tensor, dw: &[f32]) {
        if !w.is_variable() {
            return;
        }
        self.grads.contribute(w, dw.len(), |buf, fresh| {
            if fresh {
                buf.copy_from_slice(dw);
            } else {
                simd::axpy(buf, 1.0, dw);
            }
        });
    }

    fn forward(&self, x: &[f32], dims: &[usize]) -> Result<(Vec<f32>, Activations)> {
        let [b, t, hidden] = dims else { bail!("train-decoder-layer: expects [B, T, hidden], got {dims:?}") };
        let (b, t, hidden) = (*b, *t, *hidden);
        let w = &self.weights;
        let AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d } = self.shape;
        if w.q.dims2()? != (h * d, hidden) || w.k.dims2()? != (kv * d, hidden) {
            bail!("train-decoder-layer: projections do not match {:?} and hidden {hidden}", self.shape);
        }
        let mut lora_hidden: [Vec<f32>; 7] = Default::default();
        let normed_input = host(&w.input_norm, |wn| Ok(kernels::rms_norm(x, wn, w.eps)))?;
        let mut q = self.project(Projection::Q, &normed_input, &mut lora_hidden)?;
        let mut k = self.project(Projection::K, &normed_input, &mut lora_hidden)?;
        let v = self.project(Projection::V, &normed_input, &mut lora_hidden)?;
        host(&self.cos, |cos| {
            host(&self.sin, |sin| {
                kernels::rope_in_place(&mut q, cos, sin, t, h, d, false);
                kernels::rope_in_place(&mut k, cos, sin, t, kv, d, false);
                Ok(())
            })
        })?;
        let attention = kernels::attention(&q, &k, &v, t, self.shape);
        let mut mid = self.project(Projection::O, &attention, &mut lora_hidden)?;
        simd::axpy(&mut mid, 1.0, x);
        let normed_mid = host(&w.post_attention_norm, |wn| Ok(kernels::rms_norm(&mid, wn, w.eps)))?;
        let gate = self.project(Projection::Gate, &normed_mid, &mut lora_hidden)?;
        let up = self.project(Projection::Up, &normed_mid, &mut lora_hidden)?;
        let activation = kernels::swiglu(&gate, &up);
        let mut y = self.project(Projection::Down, &activation, &mut lora_hidden)?;
        simd::axpy(&mut y, 1.0, &mid);
        debug_assert_eq!(y.len(), b * t * hidden);
        let saved =
            Activations { t, normed_input, q, k, v, attention, mid, normed_mid, gate, up, activation, lora_hidden };
        Ok((y, saved))
    }

    fn backward(&self, x: &[f32], a: &Activations, dy: &[f32]) -> Result<Vec<f32>> {
        let w = &self.weights;
        let AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d } = self.shape;
        let (n, inter) = (x.len() / w.input_norm.elem_count().max(1), w.gate.dim(0)?);
        // MLP: y = mid + down(swiglu(gate(norm(mid)), up(norm(mid)))).
        let hidden = |p: Projection| a.lora_hidden[p.index()].as_slice();
        let mut d_activation = vec![0f32; n * inter];
        self.project_back(Projection::Down, dy, &a.activation, hidden(Projection::Down), &mut d_activation, false)?;
        let (d_gate, d_up) = kernels::swiglu_backward(&a.gate, &a.up, &d_activation);
        drop(d_activation);
        let mut d_normed_mid = vec![0f32; x.len()];
        self.project_back(
            Projection::Gate,
            &d_gate,
            &a.normed_mid,
            hidden(Projection::Gate),
            &mut d_normed_mid,
            false,
        )?;
        self.project_back(Projection::Up, &d_up, &a.normed_mid, hidden(Projection::Up), &mut d_normed_mid, true)?;
        let mut d_mid = dy.to_vec();
        let dw = host(&w.post_attention_norm, |wn| {
            Ok(kernels::rms_norm_backward(&a.mid, wn, &d_normed_mid, w.eps, &mut d_mid))
        })?;
        self.norm_grad(&w.post_attention_norm, &dw);
        // Attention: mid = x + o(attention(rope(q(norm(x))), rope(k(norm(x))), v(norm(x)))).
        let mut d_attention = vec![0f32; n * h * d];
        self.project_back(Projection::O, &d_mid, &a.attention, hidden(Projection::O), &mut d_attention, false)?;
        let (mut dq, mut dk, dv) = kernels::attention_backward(&a.q, &a.k, &a.v, &d_attention, a.t, self.shape);
        drop(d_attention);
        host(&self.cos, |cos| {
            host(&self.sin, |sin| {
                kernels::rope_in_place(&mut dq, cos, sin, a.t, h, d, true);
                kernels::rope_in_place(&mut dk, cos, sin, a.t, kv, d, true);
                Ok(())
            })
        })?;
        let mut d_normed_input = vec![0f32; x.len()];
        let normed = &a.normed_input;
        self.project_back(Projection::Q, &dq, normed, hidden(Projection::Q), &mut d_normed_input, false)?;
        self.project_back(Projection::K, &dk, normed, hidden(Projection::K), &mut d_normed_input, true)?;
        self.project_back(Projection::V, &dv, normed, hidden(Projection::V), &mut d_normed_input, true)?;
        let mut dx = d_mid;
        let dw = host(&w.input_norm, |wn| Ok(kernels::rms_norm_backward(x, wn, &d_normed_input, w.eps, &mut dx)))?;
        self.norm_grad(&w.input_norm, &dw);
        Ok(dx)
    }
}

impl CustomOp2 for DecoderLayer {
    fn name(&self) -> &'static str {
        "train-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{}: expects a contiguous input", self.name())
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let (y, saved) = self.forward(x, layout.dims())?;
        if !self.recompute {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// The weights' gradients go to the sink; `x`'s is returned (computed even when `x` is not tracked, which
    /// costs one RMS-norm backward).
    fn bwd(&self, x: &Tensor, _anchor: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let saved = match saved {
            Some(saved) => saved,
            None if self.recompute => host(x, |xs| Ok(self.forward(xs, x.dims())?.1))?,
            None => bail!("{}: backward ran twice, or without a forward", self.name()),
        };
        let dy = dy.contiguous()?;
        let dx = host(x, |xs| host(&dy, |dys| self.backward(xs, &saved, dys)))?;
        let dx = if x.track_op() { Some(Tensor::from_vec(dx, x.shape(), x.device())?) } else { None };
        Ok((dx, None))
    }
}
