//! Packs a loaded model's projection weights into the serving format
//! (`[model] serve_dtype`, see [`crate::quant`]) before it serves.
//!
//! What is packed: every projection of every layer (Q/K/V and gate/up as
//! their stacked matrices, the output and down projections) and the LM head.
//! What stays F32: the token embedding (a gather of one row per new token, so
//! its format does not change the bytes read per step; with tied embeddings
//! the LM head gets its own packed copy), the norm weights and RoPE tables
//! (a few kilobytes), biases, activations, attention and the KV cache.
//! llama.cpp keeps the same split for Q8_0 and Q4_0 except that it also
//! stores the embedding table quantized. Under Q4_0 the LM head is packed
//! in Q8_0, as llama.cpp's Q4_0 files keep their output matrix in Q6_K: on
//! SmolLM2 that took Q4_0's held-out NLL from +7.26% to +5.23% of F32's
//! (`instructd bench-quality`).

use candle_nn::Linear;

use super::{Fused, Llama};
use crate::error::{Error, Result};
use crate::quant::{self, ServeDtype};

impl Llama {
    /// This model with its projections packed in `dtype`; `F32` returns it
    /// unchanged. Needs F32 weights in CPU memory that are not trainable
    /// variables (a loaded checkpoint, not a training model).
    pub fn with_serve_dtype(mut self, dtype: ServeDtype) -> Result<Self> {
        if dtype == ServeDtype::F32 {
            return Ok(self);
        }
        let refuse = |message: String| Error::ServeDtype { dtype: dtype.as_str(), message };
        match quant::kernel(dtype) {
            quant::Kernel::Portable => tracing::warn!(
                serve_dtype = %dtype,
                "this CPU has neither AVX2 nor the format's AVX-512 instructions: {dtype} runs on the portable loop, \
                 tens of times slower than f32; serve f32 here"
            ),
            kernel => tracing::info!(serve_dtype = %dtype, ?kernel, "projection weights packed for this CPU's kernel"),
        }
        if !self.runs_on_host() {
            return Err(refuse(format!(
                "packed weights run on the CPU with dtype = \"f32\" activations; this model is {:?} on {:?}",
                self.dtype,
                self.device.location()
            )));
        }
        let pack_in = |linear: &Linear, dtype: ServeDtype| -> Result<Linear> {
            if linear.weight().is_variable() {
                return Err(refuse("a trainable model cannot be packed".into()));
            }
            Ok(Linear::new(quant::pack(linear.weight(), dtype)?, linear.bias().cloned()))
        };
        let pack = |linear: &Linear| pack_in(linear, dtype);
        // A stacked matrix is split into views of its rows; a format that interleaves rows keeps only views that
        // start and end on its row groups, else the parts are packed apart.
        let splits = |fused: &Option<Fused>| fused.as_ref().is_some_and(|f| f.splits_on(quant::view_rows(dtype)));
        for layer in &mut self.layers {
            if !splits(&layer.attn.qkv) {
                layer.attn.qkv = None;
            }
            if !splits(&layer.mlp.gate_up) {
                layer.mlp.gate_up = None;
            }
            let attn = &mut layer.attn;
            match attn.qkv.as_mut() {
                Some(qkv) => [attn.q_proj, attn.k_proj, attn.v_proj] = qkv.pack(&pack)?,
                None => {
                    attn.q_proj = pack(&attn.q_proj)?;
                    attn.k_proj = pack(&attn.k_proj)?;
                    attn.v_proj = pack(&attn.v_proj)?;
                }
            }
            attn.o_proj = pack(&attn.o_proj)?;
            let mlp = &mut layer.mlp;
            match mlp.gate_up.as_mut() {
                Some(gate_up) => [mlp.gate_proj, mlp.up_proj] = gate_up.pack(&pack)?,
                None => {
                    mlp.gate_proj = pack(&mlp.gate_proj)?;
                    mlp.up_proj = pack(&mlp.up_proj)?;
                }
            }
            mlp.down_proj = pack(&mlp.down_proj)?;
        }
        // The LM head decides every token: under Q4_0 it stays 8-bit (llama.cpp keeps it in Q6_K for the
        // same reason); the product tells the formats apart by their row widths.
        let head_dtype = if dtype == ServeDtype::Q4_0 { ServeDtype::Q8_0 } else { dtype };
        self.lm_head = pack_in(&self.lm_head, head_dtype)?;
        Ok(self)
    }
}

impl Fused {
    /// Whether every part starts and ends on a multiple of `rows`.
    fn splits_on(&self, rows: usize) -> bool {
        self.widths.iter().all(|w| w.is_multiple_of(rows))
    }

    /// Packs the stacked matrix with `pack` and returns the parts as row
    /// views of it (so the F32 stack, which the old views shared, is freed).
    fn pack<const P: usize>(&mut self, pack: &impl Fn(&Linear) -> Result<Linear>) -> Result<[Linear; P]> {
        self.linear = pack(&self.linear)?;
        let mut views = Vec::with_capacity(P);
        let mut start = 0;
        for &width in &self.widths {
            let bias = self.linear.bias().map(|b| b.narrow(0, start, width)).transpose()?;
            views.push(Linear::new(self.linear.weight().narrow(0, start, width)?, bias));
            start += width;
        }
        views.try_into().map_err(|_| Error::EngineFailure("fused projection count".into()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::llama::BatchChunk;
    use crate::load::LoadedModel;
    use crate::tiny_model::{TinySpec, init_tiny};

    /// Every logit of a prefill and two decode steps, for 3 sequences batched together.
    fn logits(model: &Llama) -> Vec<f32> {
        let prompts: [&[u32]; 3] = [&[1, 20, 33, 4, 90, 17, 5], &[7, 7, 8], &[3, 100, 60, 2, 9]];
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache(16)).collect();
        let mut chunks: Vec<BatchChunk> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, cache)| BatchChunk { tokens: p, cache, all_logits: true })
            .collect();
        let mut out: Vec<Tensor> = model.forward_batch(&mut chunks).unwrap();
        for step in [[11u32], [42]] {
            let mut chunks: Vec<BatchChunk> =
                caches.iter_mut().map(|cache| BatchChunk { tokens: &step, cache, all_logits: false }).collect();
            out.extend(model.forward_batch(&mut chunks).unwrap());
        }
        out.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    /// The whole tiny model (2 layers, GQA, tied LM head) served packed
    /// stays within each format's error of F32: BF16 rounds every operand to
    /// 8 significant bits, Q8_0 to 1/254 of each block's largest value, Q4_0
    /// weights to 1/16 of it (a full step on the clamped side).
    /// Tolerances are relative to the largest F32 logit.
    #[test]
    fn packed_models_match_f32_logits_within_tolerance() {
        let dir = tempfile::tempdir().unwrap();
        init_tiny(dir.path(), &TinySpec { seed: 7, ..Default::default() }).unwrap();
        let load = |dtype| LoadedModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap().with_serve_dtype(dtype);
        let reference = logits(&load(ServeDtype::F32).unwrap().model);
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (dtype, tolerance) in [(ServeDtype::Bf16, 0.02), (ServeDtype::Q8_0, 0.03), (ServeDtype::Q4_0, 0.12)] {
            let model = load(dtype).unwrap().model;
            let hidden = TinySpec::default().hidden_size;
            // Under Q4_0 the head stays 8-bit, as llama.cpp's Q4_0 files keep theirs in Q6_K.
            let head = if dtype == ServeDtype::Q4_0 { ServeDtype::Q8_0 } else { dtype };
            assert_eq!(quant::packed_dtype(model.lm_head.weight(), hidden), Some(head));
            let down = model.layers[0].mlp.down_proj.weight();
            assert_eq!(quant::packed_dtype(down, TinySpec::default().intermediate_size), Some(dtype));
            let got = logits(&model);
            let diff = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff > 0.0, "{dtype}: identical to F32, so the packed weights were not used");
            assert!(diff < tolerance * scale, "{dtype}: max logit difference {diff} (largest logit {scale})");
        }
    }

    /// Key and value projections 8 rows wide (one KV head of 8): the packed
    /// formats' panels (16 rows) cannot be split there, so the stacked Q/K/V
    /// matrix is dropped and each projection packed alone.
    #[test]
    fn stacks_that_split_inside_a_panel_are_packed_apart() {
        let dir = tempfile::tempdir().unwrap();
        let spec =
            TinySpec { hidden_size: 32, num_key_value_heads: 1, intermediate_size: 64, seed: 3, ..Default::default() };
        init_tiny(dir.path(), &spec).unwrap();
        let load = |dtype| LoadedModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap().with_serve_dtype(dtype);
        let reference = logits(&load(ServeDtype::F32).unwrap().model);
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (dtype, tolerance) in [(ServeDtype::Bf16, 0.02), (ServeDtype::Q8_0, 0.03), (ServeDtype::Q4_0, 0.12)] {
            let model = load(dtype).unwrap().model;
            assert!(model.layers[0].attn.qkv.is_none(), "{dtype}: the Q/K/V stack splits inside a panel");
            assert!(model.layers[0].mlp.gate_up.is_some(), "{dtype}: 64-row gate/up parts split on panels");
            let got = logits(&model);
            let diff = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < tolerance * scale, "{dtype}: max logit difference {diff} (largest logit {scale})");
        }
    }

    #[test]
    fn unpackable_models_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        // 48-wide rows are not a whole number of Q8_0 or Q4_0 blocks (32); BF16 has no such limit.
        init_tiny(dir.path(), &TinySpec { hidden_size: 48, intermediate_size: 96, ..Default::default() }).unwrap();
        let load = || LoadedModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        for dtype in [ServeDtype::Q8_0, ServeDtype::Q4_0] {
            let err = load().with_serve_dtype(dtype).err().expect("48-wide rows cannot be Q8_0 or Q4_0");
            assert!(matches!(err, Error::ServeDtype { dtype: d, .. } if d == dtype.as_str()), "{err}");
        }
        assert!(load().with_serve_dtype(ServeDtype::Bf16).is_ok());
        let bf16 = LoadedModel::load(dir.path(), DType::BF16, &Device::Cpu).unwrap();
        let err = bf16.with_serve_dtype(ServeDtype::Bf16).err().expect("BF16 activations are not packed");
        assert!(err.to_string().contains("dtype = \"f32\""), "{err}");
    }
}
