//! Stop sequences, matched on decoded text as it streams out.
//!
//! A stop string can be split across several tokens ("<|" + "end" + "|>"),
//! so matching on token ids is not enough. [`StopMatcher`] sits between the
//! incremental decoder and the client: it holds back any tail of the output
//! that could still be the start of a stop string, and once a stop string is
//! complete it emits only the text before it. The stop string itself and
//! everything after it are never emitted (OpenAI semantics).

use std::sync::Arc;

use crate::{Error, Result};

/// The most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The longest stop sequence, in bytes: every decoded piece is searched for
/// each one, and the held-back tail can grow to this length.
pub const MAX_STOP_BYTES: usize = 256;

/// Checks a request's `stop` list: at most four strings, none empty, none
/// longer than [`MAX_STOP_BYTES`].
pub fn validate_stops(stops: &[String]) -> Result<()> {
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(Error::invalid(
            "stop",
            format!("stop may contain at most {MAX_STOP_SEQUENCES} sequences, got {}", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(Error::invalid("stop", "stop sequences must not be empty"));
    }
    if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(Error::invalid(
            "stop",
            format!("each stop sequence may be at most {MAX_STOP_BYTES} bytes long, got one of {}", long.len()),
        ));
    }
    Ok(())
}

/// What the caller may send to the client after one [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStep {
    /// Text that is now safe to emit (possibly empty).
    pub emit: String,
    /// A stop sequence was found: generation must end, and `emit` is the
    /// last text of the completion.
    pub stopped: bool,
}

/// Finds stop sequences in streamed text without ever emitting them.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// Shared by every sample of every prompt of a request (never copied per sample).
    stops: Arc<[String]>,
    /// Text received but not yet emitted: a tail that might begin a stop
    /// string. Always starts right after the last emitted byte.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// Creates a matcher for the given stop strings. Empty strings would
    /// match everywhere; they are dropped here, and [`validate_stops`]
    /// rejects them at the API boundary.
    pub fn new(stops: Arc<[String]>) -> Self {
        let stops = if stops.iter().any(String::is_empty) {
            stops.iter().filter(|s| !s.is_empty()).cloned().collect()
        } else {
            stops
        };
        StopMatcher { stops, pending: String::new(), stopped: false }
    }

    /// True once a stop sequence has matched; further input is ignored.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly decoded text and returns what can be emitted now.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stopped {
            return StopStep { emit: String::new(), stopped: true };
        }
        self.pending.push_str(text);

        // The held-back tail is searched again together with the new text,
        // so a stop string spanning several pushes is found; nothing before
        // the tail can be part of a match (it was not a stop prefix).
        if let Some(at) = self.earliest_match() {
            self.pending.truncate(at);
            self.stopped = true;
            return StopStep { emit: std::mem::take(&mut self.pending), stopped: true };
        }

        let held = self.longest_partial_suffix();
        let emit_len = self.pending.len() - held;
        let rest = self.pending.split_off(emit_len);
        StopStep { emit: std::mem::replace(&mut self.pending, rest), stopped: false }
    }

    /// Ends the stream: returns the held-back text, which turned out not to
    /// start a stop string. Empty after a stop.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// Byte offset of the earliest stop string in `pending`, if any.
    fn earliest_match(&self) -> Option<usize> {
        self.stops.iter().filter_map(|stop| self.pending.find(stop.as_str())).min()
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper
    /// prefix of some stop string, and so must be held back.
    fn longest_partial_suffix(&self) -> usize {
        let mut longest = 0;
        for stop in self.stops.iter() {
            // A full match was ruled out already, hence `len() - 1`.
            let max = (stop.len() - 1).min(self.pending.len());
            for len in (longest + 1..=max).rev() {
                // Slicing the stop string only at its char boundaries keeps
                // this UTF-8 safe; a suffix of `pending` equal to a valid
                // prefix necessarily starts on a char boundary of `pending`.
                if stop.is_char_boundary(len) && self.pending.ends_with(&stop[..len]) {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Pushes every piece and returns (all emitted text, stopped).
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for piece in pieces {
            let step = m.push(piece);
            out.push_str(&step.emit);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = matcher(&[]);
        let step = m.push("hello");
        assert_eq!(step.emit, "hello");
        assert!(!step.stopped);
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_inside_one_push() {
        let mut m = matcher(&["\n\n"]);
        let step = m.push("one\n\ntwo");
        assert_eq!(step, StopStep { emit: "one".into(), stopped: true });
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), StopStep { emit: String::new(), stopped: true });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_split_over_several_pushes() {
        let mut m = matcher(&["<|end|>"]);
        let steps: Vec<StopStep> = ["Hi <", "|e", "nd", "|", ">tail"].iter().map(|p| m.push(p)).collect();
        assert_eq!(steps[0].emit, "Hi ");
        assert!(steps[1..4].iter().all(|s| s.emit.is_empty() && !s.stopped));
        assert_eq!(steps[4].emit, "");
        assert!(steps[4].stopped);
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_prefix_that_is_not_a_stop_is_emitted_later() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("go ST").emit, "go ");
        // "STO" is still a possible prefix.
        assert_eq!(m.push("O").emit, "");
        // "STOP" broken by "x": everything is safe again.
        assert_eq!(m.push("x").emit, "STOx");
        assert_eq!(m.push("S").emit, "");
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn overlapping_partial_restarts() {
        // "aab": the held "aa" is not a prefix once "a" follows, but its
        // suffix "a" + new "a" may still be.
        let mut m = matcher(&["aab"]);
        assert_eq!(run(&mut m, &["xa", "a", "a", "b", "zzz"]), ("xa".into(), true));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(run(&mut m, &["hello world"]), ("hel".into(), true));
        // Also when the later-starting stop completes first in the stream.
        let mut m = matcher(&["abcdef", "cd"]);
        assert_eq!(run(&mut m, &["ab", "c", "d"]), ("ab".into(), true));
    }

    #[test]
    fn held_prefix_of_one_stop_while_another_diverges() {
        let mut m = matcher(&["abcd", "bcx"]);
        // "abc" is held for both; then "d" completes "abcd" at 0.
        assert_eq!(run(&mut m, &["abc", "d"]), ("".into(), true));
    }

    #[test]
    fn first_completed_stop_ends_generation() {
        // "bc" is complete while "abcd" is still only a prefix: stop now,
        // as vLLM and OpenAI do, rather than wait for a longer match.
        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(run(&mut m, &["abc", "d"]), ("a".into(), true));
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut m = matcher(&["###"]);
        assert_eq!(run(&mut m, &["###", "anything"]), ("".into(), true));
        let mut m = matcher(&["###"]);
        assert_eq!(run(&mut m, &["#", "#", "#x"]), ("".into(), true));
    }

    #[test]
    fn held_back_text_is_flushed_at_finish() {
        let mut m = matcher(&["\nUser:"]);
        assert_eq!(run(&mut m, &["answer", "\nUs"]), ("answer\nUs".into(), false));
    }

    #[test]
    fn unicode_stop_and_text() {
        let mut m = matcher(&["日本語"]);
        let a = m.push("héllo 日");
        assert_eq!(a.emit, "héllo ");
        let b = m.push("本");
        assert_eq!(b.emit, "");
        let c = m.push("語です");
        assert_eq!(c, StopStep { emit: String::new(), stopped: true });

        let mut m = matcher(&["😀!"]);
        assert_eq!(run(&mut m, &["ok 😀", "?", " 😀", "!"]), ("ok 😀? ".into(), true));
    }

    #[test]
    fn unicode_text_never_splits_chars() {
        // The stop begins with the same lead byte as the text's char (é and
        // è share 0xC3): holding back must work on whole chars.
        let mut m = matcher(&["è"]);
        let step = m.push("é");
        assert_eq!(step.emit, "é");
        let mut m = matcher(&["èx"]);
        assert_eq!(run(&mut m, &["aé", "è", "y"]), ("aéèy".into(), false));
    }

    #[test]
    fn empty_pushes_are_harmless() {
        let mut m = matcher(&["ab"]);
        assert_eq!(run(&mut m, &["", "a", "", "b"]), ("".into(), true));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut m = StopMatcher::new(vec![String::new(), "x".into()].into());
        assert_eq!(run(&mut m, &["abc", "dxe"]), ("abcd".into(), true));
    }

    #[test]
    fn validate_stops_limits() {
        let ok: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        validate_stops(&ok).unwrap();
        validate_stops(&[]).unwrap();
        let too_many: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let too_long = vec!["x".repeat(MAX_STOP_BYTES + 1)];
        validate_stops(&["x".repeat(MAX_STOP_BYTES)]).unwrap();
        for bad in [too_many, vec!["a".to_string(), String::new()], too_long] {
            match validate_stops(&bad) {
                Err(Error::InvalidRequest { param, .. }) => assert_eq!(param, "stop"),
                other => panic!("expected a stop error, got {other:?}"),
            }
        }
    }
}
