//! Unit tests of the metric families: labels stay bounded, scrape-time sources are read,
//! and the batch-size histogram built from counts is what observing would give.

use super::*;
use crate::adapters::{AdapterLimits, AdapterOutcome};

type R = Result<(), MetricsError>;

/// The value of the sample whose line starts with `prefix` (name and labels as rendered).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn unknown_tasks_and_models_become_unknown() -> R {
    let m = Metrics::detached("base")?;
    m.know_task("support");
    m.observe_http(&HttpObservation {
        route: "/v1/chat/completions",
        task: Some("free text from a user"),
        model: Some("base:nope"),
        status: 404,
        rejected: None,
        duration: Duration::from_millis(3),
    });
    m.observe_http(&HttpObservation {
        route: "/v1/chat/completions",
        task: Some("support"),
        model: Some("base:support"),
        status: 200,
        rejected: None,
        duration: Duration::from_millis(3),
    });
    let text = m.render()?;
    let line = r#"tunegate_requests_total{model="unknown",route="/v1/chat/completions",status="4xx",task="unknown"}"#;
    assert_eq!(sample(&text, line), Some(1.0), "{text}");
    let line = r#"tunegate_requests_total{model="base:support",route="/v1/chat/completions",status="2xx",task="support"}"#;
    assert_eq!(sample(&text, line), Some(1.0), "{text}");
    assert!(!text.contains("free text"));
    Ok(())
}

#[test]
fn request_tokens_timings_and_overhead() -> R {
    let m = Metrics::detached("base")?;
    let choices = [ChoiceTiming {
        time_to_first_token: Duration::from_millis(20),
        decode: Duration::from_millis(90),
        completion_tokens: 10,
    }];
    m.observe_request(&RequestObservation {
        task: "base",
        adapter: None,
        prompt_tokens: 30,
        completion_tokens: 10,
        prompt_tokens_saved: 12,
        prompt_tokens_cached: 8,
        duration: Duration::from_millis(120),
        engine_time: Some(Duration::from_millis(110)),
        choices: &choices,
    });
    let text = m.render()?;
    assert_eq!(sample(&text, r#"tunegate_prompt_tokens_total{adapter="base",task="base"}"#), Some(30.0));
    assert_eq!(sample(&text, r#"tunegate_completion_tokens_total{adapter="base",task="base"}"#), Some(10.0));
    assert_eq!(sample(&text, r#"tunegate_prompt_tokens_saved_total{adapter="base",task="base"}"#), Some(12.0));
    assert_eq!(sample(&text, r#"tunegate_prompt_tokens_cached_total{adapter="base",task="base"}"#), Some(8.0));
    let overhead = sample(&text, "tunegate_gateway_overhead_seconds_sum").unwrap_or(-1.0);
    assert!((overhead - 0.010).abs() < 1e-9, "{overhead}");
    let itl = sample(&text, "tunegate_inter_token_latency_seconds_sum").unwrap_or(-1.0);
    assert!((itl - 0.010).abs() < 1e-9, "{itl}");
    let tps = sample(&text, "tunegate_generation_tokens_per_second_sum").unwrap_or(-1.0);
    assert!((tps - 100.0).abs() < 1e-6, "{tps}");
    assert_eq!(sample(&text, r#"tunegate_time_to_first_token_seconds_count{task="base"}"#), Some(1.0));
    Ok(())
}

#[test]
fn batch_sizes_come_from_engine_counts() -> R {
    let counters = Arc::new(EngineCounters::new(8));
    let m = Metrics::new("base", None, Some(counters.clone()))?;
    let h = histogram_from_counts(&[0, 3, 0, 2, 0, 0, 0, 0, 1], buckets::BATCH_SIZE);
    assert_eq!(h.get_sample_count(), 6);
    assert_eq!(h.get_sample_sum(), 3.0 + 6.0 + 8.0);
    let cumulative: Vec<u64> = h.get_bucket().iter().map(|b| b.cumulative_count()).collect();
    assert_eq!(cumulative, vec![3, 3, 5, 6, 6, 6, 6, 6, 6]);
    let text = m.render()?;
    assert_eq!(sample(&text, "tunegate_batch_size_count"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "tunegate_queue_depth"), Some(0.0));
    Ok(())
}

#[test]
fn adapter_events_and_registry_gauges() -> R {
    let registry = Arc::new(AdapterRegistry::new(AdapterLimits::default()));
    let m = Metrics::new("base", Some(registry), None)?;
    m.observe_adapter(&AdapterEvent { alias: "some/../path", outcome: AdapterOutcome::Failed, load_seconds: None });
    let text = m.render()?;
    assert_eq!(sample(&text, r#"tunegate_adapter_swaps_total{result="failed",task="unknown"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, "tunegate_adapters_loaded"), Some(0.0));
    Ok(())
}

#[test]
fn log_writer_counters_only_rise() -> R {
    let m = Metrics::detached("base")?;
    let stats = Arc::new(WriterStats::default());
    stats.written.store(5, std::sync::atomic::Ordering::Relaxed);
    stats.queue_depth.store(2, std::sync::atomic::Ordering::Relaxed);
    m.watch_log_writer("sqlite", stats.clone());
    let text = m.render()?;
    assert_eq!(sample(&text, r#"tunegate_logs_written_total{store="sqlite"}"#), Some(5.0));
    assert_eq!(sample(&text, r#"tunegate_log_queue_depth{store="sqlite"}"#), Some(2.0));
    stats.written.store(7, std::sync::atomic::Ordering::Relaxed);
    m.observe_log_writer("sqlite", &WriterStatsSnapshot { written: 3, ..stats.snapshot() });
    let text = m.render()?;
    assert_eq!(sample(&text, r#"tunegate_logs_written_total{store="sqlite"}"#), Some(7.0));
    Ok(())
}

#[test]
fn review_training_and_build_info() -> R {
    let m = Metrics::detached("base")?;
    m.know_task("support");
    m.review("support", "approved");
    m.set_examples("support", "pending", 4);
    m.training_job("support", "succeeded");
    m.training_progress("support", Some(1.5), Some(300.0));
    m.eval_score("support", "support-v2", "exact_match", 0.75);
    m.promotion("support", "promoted");
    let text = m.render()?;
    assert_eq!(sample(&text, r#"tunegate_reviews_total{state="approved",task="support"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"tunegate_examples{state="pending",task="support"}"#), Some(4.0));
    assert_eq!(sample(&text, r#"tunegate_training_loss{task="support"}"#), Some(1.5));
    assert_eq!(
        sample(&text, r#"tunegate_eval_score{adapter="unknown",metric="exact_match",task="support"}"#),
        Some(0.75)
    );
    assert_eq!(sample(&text, &format!("tunegate_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), Some(1.0));
    Ok(())
}

#[test]
fn status_classes() {
    assert_eq!([200, 404, 429, 503, 101, 304].map(status_class), ["2xx", "4xx", "4xx", "5xx", "1xx", "3xx"]);
}
