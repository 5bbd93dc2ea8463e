//! `tunegate logs …`: the request log from the terminal, straight on the configured store
//! (SQLite works beside a running gateway: WAL lets readers and one writer share it).
//! `list`, `show`, `approve`, `reject`, and `export` / `import` in OpenAI's fine-tuning
//! JSONL (`{"messages":[...]}` per line, the correction where a reviewer made one).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::logs::{
    export_line, import_jsonl, open_store, ImportOptions, LogFilter, LogStore, ReviewAction, ReviewState,
};

pub enum LogsArgs {
    List { task: Option<String>, state: Option<String>, q: Option<String>, limit: usize, json: bool },
    Show { id: String },
    Review { ids: Vec<String>, state: ReviewState, correction: Option<String>, reviewer: Option<String> },
    Export { task: String, state: String },
    Import { file: PathBuf, task: String },
}

pub fn run(config: &std::path::Path, args: LogsArgs) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let store = open_store(&config.logs, &config.server.data_dir).context("opening the log store")?;
        match args {
            LogsArgs::List { task, state, q, limit, json } => list(&store, task, state, q, limit, json).await,
            LogsArgs::Show { id } => {
                let r = store.get(&id).await?.with_context(|| format!("no log record '{id}'"))?;
                println!("{}", serde_json::to_string_pretty(&r)?);
                Ok(())
            }
            LogsArgs::Review { ids, state, correction, reviewer } => {
                let action = ReviewAction {
                    state,
                    corrected_response: correction,
                    reviewer: Some(reviewer.unwrap_or_else(|| format!("cli:{}", whoami()))),
                    expected_state: None,
                };
                let mut failed = 0;
                for id in &ids {
                    match store.review(id, &action).await {
                        Ok(r) => println!("{}\t{}", r.id, r.review.state),
                        Err(e) => {
                            failed += 1;
                            eprintln!("{id}: {e}");
                        }
                    }
                }
                anyhow::ensure!(failed == 0, "{failed} of {} reviews failed", ids.len());
                Ok(())
            }
            LogsArgs::Export { task, state } => export(&store, &task, &state).await,
            LogsArgs::Import { file, task } => {
                let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let opts = ImportOptions { task: task.clone(), model: config.model.name.clone(), reviewer: None };
                let n = import_jsonl(&store, std::io::BufReader::new(f), &opts)
                    .await
                    .with_context(|| file.display().to_string())?;
                eprintln!("imported {n} approved examples into task '{task}'");
                Ok(())
            }
        }
    })
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}

async fn list(
    store: &LogStore,
    task: Option<String>,
    state: Option<String>,
    q: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let state = state.map(|s| ReviewState::parse(&s)).transpose()?;
    let filter = LogFilter { task, state, q, ..LogFilter::default() };
    let page = store.list(&filter, None, limit).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &page.records {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    writeln!(out, "{:<41} {:<19} {:<16} {:<9} {:<6} RESPONSE", "ID", "TIME (UTC)", "TASK", "STATE", "STATUS")?;
    for r in &page.records {
        let when = chrono_like(r.created_ms);
        let answer = r.review.corrected_response.as_deref().unwrap_or(&r.response);
        let answer: String = answer.chars().map(|c| if c.is_control() { ' ' } else { c }).take(60).collect();
        writeln!(
            out,
            "{:<41} {:<19} {:<16} {:<9} {:<6} {answer}",
            r.id,
            when,
            truncate(&r.task, 16),
            r.review.state,
            truncate(&r.status, 6)
        )?;
    }
    if page.next_cursor.is_some() {
        writeln!(out, "(more: raise --limit or narrow with --task/--state/--q)")?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// `YYYY-MM-DD HH:MM:SS` in UTC from unix milliseconds (civil-from-days, no time crate).
fn chrono_like(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Approved examples are training lines; other states export their records' own answers
/// in the same shape (for inspection or relabelling elsewhere).
async fn export(store: &LogStore, task: &str, state: &str) -> anyhow::Result<()> {
    let state = ReviewState::parse(state)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let n = if state == ReviewState::Approved {
        crate::logs::export_jsonl(store, task, &mut out).await?
    } else {
        let filter = LogFilter {
            task: Some(task.to_string()),
            state: Some(state),
            order: crate::logs::Order::OldestFirst,
            ..LogFilter::default()
        };
        let mut cursor: Option<String> = None;
        let mut n = 0;
        loop {
            let page = store.list(&filter, cursor.as_deref(), crate::logs::MAX_PAGE_LIMIT).await?;
            for r in &page.records {
                writeln!(out, "{}", export_line(r)?)?;
                n += 1;
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        out.flush()?;
        n
    };
    eprintln!("exported {n} {state} examples of task '{task}'");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_time_formatting() {
        assert_eq!(super::chrono_like(0), "1970-01-01 00:00:00");
        assert_eq!(super::chrono_like(1_796_000_000_000), "2026-11-30 00:53:20");
        assert_eq!(super::chrono_like(951_782_400_000), "2000-02-29 00:00:00");
    }
}
