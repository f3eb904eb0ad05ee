//! What the gateway asks of an upstream for one sample of a request, and what
//! it refuses up front because an upstream cannot do it faithfully.
//!
//! The gateway tokenizes (and applies the chat template) itself and sends the
//! token ids as the `prompt` of `/v1/completions`, which vLLM, SGLang and
//! llama-server all accept: limits and usage are counted on exactly the tokens
//! the upstream runs, and chat formatting is the same as the built-in engine's.

use inference::engine::GenerateRequest;
use serde_json::{Value, json};

/// Refuses, naming the field, what is not forwarded: log-probabilities (and with them `echo` scoring and
/// `best_of` ranking, which need them) are not mapped from upstreams' differing formats yet.
pub fn check(request: &GenerateRequest) -> inference::Result<()> {
    let refuse = |param: &'static str, what: &str| {
        Err(inference::Error::invalid(
            param,
            format!("{what} is not supported when this gateway serves through an external engine (openai_http)"),
        ))
    };
    if request.sampling.top_logprobs.is_some() {
        if request.echo {
            return refuse("echo", "'echo' with 'logprobs' (prompt log-probabilities)");
        }
        return refuse("logprobs", "'logprobs'");
    }
    if request.samples() > request.n {
        return refuse("best_of", "'best_of' greater than 'n'");
    }
    Ok(())
}

/// The `/v1/completions` body for sample `sample` of `request`, streamed. Each sample is its own upstream call
/// (not every upstream implements `n`); with a `seed`, sample `i` uses `seed + i` so samples differ but repeat.
pub fn body(request: &GenerateRequest, sample: usize, model: &str) -> Value {
    let sampling = &request.sampling;
    let mut body = json!({
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(seed) = sampling.seed {
        body["seed"] = json!(seed.wrapping_add(sample as u64) & (i64::MAX as u64));
    }
    if !request.stop.is_empty() {
        body["stop"] = json!(request.stop.as_ref());
    }
    if request.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if !model.is_empty() {
        body["model"] = json!(model);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_echo_scoring_and_best_of_are_refused_by_name() {
        let param = |r: &GenerateRequest| match check(r) {
            Err(inference::Error::InvalidRequest { param, .. }) => Some(param),
            _ => None,
        };
        let mut request = GenerateRequest::new(vec![1, 2], 4);
        assert_eq!(param(&request), None);
        request.echo = true;
        assert_eq!(param(&request), None, "echo alone is the prompt text, which the gateway has");
        request.sampling.top_logprobs = Some(0);
        assert_eq!(param(&request), Some("echo"));
        request.echo = false;
        assert_eq!(param(&request), Some("logprobs"));
        request.sampling.top_logprobs = None;
        request.best_of = Some(3);
        assert_eq!(param(&request), Some("best_of"));
    }

    #[test]
    fn the_body_carries_token_ids_and_per_sample_seeds() {
        let mut request = GenerateRequest::new(vec![5, 6, 7], 9);
        request.sampling.seed = Some(41);
        request.stop = std::sync::Arc::from(vec!["\n".to_string()]);
        let body = body(&request, 1, "");
        assert_eq!(body["prompt"], json!([5, 6, 7]));
        assert_eq!((body["max_tokens"].as_u64(), body["seed"].as_u64()), (Some(9), Some(42)));
        assert_eq!(body["stop"], json!(["\n"]));
        assert!(body.get("model").is_none() && body.get("ignore_eos").is_none());
    }
}
