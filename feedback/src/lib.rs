//! Feedback capture into Redis Streams. Arrives with its own issue.
