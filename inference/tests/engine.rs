//! The engine on a tiny random-weight model: validation, overload,
//! cancellation, hot swap, n / best_of / echo / logprobs / stop semantics.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use inference::Error;
use inference::engine::{Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, Tenant};
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

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.sampling.temperature = 0.0;
    r
}

fn param_of(result: Result<inference::engine::Generation, Error>) -> &'static str {
    match result {
        Err(Error::InvalidRequest { param, .. }) => param,
        Err(other) => panic!("expected an invalid-request error, got {other}"),
        Ok(_) => panic!("expected an invalid-request error, the request was accepted"),
    }
}

#[test]
fn bad_requests_are_refused_with_the_parameter_named() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path(), 0, "a", EngineConfig::default());
    let max = engine.info().max_positions;
    let vocab = engine.info().vocab_size as u32;
    let ok = || greedy(vec![5, 6, 7], 4);

    assert_eq!(param_of(engine.submit(greedy(vec![], 4), false)), "prompt");
    assert_eq!(param_of(engine.submit(greedy(vec![1; max + 1], 4), false)), "prompt");
    assert_eq!(param_of(engine.submit(greedy(vec![1; 10], max), false)), "max_tokens");
    assert_eq!(param_of(engine.submit(greedy(vec![1], usize::MAX), false)), "max_tokens");
    assert_eq!(param_of(engine.submit(greedy(vec![1, vocab], 4), false)), "prompt");
    assert_eq!(param_of(engine.submit(greedy(vec![1], 0), false)), "max_tokens");
    let mut r = ok();
    r.n = 0;
    assert_eq!(param_of(engine.submit(r, false)), "n");
    let mut r = ok();
    r.n = 1000;
    assert_eq!(param_of(engine.submit(r, false)), "n");
    let mut r = ok();
    r.best_of = Some(3);
    assert_eq!(param_of(engine.submit(r, true)), "best_of", "best_of > n cannot stream");
    for top_p in [0.0, -0.5, 1.5, f32::NAN] {
        let mut r = ok();
        r.sampling.top_p = top_p;
        assert_eq!(param_of(engine.submit(r, false)), "top_p");
    }
    let mut r = ok();
    r.sampling.temperature = -1.0;
    assert_eq!(param_of(engine.submit(r, false)), "temperature");
    let mut r = ok();
    r.stop = vec![String::new()].into();
    assert_eq!(param_of(engine.submit(r, false)), "stop");

    // The engine is still healthy after all of that.
    let completion = runtime().block_on(engine.generate(ok())).unwrap();
    assert_eq!(completion.choices.len(), 1);
}

#[test]
fn a_full_queue_answers_overloaded_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let config = EngineConfig { queue_capacity: 1, max_running: 1, ..Default::default() };
    let engine = tiny_engine(tmp.path(), 0, "a", config);
    let mut held = Vec::new();
    let mut overloaded = false;
    for _ in 0..8 {
        let started = Instant::now();
        match engine.submit(greedy(vec![1, 2, 3], 300), false) {
            Ok(g) => held.push(g),
            Err(Error::Overloaded) => {
                assert!(started.elapsed() < Duration::from_millis(100), "Overloaded must not wait");
                overloaded = true;
                break;
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(overloaded, "8 long requests into a queue of 1 never overloaded it");
}

#[test]
fn dropping_a_generation_cancels_it_and_frees_its_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path(), 0, "a", EngineConfig::default());
    let rt = runtime();
    let mut request = greedy(vec![1, 2, 3], 400);
    request.ignore_eos = true;
    let mut generation = engine.submit(request, true).unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            generation.next().await.unwrap();
        }
    });
    assert!(engine.stats().running.load(Ordering::Relaxed) >= 1);
    drop(generation);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().running.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "the cancelled sequence was never freed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_swap_leaves_requests_in_flight_on_their_engine() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let handle = EngineHandle::new(tiny_engine(a_dir.path(), 1, "a", EngineConfig::default()));
    let rt = runtime();
    // Seeded sampling: a random tiny model's greedy text is degenerate (it
    // repeats its input), so two engines would look alike.
    let mut long = GenerateRequest::new(vec![4, 5, 6], 64);
    long.sampling.seed = Some(3);
    long.ignore_eos = true;
    let expected_a = rt.block_on(handle.current().generate(long.clone())).unwrap().choices[0].text.clone();

    let engine_a = handle.current();
    let mut in_flight = engine_a.submit(long.clone(), true).unwrap();
    drop(engine_a);
    let first = rt.block_on(in_flight.next()).unwrap();
    handle.swap(tiny_engine(b_dir.path(), 2, "b", EngineConfig::default()));
    assert_eq!(handle.current().info().checkpoint, "b");

    let mut text = String::new();
    if let Event::Token { text: t, .. } = first {
        text.push_str(&t);
    }
    rt.block_on(async {
        while let Some(event) = in_flight.next().await {
            match event {
                Event::Token { text: t, .. } => text.push_str(&t),
                Event::Finished { reason, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    assert_eq!(text, expected_a, "the in-flight request must finish on the engine it started on");
    let on_b = rt.block_on(handle.current().generate(long)).unwrap().choices[0].text.clone();
    assert_ne!(on_b, expected_a, "new requests go to the new engine");
}

#[test]
fn seeded_samples_are_reproducible_and_distinct() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path(), 0, "a", EngineConfig::default());
    let rt = runtime();
    let mut request = GenerateRequest::new(vec![7, 8, 9], 24);
    request.n = 3;
    request.ignore_eos = true;
    request.sampling.seed = Some(42);
    let a = rt.block_on(engine.generate(request.clone())).unwrap();
    let b = rt.block_on(engine.generate(request)).unwrap();
    let texts = |c: &inference::engine::Completion| c.choices.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(a.choices.len(), 3);
    assert_ne!(a.choices[0].text, a.choices[1].text, "samples of one prompt must differ");
    assert_eq!(a.completion_tokens, 72);
}

#[test]
fn best_of_keeps_the_most_likely_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path(), 0, "a", EngineConfig::default());
    let mut request = GenerateRequest::new(vec![7, 8, 9], 12);
    request.n = 2;
    request.best_of = Some(5);
    request.ignore_eos = true;
    request.sampling.seed = Some(7);
    let completion = runtime().block_on(engine.generate(request)).unwrap();
    assert_eq!(completion.choices.len(), 2);
    assert_eq!(completion.completion_tokens, 60, "usage counts every sample generated");
    assert!(completion.choices[0].mean_logprob >= completion.choices[1].mean_logprob);
    assert_eq!(completion.choices[0].index, 0);
    assert_eq!(completion.choices[1].index, 1);
}

#[test]
fn echo_returns_prompt_logprobs_and_completion_logprobs() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path(), 0, "a", EngineConfig::default());
    let mut request = greedy(vec![10, 11, 12, 13], 5);
    request.echo = true;
    request.ignore_eos = true;
    request.sampling.top_logprobs = Some(3);
    let completion = runtime().block_on(engine.generate(request)).unwrap();
    let prompt = completion.prompt.unwrap();
    assert_eq!(prompt.len(), 4);
    assert_eq!(prompt[0].logprob, None, "the first prompt token has no context");
    assert!(prompt[1..].iter().all(|t| t.logprob.is_some_and(|lp| lp <= 0.0) && t.top.len() == 3));
    let tokens = &completion.choices[0].tokens;
    assert_eq!(tokens.len(), 5);
    // Greedy: the chosen token is the most likely one.
    for t in tokens {
        let lp = t.logprob.unwrap();
        assert!((lp - t.top[0].1).abs() < 1e-5, "greedy token {lp} is not the top alternative {}", t.top[0].1);
    }

    // Scoring mode: echo with max_tokens 0 generates nothing.
    let mut score = greedy(vec![10, 11, 12, 13], 0);
    score.echo = true;
    score.sampling.top_logprobs = Some(0);
    let completion = runtime().block_on(engine.generate(score)).unwrap();
    assert_eq!(completion.completion_tokens, 0);
    assert_eq!(completion.prompt.unwrap()[3].logprob, prompt[3].logprob);
}

#[test]
fn stop_sequences_end_the_text_before_them() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path(), 0, "a", EngineConfig::default());
    let rt = runtime();
    let mut request = GenerateRequest::new(vec![20, 21, 22], 40);
    request.sampling.seed = Some(11);
    request.ignore_eos = true;
    let full = rt.block_on(engine.generate(request.clone())).unwrap().choices[0].text.clone();
    // Stop on a piece of the middle of the greedy text: the result must be
    // exactly the text before its first occurrence.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "tiny model produced too little text: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.find(&stop).unwrap();
    assert!(cut > 0, "pick a stop that leaves some text: {full:?}");
    request.stop = vec![stop.clone()].into();
    let choice = rt.block_on(engine.generate(request)).unwrap().choices.remove(0);
    assert_eq!(choice.text, full[..cut], "stop {stop:?}");
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
}

/// Engine steps a victim tenant's 1-token request waits in the queue behind
/// 40 requests of a flooding tenant (2 samples x 8 tokens each) on an engine
/// that runs 4 samples at once.
fn steps_for_victim_behind_a_flood(fair_sharing: bool) -> u64 {
    let tmp = tempfile::tempdir().unwrap();
    let config = EngineConfig { max_running: 4, fair_sharing, ..Default::default() };
    let engine = tiny_engine(tmp.path(), 0, "a", config);
    let rt = runtime();
    let flood: Vec<GenerateRequest> = (0..40)
        .map(|i| {
            let mut r = greedy(vec![3, 4, 5 + i], 8);
            r.tenant = Tenant::new("org:flood", 1);
            r.n = 2;
            r.ignore_eos = true;
            r
        })
        .collect();
    // Held, not dropped: dropping a generation cancels it.
    let _flood = engine.submit_all(flood, false).unwrap();
    let mut victim = greedy(vec![9, 10, 11], 1);
    victim.tenant = Tenant::new("org:victim", 1);
    let mut victim = engine.submit(victim, false).unwrap();
    rt.block_on(victim.next()).expect("the victim's request runs");
    victim.queued_steps().expect("a request that produced an event was admitted")
}

#[test]
fn a_flooding_tenant_cannot_hold_back_another_tenants_request() {
    // With fair sharing the victim goes before the flood's queue and, its
    // tenant having nothing running, into the batch's headroom at the next
    // step; first come, first served it waits for the whole flood (~150 steps).
    let fair = steps_for_victim_behind_a_flood(true);
    assert!(fair <= 1, "fair sharing: the victim waited {fair} engine steps");
    let fifo = steps_for_victim_behind_a_flood(false);
    assert!(fifo >= 100, "first come, first served should make the victim wait for the flood, it waited {fifo} steps");
}

#[test]
fn a_tenant_past_its_queue_share_is_refused_while_others_get_in() {
    let tmp = tempfile::tempdir().unwrap();
    let config = EngineConfig { queue_capacity: 16, tenant_queue_share: 0.5, max_running: 1, ..Default::default() };
    let engine = tiny_engine(tmp.path(), 0, "a", config);
    let request = |tenant: &str, n: usize| {
        let mut r = greedy(vec![1, 2, 3], 200);
        r.tenant = Tenant::new(tenant, 1);
        r.n = n;
        r.ignore_eos = true;
        r
    };
    // Room for 8 samples each; the first request may be admitted at once, so fill past that.
    let mut held = Vec::new();
    let refused = (0..10).find_map(|_| match engine.submit(request("org:flood", 4), false) {
        Ok(g) => {
            held.push(g);
            None
        }
        Err(e) => Some(e),
    });
    assert!(matches!(refused, Some(Error::QueueShareExceeded { limit: 8, .. })), "{refused:?}");
    held.push(engine.submit(request("org:victim", 1), false).expect("another tenant still gets in"));
    // Several prompts at once are queued whole or not at all.
    let whole = engine.submit_all(vec![request("org:victim", 4), request("org:victim", 4)], false);
    assert!(matches!(whole, Err(Error::QueueShareExceeded { .. })), "half a submission was queued");
}
