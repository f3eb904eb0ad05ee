//! End-to-end tests of issue 15 against the real `instructd serve` and a
//! private `redis-server`: OpenAI's Responses API through the unmodified
//! `openai` client (`tests/e2e/responses_api.py`), and `POST /v1/rewards`
//! scoring with tiny reward models the way the trainer publishes them
//! (written to the checkpoint store, announced on `instructd:checkpoints`),
//! hot-swapped when a newer one is announced and loaded at start-up.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::time::{Duration, Instant};

use feedback::RedisLink;
use feedback::announcement::CheckpointAnnouncement;
use inference::checkpoint::CheckpointStore;
use serde_json::{Value, json};
use trainer::reward_model::RewardModel;

use gateway::{ADMIN_KEY, Gateway, RedisServer, publish_reward_model, python, run_script, tiny_model};

#[test]
fn responses_api_through_the_openai_client() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    run_script(&python, "responses_api.py", &[("INSTRUCTD_URL", &gateway.url)]);
}

fn announce(redis_url: &str, id: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let link = RedisLink::new(redis_url).unwrap();
        let announcement =
            CheckpointAnnouncement { id: id.into(), stage: Some("reward_model".into()), parent: None, source: None };
        announcement.publish(&link).await.expect("announced");
    });
}

/// Scores until the gateway answers with reward model `id` (it loads in the background).
fn scores_with(gateway: &Gateway, key: &str, body: &Value, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, answer, _) = gateway.call("POST", "/v1/rewards", key, Some(body));
        if status == 200 && answer["model"] == id {
            return answer;
        }
        assert!(Instant::now() < deadline, "reward model {id} never served: {status} {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A completions body whose `best_of` samples (seeded, so repeatable) are ranked by the reward model.
fn best_of_by_reward(model: &str, best_of: u32) -> Value {
    json!({"model": model, "prompt": "Say something.", "max_tokens": 6, "temperature": 1.0, "seed": 11,
        "n": 1, "best_of": best_of, "rank_by": "reward"})
}

fn rewards(answer: &Value) -> Vec<f64> {
    answer["data"].as_array().expect("data").iter().map(|d| d["reward"].as_f64().expect("a reward")).collect()
}

fn assert_close(got: &[f64], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - f64::from(*w)).abs() < 1e-3, "{got:?} vs {want:?}");
    }
}

#[test]
fn rewards_score_with_the_published_reward_model_and_swap_to_a_newer_one() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_model(tmp.path());
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
    let checkpoints = [("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().unwrap())];
    let gateway = Gateway::start(&redis.url(), &policy, &checkpoints);

    let (status, key, _) =
        gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&json!({"user": "scorer", "scopes": ["scoring"]})));
    assert_eq!(status, 201, "{key}");
    let scorer = key["secret"].as_str().unwrap().to_string();
    let (_, key, _) =
        gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&json!({"user": "u", "scopes": ["completions"]})));
    let plain = key["secret"].as_str().unwrap().to_string();
    let (_, models, _) = gateway.call("GET", "/v1/models", &plain, None);
    let model = models["data"][0]["id"].as_str().expect("a model id").to_string();

    let completions = ["Paris.", "I do not know.", "The capital of France is Paris."];
    let body = json!({"prompt": "What is the capital of France?", "completions": completions});
    let (status, answer, _) = gateway.call("POST", "/v1/rewards", &plain, Some(&body));
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("insufficient_scope")), "{answer}");
    let (status, answer, _) = gateway.call("POST", "/v1/rewards", &scorer, Some(&body));
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("reward_model_unavailable")), "{answer}");
    // best_of ranked by reward needs a reward model: refused, not ranked by log-probability instead.
    let (status, answer, _) = gateway.call("POST", "/v1/completions", &plain, Some(&best_of_by_reward(&model, 4)));
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("reward_model_unavailable")), "{answer}");

    // The trainer publishes a reward model and announces it: the gateway loads it and scores with it, exactly as
    // the trainer's own RewardModel scores the same pairs.
    publish_reward_model(&store, &policy, tmp.path(), "rm-a", 1);
    announce(&redis.url(), "rm-a");
    let answer = scores_with(&gateway, &scorer, &body, "rm-a");
    let pairs: Vec<(&str, &str)> = completions.iter().map(|c| ("What is the capital of France?", *c)).collect();
    let want_a = RewardModel::load(store.path("rm-a")).unwrap().score(&pairs).unwrap();
    assert_close(&rewards(&answer), &want_a);
    assert_eq!(answer["data"][2]["index"], 2, "{answer}");
    assert_eq!(answer["data"][0]["truncated"], false, "{answer}");
    assert!(answer["usage"]["total_tokens"].as_u64().unwrap() > 0, "{answer}");

    // A prompt as messages is the same single user turn.
    let as_messages = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "completions": completions, "model": "rm-a"});
    let (status, answer, headers) = gateway.call("POST", "/v1/rewards", &scorer, Some(&as_messages));
    assert_eq!(status, 200, "{answer}");
    assert_close(&rewards(&answer), &want_a);
    assert!(headers.contains_key("x-ratelimit-limit-requests"), "{headers:?}");
    let wrong_model = json!({"prompt": "p", "completions": ["a"], "model": "rm-zzz"});
    let (status, answer, _) = gateway.call("POST", "/v1/rewards", &scorer, Some(&wrong_model));
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("model_not_found")), "{answer}");
    let (status, answer, _) =
        gateway.call("POST", "/v1/rewards", &scorer, Some(&json!({"prompt": "p", "completions": []})));
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("completions")), "{answer}");

    // best_of ranked by reward returns, of the samples the same seed draws, the one rm-a scores highest.
    let mut all = best_of_by_reward(&model, 4);
    all["n"] = json!(4);
    let (status, answer, _) = gateway.call("POST", "/v1/completions", &plain, Some(&all));
    assert_eq!(status, 200, "{answer}");
    let samples: Vec<String> =
        answer["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    let scored: Vec<(&str, &str)> = samples.iter().map(|s| ("Say something.", s.as_str())).collect();
    let scores = RewardModel::load(store.path("rm-a")).unwrap().score(&scored).unwrap();
    let best = (0..samples.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap();
    let (status, answer, _) = gateway.call("POST", "/v1/completions", &plain, Some(&best_of_by_reward(&model, 4)));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer["choices"][0]["text"], samples[best].as_str(), "samples {samples:?} scored {scores:?}");
    assert_eq!(answer["choices"][0]["index"], 0, "{answer}");

    // A newer reward model is swapped in when announced.
    publish_reward_model(&store, &policy, tmp.path(), "rm-b", 2);
    announce(&redis.url(), "rm-b");
    let answer = scores_with(&gateway, &scorer, &body, "rm-b");
    let want_b = RewardModel::load(store.path("rm-b")).unwrap().score(&pairs).unwrap();
    assert_close(&rewards(&answer), &want_b);
    assert_ne!(want_a, want_b, "two heads score differently");

    // A gateway starting later scores with the newest reward model in the store.
    let later = Gateway::start(&redis.url(), &policy, &checkpoints);
    let answer = scores_with(&later, ADMIN_KEY, &body, "rm-b");
    assert_close(&rewards(&answer), &want_b);
}

/// A labeler's ranking is answered with the reward model's ordering of the same samples and how many of the
/// labeler's pairs it orders alike; a playground user's own ranking, and any ranking before a reward model is
/// loaded, get none. The labeling task itself never carries it (it would anchor the labeler).
#[test]
fn a_labeler_sees_the_reward_models_order_only_after_ranking() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_model(tmp.path());
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
    publish_reward_model(&store, &policy, tmp.path(), "rm-l", 5);
    let checkpoints = [("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().unwrap())];
    let gateway = Gateway::start(&redis.url(), &policy, &checkpoints);
    let key = |user: &str, scope: &str| {
        let (status, key, _) =
            gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&json!({"user": user, "scopes": [scope]})));
        assert_eq!(status, 201, "{key}");
        key["secret"].as_str().unwrap().to_string()
    };
    let (user, labeler) = (key("pia", "playground"), key("lou", "labeler"));
    let (_, notice, _) = gateway.call("GET", "/v1/playground/notice", &user, None);
    let consent = json!({"action": "accept", "notice_version": notice["version"]});
    assert_eq!(gateway.call("POST", "/v1/playground/consent", &user, Some(&consent)).0, 200);
    let (_, models, _) = gateway.call("GET", "/v1/models", &user, None);
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let body = json!({"model": model, "prompt": "Name a colour.", "k": 4, "max_tokens": 4, "temperature": 1.0});
    let (status, logged, _) = gateway.call("POST", "/v1/playground/completions", &user, Some(&body));
    assert_eq!((status, logged["logged"].as_bool()), (200, Some(true)), "{logged}");

    // The reward model loads at start-up in the background; the task never carries its view.
    let (status, task, _) = gateway.call("GET", "/v1/labeling/next", &labeler, None);
    assert_eq!(status, 200, "{task}");
    assert!(task.get("reward_model").is_none(), "{task}");
    let ids: Vec<String> =
        task["samples"].as_array().unwrap().iter().map(|s| s["generation_id"].as_str().unwrap().to_string()).collect();
    let ranking = json!({"type": "ranking", "prompt_id": task["prompt_id"],
        "ranking": [[ids[0]], [ids[1], ids[2]], [ids[3]]]});
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let (status, answer, _) = gateway.call("POST", "/v1/feedback", &labeler, Some(&ranking));
        assert!(status == 200 || status == 201, "{answer}");
        if answer.get("reward_model").is_some() {
            break answer;
        }
        assert!(Instant::now() < deadline, "no reward model ordering: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let seen = &answer["reward_model"];
    assert_eq!(seen["model"], "rm-l", "{answer}");
    let mut order: Vec<String> = seen["order"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    let rewards: Vec<f64> = order.iter().map(|id| seen["rewards"][id].as_f64().unwrap()).collect();
    assert!(rewards.windows(2).all(|w| w[0] >= w[1]), "highest reward first: {answer}");
    order.sort();
    let mut all = ids.clone();
    all.sort();
    assert_eq!(order, all, "every sample, once: {answer}");
    // 1x2 + 1x1 + 2x1 = 5 ordered pairs (the tied pair dropped).
    assert_eq!(seen["agreement"]["pairs"], 5, "{answer}");
    assert!(seen["agreement"]["agreed"].as_u64().unwrap() <= 5, "{answer}");

    // The prompt's own user ranking it in the playground gets no reward-model view.
    let (status, answer, _) = gateway.call("POST", "/v1/feedback", &user, Some(&ranking));
    assert!(status == 200 || status == 201, "{answer}");
    assert!(answer.get("reward_model").is_none(), "{answer}");
}
