//! Snapshot building on a hand-made store.

use feedback::events::{
    FeedbackEvent, FeedbackPayload, LabelerGroup, PromptEvent, SCHEMA_VERSION, Sample, WithdrawalEvent,
};
use feedback::pii::{PiiFinding, PiiKind};
use feedback::records::Record;
use feedback::split::{DEDUPE_PREFIX_CHARS, SplitConfig, dedupe_key};
use feedback::streams;

use super::*;
use crate::store::{DatasetStore, StoredEntry};

fn prompt(id: &str, user: &str, text: &str, pii: bool) -> PromptEvent {
    PromptEvent {
        schema_version: SCHEMA_VERSION,
        prompt_id: id.into(),
        prompt: text.into(),
        messages: None,
        samples: (0..4)
            .map(|i| Sample {
                generation_id: format!("{id}-{i}"),
                text: format!("{id} answer {i}"),
                finish_reason: "stop".into(),
                completion_tokens: 3,
                mean_logprob: -1.0,
            })
            .collect(),
        params: serde_json::json!({}),
        model: "m".into(),
        checkpoint: "c".into(),
        user: user.into(),
        organization: "o".into(),
        key_id: "k".into(),
        use_case: "generation".into(),
        consent_version: "v".into(),
        pii: if pii { vec![PiiFinding { kind: PiiKind::Email, start: 0, end: 3 }] } else { vec![] },
        redacted: false,
        split: Split::Train,
        dedupe_key: dedupe_key(text, DEDUPE_PREFIX_CHARS),
        created_at_ms: 1,
    }
}

fn feedback(prompt_id: Option<&str>, payload: FeedbackPayload) -> FeedbackEvent {
    FeedbackEvent {
        schema_version: SCHEMA_VERSION,
        event_id: "e".into(),
        prompt_id: prompt_id.map(Into::into),
        labeler_id: "lena".into(),
        labeler_group: LabelerGroup::Training,
        organization: "o".into(),
        key_id: "k".into(),
        payload,
        created_at_ms: 1,
    }
}

/// The stream entry number `n` of `record`, as the gateway writes it.
fn entry(n: usize, record: Record) -> StoredEntry {
    let written = record.to_entry(&format!("e{n}")).unwrap();
    StoredEntry { stream: written.stream, id: format!("{n}-0"), fields: written.fields.into_iter().collect() }
}

#[test]
fn filters_like_the_paper_and_writes_an_immutable_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = DatasetStore::open(dir.path()).unwrap();
    let prompts = [
        prompt("p1", "ann", "Write a poem about the sea.", false),
        prompt("p2", "ann", "write a POEM   about the sea.", false), // same prefix once normalised
        prompt("p3", "ann", "Email x@y.com to my boss.", true),      // personal data
        prompt("p4", "ann", "Tell me a joke.", false),
        prompt("p5", "ann", "List three colours.", false), // over the cap of 2 for ann
        prompt("p6", "bob", "Explain rain.", false),       // bob withdraws afterwards
    ];
    let mut entries: Vec<StoredEntry> =
        prompts.iter().enumerate().map(|(i, p)| entry(i + 1, Record::Prompt(p.clone()))).collect();
    let withdrawal =
        WithdrawalEvent { schema_version: 1, user: "bob".into(), removed_from_stream: 0, created_at_ms: 1 };
    entries.push(entry(10, Record::Withdrawal(withdrawal)));
    let p7 = prompt("p7", "bob", "Explain snow.", false); // logged after bob consented again
    entries.push(entry(11, Record::Prompt(p7)));
    store.append(streams::PROMPTS, &entries).unwrap();

    let ranking = |p: &str| FeedbackPayload::Ranking {
        prompt_id: p.into(),
        ranking: vec![vec![format!("{p}-2")], vec![format!("{p}-0"), format!("{p}-1")], vec![format!("{p}-3")]],
    };
    let events = [
        feedback(Some("p1"), ranking("p1")),
        feedback(Some("p6"), ranking("p6")), // withdrawn user's prompt
        feedback(
            Some("p4"),
            FeedbackPayload::Comparison { prompt_id: "p4".into(), better: "p4-1".into(), worse: "p4-0".into() },
        ),
        feedback(
            Some("p1"),
            FeedbackPayload::Demonstration { prompt_id: Some("p1".into()), prompt: None, response: "Waves.".into() },
        ),
        feedback(
            None,
            FeedbackPayload::Demonstration {
                prompt_id: None,
                prompt: Some("Explain tides.".into()),
                response: "The moon.".into(),
            },
        ),
        feedback(
            Some("p7"),
            FeedbackPayload::Rating {
                generation_id: "p7-0".into(),
                score: 5,
                flags: Default::default(),
                comment: None,
            },
        ),
    ];
    append_feedback(&mut store, &events);

    let filters = Filters { max_prompts_per_user: 2, ..filters(Default::default()) };
    let data = build(&store, &filters).unwrap();
    let kept: Vec<&str> = data.prompts.iter().map(|p| p.prompt_id.as_str()).collect();
    assert_eq!(kept, ["p1", "p4", "p7"]);
    assert_eq!(
        data.excluded,
        Exclusions {
            personal_data: 1,
            duplicate_prefix: 1,
            over_user_cap: 1,
            withdrawn: 1,
            unparseable: 0,
            feedback_without_prompt: 1,
            superseded: 0,
            low_agreement_labeler: 0,
        }
    );
    assert_eq!(data.rm.len(), 2);
    assert_eq!(data.rm[0].ranks, [0, 1, 1, 2]);
    assert_eq!(data.rm[0].completions[0], "p1 answer 2");
    assert_eq!(data.rm[1].ranks, [0, 1], "a comparison is a ranking of two");
    assert_eq!(data.sft.len(), 2);
    assert_eq!(data.ratings.len(), 1);

    let manifest = write(&store, dir.path(), &data, &filters).unwrap();
    assert_eq!(manifest.counts["rm"], 2);
    assert_eq!(manifest.source[streams::PROMPTS], "11-0");
    let again = write(&store, dir.path(), &data, &filters).unwrap();
    assert_eq!(again, manifest, "the same data gives the same snapshot, untouched");
    let rm = std::fs::read_to_string(dir.path().join("snapshots").join(&manifest.id).join("rm.jsonl")).unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(rm.as_bytes())), manifest.files["rm.jsonl"]);
    assert!(
        !std::fs::read_dir(dir.path().join("snapshots")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp"))
    );
}

/// `n` prompts by one user, appended to the store's prompt stream.
fn store_with_prompts(dir: &Path, n: usize) -> DatasetStore {
    let mut store = DatasetStore::open(dir).unwrap();
    let entries: Vec<StoredEntry> = (0..n)
        .map(|i| {
            let p = prompt(&format!("p{i}"), &format!("user{}", i % 5), &format!("Question number {i}?"), false);
            entry(i + 1, Record::Prompt(p))
        })
        .collect();
    store.append(streams::PROMPTS, &entries).unwrap();
    store
}

fn by(labeler: &str, prompt: &str, order: [usize; 4]) -> FeedbackEvent {
    let mut event = feedback(
        Some(prompt),
        FeedbackPayload::Ranking {
            prompt_id: prompt.into(),
            ranking: order.iter().map(|i| vec![format!("{prompt}-{i}")]).collect(),
        },
    );
    event.labeler_id = labeler.into();
    event
}

fn append_feedback(store: &mut DatasetStore, events: &[FeedbackEvent]) {
    let entries: Vec<StoredEntry> =
        events.iter().enumerate().map(|(i, e)| entry(i + 1, Record::Feedback(e.clone()))).collect();
    store.append(streams::FEEDBACK, &entries).unwrap();
}

fn filters(qc: crate::labeler_quality::LabelerQcConfig) -> Filters {
    Filters {
        max_prompts_per_user: 200,
        dedupe_prefix_chars: DEDUPE_PREFIX_CHARS,
        split: SplitConfig::default(),
        labeler_qc: qc,
    }
}

#[test]
fn one_judgment_per_labeler_prompt_and_kind_the_latest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_prompts(dir.path(), 2);
    let mut events = vec![by("lena", "p0", [0, 1, 2, 3]), by("max", "p0", [0, 1, 2, 3])];
    // lena resubmits p0 a hundred times, ending with the reverse order; p1 once.
    events.extend((0..99).map(|_| by("lena", "p0", [1, 0, 2, 3])));
    events.push(by("lena", "p0", [3, 2, 1, 0]));
    events.push(by("lena", "p1", [0, 1, 2, 3]));
    append_feedback(&mut store, &events);
    let data = build(&store, &filters(Default::default())).unwrap();
    assert_eq!(data.excluded.superseded, 100);
    assert_eq!(data.rm.len(), 3, "lena's latest p0, max's p0, lena's p1");
    let lena_p0 = data.rm.iter().find(|r| r.labeler_id == "lena" && r.prompt_id == "p0").unwrap();
    assert_eq!(lena_p0.completions[0], "p0 answer 3", "the latest ranking is the one kept");
}

#[test]
fn quality_control_drops_a_labeler_who_disagrees_with_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_prompts(dir.path(), 10);
    let mut events = Vec::new();
    for i in 0..10 {
        let p = format!("p{i}");
        events.push(by("ann", &p, [0, 1, 2, 3]));
        events.push(by("bob", &p, [0, 1, 3, 2]));
        events.push(by("eve", &p, [3, 2, 1, 0]));
    }
    append_feedback(&mut store, &events);
    let qc = crate::labeler_quality::LabelerQcConfig { min_comparisons: 20, ..Default::default() };
    let data = build(&store, &filters(qc.clone())).unwrap();
    assert!(data.labeler_quality.labelers["eve"].flagged);
    assert!(!data.labeler_quality.labelers["ann"].flagged && !data.labeler_quality.labelers["bob"].flagged);
    assert_eq!(data.excluded.low_agreement_labeler, 10);
    assert!(data.rm.iter().all(|r| r.labeler_id != "eve") && data.rm.len() == 20);
    let manifest = write(&store, dir.path(), &data, &filters(qc)).unwrap();
    assert!(manifest.labeler_quality.labelers["eve"].flagged, "the report is in the manifest");
    // Only flagging keeps every ranking.
    let flag_only = crate::labeler_quality::LabelerQcConfig {
        min_comparisons: 20,
        action: crate::labeler_quality::QcAction::Flag,
        ..Default::default()
    };
    assert_eq!(build(&store, &filters(flag_only)).unwrap().rm.len(), 30);
}

/// A withdrawal reaches the store and the snapshots already written, by user id whatever the stream order: the
/// user's prompts, their judgments, others' judgments of their prompts; an older entry of theirs arriving later
/// (claimed from another consumer) is refused, across a restart; what they log after consenting again is kept.
#[test]
fn a_withdrawal_forgets_the_user_in_the_store_and_in_old_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_prompts(dir.path(), 10);
    append_feedback(
        &mut store,
        &[by("lena", "p0", [0, 1, 2, 3]), by("user0", "p1", [3, 2, 1, 0]), by("lena", "p1", [0, 1, 2, 3])],
    );
    let filters = filters(Default::default());
    let old = write(&store, dir.path(), &build(&store, &filters).unwrap(), &filters).unwrap();
    let rows = |name: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.path().join("snapshots").join(&old.id).join(name)).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let theirs = |row: &serde_json::Value| {
        row["user"] == "user0" || row["labeler_id"] == "user0" || row["prompt_id"] == "p0" || row["prompt_id"] == "p5"
    };
    assert!(rows("prompts.jsonl").iter().any(theirs) && rows("rm.jsonl").iter().any(theirs), "the user is in it");

    let mut forgotten = store.forget_user("user0", 5).unwrap();
    forgotten.sort();
    assert_eq!(forgotten, ["p0", "p5"]);
    assert!(forget_user(dir.path(), "user0", &forgotten).unwrap() >= 3);
    for name in ["prompts.jsonl", "rm.jsonl", "sft.jsonl", "ratings.jsonl"] {
        assert!(!rows(name).iter().any(theirs), "{name} still holds the user's rows");
    }
    let manifest: SnapshotManifest = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("snapshots").join(&old.id).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest.counts["prompts"], 8);
    assert_eq!(manifest.counts["rm"], rows("rm.jsonl").len());
    let records = |store: &DatasetStore, stream| -> Vec<Record> {
        store.read(stream).unwrap().iter().map(|e| e.record().unwrap()).collect()
    };
    let held = [records(&store, streams::PROMPTS), records(&store, streams::FEEDBACK)].concat();
    assert_eq!(held.len(), 8 + 1, "8 prompts and lena's ranking of p1 are left");
    assert!(held.iter().all(|r| r.user() != "user0"));

    // An older prompt of theirs claimed late, then one logged after they consented again.
    let mut late = prompt("p90", "user0", "Claimed late.", false);
    late.created_at_ms = 4;
    let mut again = prompt("p91", "user0", "After consenting again.", false);
    again.created_at_ms = 9;
    assert_eq!(store.append(streams::PROMPTS, &[entry(0, Record::Prompt(late.clone()))]).unwrap(), 0);
    drop(store);
    let mut store = DatasetStore::open(dir.path()).unwrap();
    let mut late_again = entry(0, Record::Prompt(late));
    late_again.id = "0-1".into();
    assert_eq!(store.append(streams::PROMPTS, &[late_again, entry(50, Record::Prompt(again))]).unwrap(), 1);
    let prompts: Vec<String> = build(&store, &filters).unwrap().prompts.into_iter().map(|p| p.prompt_id).collect();
    assert!(prompts.contains(&"p91".to_string()) && !prompts.contains(&"p90".to_string()), "{prompts:?}");
}
