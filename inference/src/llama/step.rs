//! A serving step that can stop between decoder layers and go on later.
//!
//! [`Llama::begin_step`] validates a ragged batch, reserves its cache rows
//! and embeds its tokens; [`Llama::run_layers`] moves the residual stream
//! through layers up to a given one; [`Llama::finish_step`] runs whatever
//! layers are left and projects the rows wanted onto the vocabulary.
//! Between two calls the caller may drop its chunks (and so the borrows of
//! the caches) and run other forwards over other caches: a layer writes keys
//! and values only at the new positions of its own chunks' caches, and the
//! caches count those positions only in `finish_step`, so the step resumes
//! with the same chunks rebuilt and gives the result it would have given
//! uninterrupted. [`Llama::forward_batch`] is the three in a row.

use candle_core::{DType, Module, Tensor};

use super::host::Rope;
use super::{BatchChunk, Llama, RowVisitor, SequenceCache, advance_caches, serve, split_logits, stream_rows};
use crate::error::{Error, Result};

/// A serving step in flight: the residual stream after `layer` layers.
pub struct StepState {
    layer: usize,
    /// New tokens in the batch (rows of the residual stream).
    rows: usize,
    stream: Stream,
}

enum Stream {
    /// F32 on the CPU ([`Llama::runs_on_host`]): rows of `hidden` values and
    /// each row's RoPE cos / sin.
    Host { x: Vec<f32>, rope: Rope },
    /// Candle tensors on any device.
    Tensor { x: Tensor, cos: Tensor, sin: Tensor },
}

impl Llama {
    /// Decoder layers; [`Llama::run_layers`] takes a layer count up to this.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Validates `chunks`, makes room in their caches for their new tokens
    /// and embeds them. `None` when no chunk brings a token (no step).
    pub fn begin_step(&self, chunks: &mut [BatchChunk<'_>]) -> Result<Option<StepState>> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for chunk in chunks.iter() {
            if chunk.tokens.is_empty() {
                return Err(Error::invalid("prompt", "a sequence brought no tokens to the batch"));
            }
            let start = chunk.cache.len;
            let end = start + chunk.tokens.len();
            if end > self.max_positions() {
                return Err(Error::invalid(
                    "prompt",
                    format!("sequence would reach {end} tokens, beyond the model's {} positions", self.max_positions()),
                ));
            }
            if let Some(&bad) = chunk.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(Error::invalid(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary (size {})", self.config.vocab_size),
                ));
            }
            ids.extend_from_slice(chunk.tokens);
            positions.extend(start..end);
        }
        if ids.is_empty() {
            return Ok(None);
        }
        for chunk in chunks.iter_mut() {
            chunk.cache.prepare(chunk.tokens.len())?;
        }
        let rows = ids.len();
        let stream = if self.runs_on_host() {
            let (x, rope) = self.host_embed(&ids, &positions)?;
            Stream::Host { x, rope }
        } else {
            let positions = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect(), rows, &self.device)?;
            Stream::Tensor {
                x: self.embed_tokens.forward(&Tensor::from_vec(ids, rows, &self.device)?)?,
                cos: self.rope.cos.index_select(&positions, 0)?,
                sin: self.rope.sin.index_select(&positions, 0)?,
            }
        };
        Ok(Some(StepState { layer: 0, rows, stream }))
    }

    /// Runs `state` through the layers below `until` (clamped to the model's
    /// depth) that it has not been through. `chunks` must bring the same
    /// tokens, with the same caches, as they did to [`Llama::begin_step`].
    pub fn run_layers(&self, state: &mut StepState, chunks: &mut [BatchChunk<'_>], until: usize) -> Result<()> {
        let until = until.min(self.layers.len());
        if state.layer >= until {
            return Ok(());
        }
        if chunks.iter().map(|c| c.tokens.len()).sum::<usize>() != state.rows {
            return Err(Error::EngineFailure("a resumed step came back with other chunks than it began with".into()));
        }
        let mut caches: Vec<(&mut SequenceCache, usize)> =
            chunks.iter_mut().map(|c| (&mut *c.cache, c.tokens.len())).collect();
        for i in state.layer..until {
            match &mut state.stream {
                Stream::Host { x, rope } => self.host_layer(i, x, state.rows, rope, &mut caches)?,
                Stream::Tensor { x, cos, sin } => *x = self.layers[i].forward_batch(x, cos, sin, &mut caches, i)?,
            }
            state.layer = i + 1;
        }
        Ok(())
    }

    /// Runs the layers `state` has left, counts every chunk's new tokens as
    /// cached and returns, per chunk, F32 logits `[rows, vocab]` (see
    /// [`Llama::forward_batch`]; with `visit`, [`Llama::forward_batch_streaming`]).
    pub fn finish_step(
        &self,
        mut state: StepState,
        chunks: &mut [BatchChunk<'_>],
        visit: Option<RowVisitor<'_>>,
    ) -> Result<Vec<Tensor>> {
        self.run_layers(&mut state, chunks, self.layers.len())?;
        // Only the rows someone asked for go through the (large) vocabulary projection.
        let mut rows = advance_caches(chunks);
        match state.stream {
            Stream::Host { x, .. } => self.host_logits(&x, chunks, &mut rows, visit),
            Stream::Tensor { x, .. } => {
                if let Some(visit) = visit {
                    let vocab = self.config.vocab_size;
                    stream_rows(chunks, &mut rows, vocab, visit, |start, count| {
                        let block = serve(&self.lm_head, &self.norm.forward_fast(&x.narrow(0, start, count)?)?)?;
                        Ok(block.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                    })?;
                }
                let index: Vec<u32> = rows.iter().flat_map(|&(s, k)| (s..s + k).map(|r| r as u32)).collect();
                let len = index.len();
                let picked = x.index_select(&Tensor::from_vec(index, len, &self.device)?, 0)?;
                let logits = serve(&self.lm_head, &self.norm.forward_fast(&picked)?)?.to_dtype(DType::F32)?;
                split_logits(&logits, &rows)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;

    fn model(dtype: DType) -> Llama {
        let cfg = serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":50,
            "max_position_embeddings":64,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#,
        )
        .unwrap();
        Llama::new(&cfg, VarBuilder::from_varmap(&VarMap::new(), dtype, &Device::Cpu)).unwrap()
    }

    /// A decode step paused after one layer while another sequence is
    /// prefilled gives the same logits, bit for bit, as the step run
    /// uninterrupted, on the host path (F32) and the tensor path (BF16).
    #[test]
    fn a_step_paused_for_another_forward_gives_the_same_logits() {
        for dtype in [DType::F32, DType::BF16] {
            let model = model(dtype);
            let decode = |pause: bool| {
                let mut cache = model.new_cache(16);
                model
                    .forward_batch(&mut [BatchChunk { tokens: &[1, 2, 3, 4], cache: &mut cache, all_logits: false }])
                    .unwrap();
                let mut chunks = [BatchChunk { tokens: &[5], cache: &mut cache, all_logits: false }];
                let mut state = model.begin_step(&mut chunks).unwrap().unwrap();
                if pause {
                    model.run_layers(&mut state, &mut chunks, 1).unwrap();
                    let mut other = model.new_cache(16);
                    model
                        .forward_batch(&mut [BatchChunk { tokens: &[9, 8, 7], cache: &mut other, all_logits: true }])
                        .unwrap();
                }
                let logits = model.finish_step(state, &mut chunks, None).unwrap().remove(0);
                (logits.to_vec2::<f32>().unwrap(), cache.len())
            };
            let (straight, paused) = (decode(false), decode(true));
            assert_eq!(paused.1, 5, "{dtype:?}: the cache counts the new token once");
            assert_eq!(straight, paused, "{dtype:?}");
        }
    }

    #[test]
    fn a_step_resumed_with_other_chunks_is_refused() {
        let model = model(DType::F32);
        let (mut a, mut b) = (model.new_cache(8), model.new_cache(8));
        let mut state =
            model.begin_step(&mut [BatchChunk { tokens: &[1, 2], cache: &mut a, all_logits: false }]).unwrap().unwrap();
        let err = model.run_layers(&mut state, &mut [BatchChunk { tokens: &[3], cache: &mut b, all_logits: false }], 1);
        assert!(matches!(err, Err(Error::EngineFailure(_))));
    }
}
