//! Training curves: turns checkpoint manifests into chart data (per policy
//! refresh, per reward-model refresh, and per PPO iteration of the newest
//! `ppo_ptx` checkpoint) plus a summary table, and renders each chart as a
//! self-contained SVG line chart. Pure functions: no I/O, and the same
//! manifests always give the same bytes.
//!
//! Every metric is optional: a missing key, a non-numeric value or a
//! non-finite number leaves a gap (no point), never a panic.

use std::fmt::Write as _;

use inference::checkpoint::{Manifest, Stage};
use serde::Serialize;
use serde_json::Value;

/// One named line of a chart: `(x, y)` points, drawn in the order given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.to_string(), points }
    }
}

/// A chart: its data and its rendered SVG.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chart {
    /// Stable identifier (`win_rate`, `ppo_kl`, ...), for pages and tests.
    pub id: &'static str,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// The chart rendered as a standalone SVG document.
    pub svg: String,
}

impl Chart {
    /// `x_span`: x values the axis covers even where no series has a point there.
    fn new(
        id: &'static str,
        title: String,
        (x_label, y_label): (&str, &str),
        series: Vec<Series>,
        x_span: Option<(f64, f64)>,
    ) -> Self {
        let svg = render_svg_spanning(&title, x_label, y_label, &series, x_span);
        Self { id, title, x_label: x_label.to_string(), y_label: y_label.to_string(), series, svg }
    }
}

/// The headline numbers of one checkpoint (each null when its manifest lacks it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Headline {
    /// SFT: validation and training loss, best epoch.
    pub val_loss: Option<f64>,
    pub train_loss: Option<f64>,
    pub best_epoch: Option<u64>,
    /// Reward model: validation accuracy after and before training.
    pub val_accuracy: Option<f64>,
    pub val_accuracy_before: Option<f64>,
    /// PPO-ptx: number of iterations and the last iteration's mean reward.
    pub iterations: Option<usize>,
    pub final_reward_mean: Option<f64>,
    /// Evaluation against the serving checkpoint (SFT and PPO-ptx), with the win rate's confidence interval.
    pub win_rate: Option<f64>,
    pub win_rate_lower: Option<f64>,
    pub win_rate_upper: Option<f64>,
    pub candidate_reward: Option<f64>,
    pub serving_reward: Option<f64>,
    pub kl_from_sft: Option<f64>,
    pub alignment_tax: Option<f64>,
    pub eval_prompts: Option<u64>,
    pub wall_secs: Option<f64>,
    /// The data it learned from: age of its newest judgment when published, labelers' agreement, labelers
    /// quality control flagged.
    pub feedback_age_secs: Option<f64>,
    pub labeler_agreement: Option<f64>,
    pub labelers_flagged: Option<usize>,
}

/// One row of the checkpoint table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub id: String,
    pub stage: Stage,
    pub parent: Option<String>,
    pub created_at_ms: u64,
    /// The checkpoint's x in the per-refresh charts: its policy refresh number
    /// (sft, ppo_ptx) or reward-model refresh number (reward_model); null for base.
    pub refresh: Option<usize>,
    pub headline: Headline,
    /// The evaluation gate's verdict, when the checkpoint was evaluated.
    pub passed: Option<bool>,
    pub reasons: Vec<String>,
}

/// Everything `GET /admin/training/report` answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingReport {
    pub object: &'static str,
    /// Policy checkpoints (sft and ppo_ptx): the x range of the per-refresh charts.
    pub policy_refreshes: usize,
    pub reward_model_refreshes: usize,
    /// The ppo_ptx checkpoint whose iterations the per-iteration charts show.
    pub newest_ppo: Option<String>,
    pub charts: Vec<Chart>,
    /// Every checkpoint, oldest first (by `created_at_ms`, then id).
    pub table: Vec<Row>,
    /// The newest checkpoint whose manifest has per-labeler quality figures, and those figures (the trainer's
    /// own type, read back from `metrics.data.labelers`).
    pub labelers_from: Option<String>,
    pub labelers: Vec<trainer::labeler_quality::LabelerQuality>,
}

/// A finite number under `key`, if `value` is an object that has one.
fn num(value: &Value, key: &str) -> Option<f64> {
    value.get(key).and_then(Value::as_f64).filter(|v| v.is_finite())
}

fn evaluation(metrics: &Value) -> Option<&Value> {
    metrics.get("evaluation").filter(|e| e.is_object())
}

fn iterations(metrics: &Value) -> &[Value] {
    metrics.get("iterations").and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// One point per policy checkpoint that has evaluation metric `key`; x is the refresh number.
fn per_refresh(name: &str, policy: &[&Manifest], key: &str) -> Series {
    let points = policy
        .iter()
        .enumerate()
        .filter_map(|(i, m)| evaluation(&m.metrics).and_then(|e| num(e, key)).map(|y| ((i + 1) as f64, y)))
        .collect();
    Series::new(name, points)
}

/// One point per PPO iteration with metric `key`, by iteration number (position when missing).
fn per_iteration(name: &str, iterations: &[Value], key: &str) -> Series {
    let mut points: Vec<(f64, f64)> = iterations
        .iter()
        .enumerate()
        .filter_map(|(i, it)| num(it, key).map(|y| (num(it, "iteration").unwrap_or((i + 1) as f64), y)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Series::new(name, points)
}

fn headline(m: &Manifest) -> Headline {
    let metrics = &m.metrics;
    let eval = evaluation(metrics).unwrap_or(&Value::Null);
    let iterations = metrics.get("iterations").and_then(Value::as_array);
    Headline {
        val_loss: num(metrics, "val_loss"),
        train_loss: num(metrics, "train_loss"),
        best_epoch: metrics.get("best_epoch").and_then(Value::as_u64),
        val_accuracy: num(metrics, "val_accuracy"),
        val_accuracy_before: num(metrics, "val_accuracy_before"),
        iterations: iterations.map(Vec::len),
        final_reward_mean: iterations.and_then(|its| its.iter().rev().find_map(|it| num(it, "reward_mean"))),
        win_rate: num(eval, "win_rate"),
        win_rate_lower: num(eval, "win_rate_lower"),
        win_rate_upper: num(eval, "win_rate_upper"),
        candidate_reward: num(eval, "candidate_reward"),
        serving_reward: num(eval, "serving_reward"),
        kl_from_sft: num(eval, "kl_from_sft"),
        alignment_tax: num(eval, "alignment_tax"),
        eval_prompts: eval.get("prompts").and_then(Value::as_u64),
        wall_secs: num(metrics, "wall_secs"),
        feedback_age_secs: metrics.get("data").and_then(|d| num(d, "newest_judgment_age_secs")),
        labeler_agreement: metrics.get("data").and_then(|d| num(d, "labeler_agreement")),
        labelers_flagged: metrics
            .get("data")
            .and_then(|d| d.get("labelers_flagged"))
            .and_then(Value::as_array)
            .map(Vec::len),
    }
}

/// The training report: per-refresh curves over the policy checkpoints (sft
/// and ppo_ptx, oldest first, x = refresh 1..n), reward-model accuracy per
/// reward-model refresh, per-iteration curves of the newest ppo_ptx
/// checkpoint, and the table of every checkpoint.
pub fn report(manifests: &[Manifest]) -> TrainingReport {
    let mut sorted: Vec<&Manifest> = manifests.iter().collect();
    sorted.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let policy: Vec<&Manifest> =
        sorted.iter().copied().filter(|m| matches!(m.stage, Stage::Sft | Stage::PpoPtx)).collect();
    let reward_models: Vec<&Manifest> = sorted.iter().copied().filter(|m| m.stage == Stage::RewardModel).collect();
    let newest_ppo = sorted.iter().rev().find(|m| m.stage == Stage::PpoPtx).copied();

    let refresh = "policy refresh";
    // Every per-refresh chart spans refreshes 1..n, so they line up even where a value is missing.
    let span = |n: usize| (n > 0).then_some((1.0, n as f64));
    let policy_span = span(policy.len());
    let mut charts = vec![
        Chart::new(
            "win_rate",
            "Win rate against the serving checkpoint".into(),
            (refresh, "win rate (0..1)"),
            vec![per_refresh("win rate", &policy, "win_rate")],
            policy_span,
        ),
        Chart::new(
            "reward",
            "Mean reward: candidate vs serving".into(),
            (refresh, "mean reward"),
            vec![
                per_refresh("candidate", &policy, "candidate_reward"),
                per_refresh("serving", &policy, "serving_reward"),
            ],
            policy_span,
        ),
        Chart::new(
            "kl_from_sft",
            "KL divergence from the SFT policy".into(),
            (refresh, "KL from SFT"),
            vec![per_refresh("KL from SFT", &policy, "kl_from_sft")],
            policy_span,
        ),
        Chart::new(
            "alignment_tax",
            "Alignment tax (pretraining loss increase)".into(),
            (refresh, "alignment tax"),
            vec![per_refresh("alignment tax", &policy, "alignment_tax")],
            policy_span,
        ),
    ];
    let rm_series = |name: &str, key: &str| {
        let points = reward_models
            .iter()
            .enumerate()
            .filter_map(|(i, m)| num(&m.metrics, key).map(|y| ((i + 1) as f64, y)))
            .collect();
        Series::new(name, points)
    };
    charts.push(Chart::new(
        "rm_accuracy",
        "Reward model validation accuracy".into(),
        ("reward model refresh", "pairwise accuracy"),
        vec![rm_series("after training", "val_accuracy"), rm_series("before training", "val_accuracy_before")],
        span(reward_models.len()),
    ));

    let its = newest_ppo.map_or(&[][..], |m| iterations(&m.metrics));
    let of = newest_ppo.map_or_else(|| " (no ppo_ptx checkpoint yet)".to_string(), |m| format!(" ({})", m.id));
    let per_iteration_charts: [(&'static str, &str, &str, &str); 6] = [
        ("ppo_reward_mean", "PPO mean reward per iteration", "reward mean", "reward_mean"),
        ("ppo_kl", "PPO KL per iteration", "KL", "kl"),
        ("ppo_clip_fraction", "PPO clip fraction per iteration", "clip fraction", "clip_fraction"),
        ("ppo_entropy", "PPO entropy per iteration", "entropy", "entropy"),
        ("ppo_value_loss", "PPO value loss per iteration", "value loss", "value_loss"),
        ("ppo_ptx_loss", "PPO pretraining (ptx) loss per iteration", "ptx loss", "ptx_loss"),
    ];
    for (id, title, y_label, key) in per_iteration_charts {
        charts.push(Chart::new(
            id,
            format!("{title}{of}"),
            ("PPO iteration", y_label),
            vec![per_iteration(y_label, its, key)],
            None,
        ));
    }

    let (mut policy_n, mut rm_n) = (0, 0);
    let table = sorted
        .iter()
        .map(|m| {
            let refresh = match m.stage {
                Stage::Sft | Stage::PpoPtx => {
                    policy_n += 1;
                    Some(policy_n)
                }
                Stage::RewardModel => {
                    rm_n += 1;
                    Some(rm_n)
                }
                Stage::Base => None,
            };
            let eval = evaluation(&m.metrics);
            Row {
                id: m.id.clone(),
                stage: m.stage,
                parent: m.parent.clone(),
                created_at_ms: m.created_at_ms,
                refresh,
                headline: headline(m),
                passed: eval.and_then(|e| e.get("passed")).and_then(Value::as_bool),
                reasons: eval
                    .and_then(|e| e.get("reasons"))
                    .and_then(Value::as_array)
                    .map(|rs| rs.iter().filter_map(Value::as_str).map(str::to_string).collect())
                    .unwrap_or_default(),
            }
        })
        .collect();

    let labelers = sorted.iter().rev().find_map(|m| {
        let rows = m.metrics.get("data")?.get("labelers")?.clone();
        let rows: Vec<trainer::labeler_quality::LabelerQuality> = serde_json::from_value(rows).ok()?;
        (!rows.is_empty()).then(|| (m.id.clone(), rows))
    });
    let (labelers_from, labelers) = labelers.map_or((None, vec![]), |(id, rows)| (Some(id), rows));
    TrainingReport {
        object: "training_report",
        labelers_from,
        labelers,
        policy_refreshes: policy.len(),
        reward_model_refreshes: reward_models.len(),
        newest_ppo: newest_ppo.map(|m| m.id.clone()),
        charts,
        table,
    }
}

// ---------- SVG ----------

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 20.0;
const BOTTOM: f64 = 50.0;
/// Gap between the frame and the outermost ticks.
const INSET: f64 = 8.0;
const BACKGROUND: &str = "#ffffff";
const INK: &str = "#1c2230";
const MUTED: &str = "#5a6376";
const GRID: &str = "#e3e6ec";
const FRAME: &str = "#b9bfca";
const PALETTE: [&str; 6] = ["#3457d5", "#d5573b", "#2a9d6f", "#9b59b6", "#c08a00", "#555f73"];
/// Longest text (in characters) drawn before it is cut with an ellipsis.
const MAX_TEXT: usize = 90;

/// Escapes text for XML content and attributes, dropping characters XML 1.0 cannot hold at all.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.chars().enumerate() {
        if i == MAX_TEXT {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// A "nice" step (1, 2, 2.5 or 5 times a power of ten) close to `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 2.5 {
        2.5
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A value in a tooltip: up to 4 decimals, scientific when very large or small.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    let text = if a != 0.0 && !(1e-4..1e7).contains(&a) {
        format!("{v:.3e}")
    } else {
        let fixed = format!("{v:.4}");
        fixed.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    no_negative_zero(text)
}

fn no_negative_zero(text: String) -> String {
    match text.strip_prefix('-') {
        Some(rest) if rest.parse::<f64>().is_ok_and(|v| v == 0.0) => rest.to_string(),
        _ => text,
    }
}

/// Decimals that show every multiple of `step` exactly, if a few suffice.
fn decimals(step: f64) -> Option<usize> {
    (0..=6).find(|&d| {
        let scaled = step * 10f64.powi(d as i32);
        scaled.round() != 0.0 && (scaled - scaled.round()).abs() <= 1e-9 * scaled.abs()
    })
}

struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// An axis covering `min..=max` (finite, `min <= max`), with 2 to 13 ticks.
    /// `integer`: every value is a whole number, so ticks are too.
    fn new(min: f64, max: f64, integer: bool) -> Self {
        let (mut lo, mut hi) = (min, max);
        if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) {
            let pad = if integer || lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            lo -= pad;
            hi += pad;
        }
        let range = hi - lo;
        if range.is_finite() && range > 0.0 {
            let mut step = nice_step(range / 4.0);
            if integer {
                step = step.max(1.0).ceil();
            }
            let (nice_lo, nice_hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
            let count = ((nice_hi - nice_lo) / step).round();
            if nice_lo.is_finite() && nice_hi.is_finite() && step > 0.0 && (1.0..=12.0).contains(&count) {
                let scientific = nice_lo.abs().max(nice_hi.abs()) >= 1e7;
                let digits = if scientific { None } else { decimals(step) };
                let ticks = (0..=count as usize)
                    .map(|k| {
                        let v = nice_lo + k as f64 * step;
                        let label = match digits {
                            Some(d) => no_negative_zero(format!("{v:.d$}")),
                            None => no_negative_zero(format!("{v:.2e}")),
                        };
                        (v, label)
                    })
                    .collect();
                return Self { lo: nice_lo, hi: nice_hi, ticks };
            }
        }
        Self { lo, hi, ticks: vec![(lo, fmt_value(lo)), (hi, fmt_value(hi))] }
    }

    /// Where `v` falls, 0 (at `lo`) to 1 (at `hi`).
    fn fraction(&self, v: f64) -> f64 {
        // Halved first, so that spans near f64::MAX do not overflow.
        let t = (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5);
        if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.5 }
    }
}

/// Renders a line chart as a standalone SVG document: title, legend, framed
/// plot with numeric ticks on both axes, one polyline with point markers per
/// series that has points, and axis labels. Non-finite points are skipped; a
/// chart without any point says "no data yet". All text is XML-escaped.
pub fn render_svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    render_svg_spanning(title, x_label, y_label, series, None)
}

/// [`render_svg`] with an x axis that covers at least `x_span` (finite ends
/// only) once there is data to draw.
pub fn render_svg_spanning(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    x_span: Option<(f64, f64)>,
) -> String {
    let series: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.name.as_str(), s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()))
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="sans-serif" font-size="11">"#
    );
    let title = escape(title);
    let _ = write!(
        out,
        r#"<title>{title}</title><rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="{BACKGROUND}"/>"#
    );
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15" font-weight="600" fill="{INK}">{title}</text>"#,
        WIDTH / 2.0
    );

    // Legend: one entry per series, wrapped onto as many rows as needed.
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (mut lx, mut row) = (x0, 0usize);
    let mut legend = String::new();
    for (i, (name, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let label = if points.is_empty() { format!("{name} (no data)") } else { (*name).to_string() };
        let width = 30.0 + 6.5 * label.chars().count().min(MAX_TEXT) as f64;
        if lx + width > x1 && lx > x0 {
            lx = x0;
            row += 1;
        }
        let y = 46.0 + 18.0 * row as f64;
        let _ = write!(
            legend,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/><circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="{INK}">{}</text>"#,
            lx,
            y - 4.0,
            lx + 20.0,
            y - 4.0,
            lx + 10.0,
            y - 4.0,
            lx + 25.0,
            y,
            escape(&label)
        );
        lx += width;
    }
    let rows = if series.is_empty() { 0 } else { row + 1 };
    let _ = write!(out, r#"<g class="legend">{legend}</g>"#);

    let y1 = HEIGHT - BOTTOM;
    let y0 = (36.0 + 18.0 * rows as f64 + 12.0).min(y1 - 40.0);
    let _ = write!(
        out,
        r#"<rect x="{x0:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="{FRAME}"/>"#,
        x1 - x0,
        y1 - y0
    );
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{MUTED}">{}</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 10.0,
        escape(x_label)
    );
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="16" transform="rotate(-90)" text-anchor="middle" fill="{MUTED}">{}</text>"#,
        -(y0 + y1) / 2.0,
        escape(y_label)
    );

    let all = || series.iter().flat_map(|(_, points)| points.iter().copied());
    let bounds = all().fold(None, |acc: Option<(f64, f64, f64, f64)>, (x, y)| {
        Some(match acc {
            None => (x, x, y, y),
            Some((a, b, c, d)) => (a.min(x), b.max(x), c.min(y), d.max(y)),
        })
    });
    let Some((min_x, max_x, min_y, max_y)) = bounds else {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" fill="{MUTED}">no data yet</text></svg>"#,
            (x0 + x1) / 2.0,
            (y0 + y1) / 2.0 + 4.0
        );
        return out;
    };
    let span = x_span.filter(|(lo, hi)| lo.is_finite() && hi.is_finite());
    let (min_x, max_x) = span.map_or((min_x, max_x), |(lo, hi)| (min_x.min(lo.min(hi)), max_x.max(lo.max(hi))));
    let whole =
        all().all(|(x, _)| x.fract() == 0.0) && span.is_none_or(|(lo, hi)| lo.fract() == 0.0 && hi.fract() == 0.0);
    let x_axis = Axis::new(min_x, max_x, whole);
    let y_axis = Axis::new(min_y, max_y, false);
    // Data sits a little inside the frame, so markers at the extremes are not cut by it.
    let px = |x: f64| x0 + INSET + x_axis.fraction(x) * (x1 - x0 - 2.0 * INSET);
    let py = |y: f64| y1 - INSET - y_axis.fraction(y) * (y1 - y0 - 2.0 * INSET);

    out.push_str(r#"<g class="axes">"#);
    for (v, label) in &y_axis.ticks {
        let y = py(*v);
        let _ = write!(
            out,
            r#"<line x1="{x0:.1}" y1="{y:.2}" x2="{x1:.1}" y2="{y:.2}" stroke="{GRID}"/><text x="{:.1}" y="{:.2}" text-anchor="end" fill="{MUTED}">{}</text>"#,
            x0 - 6.0,
            y + 4.0,
            escape(label)
        );
    }
    for (v, label) in &x_axis.ticks {
        let x = px(*v);
        let _ = write!(
            out,
            r#"<line x1="{x:.2}" y1="{y1:.1}" x2="{x:.2}" y2="{:.1}" stroke="{FRAME}"/><text x="{x:.2}" y="{:.1}" text-anchor="middle" fill="{MUTED}">{}</text>"#,
            y1 + 5.0,
            y1 + 17.0,
            escape(label)
        );
    }
    out.push_str("</g>");

    for (i, (name, points)) in series.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        let coords: Vec<String> = points.iter().map(|&(x, y)| format!("{:.2},{:.2}", px(x), py(y))).collect();
        let _ = write!(
            out,
            r#"<g class="series"><polyline fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round" points="{}"/>"#,
            coords.join(" ")
        );
        let radius = if points.len() > 50 { 1.5 } else { 3.0 };
        for &(x, y) in points {
            let _ = write!(
                out,
                r#"<circle cx="{:.2}" cy="{:.2}" r="{radius}" fill="{color}"><title>{}: {}, {}</title></circle>"#,
                px(x),
                py(y),
                escape(name),
                fmt_value(x),
                fmt_value(y)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal XML check: tags balance, every `&` starts a known entity,
    /// and the document is one `<svg>` element. Returns the element names opened.
    fn well_formed(svg: &str) -> Result<Vec<String>, String> {
        if !svg.starts_with("<svg") || !svg.ends_with("</svg>") {
            return Err("not a single <svg> element".into());
        }
        let mut stack: Vec<String> = Vec::new();
        let mut opened = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            check_text(&rest[..start])?;
            let end = rest[start..].find('>').ok_or("unterminated tag")? + start;
            let tag = &rest[start + 1..end];
            if tag.contains('<') {
                return Err(format!("'<' inside tag {tag}"));
            }
            if !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in {tag}"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                if open != name {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
            } else {
                check_text(tag)?;
                let name: String = tag.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
                if name.is_empty() {
                    return Err(format!("bad tag <{tag}>"));
                }
                opened.push(name.clone());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
            if stack.is_empty() && !rest.is_empty() {
                return Err("content after the root element".into());
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        Ok(opened)
    }

    fn check_text(text: &str) -> Result<(), String> {
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            if !["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"].iter().any(|e| entity.starts_with(e)) {
                return Err(format!("raw '&' in {text}"));
            }
        }
        if text.contains('>') {
            return Err(format!("raw '>' in {text}"));
        }
        Ok(())
    }

    fn count(names: &[String], name: &str) -> usize {
        names.iter().filter(|n| *n == name).count()
    }

    fn manifest(id: &str, parent: Option<&str>, stage: Stage, created_at_ms: u64, metrics: Value) -> Manifest {
        let mut m = Manifest::new(id, parent, stage);
        m.created_at_ms = created_at_ms;
        m.metrics = metrics;
        m
    }

    fn iteration(n: u64, reward: f64, ptx: Value) -> Value {
        json!({"iteration": n, "reward_mean": reward, "kl": 0.01 * n as f64, "entropy": 2.0 - 0.1 * n as f64,
               "clip_fraction": 0.05, "value_loss": 1.0 / n as f64, "policy_loss": -0.1, "ptx_loss": ptx,
               "lr": 1e-6, "wall_secs": 3.0})
    }

    fn eval(win_rate: f64, candidate: f64, serving: f64, kl: f64, tax: Value, passed: bool) -> Value {
        json!({"win_rate": win_rate, "candidate_reward": candidate, "serving_reward": serving, "kl_from_sft": kl,
               "ptx_loss_candidate": null, "ptx_loss_serving": null, "alignment_tax": tax, "prompts": 64,
               "win_rate_lower": win_rate - 0.1, "win_rate_upper": win_rate + 0.1,
               "passed": passed, "reasons": if passed { json!([]) } else { json!(["win rate below 0.5"]) }})
    }

    /// base, then two refreshes (sft + rm + ppo, then rm + ppo), given out of order.
    fn fixture() -> Vec<Manifest> {
        vec![
            manifest(
                "ppo-2",
                Some("ppo-1"),
                Stage::PpoPtx,
                600,
                json!({"iterations": [iteration(2, 0.9, json!(2.2)), iteration(1, 0.7, json!(null)),
                                      iteration(3, 1.1, json!(2.3))],
                       "wall_secs": 50.0, "evaluation": eval(0.62, 1.1, 0.8, 0.05, json!(0.04), true)}),
            ),
            manifest("base", None, Stage::Base, 100, Value::Null),
            manifest(
                "rm-2",
                Some("ppo-1"),
                Stage::RewardModel,
                500,
                json!({"val_accuracy": 0.71,
                     "val_accuracy_before": 0.66, "wall_secs": 20.0,
                     "data": {"newest_judgment_age_secs": 42.5, "labeler_agreement": 0.74,
                              "labelers_flagged": ["eve"],
                              "labelers": [
                                  {"labeler_id": "ann", "rankings": 40, "comparisons": 90, "agreement": 0.78,
                                   "gold_comparisons": 0, "gold_agreement": null, "gold": false, "flagged": false},
                                  {"labeler_id": "eve", "rankings": 30, "comparisons": 70, "agreement": 0.31,
                                   "gold_comparisons": 12, "gold_agreement": 0.25, "gold": false, "flagged": true}]}}),
            ),
            manifest(
                "sft-1",
                Some("base"),
                Stage::Sft,
                200,
                json!({"val_loss": 1.8, "train_loss": 1.6,
                     "best_epoch": 3, "wall_secs": 90.0, "evaluation": eval(0.55, 0.3, 0.1, 0.0, json!(null), true)}),
            ),
            manifest(
                "rm-1",
                Some("sft-1"),
                Stage::RewardModel,
                300,
                json!({"val_accuracy": 0.68,
                     "val_accuracy_before": 0.5, "wall_secs": 41.0}),
            ),
            manifest(
                "ppo-1",
                Some("sft-1"),
                Stage::PpoPtx,
                400,
                json!({"iterations": [iteration(1, 0.2, json!(2.0)), iteration(2, 0.4, json!(2.1))],
                       "wall_secs": 30.0, "evaluation": eval(0.48, 0.6, 0.3, 0.03, json!(0.02), false)}),
            ),
        ]
    }

    fn chart<'a>(report: &'a TrainingReport, id: &str) -> &'a Chart {
        report.charts.iter().find(|c| c.id == id).unwrap_or_else(|| panic!("no chart {id}"))
    }

    fn points<'a>(report: &'a TrainingReport, id: &str, series: &str) -> &'a [(f64, f64)] {
        let chart = chart(report, id);
        let found = chart.series.iter().find(|s| s.name == series);
        &found.unwrap_or_else(|| panic!("no series {series} in {id}")).points
    }

    #[test]
    fn fixture_numbers_land_in_the_right_series_in_order() {
        let report = report(&fixture());
        assert_eq!(report.object, "training_report");
        assert_eq!((report.policy_refreshes, report.reward_model_refreshes), (3, 2));
        assert_eq!(report.newest_ppo.as_deref(), Some("ppo-2"));
        // Policy refreshes: sft-1 = 1, ppo-1 = 2, ppo-2 = 3.
        assert_eq!(points(&report, "win_rate", "win rate"), [(1.0, 0.55), (2.0, 0.48), (3.0, 0.62)]);
        assert_eq!(points(&report, "reward", "candidate"), [(1.0, 0.3), (2.0, 0.6), (3.0, 1.1)]);
        assert_eq!(points(&report, "reward", "serving"), [(1.0, 0.1), (2.0, 0.3), (3.0, 0.8)]);
        assert_eq!(points(&report, "kl_from_sft", "KL from SFT"), [(1.0, 0.0), (2.0, 0.03), (3.0, 0.05)]);
        // sft-1's alignment tax is null: a gap, not a zero; the axis still starts at refresh 1.
        assert_eq!(points(&report, "alignment_tax", "alignment tax"), [(2.0, 0.02), (3.0, 0.04)]);
        assert!(chart(&report, "alignment_tax").svg.contains(r##"text-anchor="middle" fill="#5a6376">1</text>"##));
        assert_eq!(points(&report, "rm_accuracy", "after training"), [(1.0, 0.68), (2.0, 0.71)]);
        assert_eq!(points(&report, "rm_accuracy", "before training"), [(1.0, 0.5), (2.0, 0.66)]);
        // Per-iteration curves are the newest PPO checkpoint's, sorted by iteration.
        assert_eq!(points(&report, "ppo_reward_mean", "reward mean"), [(1.0, 0.7), (2.0, 0.9), (3.0, 1.1)]);
        assert_eq!(points(&report, "ppo_ptx_loss", "ptx loss"), [(2.0, 2.2), (3.0, 2.3)]);
        assert_eq!(points(&report, "ppo_kl", "KL").len(), 3);
        assert!(chart(&report, "ppo_kl").title.contains("(ppo-2)"));
        for id in ["ppo_clip_fraction", "ppo_entropy", "ppo_value_loss"] {
            assert_eq!(chart(&report, id).series[0].points.len(), 3, "{id}");
        }

        let rows: Vec<(&str, Option<usize>)> = report.table.iter().map(|r| (r.id.as_str(), r.refresh)).collect();
        assert_eq!(
            rows,
            [
                ("base", None),
                ("sft-1", Some(1)),
                ("rm-1", Some(1)),
                ("ppo-1", Some(2)),
                ("rm-2", Some(2)),
                ("ppo-2", Some(3))
            ]
        );
        let ppo1 = &report.table[3];
        assert_eq!((ppo1.stage, ppo1.parent.as_deref(), ppo1.created_at_ms), (Stage::PpoPtx, Some("sft-1"), 400));
        assert_eq!(ppo1.passed, Some(false));
        assert_eq!(ppo1.reasons, ["win rate below 0.5"]);
        assert_eq!(ppo1.headline.iterations, Some(2));
        assert_eq!(ppo1.headline.final_reward_mean, Some(0.4));
        assert_eq!(ppo1.headline.win_rate, Some(0.48));
        assert_eq!((ppo1.headline.win_rate_lower, ppo1.headline.win_rate_upper), (Some(0.48 - 0.1), Some(0.48 + 0.1)));
        let rm2 = report.table.iter().find(|r| r.id == "rm-2").unwrap();
        assert_eq!(rm2.headline.feedback_age_secs, Some(42.5));
        assert_eq!((rm2.headline.labeler_agreement, rm2.headline.labelers_flagged), (Some(0.74), Some(1)));
        // The quality table comes from the newest manifest that has per-labeler figures.
        assert_eq!(report.labelers_from.as_deref(), Some("rm-2"));
        let flagged: Vec<(&str, bool)> = report.labelers.iter().map(|l| (l.labeler_id.as_str(), l.flagged)).collect();
        assert_eq!(flagged, [("ann", false), ("eve", true)]);
        assert_eq!(report.labelers[1].gold_agreement, Some(0.25));
        let sft = &report.table[1];
        assert_eq!((sft.headline.val_loss, sft.headline.best_epoch, sft.passed), (Some(1.8), Some(3), Some(true)));
        assert_eq!(report.table[2].headline.val_accuracy, Some(0.68));
        assert_eq!(report.table[0].passed, None);

        for chart in &report.charts {
            let names = well_formed(&chart.svg).unwrap_or_else(|e| panic!("{}: {e}", chart.id));
            let non_empty = chart.series.iter().filter(|s| !s.points.is_empty()).count();
            assert_eq!(count(&names, "polyline"), non_empty, "{}", chart.id);
            let markers: usize = chart.series.iter().map(|s| s.points.len()).sum();
            // One legend dot per series plus one marker per point.
            assert_eq!(count(&names, "circle"), chart.series.len() + markers, "{}", chart.id);
        }
        assert_eq!(report, super::report(&fixture()), "deterministic");
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["table"][1]["stage"], "sft");
        assert_eq!(json["charts"][0]["series"][0]["points"][0], json!([1.0, 0.55]));
    }

    #[test]
    fn missing_and_odd_metrics_give_empty_charts() {
        let odd = vec![
            manifest("sft-a", None, Stage::Sft, 1, Value::Null),
            manifest(
                "ppo-a",
                Some("sft-a"),
                Stage::PpoPtx,
                2,
                json!({"iterations": "lots",
                     "evaluation": {"win_rate": "high", "kl_from_sft": null, "passed": "yes", "reasons": [1, "ok"]}}),
            ),
            manifest("rm-a", None, Stage::RewardModel, 3, json!({"val_accuracy": [0.5], "wall_secs": "ten"})),
            manifest(
                "ppo-b",
                Some("ppo-a"),
                Stage::PpoPtx,
                4,
                json!({"iterations": [null, 3, {"reward_mean": "x"},
                     {"kl": "0.1", "clip_fraction": true}, {"entropy": 1.5}]}),
            ),
        ];
        let report = report(&odd);
        assert_eq!(report.newest_ppo.as_deref(), Some("ppo-b"));
        for chart in &report.charts {
            well_formed(&chart.svg).unwrap_or_else(|e| panic!("{}: {e}", chart.id));
            let points: usize = chart.series.iter().map(|s| s.points.len()).sum();
            if chart.id == "ppo_entropy" {
                // The one usable value, at its position (no "iteration" key).
                assert_eq!(chart.series[0].points, [(5.0, 1.5)]);
            } else {
                assert_eq!(points, 0, "{}", chart.id);
                assert!(chart.svg.contains("no data yet"), "{}", chart.id);
                assert!(!chart.svg.contains("<polyline"), "{}", chart.id);
            }
        }
        let ppo_a = &report.table[1];
        assert_eq!((ppo_a.passed, ppo_a.reasons.as_slice()), (None, &["ok".to_string()][..]));
        assert_eq!(ppo_a.headline, Headline::default());
        assert_eq!(report.table[3].headline.iterations, Some(5));
        assert_eq!(report.table[3].headline.final_reward_mean, None);

        let empty = super::report(&[]);
        assert!(empty.table.is_empty() && empty.newest_ppo.is_none());
        assert!(empty.charts.iter().all(|c| c.svg.contains("no data yet")));
        assert!(chart(&empty, "ppo_kl").title.contains("no ppo_ptx checkpoint yet"));
    }

    #[test]
    fn text_is_escaped() {
        let m = manifest(
            "ppo<&>\"x'",
            Some("a&b"),
            Stage::PpoPtx,
            1,
            json!({"iterations": [iteration(1, 0.5, json!(1.0))]}),
        );
        let report = report(&[m]);
        let svg = &chart(&report, "ppo_reward_mean").svg;
        well_formed(svg).unwrap_or_else(|e| panic!("{e}"));
        assert!(svg.contains("ppo&lt;&amp;&gt;&quot;x&#39;"), "{svg}");
        assert!(!svg.contains("ppo<&>"));

        let series = [Series::new("a <b> & \"c\"\u{0}", vec![(1.0, 2.0)])];
        let svg = render_svg("T & <t>", "x<", "y>", &series);
        let names = well_formed(&svg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(count(&names, "polyline"), 1);
        assert!(svg.contains("T &amp; &lt;t&gt;") && svg.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
        assert!(svg.contains(">x&lt;<") && svg.contains(">y&gt;<"));
    }

    #[test]
    fn edge_cases_render_valid_finite_svg() {
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![Series::new("empty", vec![])],
            vec![Series::new("one", vec![(1.0, 0.5)])],
            vec![Series::new("flat", vec![(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)])],
            vec![Series::new("zeros", vec![(0.5, 0.0), (0.5, 0.0)])],
            vec![Series::new("nan", vec![(1.0, f64::NAN), (f64::INFINITY, 1.0), (2.0, f64::NEG_INFINITY)])],
            vec![Series::new("mixed", vec![(1.0, f64::NAN), (2.0, 1.0), (3.0, 2.0)]), Series::new("b", vec![])],
            vec![Series::new("huge", vec![(0.0, -1e308), (1.0, 1e308)])],
            vec![Series::new("tiny", vec![(0.0, 1e-12), (1.0, 3e-12)])],
            vec![Series::new("negative", vec![(-3.0, -0.25), (7.0, -0.001)])],
            (0..8).map(|i| Series::new(&format!("series number {i}"), vec![(i as f64, 1.0)])).collect(),
        ];
        for series in &cases {
            let svg = render_svg("title", "x", "y", series);
            let names = well_formed(&svg).unwrap_or_else(|e| panic!("{series:?}: {e}\n{svg}"));
            let non_empty = series.iter().filter(|s| s.points.iter().any(|(x, y)| x.is_finite() && y.is_finite()));
            assert_eq!(count(&names, "polyline"), non_empty.count(), "{series:?}");
            for bad in ["NaN", "inf", "-0 ", ">-0<"] {
                assert!(!svg.contains(bad), "{bad} in {svg}");
            }
            assert_eq!(svg, render_svg("title", "x", "y", series), "deterministic");
        }
        let nan_only = render_svg("t", "x", "y", &cases[5]);
        assert!(nan_only.contains("no data yet") && nan_only.contains("nan (no data)"));
        let flat = render_svg("t", "x", "y", &cases[3]);
        assert_eq!(flat.matches("<circle").count(), 1 + 3);
        // Integer x (iterations, refreshes) get whole-number ticks.
        assert!(flat.contains(">2</text>") && !flat.contains(">1.5</text>"), "{flat}");
    }

    #[test]
    fn axes_have_a_few_nice_ticks() {
        let axis = Axis::new(0.48, 0.62, false);
        let labels: Vec<&str> = axis.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["0.45", "0.50", "0.55", "0.60", "0.65"]);
        let axis = Axis::new(1.0, 200.0, true);
        let labels: Vec<&str> = axis.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["0", "50", "100", "150", "200"]);
        let axis = Axis::new(1.0, 1.0, true);
        assert_eq!(axis.ticks.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(), ["0", "1", "2"]);
        let huge = Axis::new(-1e308, 1e308, false);
        assert!((2..=13).contains(&huge.ticks.len()));
        assert_eq!((huge.fraction(-1e308), huge.fraction(0.0), huge.fraction(1e308)), (0.0, 0.5, 1.0));
        // Steps too small for a few decimals go scientific rather than all "0".
        let tiny = Axis::new(1e-12, 3e-12, false);
        let labels: Vec<&str> = tiny.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert!(labels.windows(2).all(|w| w[0] != w[1]), "{labels:?}");
    }
}
