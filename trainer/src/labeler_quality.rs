//! Labeler quality control: how often each labeler agrees with the others on prompts several of them ranked, and
//! with gold rankings an operator seeded, and what a snapshot does with labelers below the bar.
//!
//! The paper screened its labelers and measured them: they agreed with each other 72.6 ± 1.5% of the time.
//! Here agreement is counted on ordered pairs of completions: for every prompt two labelers both ranked, every
//! pair of completions both of them ordered (no tie on either side) is one comparison, an agreement when they
//! ordered it the same way. A labeler's agreement is over all their comparisons with other labelers; gold
//! agreement is over comparisons with the gold labelers (operators' own labeler keys, `gold_labelers`). A labeler
//! with at least `min_comparisons` comparisons and an agreement (gold agreement when it has enough gold
//! comparisons, which says more) under `min_agreement` is flagged. Flagged labelers' rankings are kept, weighted
//! by their agreement, or dropped, as `action` says.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::snapshot::RankedExample;

/// `[trainer.labeler_qc]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelerQcConfig {
    /// Flag a labeler whose agreement is below this (the paper's labelers: 0.726 with each other).
    pub min_agreement: f64,
    /// Comparisons a labeler needs before it can be judged at all.
    pub min_comparisons: usize,
    /// Labeler ids whose rankings are gold (an operator's labeler keys).
    pub gold_labelers: Vec<String>,
    pub action: QcAction,
}

impl Default for LabelerQcConfig {
    fn default() -> Self {
        Self { min_agreement: 0.6, min_comparisons: 20, gold_labelers: Vec::new(), action: QcAction::Exclude }
    }
}

/// What happens to a flagged labeler's rankings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QcAction {
    /// Reported only.
    Flag,
    /// Kept, each ranking weighted by the labeler's agreement in the reward model's loss.
    DownWeight,
    /// Left out of the snapshot.
    Exclude,
}

/// One labeler's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelerQuality {
    pub labeler_id: String,
    pub rankings: usize,
    /// Ordered pairs compared with other labelers, and the share that agreed.
    pub comparisons: usize,
    pub agreement: Option<f64>,
    /// The same against gold labelers only.
    pub gold_comparisons: usize,
    pub gold_agreement: Option<f64>,
    pub gold: bool,
    pub flagged: bool,
}

/// Every labeler's figures, by labeler id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QcReport {
    pub labelers: BTreeMap<String, LabelerQuality>,
    /// Agreement over all comparisons between non-gold labelers (the paper's inter-labeler agreement).
    pub overall_agreement: Option<f64>,
    pub comparisons: usize,
}

impl QcReport {
    pub fn flagged(&self) -> impl Iterator<Item = &LabelerQuality> {
        self.labelers.values().filter(|l| l.flagged)
    }
}

#[derive(Default)]
struct Tally {
    agree: usize,
    total: usize,
}

impl Tally {
    fn rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.agree as f64 / self.total as f64)
    }
}

/// Measures every labeler in `rankings` (see the module docs). Flags one labeler at a time, the one furthest
/// below the bar, and measures the rest again without them: one adversary among three labelers would otherwise
/// drag the two honest ones under the bar with it.
pub fn assess(rankings: &[RankedExample], config: &LabelerQcConfig) -> QcReport {
    let is_gold = |id: &str| config.gold_labelers.iter().any(|g| g == id);
    let mut by_prompt: HashMap<&str, Vec<&RankedExample>> = HashMap::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rankings {
        by_prompt.entry(r.prompt_id.as_str()).or_default().push(r);
        *counts.entry(r.labeler_id.as_str()).or_default() += 1;
    }
    let mut flagged: HashSet<&str> = HashSet::new();
    loop {
        let t = tallies(&by_prompt, &flagged, &is_gold);
        let worst = counts
            .keys()
            .filter(|id| !is_gold(id) && !flagged.contains(*id))
            .filter_map(|id| judged(&t, id, config).map(|rate| (*id, rate)))
            .filter(|(_, rate)| *rate < config.min_agreement)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match worst {
            Some((id, _)) => {
                flagged.insert(id);
            }
            None => {
                let labelers = counts
                    .iter()
                    .map(|(&id, &n)| {
                        let (peer, gold) = (t.peer.get(id), t.gold.get(id));
                        let quality = LabelerQuality {
                            labeler_id: id.to_string(),
                            rankings: n,
                            comparisons: peer.map_or(0, |t| t.total),
                            agreement: peer.and_then(Tally::rate),
                            gold_comparisons: gold.map_or(0, |t| t.total),
                            gold_agreement: gold.and_then(Tally::rate),
                            gold: is_gold(id),
                            flagged: flagged.contains(id),
                        };
                        (id.to_string(), quality)
                    })
                    .collect();
                return QcReport { labelers, overall_agreement: t.overall.rate(), comparisons: t.overall.total };
            }
        }
    }
}

/// Agreement tallies per labeler against peers and against gold, and between unflagged non-gold labelers.
#[derive(Default)]
struct Tallies<'a> {
    peer: HashMap<&'a str, Tally>,
    gold: HashMap<&'a str, Tally>,
    overall: Tally,
}

/// Counts comparisons on every prompt several labelers ranked; flagged labelers are nobody's reference.
fn tallies<'a>(
    by_prompt: &HashMap<&str, Vec<&'a RankedExample>>,
    flagged: &HashSet<&str>,
    is_gold: &dyn Fn(&str) -> bool,
) -> Tallies<'a> {
    let mut t = Tallies::default();
    for group in by_prompt.values() {
        for (i, a) in group.iter().enumerate() {
            for b in &group[i + 1..] {
                if a.labeler_id == b.labeler_id {
                    continue;
                }
                let (agree, total) = pair_agreement(a, b);
                if total == 0 {
                    continue;
                }
                for (me, other) in [(a, b), (b, a)] {
                    if flagged.contains(other.labeler_id.as_str()) {
                        continue;
                    }
                    let tally = if is_gold(&other.labeler_id) { &mut t.gold } else { &mut t.peer };
                    let tally = tally.entry(me.labeler_id.as_str()).or_default();
                    tally.agree += agree;
                    tally.total += total;
                }
                let counted = |id: &str| !is_gold(id) && !flagged.contains(id);
                if counted(&a.labeler_id) && counted(&b.labeler_id) {
                    t.overall.agree += agree;
                    t.overall.total += total;
                }
            }
        }
    }
    t
}

/// The agreement a labeler is judged by: against gold when there is enough of it, else against everyone; `None`
/// with too few comparisons to judge.
fn judged(t: &Tallies<'_>, id: &str, config: &LabelerQcConfig) -> Option<f64> {
    let (peer, gold) = (t.peer.get(id), t.gold.get(id));
    let (gold_total, gold_rate) = (gold.map_or(0, |g| g.total), gold.and_then(Tally::rate));
    if gold_total >= config.min_comparisons {
        return gold_rate;
    }
    let peer_total = peer.map_or(0, |p| p.total);
    if peer_total + gold_total < config.min_comparisons {
        return None;
    }
    combined((peer_total, peer.and_then(Tally::rate)), (gold_total, gold_rate))
}

fn combined(a: (usize, Option<f64>), b: (usize, Option<f64>)) -> Option<f64> {
    let total = a.0 + b.0;
    (total > 0).then(|| (a.1.unwrap_or(0.0) * a.0 as f64 + b.1.unwrap_or(0.0) * b.0 as f64) / total as f64)
}

/// Ordered pairs both labelers ordered, and how many they ordered alike. Completions are matched by text (two
/// labelers of a prompt rank the same logged samples).
fn pair_agreement(a: &RankedExample, b: &RankedExample) -> (usize, usize) {
    let rank_in_b: HashMap<&str, usize> =
        b.completions.iter().map(String::as_str).zip(b.ranks.iter().copied()).collect();
    let shared: Vec<(usize, usize)> = a
        .completions
        .iter()
        .zip(&a.ranks)
        .filter_map(|(c, &ra)| rank_in_b.get(c.as_str()).map(|&rb| (ra, rb)))
        .collect();
    let (mut agree, mut total) = (0, 0);
    for (i, &(ai, bi)) in shared.iter().enumerate() {
        for &(aj, bj) in &shared[i + 1..] {
            if ai != aj && bi != bj {
                total += 1;
                agree += usize::from((ai < aj) == (bi < bj));
            }
        }
    }
    (agree, total)
}

/// Applies `config.action` to the flagged labelers' rankings; returns how many rankings were dropped.
pub fn apply(rankings: &mut Vec<RankedExample>, report: &QcReport, action: QcAction) -> usize {
    let flagged: HashMap<&str, f64> =
        report.flagged().map(|l| (l.labeler_id.as_str(), l.gold_agreement.or(l.agreement).unwrap_or(0.0))).collect();
    match action {
        QcAction::Flag => 0,
        QcAction::DownWeight => {
            for r in rankings.iter_mut() {
                if let Some(&rate) = flagged.get(r.labeler_id.as_str()) {
                    r.weight = rate as f32;
                }
            }
            0
        }
        QcAction::Exclude => {
            let before = rankings.len();
            rankings.retain(|r| !flagged.contains_key(r.labeler_id.as_str()));
            before - rankings.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use feedback::events::LabelerGroup;
    use feedback::split::Split;

    fn ranking(prompt: &str, labeler: &str, order: &[&str]) -> RankedExample {
        RankedExample {
            prompt_id: prompt.into(),
            prompt: format!("prompt {prompt}"),
            completions: order.iter().map(|s| s.to_string()).collect(),
            ranks: (0..order.len()).collect(),
            labeler_group: LabelerGroup::Training,
            split: Split::Train,
            labeler_id: labeler.into(),
            weight: 1.0,
        }
    }

    /// Three honest labelers order a, b, c, d; an adversary reverses them; a noisy one swaps the middle.
    fn panel() -> Vec<RankedExample> {
        let mut out = Vec::new();
        for p in 0..6 {
            let prompt = format!("p{p}");
            for honest in ["ann", "bob", "cy"] {
                out.push(ranking(&prompt, honest, &["a", "b", "c", "d"]));
            }
            out.push(ranking(&prompt, "eve", &["d", "c", "b", "a"]));
            out.push(ranking(&prompt, "noisy", &["a", "c", "b", "d"]));
        }
        out
    }

    #[test]
    fn agreement_finds_the_adversary_and_keeps_the_noisy_labeler() {
        let config = LabelerQcConfig { min_agreement: 0.6, min_comparisons: 12, ..Default::default() };
        let report = assess(&panel(), &config);
        let eve = &report.labelers["eve"];
        // 6 prompts x 4 other labelers x 6 pairs; eve agrees with the noisy one on one pair per prompt.
        assert_eq!(eve.comparisons, 144);
        assert!(eve.agreement.unwrap() < 0.1, "{eve:?}");
        assert!(eve.flagged);
        let noisy = &report.labelers["noisy"];
        assert!(!noisy.flagged, "{noisy:?}");
        assert!(noisy.agreement.unwrap() > 0.6 && noisy.agreement.unwrap() < 1.0);
        assert_eq!(report.flagged().count(), 1);
        let overall = report.overall_agreement.unwrap();
        // Among the labelers kept: the noisy one disagrees on 1 pair of 6 with each honest one.
        assert!((overall - 33.0 / 36.0).abs() < 1e-9, "{overall}");
    }

    #[test]
    fn gold_rankings_decide_when_there_are_enough() {
        // The majority is wrong here (three copies of the reversed order), the gold labeler right.
        let mut rankings = Vec::new();
        for p in 0..4 {
            let prompt = format!("p{p}");
            for wrong in ["w1", "w2", "w3"] {
                rankings.push(ranking(&prompt, wrong, &["d", "c", "b", "a"]));
            }
            rankings.push(ranking(&prompt, "op", &["a", "b", "c", "d"]));
        }
        let config = LabelerQcConfig { min_comparisons: 12, gold_labelers: vec!["op".into()], ..Default::default() };
        let report = assess(&rankings, &config);
        assert!(report.labelers.values().filter(|l| !l.gold).all(|l| l.flagged), "{report:?}");
        assert!(!report.labelers["op"].flagged);
        assert_eq!(report.labelers["w1"].gold_comparisons, 24);
    }

    #[test]
    fn too_few_comparisons_flag_no_one_and_actions_apply() {
        let config = LabelerQcConfig { min_comparisons: 1000, ..Default::default() };
        assert_eq!(assess(&panel(), &config).flagged().count(), 0);

        let config = LabelerQcConfig { min_comparisons: 12, ..Default::default() };
        let report = assess(&panel(), &config);
        let mut kept = panel();
        assert_eq!(apply(&mut kept, &report, QcAction::Exclude), 6);
        assert!(kept.iter().all(|r| r.labeler_id != "eve"));
        let mut weighted = panel();
        assert_eq!(apply(&mut weighted, &report, QcAction::DownWeight), 0);
        assert!(weighted.iter().all(|r| (r.labeler_id == "eve") == (r.weight < 0.1)));
        let mut flagged = panel();
        apply(&mut flagged, &report, QcAction::Flag);
        assert_eq!(flagged, panel());
    }
}
