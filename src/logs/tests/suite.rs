//! Store behaviour suite: every function here runs against SQLite and against Redis (see
//! `store_suite!` in `mod.rs`), so both backends are held to the same contract.

use std::collections::BTreeMap;

use serde_json::json;

use super::{rec, TestResult};
use crate::logs::{
    export_jsonl, import_jsonl, BulkTarget, Feedback, ImportOptions, LogError, LogFilter, LogStore,
    Order, ReviewAction, ReviewState,
};

async fn all_ids(
    store: &LogStore,
    filter: &LogFilter,
    limit: usize,
) -> Result<Vec<String>, LogError> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list(filter, cursor.as_deref(), limit).await?;
        assert!(page.records.len() <= limit);
        ids.extend(page.records.into_iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(ids),
        }
    }
}

pub async fn insert_get_and_idempotent(store: &LogStore) -> TestResult {
    let a = rec("a", "support", 1_000);
    let b = rec("b", "support", 2_000);
    assert_eq!(store.insert_batch(&[a.clone(), b.clone()]).await?, 2);
    let mut changed = a.clone();
    changed.response = "something else".into();
    let c = rec("c", "other", 3_000);
    assert_eq!(store.insert_batch(&[changed, c.clone()]).await?, 1, "existing ids are skipped");
    assert_eq!(store.get("a").await?, Some(a));
    assert_eq!(store.get("c").await?, Some(c));
    assert_eq!(store.get("missing").await?, None);
    assert_eq!(store.insert_batch(&[]).await?, 0);
    store.ping().await?;
    Ok(())
}

pub async fn pages_follow_cursors_without_gaps(store: &LogStore) -> TestResult {
    // Ties on created_ms on purpose: the order is (created_ms, id).
    let records: Vec<_> =
        (0..25).map(|i| rec(&format!("id-{i:02}"), "support", 1_000 + (i / 3) * 10)).collect();
    store.insert_batch(&records).await?;
    let mut expected: Vec<_> = records.iter().map(|r| (r.created_ms, r.id.clone())).collect();
    expected.sort();
    let oldest: Vec<String> = expected.iter().map(|(_, id)| id.clone()).collect();
    let newest: Vec<String> = oldest.iter().rev().cloned().collect();

    for limit in [1, 4, 7, 25, 100] {
        assert_eq!(all_ids(store, &LogFilter::default(), limit).await?, newest, "limit {limit}");
        let asc = LogFilter { order: Order::OldestFirst, ..LogFilter::default() };
        assert_eq!(all_ids(store, &asc, limit).await?, oldest, "oldest first, limit {limit}");
    }

    // A record arriving between pages does not shift the next page.
    let first = store.list(&LogFilter::default(), None, 10).await?;
    store.insert_batch(&[rec("newer", "support", 99_999)]).await?;
    let cursor = first.next_cursor.ok_or("expected more pages")?;
    let second = store.list(&LogFilter::default(), Some(&cursor), 10).await?;
    let ids: Vec<_> = second.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, newest[10..20].iter().map(String::as_str).collect::<Vec<_>>());

    let last = store.list(&LogFilter::default(), None, 26).await?;
    assert_eq!(last.records.len(), 26);
    assert_eq!(last.next_cursor, None, "no cursor when nothing follows");

    assert!(matches!(
        store.list(&LogFilter::default(), Some("not-a-cursor"), 5).await,
        Err(LogError::InvalidInput(_))
    ));
    let asc = LogFilter { order: Order::OldestFirst, ..LogFilter::default() };
    assert!(matches!(store.list(&asc, Some(&cursor), 5).await, Err(LogError::InvalidInput(_))));
    // A cursor made from a record (OpenAI `after=<id>`).
    let r = store.get("id-20").await?.ok_or("id-20 missing")?;
    let after = crate::logs::cursor_after(&r, Order::NewestFirst);
    let page = store.list(&LogFilter::default(), Some(&after), 2).await?;
    let pos = newest.iter().position(|i| i == "id-20").ok_or("id-20 not listed")?;
    let ids: Vec<_> = page.records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, newest[pos + 1..pos + 3].to_vec());
    Ok(())
}

pub async fn filters_narrow_the_listing(store: &LogStore) -> TestResult {
    let mut rs = Vec::new();
    for i in 0..12 {
        let mut r =
            rec(&format!("r{i:02}"), if i % 2 == 0 { "support" } else { "sql" }, 1_000 + i * 100);
        r.model = if i % 3 == 0 { "support".into() } else { "smollm2".into() };
        r.store = i % 4 == 0;
        if i % 5 == 0 {
            r.metadata.insert("team".into(), "blue".into());
        }
        if i == 7 {
            r.status = "engine_overloaded".into();
        }
        rs.push(r);
    }
    store.insert_batch(&rs).await?;
    store.review("r02", &ReviewAction::approve()).await?;
    store.review("r04", &ReviewAction::reject()).await?;

    let check = |f: LogFilter, want: Vec<&'static str>| async move {
        let mut got = all_ids(store, &f, 3).await?;
        got.reverse();
        assert_eq!(got, want, "filter {f:?}");
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    check(LogFilter::task("sql"), vec!["r01", "r03", "r05", "r07", "r09", "r11"]).await?;
    check(
        LogFilter { state: Some(ReviewState::Pending), ..LogFilter::task("support") },
        vec!["r00", "r06", "r08", "r10"],
    )
    .await?;
    check(LogFilter { state: Some(ReviewState::Approved), ..LogFilter::default() }, vec!["r02"])
        .await?;
    check(LogFilter { state: Some(ReviewState::Rejected), ..LogFilter::default() }, vec!["r04"])
        .await?;
    check(
        LogFilter { since_ms: Some(1_300), until_ms: Some(1_600), ..LogFilter::default() },
        vec!["r03", "r04", "r05"],
    )
    .await?;
    check(
        LogFilter { model: Some("support".into()), ..LogFilter::default() },
        vec!["r00", "r03", "r06", "r09"],
    )
    .await?;
    check(LogFilter { stored_only: true, ..LogFilter::default() }, vec!["r00", "r04", "r08"])
        .await?;
    check(LogFilter { stored_only: true, ..LogFilter::task("support") }, vec!["r00", "r04", "r08"])
        .await?;
    let team = BTreeMap::from([("team".to_string(), "blue".to_string())]);
    check(LogFilter { metadata: team.clone(), ..LogFilter::default() }, vec!["r00", "r05", "r10"])
        .await?;
    check(LogFilter { metadata: team, ..LogFilter::task("sql") }, vec!["r05"]).await?;
    check(
        LogFilter { status: Some("engine_overloaded".into()), ..LogFilter::default() },
        vec!["r07"],
    )
    .await?;
    check(LogFilter::task("nope"), vec![]).await?;
    Ok(())
}

pub async fn search_is_case_insensitive_over_prompt_and_response(store: &LogStore) -> TestResult {
    let mut a = rec("a", "support", 1_000);
    a.request.messages = json!([
        {"role": "system", "content": "You are the ACME helper."},
        {"role": "user", "content": "Wie geht es ÜBER dem Fluss?"},
    ]);
    a.response = "Fine, thanks.".into();
    let mut b = rec("b", "support", 2_000);
    b.request.messages = json!([
        {"role": "user", "content": [{"type": "text", "text": "Describe the Invoice"}]},
    ]);
    b.response = "It lists 100% of charges_total.".into();
    let c = rec("c", "support", 3_000);
    store.insert_batch(&[a, b, c]).await?;
    let q = |s: &str| LogFilter { q: Some(s.into()), ..LogFilter::default() };
    assert_eq!(all_ids(store, &q("acme"), 10).await?, ["a"]);
    assert_eq!(all_ids(store, &q("über"), 10).await?, ["a"]);
    assert_eq!(all_ids(store, &q("FINE, THANKS"), 10).await?, ["a"]);
    assert_eq!(all_ids(store, &q("invoice"), 10).await?, ["b"]);
    // LIKE wildcards are plain characters.
    assert_eq!(all_ids(store, &q("100%"), 10).await?, ["b"]);
    assert_eq!(all_ids(store, &q("charges_"), 10).await?, ["b"]);
    assert_eq!(all_ids(store, &q("_"), 10).await?, ["b"]);
    assert_eq!(all_ids(store, &q("zzz"), 10).await?, Vec::<String>::new());
    assert_eq!(all_ids(store, &q(""), 10).await?.len(), 3, "an empty query does not filter");
    // The correction is searchable once a reviewer writes it.
    let fix = ReviewAction {
        corrected_response: Some("Use the Billing portal".into()),
        ..ReviewAction::approve()
    };
    store.review("c", &fix).await?;
    assert_eq!(all_ids(store, &q("billing PORTAL"), 10).await?, ["c"]);
    let both = LogFilter {
        q: Some("t".into()),
        state: Some(ReviewState::Approved),
        ..LogFilter::default()
    };
    assert_eq!(all_ids(store, &both, 10).await?, ["c"]);
    Ok(())
}

pub async fn review_transitions(store: &LogStore) -> TestResult {
    let mut failed = rec("failed", "support", 2_000);
    failed.status = "context_length_exceeded".into();
    store.insert_batch(&[rec("r", "support", 1_000), failed]).await?;

    let approve = ReviewAction {
        corrected_response: Some("Better answer".into()),
        reviewer: Some("ana".into()),
        ..ReviewAction::approve()
    };
    let r = store.review("r", &approve).await?;
    assert_eq!(r.review.state, ReviewState::Approved);
    assert_eq!(r.review.corrected_response.as_deref(), Some("Better answer"));
    assert_eq!(r.review.reviewer.as_deref(), Some("ana"));
    assert!(r.review.reviewed_at_ms.is_some());
    assert_eq!(store.get("r").await?, Some(r));

    // Re-review both ways is allowed; rejecting drops the correction.
    let r = store.review("r", &ReviewAction::reject()).await?;
    assert_eq!((r.review.state, r.review.corrected_response), (ReviewState::Rejected, None));
    let r = store.review("r", &ReviewAction::approve()).await?;
    assert_eq!(r.review.state, ReviewState::Approved);
    let approved = LogFilter { state: Some(ReviewState::Approved), ..LogFilter::default() };
    assert_eq!(all_ids(store, &approved, 5).await?, ["r"]);
    let rejected = LogFilter { state: Some(ReviewState::Rejected), ..LogFilter::default() };
    assert!(all_ids(store, &rejected, 5).await?.is_empty());

    let back = ReviewAction { state: ReviewState::Pending, ..ReviewAction::approve() };
    let err = store.review("r", &back).await;
    assert!(matches!(&err, Err(LogError::IllegalTransition { id, .. }) if id == "r"), "{err:?}");
    assert_eq!(err.err().map(|e| e.http_status()), Some(409));
    let err = store.review("failed", &ReviewAction::approve()).await;
    assert!(matches!(err, Err(LogError::IllegalTransition { .. })), "{err:?}");
    let err = store.review("failed", &ReviewAction::reject()).await;
    assert!(matches!(err, Err(LogError::IllegalTransition { .. })), "{err:?}");
    let stale =
        ReviewAction { expected_state: Some(ReviewState::Pending), ..ReviewAction::reject() };
    let err = store.review("r", &stale).await;
    assert!(matches!(err, Err(LogError::IllegalTransition { .. })), "{err:?}");
    let bad = ReviewAction { corrected_response: Some("x".into()), ..ReviewAction::reject() };
    assert!(matches!(store.review("r", &bad).await, Err(LogError::InvalidInput(_))));
    let empty = ReviewAction { corrected_response: Some("  ".into()), ..ReviewAction::approve() };
    assert!(matches!(store.review("r", &empty).await, Err(LogError::InvalidInput(_))));
    assert!(matches!(
        store.review("nope", &ReviewAction::approve()).await,
        Err(LogError::NotFound(_))
    ));
    // Refusals change nothing.
    let r = store.get("r").await?.ok_or("r missing")?;
    assert_eq!(r.review.state, ReviewState::Approved);
    let f = store.get("failed").await?.ok_or("failed missing")?;
    assert_eq!(f.review.state, ReviewState::Pending);
    Ok(())
}

pub async fn bulk_review(store: &LogStore) -> TestResult {
    let mut rs: Vec<_> = (0..10).map(|i| rec(&format!("s{i}"), "support", 1_000 + i)).collect();
    rs[3].status = "timeout".into();
    rs.extend((0..4).map(|i| rec(&format!("q{i}"), "sql", 2_000 + i)));
    store.insert_batch(&rs).await?;

    let ids = ["s0", "s1", "s3", "missing"].map(String::from).to_vec();
    let out = store.review_bulk(&BulkTarget::Ids(ids), &ReviewAction::reject()).await?;
    assert_eq!((out.reviewed, out.skipped), (2, 2));

    let pending = LogFilter { state: Some(ReviewState::Pending), ..LogFilter::task("support") };
    let out =
        store.review_bulk(&BulkTarget::Filter(pending.clone()), &ReviewAction::approve()).await?;
    assert_eq!((out.reviewed, out.skipped), (7, 1), "s3 failed and cannot be approved");
    assert_eq!(all_ids(store, &pending, 5).await?, ["s3"]);

    let stats = store.task_stats().await?;
    let support = stats.iter().find(|s| s.task == "support").ok_or("no support stats")?;
    assert_eq!((support.pending, support.approved, support.rejected, support.total), (1, 7, 2, 10));
    let sql = stats.iter().find(|s| s.task == "sql").ok_or("no sql stats")?;
    assert_eq!((sql.pending, sql.approved, sql.rejected, sql.total), (4, 0, 0, 4));

    let back = ReviewAction { state: ReviewState::Pending, ..ReviewAction::approve() };
    let err = store.review_bulk(&BulkTarget::Filter(LogFilter::task("sql")), &back).await;
    assert!(matches!(err, Err(LogError::IllegalTransition { .. })));
    Ok(())
}

pub async fn metadata_feedback_and_delete(store: &LogStore) -> TestResult {
    store.insert_batch(&[rec("m", "support", 1_000), rec("n", "support", 2_000)]).await?;
    let meta = BTreeMap::from([("ticket".to_string(), "42".to_string())]);
    let r = store.update_metadata("m", meta.clone()).await?;
    assert_eq!(r.metadata, meta);
    assert_eq!(store.get("m").await?.ok_or("m missing")?.metadata, meta);
    let f = LogFilter { metadata: meta.clone(), ..LogFilter::default() };
    assert_eq!(all_ids(store, &f, 5).await?, ["m"]);
    // Replace, not merge.
    let other = BTreeMap::from([("team".to_string(), "red".to_string())]);
    assert_eq!(store.update_metadata("m", other.clone()).await?.metadata, other);
    assert!(all_ids(store, &f, 5).await?.is_empty());
    assert!(matches!(store.update_metadata("x", meta).await, Err(LogError::NotFound(_))));

    let fb = Feedback { score: Some(1.0), comment: Some("great".into()), at_ms: 5_000 };
    let r = store.set_feedback("n", fb.clone()).await?;
    assert_eq!(r.feedback, Some(fb.clone()));
    assert!(fb.is_positive());
    assert_eq!(store.get("n").await?.ok_or("n missing")?.feedback, Some(fb.clone()));
    assert!(matches!(store.set_feedback("x", fb).await, Err(LogError::NotFound(_))));

    // Reviews keep metadata and feedback, and the other way round.
    store.review("n", &ReviewAction::approve()).await?;
    let n = store.get("n").await?.ok_or("n missing")?;
    assert!(n.feedback.is_some());
    assert_eq!(n.review.state, ReviewState::Approved);

    assert!(store.delete("m").await?);
    assert!(!store.delete("m").await?);
    assert_eq!(store.get("m").await?, None);
    assert_eq!(all_ids(store, &LogFilter::default(), 5).await?, ["n"]);
    assert!(store.delete("n").await?);
    assert!(store.task_stats().await?.is_empty(), "a task with no records has no stats");
    Ok(())
}

pub async fn task_stats_count_states(store: &LogStore) -> TestResult {
    assert!(store.task_stats().await?.is_empty());
    let rs = vec![
        rec("a1", "alpha", 1_000),
        rec("a2", "alpha", 5_000),
        rec("a3", "alpha", 3_000),
        rec("b1", "beta", 2_000),
    ];
    store.insert_batch(&rs).await?;
    store.review("a1", &ReviewAction::approve()).await?;
    store.review("a3", &ReviewAction::reject()).await?;
    let stats = store.task_stats().await?;
    let tasks: Vec<_> = stats.iter().map(|s| s.task.as_str()).collect();
    assert_eq!(tasks, ["alpha", "beta"]);
    let a = &stats[0];
    assert_eq!(
        (a.pending, a.approved, a.rejected, a.total, a.newest_ms),
        (1, 1, 1, 3, Some(5_000))
    );
    let b = &stats[1];
    assert_eq!(
        (b.pending, b.approved, b.rejected, b.total, b.newest_ms),
        (1, 0, 0, 1, Some(2_000))
    );
    Ok(())
}

pub async fn approved_examples_for_training(store: &LogStore) -> TestResult {
    let mut rs: Vec<_> = (0..6).map(|i| rec(&format!("e{i}"), "support", 1_000 + i)).collect();
    rs.push(rec("other", "sql", 500));
    store.insert_batch(&rs).await?;
    for id in ["e4", "e1", "e2", "other"] {
        store.review(id, &ReviewAction::approve()).await?;
    }
    store.review("e2", &ReviewAction::reject()).await?;
    let ids: Vec<_> = store.approved_examples("support").await?.into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["e1", "e4"], "approved only, oldest first");
    Ok(())
}

pub async fn export_import_round_trip(store: &LogStore) -> TestResult {
    let mut a = rec("a", "support", 1_000);
    a.request.messages = json!([
        {"role": "system", "content": "Long system prompt"},
        {"role": "user", "content": "Reset my password"},
    ]);
    a.response = "Click \"forgot\".\nThen check mail: ünïcödé".into();
    let mut b = rec("b", "support", 2_000);
    b.request.messages = json!([
        {"role": "user", "content": [{"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "earlier turn"},
        {"role": "user", "content": "and now?"},
    ]);
    let c = rec("c", "support", 3_000);
    let d = rec("d", "support", 4_000);
    store.insert_batch(&[a, b, c, d]).await?;
    let fix = ReviewAction {
        corrected_response: Some("Corrected answer".into()),
        ..ReviewAction::approve()
    };
    store.review("a", &fix).await?;
    store.review("b", &ReviewAction::approve()).await?;
    store.review("c", &ReviewAction::reject()).await?;

    let mut first = Vec::new();
    assert_eq!(export_jsonl(store, "support", &mut first).await?, 2);
    let text = String::from_utf8(first.clone())?;
    let lines: Vec<serde_json::Value> =
        text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["messages"][2],
        json!({"role": "assistant", "content": "Corrected answer"}),
        "the correction replaces the response"
    );
    assert_eq!(lines[1]["messages"].as_array().map(Vec::len), Some(4));

    let opts = ImportOptions { task: "copy".into(), model: "smollm2".into(), reviewer: None };
    assert_eq!(import_jsonl(store, first.as_slice(), &opts).await?, 2);
    let mut second = Vec::new();
    export_jsonl(store, "copy", &mut second).await?;
    assert_eq!(String::from_utf8(second.clone())?, text);
    // And once more through a fresh import, in case ids or times leak into the order.
    let opts = ImportOptions { task: "copy2".into(), ..opts };
    import_jsonl(store, second.as_slice(), &opts).await?;
    let mut third = Vec::new();
    export_jsonl(store, "copy2", &mut third).await?;
    assert_eq!(third, first);
    let imported = store.approved_examples("copy").await?;
    assert!(imported
        .iter()
        .all(|r| r.review.state == ReviewState::Approved && r.id.starts_with("chatcmpl-")));
    Ok(())
}

pub async fn import_rejects_bad_files_whole(store: &LogStore) -> TestResult {
    let opts =
        ImportOptions { task: "imp".into(), model: "m".into(), reviewer: Some("ops".into()) };
    let bad = [
        "not json",
        r#"{"prompt": "x"}"#,
        r#"{"messages": []}"#,
        r#"{"messages": [{"role": "user", "content": "q"}]}"#,
        r#"{"messages": [{"role": "assistant", "content": "only an answer"}]}"#,
        r#"{"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}"#,
    ];
    for line in bad {
        let file = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"ok\"}}, {{\"role\": \"assistant\", \"content\": \"ok\"}}]}}\n\n{line}\n");
        let err = import_jsonl(store, file.as_bytes(), &opts).await;
        assert!(
            matches!(&err, Err(LogError::InvalidInput(m)) if m.starts_with("line 3:")),
            "{line}: {err:?}"
        );
    }
    assert!(store.task_stats().await?.is_empty(), "a bad file writes nothing");
    let good = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n";
    assert_eq!(import_jsonl(store, good.as_bytes(), &opts).await?, 1);
    let r = store.approved_examples("imp").await?;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].review.reviewer.as_deref(), Some("ops"));
    assert_eq!(r[0].response, "a");
    Ok(())
}

/// Reviews racing on one record: with `expected_state: pending`, exactly one wins.
pub async fn racing_reviews_admit_exactly_one(store: &LogStore) -> TestResult {
    store.insert_batch(&[rec("race", "support", 1_000)]).await?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let base = if i % 2 == 0 { ReviewAction::approve() } else { ReviewAction::reject() };
        let action = ReviewAction {
            expected_state: Some(ReviewState::Pending),
            reviewer: Some(format!("r{i}")),
            ..base
        };
        tasks.push(tokio::spawn(async move { store.review("race", &action).await }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(r) => winners.push(r),
            Err(LogError::IllegalTransition { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(winners.len(), 1);
    let stored = store.get("race").await?.ok_or("race missing")?;
    assert_eq!(stored.review, winners[0].review);
    let stats = store.task_stats().await?;
    assert_eq!(stats[0].approved + stats[0].rejected, 1);
    assert_eq!(stats[0].pending, 0);
    Ok(())
}
