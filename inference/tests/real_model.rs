//! Checks on the real default model (SmolLM2-135M-Instruct imported from its
//! GGUF). `make test` fetches and imports it first; `INSTRUCTD_TEST_MODEL`
//! points at the directory.

#[path = "../../tests/support/real_model.rs"]
mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use inference::engine::{EngineConfig, GenerateRequest};
use inference::llama::BatchChunk;
use inference::load::LoadedModel;
use inference::model_files::ModelFiles;
use inference::tokenizer::ChatMessage;
use support::real_model_dir;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn chat_prompt(loaded: &LoadedModel, text: &str) -> Vec<u32> {
    let messages = [ChatMessage { role: "user".into(), content: text.into() }];
    let prompt = loaded.tokenizer.apply_chat_template(&messages, true).unwrap();
    loaded.tokenizer.encode(&prompt, false).unwrap()
}

/// An independent implementation (candle-transformers' llama, inference-only)
/// on the same weights must give the same next-token logits as both of ours.
#[test]
fn logits_match_candle_transformers_llama() {
    let dir = real_model_dir();
    let files = ModelFiles::open(&dir).unwrap();
    let loaded = LoadedModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let ids = chat_prompt(&loaded, "What is the capital of France?");
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();

    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let reference_cfg: candle_transformers::models::llama::LlamaConfig = serde_json::from_str(&text).unwrap();
    let reference_cfg = reference_cfg.into_config(false);
    let tensors = files.load_tensors(DType::F32, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let reference = candle_transformers::models::llama::Llama::load(vb, &reference_cfg).unwrap();
    let mut cache =
        candle_transformers::models::llama::Cache::new(false, DType::F32, &reference_cfg, &Device::Cpu).unwrap();
    let expected = reference.forward(&input, 0, &mut cache).unwrap().squeeze(0).unwrap();

    let train = loaded.model.forward_train(&input, 0.0).unwrap();
    let train_last = train.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
    let mut seq = loaded.model.new_cache(ids.len());
    let served = loaded
        .model
        .forward_batch(&mut [BatchChunk { tokens: &ids, cache: &mut seq, all_logits: false }])
        .unwrap()
        .remove(0)
        .squeeze(0)
        .unwrap();

    let scale = expected.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let d_train = max_abs_diff(&train_last, &expected);
    let d_served = max_abs_diff(&served, &expected);
    assert!(d_train < 1e-3 * scale.max(1.0), "training path differs from candle-transformers by {d_train}");
    assert!(d_served < 1e-3 * scale.max(1.0), "serving path differs from candle-transformers by {d_served}");
    let argmax = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(argmax(&served), argmax(&expected));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn greedy_chat_says_paris() {
    let loaded = LoadedModel::load(real_model_dir(), DType::F32, &Device::Cpu).unwrap();
    let prompt = chat_prompt(&loaded, "What is the capital of France?");
    let engine = loaded.into_engine("smollm2", "test", EngineConfig::default()).unwrap();
    let mut request = GenerateRequest::new(prompt, 24);
    request.sampling.temperature = 0.0;
    let completion = runtime().block_on(engine.generate(request)).unwrap();
    let text = &completion.choices[0].text;
    assert!(text.contains("Paris"), "unexpected answer: {text:?}");
}

/// Continuous batching must not change results: 16 greedy requests at once
/// give exactly the texts they give one at a time.
#[test]
fn concurrent_greedy_requests_match_sequential_ones() {
    let loaded = LoadedModel::load(real_model_dir(), DType::F32, &Device::Cpu).unwrap();
    let questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "Write a haiku about rain.",
        "What is 2 + 2?",
        "Give me a synonym for happy.",
        "Who wrote Hamlet?",
        "What is the boiling point of water?",
        "Say hello in Spanish.",
        "List three fruits.",
        "What is the opposite of cold?",
        "How many legs does a spider have?",
        "Describe the sky in one sentence.",
        "What colour is grass?",
        "Translate 'thank you' into French.",
        "What is the largest planet?",
        "Suggest a name for a cat.",
    ];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| chat_prompt(&loaded, q)).collect();
    let engine = loaded.into_engine("smollm2", "test", EngineConfig::default()).unwrap();
    let request = |p: &Vec<u32>| {
        let mut r = GenerateRequest::new(p.clone(), 24);
        r.sampling.temperature = 0.0;
        r
    };
    let rt = runtime();
    let sequential: Vec<String> =
        prompts.iter().map(|p| rt.block_on(engine.generate(request(p))).unwrap().choices[0].text.clone()).collect();
    let generations: Vec<_> = prompts.iter().map(|p| engine.submit(request(p), false).unwrap()).collect();
    let concurrent: Vec<String> = rt.block_on(async {
        let mut out = Vec::new();
        for g in generations {
            out.push(g.collect().await.unwrap().choices[0].text.clone());
        }
        out
    });
    for (i, (s, c)) in sequential.iter().zip(&concurrent).enumerate() {
        assert_eq!(s, c, "request {i} ({:?}) differs when batched", questions[i]);
    }
}
