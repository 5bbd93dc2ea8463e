//! `docs/architecture.md` against the code: the "may import" table in that document is
//! the rule, and this test reads every source file of every part. It fails when a part
//! imports one the table does not allow (an arrow running the wrong way), and when the
//! table allows an import nothing uses (the document drifting from the code).
//!
//! Test-only code is left out: files named `tests.rs` or under a `tests/` folder, the
//! `testing` and `fuzz` modules (compiled for tests only), and a file's trailing
//! `#[cfg(test)] mod tests` block. Comments are left out too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type R = Result<(), Box<dyn std::error::Error>>;

const TEST_ONLY: [&str; 2] = ["testing", "fuzz"];

/// `part: a b c` lines of the fenced block after the "## May import" heading.
fn allowed(doc: &str) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let section = doc.split("## May import").nth(1).ok_or("no '## May import' section")?;
    let block = section.split("```").nth(1).ok_or("no fenced block in '## May import'")?;
    let mut out = BTreeMap::new();
    for line in block.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let (part, deps) = line.split_once(':').ok_or_else(|| format!("not 'part: deps': {line}"))?;
        out.insert(part.trim().to_string(), deps.split_whitespace().map(String::from).collect());
    }
    Ok(out)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The code of a file without comments and without a trailing `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The parts a piece of code names through `crate::part` (grouped `use crate::{a, b}` too).
fn imports(code: &str, parts: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end].split(',').map(|s| s.trim()).collect()
        } else {
            vec![rest]
        };
        for n in names {
            let name: String = n.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if parts.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn imports_between_parts_follow_the_architecture_document() -> R {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = allowed(&std::fs::read_to_string(root.join("docs/architecture.md"))?)?;
    let parts: BTreeSet<String> = rules.keys().cloned().chain(TEST_ONLY.map(String::from)).collect();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files)?;
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root.join("src"))?;
        let part = rel.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or("").trim_end_matches(".rs");
        let test_file = rel.file_name().is_some_and(|n| n == "tests.rs") || rel.components().any(|c| c.as_os_str() == "tests");
        if matches!(part, "main" | "lib") || TEST_ONLY.contains(&part) || test_file {
            continue;
        }
        let Some(may) = rules.get(part) else {
            wrong.push(format!("{}: part '{part}' is not in the table", rel.display()));
            continue;
        };
        for dep in imports(&code(&std::fs::read_to_string(f)?), &parts) {
            if dep == part {
                continue;
            }
            if !may.contains(&dep) {
                wrong.push(format!("{}: {part} imports {dep}", rel.display()));
            }
            used.insert((part.to_string(), dep));
        }
    }
    for (part, deps) in &rules {
        for dep in deps {
            if !used.contains(&(part.clone(), dep.clone())) {
                wrong.push(format!("the document lets {part} import {dep}, which no code does"));
            }
        }
    }
    assert!(wrong.is_empty(), "docs/architecture.md and the code disagree:\n{}", wrong.join("\n"));
    Ok(())
}
