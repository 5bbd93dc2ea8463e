//! Redaction before storage: configured regexes are replaced in every message's text and
//! in the response, so secrets and personal data never reach the store or the spool.

use regex::Regex;
use serde_json::Value;

use super::{LogError, LogRecord};

/// What a match is replaced with.
pub const REDACTED: &str = "[REDACTED]";

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    patterns: Vec<Regex>,
}

impl Redactor {
    /// Compiles the patterns; a bad one is an error naming it (config validation shows it).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, LogError> {
        let patterns = patterns
            .iter()
            .map(|p| {
                Regex::new(p.as_ref()).map_err(|e| {
                    LogError::InvalidInput(format!(
                        "invalid redaction pattern '{}': {e}",
                        p.as_ref()
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn redact_str(&self, s: &str) -> String {
        let mut out = s.to_string();
        for p in &self.patterns {
            if let std::borrow::Cow::Owned(r) = p.replace_all(&out, REDACTED) {
                out = r;
            }
        }
        out
    }

    /// Redacts message contents (strings and text parts), the response and any correction.
    pub fn redact_record(&self, r: &mut LogRecord) {
        if self.is_empty() {
            return;
        }
        for m in r.request.messages.as_array_mut().into_iter().flatten() {
            match m.get_mut("content") {
                Some(Value::String(s)) => *s = self.redact_str(s),
                Some(Value::Array(parts)) => {
                    for part in parts {
                        if let Some(Value::String(t)) = part.get_mut("text") {
                            *t = self.redact_str(t);
                        }
                    }
                }
                _ => {}
            }
        }
        r.response = self.redact_str(&r.response);
        if let Some(c) = &mut r.review.corrected_response {
            *c = self.redact_str(c);
        }
    }
}
