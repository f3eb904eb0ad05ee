//! The HTTP gateway (OpenAI-compatible API, keys, limits, policy). Arrives with its own issue.
