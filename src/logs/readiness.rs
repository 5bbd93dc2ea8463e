//! Fine-tuning readiness of one task, computed from a sample of its newest records: the
//! rule of thumb is that a LoRA pays off with enough good examples (the scheduler's
//! `min_new_approved`, 500 by default), a consistent output format and enough volume for
//! the removed system prompt to matter; below that, prompting is cheaper.
//!
//! Pure: the caller reads the records and passes a token counter (the engine's tokenizer),
//! so the rules are unit-tested without a store or a model.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use super::{LogRecord, ReviewState};

/// Share of approved responses that must match the dominant shape to call a task ready.
pub const MIN_CONSISTENCY: f64 = 0.8;
/// Below this many requests per day, a projected saving is small; the advice says so.
pub const LOW_VOLUME_PER_DAY: f64 = 100.0;
/// Records the volume is measured over (newest first): the last 7 days.
pub const VOLUME_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;
/// Shortest span a rate is extrapolated from, so a burst of three requests is not a flood.
pub const MIN_SPAN_MS: i64 = 3600 * 1000;
const DAY_MS: f64 = 24.0 * 3600.0 * 1000.0;
/// A response is label-shaped when it is one short line of few words.
const LABEL_MAX_CHARS: usize = 40;
const LABEL_MAX_WORDS: usize = 4;
/// Labels listed in `dominant`.
const MAX_LISTED_LABELS: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    /// Approved examples of the task (all of them, not just the sample).
    pub approved: u64,
    /// Approved examples a fine-tune needs (the task's scheduler policy).
    pub threshold: u64,
    /// `approved / threshold`, at most 1.
    pub ratio: f64,
    /// Enough approved examples with a consistent format.
    pub ready: bool,
    /// The approved responses' output format; `None` while nothing is approved in the sample.
    pub format: Option<Format>,
    /// Requests per day over the last 7 days (or the sample's span, at least an hour).
    pub requests_per_day: f64,
    /// Tokens of the dominant system prompt, which a distilled adapter drops.
    pub system_prompt_tokens: u64,
    /// Share of sampled requests carrying exactly that system prompt.
    pub system_prompt_share: f64,
    /// `system_prompt_tokens × system_prompt_share × requests_per_day × 30`.
    pub projected_prompt_tokens_saved_per_month: u64,
    /// Prompt tokens a distilled adapter already saved, over the sampled records.
    pub prompt_tokens_saved: u64,
    /// Records the numbers above were computed from (the newest ones).
    pub sample: usize,
    pub recommendation: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Format {
    /// `label`, `json` or `text`.
    pub kind: &'static str,
    /// Share of approved responses matching the dominant shape, 0..1.
    pub consistency: f64,
    /// The shape: the label set, the JSON keys, or the typical length.
    pub dominant: String,
}

/// The text training would use: the reviewer's correction, else the served response.
fn approved_text(r: &LogRecord) -> &str {
    r.review.corrected_response.as_deref().unwrap_or(&r.response)
}

/// What a distilled adapter could absorb from `r`: its system prompt (or `""`) and its
/// callable tools (the logged `tools` as JSON, or `""`; none under `tool_choice: "none"`);
/// `None` when it has neither.
fn distillable(r: &LogRecord) -> Option<(&str, String)> {
    let params = &r.request.params;
    let callable = params.get("tool_choice").and_then(Value::as_str) != Some("none");
    let tools = params.get("tools").filter(|t| callable && t.as_array().is_some_and(|a| !a.is_empty()));
    let tools = tools.map(Value::to_string).unwrap_or_default();
    let prompt = system_prompt(r).unwrap_or_default();
    (!prompt.is_empty() || !tools.is_empty()).then_some((prompt, tools))
}

/// The first message's content when its role is `system`.
pub fn system_prompt(r: &LogRecord) -> Option<&str> {
    let first = r.request.messages.as_array()?.first()?;
    (first.get("role")?.as_str()? == "system").then(|| first.get("content")?.as_str()).flatten()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Shape {
    /// Sorted keys of a JSON object (or `[]` for an array, `scalar` for anything else).
    Json(String),
    /// The lowercased label.
    Label(String),
    Text(usize),
}

fn shape(text: &str) -> Shape {
    let t = text.trim();
    if t.starts_with('{') || t.starts_with('[') {
        if let Ok(v) = serde_json::from_str::<Value>(t) {
            return Shape::Json(match v {
                Value::Object(m) => {
                    let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
                    keys.sort_unstable();
                    format!("{{{}}}", keys.join(","))
                }
                Value::Array(_) => "[]".into(),
                _ => "scalar".into(),
            });
        }
    }
    if !t.is_empty() && !t.contains('\n') && t.chars().count() <= LABEL_MAX_CHARS && t.split_whitespace().count() <= LABEL_MAX_WORDS {
        return Shape::Label(t.trim_end_matches('.').to_lowercase());
    }
    Shape::Text(t.chars().count())
}

/// The output format of `responses` (the approved texts): the dominant kind, and the share
/// matching its shape (the same JSON keys; a label from a small recurring set; a length
/// within half to twice the median).
pub fn format_of<'a>(responses: impl IntoIterator<Item = &'a str>) -> Option<Format> {
    let shapes: Vec<Shape> = responses.into_iter().map(shape).collect();
    let n = shapes.len();
    if n == 0 {
        return None;
    }
    let (mut json, mut labels, mut texts) = (HashMap::<&str, usize>::new(), HashMap::<&str, usize>::new(), Vec::new());
    for s in &shapes {
        match s {
            Shape::Json(k) => *json.entry(k.as_str()).or_default() += 1,
            Shape::Label(l) => *labels.entry(l.as_str()).or_default() += 1,
            Shape::Text(len) => texts.push(*len),
        }
    }
    let n_json: usize = json.values().sum();
    let n_label: usize = labels.values().sum();
    // A label set recurs: mostly distinct short answers are free text.
    let label_set = n_label > 0 && labels.len() * 2 <= n_label.max(2);
    let share = |k: usize| k as f64 / n as f64;
    if n_json >= n_label.max(texts.len()) && n_json > 0 {
        let (keys, count) = json.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(k, c)| (*k, *c))?;
        return Some(Format { kind: "json", consistency: share(count), dominant: keys.to_string() });
    }
    if label_set && n_label >= texts.len() {
        let mut set: Vec<(&str, usize)> = labels.into_iter().collect();
        set.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let listed: Vec<&str> = set.iter().take(MAX_LISTED_LABELS).map(|(l, _)| *l).collect();
        let mut dominant = listed.join(" | ");
        if set.len() > MAX_LISTED_LABELS {
            dominant.push_str(&format!(" | … ({} labels)", set.len()));
        }
        return Some(Format { kind: "label", consistency: share(n_label), dominant });
    }
    // Free text: every non-JSON answer has a length.
    let mut lens: Vec<usize> = shapes
        .iter()
        .filter_map(|s| match s {
            Shape::Text(l) => Some(*l),
            Shape::Label(l) => Some(l.chars().count()),
            Shape::Json(_) => None,
        })
        .collect();
    lens.sort_unstable();
    let median = lens[lens.len() / 2];
    let similar = lens.iter().filter(|&&l| l * 2 >= median && l <= median * 2).count();
    Some(Format { kind: "text", consistency: share(similar), dominant: format!("~{median} chars") })
}

/// Requests per day from records' `created_ms` (any order): those of the last 7 days,
/// over the span from the oldest of them to `now_ms` (at least an hour).
pub fn requests_per_day(created_ms: impl IntoIterator<Item = i64>, now_ms: i64) -> f64 {
    let since = now_ms - VOLUME_WINDOW_MS;
    let (mut n, mut oldest) = (0usize, now_ms);
    for t in created_ms.into_iter().filter(|&t| t >= since) {
        n += 1;
        oldest = oldest.min(t);
    }
    if n == 0 {
        return 0.0;
    }
    let span = (now_ms - oldest).max(MIN_SPAN_MS) as f64;
    n as f64 * DAY_MS / span
}

/// `tokens × share × per_day × 30`, rounded.
pub fn projected_per_month(tokens: u64, share: f64, per_day: f64) -> u64 {
    (tokens as f64 * share * per_day * 30.0).round() as u64
}

/// Readiness of a task from `records` (its newest records, any review state), its total
/// `approved` count and `threshold`. `count_tokens(system prompt, request params)` counts
/// the tokens of a system prompt with the callable tools of those params written in (the
/// engine's tokenizer and tool prompt; `""` when the requests had tools only); when it
/// cannot, the distilled adapters' `prompt_tokens_saved` stands in.
pub fn assess(
    records: &[LogRecord],
    approved: u64,
    threshold: u64,
    now_ms: i64,
    count_tokens: impl Fn(&str, &Value) -> Option<u64>,
) -> Readiness {
    let threshold = threshold.max(1);
    let format = format_of(records.iter().filter(|r| r.review.state == ReviewState::Approved).map(approved_text));
    let per_day = requests_per_day(records.iter().map(|r| r.created_ms), now_ms);

    // What an adapter would absorb: the system prompt with the request's callable tools.
    let mut prompts: HashMap<(&str, String), (usize, &LogRecord)> = HashMap::new();
    for r in records {
        if let Some(key) = distillable(r) {
            prompts.entry(key).or_insert((0, r)).0 += 1;
        }
    }
    let dominant = prompts.into_iter().max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(&a.0)));
    let saved_max = records.iter().map(|r| u64::from(r.prompt_tokens_saved)).max().unwrap_or(0);
    let (system_prompt_tokens, share) = match dominant {
        Some(((prompt, _), (count, example))) => {
            // Distilled requests carry the prompt in the log, so they count towards the share.
            let tokens = count_tokens(prompt, &example.request.params).unwrap_or(saved_max);
            (tokens, count as f64 / records.len() as f64)
        }
        None => (0, 0.0),
    };
    let projected = projected_per_month(system_prompt_tokens, share, per_day);
    let consistency = format.as_ref().map_or(0.0, |f| f.consistency);
    let enough = approved >= threshold;
    let consistent = consistency >= MIN_CONSISTENCY;
    let recommendation = if !enough {
        format!("keep prompting: {} more approved examples needed", threshold - approved)
    } else if !consistent {
        format!(
            "inconsistent output format: {:.0}% of approved responses match the dominant shape (needs {:.0}%); tighten the prompt or correct the outliers",
            consistency * 100.0,
            MIN_CONSISTENCY * 100.0
        )
    } else if per_day < LOW_VOLUME_PER_DAY {
        format!("fine-tune now (low volume: {per_day:.0} requests/day, savings stay small)")
    } else {
        "fine-tune now".to_string()
    };
    Readiness {
        approved,
        threshold,
        ratio: (approved as f64 / threshold as f64).min(1.0),
        ready: enough && consistent,
        format,
        requests_per_day: per_day,
        system_prompt_tokens,
        system_prompt_share: share,
        projected_prompt_tokens_saved_per_month: projected,
        prompt_tokens_saved: records.iter().map(|r| u64::from(r.prompt_tokens_saved)).sum(),
        sample: records.len(),
        recommendation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::tests::rec;

    const NOW: i64 = 1_800_000_000_000;
    const HOUR: i64 = 3600 * 1000;

    /// The format of `answers`; an empty one (kind `none`) when there is none.
    fn fmt<'a>(answers: impl IntoIterator<Item = &'a str>) -> Format {
        format_of(answers).unwrap_or(Format { kind: "none", consistency: -1.0, dominant: String::new() })
    }

    fn approved(id: usize, response: &str, at: i64) -> LogRecord {
        let mut r = rec(&format!("r{id}"), "t", at);
        r.response = response.to_string();
        r.review.state = ReviewState::Approved;
        r
    }

    #[test]
    fn consistent_labels_score_high() {
        let answers = ["billing", "Shipping", "billing.", "refund", "shipping", "billing"];
        let f = fmt(answers);
        assert_eq!(f.kind, "label");
        assert_eq!(f.consistency, 1.0);
        assert!(f.dominant.starts_with("billing | shipping"), "{}", f.dominant);
    }

    #[test]
    fn json_with_the_same_keys_is_consistent_and_mixed_output_is_not() {
        let same = [r#"{"a":1,"b":2}"#, r#"{"b":3,"a":null}"#, r#" {"a":"x","b":[1]} "#];
        let f = fmt(same);
        assert_eq!((f.kind, f.consistency, f.dominant.as_str()), ("json", 1.0, "{a,b}"));

        let mixed = [r#"{"a":1,"b":2}"#, r#"{"a":1,"b":2}"#, r#"{"a":1}"#, "Sure! Here is the answer you asked for: a is one.", "billing"];
        let f = fmt(mixed);
        assert_eq!(f.kind, "json");
        assert!((f.consistency - 0.4).abs() < 1e-9, "{f:?}");
        assert!(f.consistency < MIN_CONSISTENCY);
    }

    #[test]
    fn free_text_is_judged_by_length() {
        let long = "word ".repeat(20);
        let longer = "word ".repeat(24);
        let huge = "word ".repeat(400);
        let f = fmt([long.as_str(), longer.as_str(), long.as_str(), huge.as_str()]);
        assert_eq!(f.kind, "text");
        assert!((f.consistency - 0.75).abs() < 1e-9, "{f:?}");
        // Distinct short answers are not a label set.
        let f = fmt(["one two", "three four", "five six", "seven"]);
        assert_eq!(f.kind, "text");
        assert!(format_of(Vec::<&str>::new()).is_none());
    }

    #[test]
    fn requests_per_day_uses_the_last_week_and_at_least_an_hour() {
        // 48 requests over the last 2 days: 24/day; an old one is outside the window.
        let mut times: Vec<i64> = (0..48).map(|i| NOW - i * HOUR - HOUR).collect();
        times.push(NOW - 30 * 24 * HOUR);
        let per_day = requests_per_day(times, NOW);
        assert!((per_day - 24.0).abs() < 0.01, "{per_day}");
        // Three requests a minute ago extrapolate over an hour, not a minute.
        let per_day = requests_per_day([NOW - 60_000, NOW - 30_000, NOW], NOW);
        assert!((per_day - 72.0).abs() < 1e-9, "{per_day}");
        assert_eq!(requests_per_day([], NOW), 0.0);
    }

    #[test]
    fn projection_and_recommendations() {
        assert_eq!(projected_per_month(200, 1.0, 1000.0), 6_000_000);
        assert_eq!(projected_per_month(200, 0.5, 10.0), 30_000);

        // 10 approved label answers in the last 10 hours, threshold 500.
        let records: Vec<LogRecord> = (0..10).map(|i| approved(i, "billing", NOW - i as i64 * HOUR)).collect();
        let r = assess(&records, 10, 500, NOW, |p, _| Some(p.split_whitespace().count() as u64 * 10));
        assert!(!r.ready);
        assert_eq!(r.ratio, 0.02);
        assert_eq!(r.recommendation, "keep prompting: 490 more approved examples needed");
        assert_eq!(r.format.as_ref().map(|f| (f.kind, f.consistency)), Some(("label", 1.0)));
        // "You help with t." is 4 words → 40 tokens, on every request.
        assert_eq!((r.system_prompt_tokens, r.system_prompt_share), (40, 1.0));
        let per_day = 10.0 * 24.0 / 9.0;
        assert!((r.requests_per_day - per_day).abs() < 1e-9);
        assert_eq!(r.projected_prompt_tokens_saved_per_month, projected_per_month(40, 1.0, per_day));

        let r = assess(&records, 600, 500, NOW, |_, _| Some(40));
        assert!(r.ready);
        assert_eq!(r.ratio, 1.0);
        assert!(r.recommendation.starts_with("fine-tune now (low volume"), "{}", r.recommendation);

        let mut mixed = records.clone();
        for (i, r) in mixed.iter_mut().enumerate().take(5) {
            r.response = format!("{{\"label\": \"billing\", \"n\": {i}}} and some prose after it");
        }
        let r = assess(&mixed, 600, 500, NOW, |_, _| Some(40));
        assert!(!r.ready);
        assert!(r.recommendation.starts_with("inconsistent output format"), "{}", r.recommendation);
    }

    #[test]
    fn distilled_savings_stand_in_without_a_tokenizer() {
        let mut records: Vec<LogRecord> = (0..4).map(|i| approved(i, "billing", NOW - i as i64 * HOUR)).collect();
        records[0].prompt_tokens_saved = 33;
        records[1].prompt_tokens_saved = 33;
        records[3].request.messages = serde_json::json!([{"role": "user", "content": "no system"}]);
        let r = assess(&records, 4, 500, NOW, |_, _| None);
        assert_eq!((r.system_prompt_tokens, r.system_prompt_share, r.prompt_tokens_saved), (33, 0.75, 66));
    }

    #[test]
    fn tool_lists_count_with_the_system_prompt() {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "lamp"}}]);
        let mut records: Vec<LogRecord> = (0..4).map(|i| approved(i, "billing", NOW - i as i64 * HOUR)).collect();
        for r in &mut records[..3] {
            r.request.params = serde_json::json!({"tools": tools});
        }
        // The count sees the tools; the three with the list are the dominant prompt.
        let count = |p: &str, params: &Value| Some(p.len() as u64 + if params.get("tools").is_some() { 100 } else { 0 });
        let r = assess(&records, 4, 500, NOW, count);
        assert_eq!(r.system_prompt_tokens, "You help with t.".len() as u64 + 100);
        assert_eq!(r.system_prompt_share, 0.75);
        // Tools alone, or uncallable ones.
        records[3].request.messages = serde_json::json!([{"role": "user", "content": "no system"}]);
        records[3].request.params = serde_json::json!({"tools": tools});
        assert_eq!(distillable(&records[3]), Some(("", tools.to_string())));
        records[3].request.params = serde_json::json!({"tools": tools, "tool_choice": "none"});
        assert_eq!(distillable(&records[3]), None);
    }
}
