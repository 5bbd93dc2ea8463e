//! Uploaded files (OpenAI `/v1/files`, purpose `fine-tune`): validated line by line as
//! chat fine-tuning JSONL, stored under `data_dir/files/` with a JSON sidecar. Writes go
//! to a temporary file and are renamed into place, so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use super::dataset::Example;
use crate::engine::tool_prompt;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    /// The tenant that uploaded it (tunegate's field); only it and admins see the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Invalid(String),
    #[error("No such File object: {0}")]
    NotFound(String),
    #[error("file storage error: {0}")]
    Io(String),
}

pub struct FileStore {
    dir: PathBuf,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Parses chat fine-tuning JSONL; errors name the line. Each line: `{"messages": [...]}`
/// ending with an assistant message.
pub fn parse_jsonl(bytes: &[u8]) -> Result<Vec<Example>, FileError> {
    let text = std::str::from_utf8(bytes).map_err(|e| FileError::Invalid(format!("the file is not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(e) = parse_line(i + 1, line)? {
            out.push(e);
        }
    }
    if out.is_empty() {
        return Err(FileError::Invalid("the file holds no examples".into()));
    }
    Ok(out)
}

/// Longest line of an uploaded file (one example), so that validation holds one line at a
/// time, never the whole upload.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// Validates the JSONL file at `path` line by line, holding at most one line in memory.
/// Returns the number of examples.
pub fn check_jsonl_file(path: &Path) -> Result<usize, FileError> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(path).map_err(|e| FileError::Io(e.to_string()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let (mut n, mut examples) = (0usize, 0usize);
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| FileError::Io(e.to_string()))?;
        if read == 0 {
            break;
        }
        n += 1;
        if line.len() > MAX_LINE_BYTES {
            return Err(FileError::Invalid(format!("line {n}: longer than {MAX_LINE_BYTES} bytes")));
        }
        let text = std::str::from_utf8(&line).map_err(|e| FileError::Invalid(format!("line {n}: not UTF-8: {e}")))?;
        if parse_line(n, text.trim_end_matches(['\n', '\r']))?.is_some() {
            examples += 1;
        }
    }
    if examples == 0 {
        return Err(FileError::Invalid("the file holds no examples".into()));
    }
    Ok(examples)
}

/// One line of chat fine-tuning JSONL: `None` for a blank line.
fn parse_line(n: usize, line: &str) -> Result<Option<Example>, FileError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| FileError::Invalid(format!("line {n}: invalid JSON: {e}")))?;
    let msgs = v
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or_else(|| FileError::Invalid(format!("line {n}: expected an object with a \"messages\" array")))?;
    let mut messages = Vec::with_capacity(msgs.len());
    for (j, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str()).unwrap_or_default();
        if !matches!(role, "system" | "user" | "assistant" | "developer" | "tool") {
            return Err(FileError::Invalid(format!("line {n}: messages[{j}] has an invalid role '{role}'")));
        }
        let calls = m.get("tool_calls").and_then(|c| c.as_array()).filter(|c| !c.is_empty());
        if m.get("tool_calls").is_some_and(|c| !c.is_null() && !c.is_array()) {
            return Err(FileError::Invalid(format!("line {n}: messages[{j}].tool_calls must be an array")));
        }
        let content = match m.get("content") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join(""),
            // An assistant turn that only calls tools has no content.
            None | Some(serde_json::Value::Null) if role == "assistant" && calls.is_some() => String::new(),
            _ => return Err(FileError::Invalid(format!("line {n}: messages[{j}].content must be a string"))),
        };
        messages.push(tool_prompt::turn(role, content, calls.map(Vec::as_slice)));
    }
    if messages.last().map(|m| m.role.as_str()) != Some("assistant") {
        return Err(FileError::Invalid(format!("line {n}: the last message must be from the assistant")));
    }
    // OpenAI's format puts the functions beside the messages; they are written into the
    // system prompt exactly as serving writes them.
    match v.get("tools") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(tools)) => {
            let functions = tool_prompt::callable(v.get("tools"), None);
            if functions.len() != tools.len() {
                return Err(FileError::Invalid(format!(
                    "line {n}: every entry of \"tools\" must be a function with a name"
                )));
            }
            if !functions.is_empty() {
                tool_prompt::attach(&mut messages, &tool_prompt::system_block(&functions));
            }
        }
        Some(_) => return Err(FileError::Invalid(format!("line {n}: \"tools\" must be an array"))),
    }
    Ok(Some(Example { messages }))
}

impl FileStore {
    pub fn open(data_dir: &Path) -> Result<Self, FileError> {
        let dir = data_dir.join("files");
        std::fs::create_dir_all(&dir).map_err(|e| FileError::Io(format!("{}: {e}", dir.display())))?;
        // Uploads a crash cut off.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".part") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Self { dir })
    }

    fn meta_path(&self, id: &str) -> Result<PathBuf, FileError> {
        if !id.starts_with("file-") || !id[5..].chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(FileError::NotFound(id.to_string()));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    /// Validates and stores an upload held in memory (tests, the CLI).
    pub fn create(&self, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileObject, FileError> {
        let tmp = self.upload_path();
        std::fs::write(&tmp, bytes).map_err(|e| FileError::Io(e.to_string()))?;
        let r = self.create_from(None, filename, purpose, &tmp);
        let _ = std::fs::remove_file(&tmp);
        r
    }

    /// A fresh path in the files folder for an upload being received (`*.part`: never
    /// listed; [`FileStore::create_from`] renames it into place or the caller removes it).
    pub fn upload_path(&self) -> PathBuf {
        self.dir.join(format!("upload-{}.part", uuid::Uuid::new_v4().simple()))
    }

    /// Validates the upload at `tmp` (written by the caller, e.g. streamed from a request)
    /// and moves it into place, owned by `owner`.
    pub fn create_from(&self, owner: Option<&str>, filename: &str, purpose: &str, tmp: &Path) -> Result<FileObject, FileError> {
        if purpose != "fine-tune" {
            return Err(FileError::Invalid(format!("purpose '{purpose}' is not supported; use 'fine-tune'")));
        }
        let io = |e: std::io::Error| FileError::Io(e.to_string());
        check_jsonl_file(tmp)?;
        let size = std::fs::metadata(tmp).map_err(io)?.len();
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        let filename: String = filename.chars().filter(|c| !c.is_control()).take(255).collect();
        let obj = FileObject {
            id: id.clone(),
            object: "file".into(),
            bytes: size,
            created_at: now(),
            filename,
            purpose: purpose.to_string(),
            status: "processed".into(),
            owner: owner.map(str::to_string),
        };
        let data = self.dir.join(format!("{id}.jsonl"));
        std::fs::rename(tmp, &data).map_err(io)?;
        let meta = serde_json::to_vec(&obj).map_err(|e| FileError::Io(e.to_string()))?;
        let tmp = self.dir.join(format!("{id}.json.tmp"));
        std::fs::write(&tmp, meta).map_err(io)?;
        std::fs::rename(&tmp, self.meta_path(&id)?).map_err(io)?;
        Ok(obj)
    }

    pub fn get(&self, id: &str) -> Result<FileObject, FileError> {
        let raw = std::fs::read(self.meta_path(id)?).map_err(|_| FileError::NotFound(id.to_string()))?;
        serde_json::from_slice(&raw).map_err(|e| FileError::Io(e.to_string()))
    }

    pub fn content(&self, id: &str) -> Result<Vec<u8>, FileError> {
        self.get(id)?;
        std::fs::read(self.dir.join(format!("{id}.jsonl"))).map_err(|e| FileError::Io(e.to_string()))
    }

    pub fn examples(&self, id: &str) -> Result<Vec<Example>, FileError> {
        parse_jsonl(&self.content(id)?)
    }

    /// Newest first.
    pub fn list(&self) -> Result<Vec<FileObject>, FileError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| FileError::Io(e.to_string()))?;
        let mut v: Vec<FileObject> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        v.sort_by(|a: &FileObject, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(v)
    }

    pub fn delete(&self, id: &str) -> Result<(), FileError> {
        let meta = self.meta_path(id)?;
        if !meta.exists() {
            return Err(FileError::NotFound(id.to_string()));
        }
        std::fs::remove_file(&meta).map_err(|e| FileError::Io(e.to_string()))?;
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.jsonl")));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_line_by_line_and_round_trips() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let fs = FileStore::open(dir.path())?;
        let good = b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n";
        let f = fs.create("a.jsonl", "fine-tune", good)?;
        assert_eq!(fs.get(&f.id)?, f);
        assert_eq!(fs.content(&f.id)?, good.to_vec());
        assert_eq!(fs.examples(&f.id)?.len(), 1);
        assert_eq!(fs.list()?.len(), 1);
        let bad = b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n{\"messages\": 3}\n";
        let err = fs.create("b.jsonl", "fine-tune", bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = parse_jsonl(b"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}").err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("line 1: the last message"));
        assert!(matches!(fs.get("file-nope"), Err(FileError::NotFound(_))));
        assert!(matches!(fs.get("../etc/passwd"), Err(FileError::NotFound(_))));
        fs.delete(&f.id)?;
        assert!(fs.list()?.is_empty());
        Ok(())
    }

    #[test]
    fn tools_and_tool_calls_are_written_as_serving_writes_them() -> anyhow::Result<()> {
        use crate::engine::tool_prompt::{system_block, Function};
        let line = serde_json::json!({
            "tools": [{"type": "function", "function": {"name": "lamp", "parameters": {"type": "object",
                "properties": {"on": {"type": "boolean"}}}}}],
            "messages": [
                {"role": "system", "content": "You run the house."},
                {"role": "user", "content": "Light on."},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "lamp", "arguments": "{\"on\": true}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
                {"role": "assistant", "content": "The light is on."},
            ],
        });
        let ex = parse_line(1, &line.to_string())?.ok_or_else(|| anyhow::anyhow!("no example"))?;
        let functions: Vec<Function> = line["tools"].as_array().into_iter().flatten().filter_map(Function::from_openai).collect();
        assert_eq!(ex.messages[0].content, format!("You run the house.\n\n{}", system_block(&functions)));
        assert!(ex.messages[2].content.starts_with("<tool_call>") && ex.messages[2].content.contains("\"on\":true"));
        assert_eq!(ex.messages[3].role, "tool");
        assert_eq!(ex.messages[3].content, "<tool_response>\ndone\n</tool_response>");
        // A final turn that is a call trains the call.
        let call_last = serde_json::json!({"messages": [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "lamp", "arguments": "{}"}}]}]});
        let ex = parse_line(1, &call_last.to_string())?.ok_or_else(|| anyhow::anyhow!("no example"))?;
        assert!(ex.messages[1].content.starts_with("<tool_call>"));
        for bad in [r#"{"tools": 3, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
                    r#"{"tools": [{"type": "web_search"}], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#] {
            assert!(parse_line(1, bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
