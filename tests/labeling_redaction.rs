//! End-to-end test that labelers never see personal data (issue 13): a prompt
//! the PII screen flags is not queued for labeling, while a clean one is
//! served; the real `instructd serve` on a private Redis.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use gateway::{ADMIN_KEY, Gateway, RedisServer, tiny_model};
use serde_json::json;

fn create_key(gateway: &Gateway, user: &str, scope: &str) -> String {
    let body = json!({"user": user, "scopes": [scope]});
    let (status, key, _) = gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    key["secret"].as_str().expect("a secret").to_string()
}

#[test]
fn labelers_are_not_served_prompts_with_personal_data() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    let (_, models, _) = gateway.call("GET", "/v1/models", ADMIN_KEY, None);
    let model = models["data"][0]["id"].as_str().expect("a model").to_string();
    let user = create_key(&gateway, "pia", "playground");
    let labeler = create_key(&gateway, "lou", "labeler");
    let (_, notice, _) = gateway.call("GET", "/v1/playground/notice", &user, None);
    let consent = json!({"action": "accept", "notice_version": notice["version"]});
    assert_eq!(gateway.call("POST", "/v1/playground/consent", &user, Some(&consent)).0, 200);

    let personal = "Write to jane.doe@example.com, phone +1 415 555 0134, about my visa.";
    let body = json!({"model": model, "prompt": personal, "k": 2, "max_tokens": 4});
    let (status, logged, _) = gateway.call("POST", "/v1/playground/completions", &user, Some(&body));
    assert_eq!(status, 200, "{logged}");
    assert_eq!(logged["logged"], true, "{logged}");
    let (status, task, _) = gateway.call("GET", "/v1/labeling/next", &labeler, None);
    assert_eq!(status, 204, "a prompt with personal data was served to a labeler: {task}");

    let body = json!({"model": model, "prompt": "Explain why the sky is blue.", "k": 2, "max_tokens": 4});
    let (status, logged, _) = gateway.call("POST", "/v1/playground/completions", &user, Some(&body));
    assert_eq!(status, 200, "{logged}");
    let (status, task, _) = gateway.call("GET", "/v1/labeling/next", &labeler, None);
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["prompt"], "Explain why the sky is blue.");
    assert!(!task.to_string().contains("jane.doe"), "{task}");
}
