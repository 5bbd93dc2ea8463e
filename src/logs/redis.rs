//! Redis store, shared by the gateway replicas of a fleet.
//!
//! Layout under a key prefix `P` (default `tunegate:logs:`):
//! - `P rec:<id>`: a hash per record. `core` is the record as inserted (JSON); the parts
//!   that change later live in their own fields (`review`, `metadata`, `feedback`, all JSON)
//!   and override `core` on read. `state`, `task`, `status`, `stored` and `member` are
//!   plain copies the scripts need.
//! - Sorted sets with every score 0, ordered by member `<created_ms, 20 digits>:<id>` so
//!   lexicographic ranges are time ranges and a cursor is an exclusive lex bound:
//!   `P idx:all`, `P idx:task:<task>`, `P idx:state:<state>`, `P idx:ts:<state>:<task>`,
//!   `P idx:stored`.
//! - `P tasks`: the set of task names with records.
//!
//! Every change to a record runs as one Lua script, so a record and its index entries never
//! disagree. A review is compare-and-swap: the transition is decided in Rust on the review
//! just read and the script applies it only if that review is still current (retrying if
//! not). Scripts build key names from the prefix, so this store is for a single Redis (or a
//! primary with replicas), not Redis Cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::record::{clamp_limit, Cursor};
use super::{
    now_ms, BulkReviewOutcome, BulkTarget, Feedback, LogError, LogFilter, LogRecord, Order, Page,
    Review, ReviewAction, ReviewState, TaskStats,
};

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// Prepended to every key; lets several deployments share one Redis.
    pub prefix: String,
    /// Per connection attempt. Short, so a dead Redis sends batches to the spool quickly.
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "tunegate:logs:".into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    insert: Script,
    review: Script,
    set_field: Script,
    delete: Script,
}

const INSERT_LUA: &str = r"
local p = ARGV[1]
local n = 0
for i = 2, #ARGV, 10 do
  local id, member, task, state = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local stored, status = ARGV[i + 4], ARGV[i + 5]
  local key = p .. 'rec:' .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'member', member, 'task', task, 'state', state,
      'stored', stored, 'status', status, 'core', ARGV[i + 6], 'review', ARGV[i + 7],
      'metadata', ARGV[i + 8], 'feedback', ARGV[i + 9])
    redis.call('ZADD', p .. 'idx:all', 0, member)
    redis.call('ZADD', p .. 'idx:task:' .. task, 0, member)
    redis.call('ZADD', p .. 'idx:state:' .. state, 0, member)
    redis.call('ZADD', p .. 'idx:ts:' .. state .. ':' .. task, 0, member)
    if stored == '1' then redis.call('ZADD', p .. 'idx:stored', 0, member) end
    redis.call('SADD', p .. 'tasks', task)
    n = n + 1
  end
end
return n
";

/// Returns 1 applied, 0 the review changed since it was read, -1 no such record.
const REVIEW_LUA: &str = r"
local p, id, expected, new_state, new_review = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = p .. 'rec:' .. id
local cur = redis.call('HMGET', key, 'review', 'state', 'task', 'member')
if not cur[1] then return -1 end
if cur[1] ~= expected then return 0 end
redis.call('HSET', key, 'review', new_review, 'state', new_state)
if cur[2] ~= new_state then
  local task, member = cur[3], cur[4]
  redis.call('ZREM', p .. 'idx:state:' .. cur[2], member)
  redis.call('ZADD', p .. 'idx:state:' .. new_state, 0, member)
  redis.call('ZREM', p .. 'idx:ts:' .. cur[2] .. ':' .. task, member)
  redis.call('ZADD', p .. 'idx:ts:' .. new_state .. ':' .. task, 0, member)
end
return 1
";

const SET_FIELD_LUA: &str = r"
local key = ARGV[1] .. 'rec:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, ARGV[3], ARGV[4])
return 1
";

const DELETE_LUA: &str = r"
local p = ARGV[1]
local key = p .. 'rec:' .. ARGV[2]
local cur = redis.call('HMGET', key, 'member', 'task', 'state')
if not cur[1] then return 0 end
local member, task, state = cur[1], cur[2], cur[3]
redis.call('DEL', key)
redis.call('ZREM', p .. 'idx:all', member)
redis.call('ZREM', p .. 'idx:task:' .. task, member)
redis.call('ZREM', p .. 'idx:state:' .. state, member)
redis.call('ZREM', p .. 'idx:ts:' .. state .. ':' .. task, member)
redis.call('ZREM', p .. 'idx:stored', member)
if redis.call('ZCARD', p .. 'idx:task:' .. task) == 0 then redis.call('SREM', p .. 'tasks', task) end
return 1
";

/// Attempts at a review compare-and-swap before giving up on a record under heavy contention.
const REVIEW_ATTEMPTS: usize = 16;

const FIELDS: [&str; 4] = ["core", "review", "metadata", "feedback"];

fn redis_err(e: RedisError) -> LogError {
    if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped() {
        LogError::Unavailable(format!("redis: {e}"))
    } else {
        LogError::Storage(format!("redis: {e}"))
    }
}

fn enc(e: serde_json::Error) -> LogError {
    LogError::Storage(format!("cannot encode log record: {e}"))
}

fn dec(e: serde_json::Error) -> LogError {
    LogError::Storage(format!("stored log record is not valid: {e}"))
}

/// Index member: sorts by `(created_ms, id)` byte-wise, like SQLite's `ORDER BY`.
fn member(created_ms: i64, id: &str) -> String {
    format!("{:020}:{id}", created_ms.max(0))
}

fn member_id(member: &str) -> &str {
    member.get(21..).unwrap_or_default()
}

impl RedisStore {
    /// Creates the store without waiting for Redis: a gateway may start while Redis is down
    /// (the writer spools). Use [`RedisStore::ping`] to check it. Must run inside a Tokio
    /// runtime (the connection manager spawns a task).
    pub fn connect(cfg: &RedisConfig) -> Result<Self, LogError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LogError::Storage("RedisStore::connect needs a Tokio runtime".into()));
        }
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| LogError::InvalidInput(format!("invalid redis url '{}': {e}", cfg.url)))?;
        // Few reconnect retries: a command waits for them, and the writer has its own retry
        // loop (via the spool), so waiting long here only delays the spool.
        let manager_cfg = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.response_timeout));
        let conn = client.get_connection_manager_lazy(manager_cfg).map_err(redis_err)?;
        Ok(Self {
            conn,
            prefix: cfg.prefix.as_str().into(),
            scripts: Arc::new(Scripts {
                insert: Script::new(INSERT_LUA),
                review: Script::new(REVIEW_LUA),
                set_field: Script::new(SET_FIELD_LUA),
                delete: Script::new(DELETE_LUA),
            }),
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub async fn insert_batch(&self, records: &[LogRecord]) -> Result<usize, LogError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut inv = self.scripts.insert.prepare_invoke();
        inv.arg(&*self.prefix);
        for r in records {
            inv.arg(&r.id)
                .arg(member(r.created_ms, &r.id))
                .arg(&r.task)
                .arg(r.review.state.as_str())
                .arg(if r.store { "1" } else { "0" })
                .arg(&r.status)
                .arg(serde_json::to_string(r).map_err(enc)?)
                .arg(serde_json::to_string(&r.review).map_err(enc)?)
                .arg(serde_json::to_string(&r.metadata).map_err(enc)?)
                .arg(serde_json::to_string(&r.feedback).map_err(enc)?);
        }
        let n: usize = inv.invoke_async(&mut self.conn.clone()).await.map_err(redis_err)?;
        Ok(n)
    }

    /// The record and its raw `review` field (the compare-and-swap token).
    async fn fetch(&self, id: &str) -> Result<Option<(LogRecord, String)>, LogError> {
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key(&format!("rec:{id}")))
            .arg(&FIELDS[..])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        decode(fields)
    }

    async fn fetch_many(&self, ids: &[&str]) -> Result<Vec<Option<LogRecord>>, LogError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET").arg(self.key(&format!("rec:{id}"))).arg(&FIELDS[..]);
        }
        let rows: Vec<Vec<Option<String>>> =
            pipe.query_async(&mut self.conn.clone()).await.map_err(redis_err)?;
        rows.into_iter().map(|f| Ok(decode(f)?.map(|(r, _)| r))).collect()
    }

    pub async fn get(&self, id: &str) -> Result<Option<LogRecord>, LogError> {
        Ok(self.fetch(id).await?.map(|(r, _)| r))
    }

    pub async fn list(
        &self,
        filter: &LogFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, LogError> {
        let cursor = cursor.map(|c| Cursor::decode(c, filter.order)).transpose()?;
        let limit = clamp_limit(limit);
        let mut records = self.scan(filter, cursor.as_ref(), Some(limit + 1)).await?;
        let next_cursor = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|r| {
                Cursor { order: filter.order, created_ms: r.created_ms, id: r.id.clone() }.encode()
            })
        } else {
            None
        };
        Ok(Page { records, next_cursor })
    }

    /// Walks the narrowest index for the filter in order, reading records in chunks and
    /// keeping those that match, until `limit` are found or the index ends.
    async fn scan(
        &self,
        filter: &LogFilter,
        cursor: Option<&Cursor>,
        limit: Option<usize>,
    ) -> Result<Vec<LogRecord>, LogError> {
        let index = match (&filter.task, filter.state) {
            (Some(t), Some(s)) => self.key(&format!("idx:ts:{}:{t}", s.as_str())),
            (Some(t), None) => self.key(&format!("idx:task:{t}")),
            (None, Some(s)) => self.key(&format!("idx:state:{}", s.as_str())),
            (None, None) if filter.stored_only => self.key("idx:stored"),
            (None, None) => self.key("idx:all"),
        };
        // Lex bounds; `filter.matches` below re-checks everything, bounds only narrow.
        let mut lo = filter.since_ms.map_or("-".to_string(), |s| format!("[{:020}:", s.max(0)));
        let mut hi = filter.until_ms.map_or("+".to_string(), |u| format!("({:020}:", u.max(0)));
        if let Some(c) = cursor {
            let bound = format!("({}", member(c.created_ms, &c.id));
            match filter.order {
                Order::NewestFirst => hi = bound,
                Order::OldestFirst => lo = bound,
            }
        }
        let chunk = limit.map_or(MAX_CHUNK, |l| l.clamp(MIN_CHUNK, MAX_CHUNK));
        let mut out = Vec::new();
        loop {
            let (cmd, from, to) = match filter.order {
                Order::NewestFirst => ("ZREVRANGEBYLEX", &hi, &lo),
                Order::OldestFirst => ("ZRANGEBYLEX", &lo, &hi),
            };
            let members: Vec<String> = redis::cmd(cmd)
                .arg(&index)
                .arg(from)
                .arg(to)
                .arg("LIMIT")
                .arg(0)
                .arg(chunk)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(redis_err)?;
            let Some(last) = members.last() else { break };
            let next = format!("({last}");
            let ids: Vec<&str> = members.iter().map(|m| member_id(m)).collect();
            // A record deleted between the range and the read is simply absent.
            for r in self.fetch_many(&ids).await?.into_iter().flatten() {
                if filter.matches(&r) {
                    out.push(r);
                    if limit.is_some_and(|l| out.len() >= l) {
                        return Ok(out);
                    }
                }
            }
            if members.len() < chunk {
                break;
            }
            match filter.order {
                Order::NewestFirst => hi = next,
                Order::OldestFirst => lo = next,
            }
        }
        Ok(out)
    }

    pub async fn review(&self, id: &str, action: &ReviewAction) -> Result<LogRecord, LogError> {
        for _ in 0..REVIEW_ATTEMPTS {
            let (mut record, raw_review) =
                self.fetch(id).await?.ok_or_else(|| LogError::NotFound(id.to_string()))?;
            action.apply(&mut record, now_ms())?;
            let new_review = serde_json::to_string(&record.review).map_err(enc)?;
            let applied: i64 = self
                .scripts
                .review
                .arg(&*self.prefix)
                .arg(id)
                .arg(&raw_review)
                .arg(record.review.state.as_str())
                .arg(&new_review)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_err)?;
            match applied {
                1 => return Ok(record),
                -1 => return Err(LogError::NotFound(id.to_string())),
                _ => continue,
            }
        }
        Err(LogError::Unavailable(format!("review of '{id}' kept racing other reviews; try again")))
    }

    /// Atomic per record, not as a whole: a failure midway leaves earlier records reviewed.
    pub async fn review_bulk(
        &self,
        target: &BulkTarget,
        action: &ReviewAction,
    ) -> Result<BulkReviewOutcome, LogError> {
        let ids: Vec<String> = match target {
            BulkTarget::Ids(ids) => ids.clone(),
            BulkTarget::Filter(f) => {
                self.scan(f, None, None).await?.into_iter().map(|r| r.id).collect()
            }
        };
        let mut out = BulkReviewOutcome::default();
        for id in &ids {
            match self.review(id, action).await {
                Ok(_) => out.reviewed += 1,
                Err(LogError::NotFound(_) | LogError::IllegalTransition { .. }) => out.skipped += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn set_field(&self, id: &str, field: &str, json: String) -> Result<LogRecord, LogError> {
        let found: i64 = self
            .scripts
            .set_field
            .arg(&*self.prefix)
            .arg(id)
            .arg(field)
            .arg(json)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        if found == 0 {
            return Err(LogError::NotFound(id.to_string()));
        }
        self.get(id).await?.ok_or_else(|| LogError::NotFound(id.to_string()))
    }

    pub async fn update_metadata(
        &self,
        id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<LogRecord, LogError> {
        self.set_field(id, "metadata", serde_json::to_string(&metadata).map_err(enc)?).await
    }

    pub async fn set_feedback(&self, id: &str, feedback: Feedback) -> Result<LogRecord, LogError> {
        self.set_field(id, "feedback", serde_json::to_string(&Some(feedback)).map_err(enc)?).await
    }

    pub async fn delete(&self, id: &str) -> Result<bool, LogError> {
        let n: i64 = self
            .scripts
            .delete
            .arg(&*self.prefix)
            .arg(id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        Ok(n == 1)
    }

    pub async fn task_stats(&self) -> Result<Vec<TaskStats>, LogError> {
        let mut conn = self.conn.clone();
        let mut tasks: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("tasks"))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        tasks.sort();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut counts = redis::pipe();
        let mut newest = redis::pipe();
        for t in &tasks {
            for s in ReviewState::ALL {
                counts.cmd("ZCARD").arg(self.key(&format!("idx:ts:{}:{t}", s.as_str())));
            }
            newest
                .cmd("ZREVRANGEBYLEX")
                .arg(self.key(&format!("idx:task:{t}")))
                .arg("+")
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(1);
        }
        let counts: Vec<u64> = counts.query_async(&mut conn).await.map_err(redis_err)?;
        let newest: Vec<Vec<String>> = newest.query_async(&mut conn).await.map_err(redis_err)?;
        let mut out = Vec::new();
        for ((task, c), n) in tasks.into_iter().zip(counts.chunks(3)).zip(newest) {
            let (pending, approved, rejected) = match c {
                [p, a, r] => (*p, *a, *r),
                _ => return Err(LogError::Storage("redis: short stats reply".into())),
            };
            let total = pending + approved + rejected;
            if total == 0 {
                continue;
            }
            let newest_ms = n.first().and_then(|m| m.get(..20)).and_then(|c| c.parse().ok());
            out.push(TaskStats { task, pending, approved, rejected, total, newest_ms });
        }
        Ok(out)
    }

    pub async fn ping(&self) -> Result<(), LogError> {
        let _: String =
            redis::cmd("PING").query_async(&mut self.conn.clone()).await.map_err(redis_err)?;
        Ok(())
    }
}

const MIN_CHUNK: usize = 64;
const MAX_CHUNK: usize = 1000;

/// Builds a record from `HMGET core review metadata feedback`; `None` if the hash is gone.
fn decode(fields: Vec<Option<String>>) -> Result<Option<(LogRecord, String)>, LogError> {
    let mut it = fields.into_iter();
    let (Some(Some(core)), Some(review), Some(metadata), Some(feedback)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Ok(None);
    };
    let mut record: LogRecord = serde_json::from_str(&core).map_err(dec)?;
    let review = review.ok_or_else(|| LogError::Storage("redis: record without review".into()))?;
    record.review = serde_json::from_str::<Review>(&review).map_err(dec)?;
    if let Some(m) = metadata {
        record.metadata = serde_json::from_str(&m).map_err(dec)?;
    }
    if let Some(f) = feedback {
        record.feedback = serde_json::from_str(&f).map_err(dec)?;
    }
    Ok(Some((record, review)))
}
