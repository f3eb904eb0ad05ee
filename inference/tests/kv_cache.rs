//! The KV block pool and the prefix cache in the engine, on the tiny model:
//! cache hits change no output, a full pool queues and preempts without
//! failing anything, a request the pool can never hold is refused, and a
//! swapped-in engine never reads the old engine's cache.

use std::path::Path;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device};
use inference::Error;
use inference::engine::{Engine, EngineConfig, EngineHandle, FinishReason, GenerateRequest};
use inference::load::LoadedModel;
use inference::tiny_model::{TinySpec, init_tiny};

fn tiny_engine(dir: &Path, seed: u64, checkpoint: &str, config: EngineConfig) -> Engine {
    if !dir.join("config.json").exists() {
        init_tiny(dir, &TinySpec { seed, ..Default::default() }).unwrap();
    }
    LoadedModel::load(dir, DType::F32, &Device::Cpu).unwrap().into_engine("tiny", checkpoint, config).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn config(prefix_cache: bool, blocks: usize, block_tokens: usize) -> EngineConfig {
    EngineConfig { prefix_cache, kv_cache_blocks: blocks, kv_block_tokens: block_tokens, ..Default::default() }
}

/// Greedy, fixed length: a random tiny model's text is degenerate, token ids are not.
fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.sampling.temperature = 0.0;
    r.sampling.top_logprobs = Some(0);
    r.ignore_eos = true;
    r
}

/// The sampled token ids of every choice.
fn tokens(engine: &Engine, rt: &tokio::runtime::Runtime, r: GenerateRequest) -> Vec<Vec<u32>> {
    let completion = rt.block_on(engine.generate(r)).unwrap();
    completion.choices.iter().map(|c| c.tokens.iter().map(|t| t.token).collect()).collect()
}

fn prompt(start: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (start + i * 7) % 250 + 3).collect()
}

#[test]
fn prefix_cache_hits_change_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let cached = tiny_engine(dir.path(), 5, "a", config(true, 0, 4));
    let plain = tiny_engine(dir.path(), 5, "a", config(false, 0, 4));
    let rt = runtime();
    let system = prompt(1, 37);
    let with = |question: &[u32]| [system.as_slice(), question].concat();
    let first = with(&[9, 8, 7]);
    let second = with(&[4, 5, 6, 7, 8]);
    assert_eq!(tokens(&cached, &rt, request(first.clone(), 12)), tokens(&plain, &rt, request(first, 12)));
    let hits_before = cached.stats().kv.prefix_hit_tokens.load(Ordering::Relaxed);
    assert_eq!(hits_before, 0, "nothing was cached before the first request");
    assert_eq!(tokens(&cached, &rt, request(second.clone(), 12)), tokens(&plain, &rt, request(second.clone(), 12)));
    let hits = cached.stats().kv.prefix_hit_tokens.load(Ordering::Relaxed);
    assert_eq!(hits, 36, "the system prompt's 9 full blocks of 4 came from the cache");
    assert_eq!(plain.stats().kv.prefix_hit_tokens.load(Ordering::Relaxed), 0);
    // A chat's next turn: the previous prompt and answer come back as the prefix.
    let answer = tokens(&cached, &rt, request(second.clone(), 12)).remove(0);
    let next_turn = [second.as_slice(), &answer, &[11, 12, 13]].concat();
    let before = cached.stats().kv.prefix_hit_tokens.load(Ordering::Relaxed);
    assert_eq!(tokens(&cached, &rt, request(next_turn.clone(), 6)), tokens(&plain, &rt, request(next_turn, 6)));
    let turn_hits = cached.stats().kv.prefix_hit_tokens.load(Ordering::Relaxed) - before;
    assert!(turn_hits >= 48, "the previous turn's blocks are reused, got {turn_hits} tokens");
    // Several samples of one prompt (seeded): the same with and without the cache.
    let mut samples = request(with(&[3, 3]), 8);
    samples.sampling.temperature = 1.0;
    samples.sampling.seed = Some(11);
    samples.n = 4;
    let a = tokens(&cached, &rt, samples.clone());
    assert_eq!(a, tokens(&plain, &rt, samples));
    assert!(a.iter().any(|t| t != &a[0]), "seeded samples differ from each other");
}

#[test]
fn a_full_pool_queues_and_preempts_and_every_request_completes() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = tiny_engine(dir.path(), 6, "a", config(true, 0, 4));
    // 12 blocks of 4 positions: one request of 10 + 30 tokens needs 10 of them.
    let tight = tiny_engine(dir.path(), 6, "a", config(true, 12, 4));
    let rt = runtime();
    let requests: Vec<GenerateRequest> = (0..8).map(|i| request(prompt(i * 13, 10), 30)).collect();
    let expected: Vec<Vec<Vec<u32>>> = requests.iter().map(|r| tokens(&roomy, &rt, r.clone())).collect();
    let generations: Vec<_> = requests.iter().map(|r| tight.submit(r.clone(), false).unwrap()).collect();
    let got: Vec<Vec<Vec<u32>>> = rt.block_on(async {
        let mut out = Vec::new();
        for generation in generations {
            let completion = generation.collect().await.unwrap();
            assert!(completion.choices.iter().all(|c| c.finish_reason == Some(FinishReason::Length)));
            out.push(completion.choices.iter().map(|c| c.tokens.iter().map(|t| t.token).collect()).collect());
        }
        out
    });
    assert_eq!(got, expected, "queued and preempted requests generate what they would have alone");
    let kv = &tight.stats().kv;
    assert!(kv.preemptions.load(Ordering::Relaxed) > 0, "the test must exercise preemption");
    assert_eq!(kv.blocks_total.load(Ordering::Relaxed), 12);
    // The batching thread publishes the pool's use after the step that sent the last events.
    let settled = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        kv.blocks_used.load(Ordering::Relaxed) == 0
    });
    assert!(
        settled,
        "every block is released once nothing runs ({} still used)",
        kv.blocks_used.load(Ordering::Relaxed)
    );
}

#[test]
fn a_request_the_pool_can_never_hold_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 7, "a", config(true, 8, 4));
    let refused = |r: GenerateRequest| match engine.submit(r, false) {
        Err(Error::InvalidRequest { param, message }) => (param, message),
        Err(other) => panic!("expected an invalid-request error, got {other}"),
        Ok(_) => panic!("a request larger than the KV pool was accepted"),
    };
    let (param, message) = refused(request(prompt(1, 40), 4));
    assert_eq!(param, "prompt");
    assert!(message.contains("KV cache"), "{message}");
    let mut many = request(prompt(1, 8), 4);
    many.n = 8;
    assert_eq!(refused(many).0, "n");
    // A sample that alone outgrows the pool (8 x 4 positions) ends with `length`.
    let rt = runtime();
    let completion = rt.block_on(engine.generate(request(prompt(1, 4), 60))).unwrap();
    let choice = &completion.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::Length));
    assert!(choice.completion_tokens < 60 && choice.completion_tokens >= 24, "{}", choice.completion_tokens);
}

#[test]
fn a_swapped_in_engine_never_reads_the_old_engines_cache() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let handle = EngineHandle::new(tiny_engine(a_dir.path(), 1, "a", config(true, 0, 4)));
    let rt = runtime();
    let shared = prompt(2, 33);
    tokens(&handle.current(), &rt, request(shared.clone(), 4));
    assert!(tokens(&handle.current(), &rt, request(shared.clone(), 4)).len() == 1);
    assert_eq!(handle.current().stats().kv.prefix_hit_tokens.load(Ordering::Relaxed), 32);
    handle.swap(tiny_engine(b_dir.path(), 2, "b", config(true, 0, 4)));
    let plain_b = tiny_engine(b_dir.path(), 2, "b", config(false, 0, 4));
    let on_b = tokens(&handle.current(), &rt, request(shared.clone(), 4));
    assert_eq!(handle.current().stats().kv.prefix_hit_tokens.load(Ordering::Relaxed), 0, "a new engine starts cold");
    assert_eq!(on_b, tokens(&plain_b, &rt, request(shared, 4)), "computed with the new weights only");
}

/// The trainer samples from its policy through an engine that reads the
/// policy's variables, which each training step updates in place: keys cached
/// before a step would not match the weights after it.
#[test]
fn an_engine_on_weights_that_training_updates_keeps_no_prefix_cache() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny(dir.path(), &TinySpec { seed: 8, ..Default::default() }).unwrap();
    let loaded = LoadedModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let policy = inference::llama::Llama::new(&loaded.files.config, vb).unwrap();
    assert!(policy.weights_may_change());
    assert!(!loaded.model.weights_may_change());
    let info = inference::engine::ModelInfo {
        name: "policy".into(),
        checkpoint: "policy".into(),
        vocab_size: loaded.files.config.vocab_size,
        max_positions: policy.max_positions(),
    };
    let engine = Engine::start(policy, loaded.tokenizer, info, config(true, 0, 4)).unwrap();
    let rt = runtime();
    let shared = prompt(3, 33);
    tokens(&engine, &rt, request(shared.clone(), 2));
    tokens(&engine, &rt, request(shared, 2));
    assert_eq!(engine.stats().kv.prefix_hit_tokens.load(Ordering::Relaxed), 0);
}

/// An F16 pool (`kv_dtype = "f16"`) holds twice the blocks of an F32 one in
/// the same memory, its prefix-cache hits are still exact, and its outputs
/// stay within F16 rounding of the F32 cache's.
#[test]
fn an_f16_cache_holds_twice_the_positions_and_stays_close_to_f32() {
    use inference::kv_pool::KvDtype;
    let dir = tempfile::tempdir().unwrap();
    let sized =
        |prefix_cache: bool, kv_dtype: KvDtype| EngineConfig { kv_cache_mb: 8, kv_dtype, ..config(prefix_cache, 0, 4) };
    let exact = tiny_engine(dir.path(), 5, "a", sized(false, KvDtype::F32));
    let half = tiny_engine(dir.path(), 5, "a", sized(false, KvDtype::F16));
    let half_cached = tiny_engine(dir.path(), 5, "a", sized(true, KvDtype::F16));
    let total = |e: &Engine| e.stats().kv.blocks_total.load(Ordering::Relaxed);
    assert_eq!(total(&half), 2 * total(&exact));
    let rt = runtime();
    let system = prompt(1, 37);
    let mut compared = 0;
    for question in [[9u32, 8, 7], [4, 5, 6], [20, 30, 40]] {
        let p = [system.as_slice(), &question].concat();
        let completion = |e: &Engine| rt.block_on(e.generate(request(p.clone(), 8))).unwrap().choices.remove(0).tokens;
        let (a, b) = (completion(&exact), completion(&half));
        assert_eq!(completion(&half_cached), b, "a prefix-cache hit changes nothing in F16 either");
        // Compare positions up to the first differing token (a near-tie may flip).
        for (x, y) in a.iter().zip(&b) {
            let (lx, ly) = (x.logprob.unwrap(), y.logprob.unwrap());
            if x.token != y.token {
                assert!((lx - ly).abs() < 0.05, "a flipped token was not a near-tie: {lx} vs {ly}");
                break;
            }
            assert!((lx - ly).abs() < 1e-2, "logprob {lx} (f32 cache) vs {ly} (f16 cache)");
            compared += 1;
        }
    }
    assert!(compared >= 8, "only {compared} positions agreed");
}
