//! Resolving a client-supplied adapter path inside the configured adapters root. A path is
//! refused when it has a `..` component, when it is absolute and outside the root, or when
//! it leaves the root through a symlink (both sides are canonicalized before comparing).
//! Touches the filesystem: call it off async workers.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("lora_path '{0}' is outside the adapters root; give a path relative to it (no '..')")]
    OutsideRoot(String),
    #[error("lora_path '{0}' does not exist in the adapters root")]
    NotFound(String),
    #[error("the adapters root '{0}' does not exist; create it or set adapters.root")]
    NoRoot(String),
}

/// The canonical path of `requested` (relative to `root`, or absolute) if it lies in `root`.
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, PathError> {
    let req = Path::new(requested);
    if requested.trim().is_empty() || req.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(PathError::OutsideRoot(requested.to_string()));
    }
    let root = root.canonicalize().map_err(|_| PathError::NoRoot(root.display().to_string()))?;
    let candidate = if req.is_absolute() { req.to_path_buf() } else { root.join(req) };
    match candidate.canonicalize() {
        Ok(c) if c.starts_with(&root) => Ok(c),
        Ok(_) => Err(PathError::OutsideRoot(requested.to_string())),
        // A missing absolute path outside the root gets the same answer as an existing one,
        // so the error says nothing about the rest of the filesystem.
        Err(_) if !candidate.starts_with(&root) => Err(PathError::OutsideRoot(requested.to_string())),
        Err(_) => Err(PathError::NotFound(requested.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_outside_and_symlinks() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("adapters");
        std::fs::create_dir_all(root.join("support/v1"))?;
        std::fs::create_dir_all(tmp.path().join("secret"))?;
        let canon_root = root.canonicalize()?;

        assert_eq!(resolve(&root, "support/v1"), Ok(canon_root.join("support/v1")));
        assert_eq!(resolve(&root, "./support/v1/"), Ok(canon_root.join("support/v1")));
        let abs = canon_root.join("support/v1");
        assert_eq!(resolve(&root, &abs.display().to_string()), Ok(abs.clone()));

        for bad in ["../secret", "support/../../secret", "..", ""] {
            assert_eq!(resolve(&root, bad), Err(PathError::OutsideRoot(bad.to_string())), "{bad}");
        }
        let outside = tmp.path().join("secret").display().to_string();
        assert_eq!(resolve(&root, &outside), Err(PathError::OutsideRoot(outside.clone())));
        assert_eq!(resolve(&root, "/etc/passwd"), Err(PathError::OutsideRoot("/etc/passwd".into())));
        assert_eq!(resolve(&root, "missing"), Err(PathError::NotFound("missing".into())));

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("escape"))?;
            assert_eq!(resolve(&root, "escape"), Err(PathError::OutsideRoot("escape".into())));
            std::os::unix::fs::symlink(root.join("support"), root.join("alias"))?;
            assert_eq!(resolve(&root, "alias/v1"), Ok(canon_root.join("support/v1")));
        }
        assert_eq!(resolve(&tmp.path().join("nope"), "x").map_err(|e| matches!(e, PathError::NoRoot(_))), Err(true));
        Ok(())
    }
}
