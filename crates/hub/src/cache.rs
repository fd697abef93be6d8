//! The HuggingFace cache as `huggingface_hub` lays it out, so that the Python client and
//! flipsketch share it:
//!
//! ```text
//! <cache>/CACHEDIR.TAG
//! <cache>/.locks/models--owner--name/<etag>.lock           flock'ed while a blob downloads
//! <cache>/models--owner--name/refs/<revision>               the commit a branch or tag named
//! <cache>/models--owner--name/blobs/<etag>                  file contents; etag = sha256 (LFS)
//!                                                           or git blob id (other files)
//! <cache>/models--owner--name/snapshots/<commit>/<path>     relative symlinks into blobs/
//! <cache>/models--owner--name/trees/<commit>.json           the commit's file listing (sizes,
//!                                                           blob ids, LFS sha256)
//! ```
//!
//! Beside those, `models--owner--name/flipsketch-verified.json` remembers which blobs were
//! hashed and found intact (by size and modification time), so a cached model is checked once,
//! not at every start; `huggingface_hub` reads only `refs/`, `snapshots/`, `blobs/` and
//! `trees/` and ignores it. A partial download is kept as `blobs/<etag>.incomplete` and resumed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha1::Digest as _;

use crate::HubError;

/// `CACHEDIR_TAG_CONTENT` of huggingface_hub (the Cache Directory Tagging Standard).
const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by huggingface_hub.\n\
# For information about cache directory tags, see:\n\
#\thttps://bford.info/cachedir/\n";

const VERIFIED_FILE: &str = "flipsketch-verified.json";

/// One file of a commit, as the hub's tree listing describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub size: u64,
    pub blob_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lfs_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lfs_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xet_hash: Option<String>,
}

impl TreeEntry {
    /// The name of the file's blob in the cache (the hub's ETag for it).
    pub fn etag(&self) -> &str {
        self.lfs_sha256.as_deref().unwrap_or(&self.blob_id)
    }
}

#[derive(Serialize, Deserialize)]
struct TreeFile {
    format_version: u32,
    files: BTreeMap<String, TreeEntry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
}

#[derive(Default, Serialize, Deserialize)]
struct Verified {
    blobs: BTreeMap<String, Stamp>,
}

pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// How a blob's content can be checked from its name.
pub enum Digest {
    Sha256(String),
    /// Git's blob id: sha1 of `blob <len>\0` + content.
    GitSha1(String),
    /// An ETag of another form: only the size can be checked.
    Unknown,
}

impl Digest {
    pub fn of_etag(etag: &str) -> Self {
        let hexlike = etag.bytes().all(|b| b.is_ascii_hexdigit());
        match etag.len() {
            64 if hexlike => Digest::Sha256(etag.to_ascii_lowercase()),
            40 if hexlike => Digest::GitSha1(etag.to_ascii_lowercase()),
            _ => Digest::Unknown,
        }
    }
}

/// An incremental hash for a [`Digest`].
pub enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
    None,
}

impl Hasher {
    /// `size` is the whole file's (git's blob header carries it).
    pub fn new(digest: &Digest, size: u64) -> Self {
        match digest {
            Digest::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
            Digest::GitSha1(_) => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Hasher::GitSha1(h)
            }
            Digest::Unknown => Hasher::None,
        }
    }

    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::GitSha1(h) => h.update(b),
            Hasher::None => {}
        }
    }

    /// `Ok` when the content matches `digest`, else the hash found.
    pub fn check(self, digest: &Digest) -> Result<(), String> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let (found, want) = match (self, digest) {
            (Hasher::Sha256(h), Digest::Sha256(w)) => (hex(&h.finalize()), w),
            (Hasher::GitSha1(h), Digest::GitSha1(w)) => (hex(&h.finalize()), w),
            _ => return Ok(()),
        };
        if &found == want {
            Ok(())
        } else {
            Err(found)
        }
    }
}

/// The cache folders of one model repository.
#[derive(Clone, Debug)]
pub struct RepoCache {
    pub root: PathBuf,
    pub repo_dir: PathBuf,
    locks_dir: PathBuf,
}

fn io(path: &Path, e: std::io::Error) -> HubError {
    HubError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

impl RepoCache {
    /// `repo` is `owner/name`.
    pub fn new(cache_root: &Path, repo: &str) -> Self {
        let folder = format!("models--{}", repo.replace('/', "--"));
        Self {
            root: cache_root.to_path_buf(),
            repo_dir: cache_root.join(&folder),
            locks_dir: cache_root.join(".locks").join(&folder),
        }
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.repo_dir.join("blobs").join(etag)
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.repo_dir.join("snapshots").join(commit)
    }

    pub fn pointer_path(&self, commit: &str, file: &str) -> PathBuf {
        let mut p = self.snapshot_dir(commit);
        p.extend(file.split('/'));
        p
    }

    /// The commit `revision` names in the cache: itself when it is a commit hash, else what
    /// `refs/<revision>` holds.
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.repo_dir.join("refs").join(revision)).ok()?;
        let c = text.trim().to_string();
        is_commit_hash(&c).then_some(c)
    }

    /// Records that `revision` (a branch or tag) is at `commit`, as huggingface_hub does: no
    /// file for a commit hash, the hash without a newline, replaced atomically.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let path = self.repo_dir.join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|t| t == commit) {
            return Ok(());
        }
        write_atomic(&path, commit.as_bytes())
    }

    pub fn write_cachedir_tag(&self) {
        let tag = self.root.join("CACHEDIR.TAG");
        if !tag.exists() {
            let _ = std::fs::create_dir_all(&self.root);
            let _ = std::fs::write(&tag, CACHEDIR_TAG);
        }
    }

    /// The cached tree listing of `commit` (huggingface_hub's `trees/<commit>.json`).
    pub fn read_tree(&self, commit: &str) -> Option<BTreeMap<String, TreeEntry>> {
        let text = std::fs::read_to_string(self.tree_path(commit)).ok()?;
        let t: TreeFile = serde_json::from_str(&text).ok()?;
        (t.format_version == 1).then_some(t.files)
    }

    pub fn write_tree(
        &self,
        commit: &str,
        files: &BTreeMap<String, TreeEntry>,
    ) -> Result<(), HubError> {
        let t = TreeFile {
            format_version: 1,
            files: files.clone(),
        };
        let text = serde_json::to_string_pretty(&t).expect("tree listing serialises");
        write_atomic(&self.tree_path(commit), text.as_bytes())
    }

    fn tree_path(&self, commit: &str) -> PathBuf {
        self.repo_dir.join("trees").join(format!("{commit}.json"))
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative symlink (a copy
    /// where symlinks are not available), replacing what was there.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        let pointer = self.pointer_path(commit, file);
        let parent = pointer.parent().expect("pointer has a parent");
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        match std::fs::symlink_metadata(&pointer) {
            Ok(_) => std::fs::remove_file(&pointer).map_err(|e| io(&pointer, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&pointer, e)),
        }
        // snapshots/<commit>/<a>/<b> -> ../../../blobs/<etag>
        let depth = 2 + file.split('/').count() - 1;
        let target: PathBuf = std::iter::repeat_n("..", depth)
            .chain(["blobs", etag])
            .collect();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &pointer).map_err(|e| io(&pointer, e))?;
        #[cfg(not(unix))]
        std::fs::copy(self.blob_path(etag), &pointer).map_err(|e| io(&pointer, e))?;
        Ok(pointer)
    }

    /// Takes the download lock of a blob (shared with huggingface_hub's `filelock`, which is
    /// `flock` on Unix); released when the guard drops.
    pub fn lock_blob(&self, etag: &str) -> Result<BlobLock, HubError> {
        std::fs::create_dir_all(&self.locks_dir).map_err(|e| io(&self.locks_dir, e))?;
        let path = self.locks_dir.join(format!("{etag}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns; blocks until granted.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r != 0 {
                return Err(io(&path, std::io::Error::last_os_error()));
            }
        }
        Ok(BlobLock { _file: file })
    }

    fn verified_path(&self) -> PathBuf {
        self.repo_dir.join(VERIFIED_FILE)
    }

    fn read_verified(&self) -> Verified {
        std::fs::read_to_string(self.verified_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Remembers that these blobs were found intact as they are now.
    pub fn mark_verified(&self, etags: &[&str]) {
        let mut v = self.read_verified();
        for etag in etags {
            if let Ok(meta) = std::fs::metadata(self.blob_path(etag)) {
                v.blobs.insert(
                    etag.to_string(),
                    Stamp {
                        size: meta.len(),
                        mtime_ns: mtime_ns(&meta),
                    },
                );
            }
        }
        // Forget blobs that are gone.
        v.blobs.retain(|e, _| self.blob_path(e).is_file());
        if let Ok(text) = serde_json::to_string_pretty(&v) {
            if let Err(e) = write_atomic(&self.verified_path(), text.as_bytes()) {
                tracing::debug!("cannot record verified blobs: {e}");
            }
        }
    }

    /// Checks the cached blobs `(etag, expected size)`: a blob recorded as verified with the
    /// same size and modification time passes; others are hashed (in parallel) against their
    /// name. Returns the etags that are missing, of the wrong size, or corrupt.
    pub fn check_blobs(&self, blobs: &[(String, Option<u64>)]) -> Vec<String> {
        let verified = self.read_verified();
        let mut to_hash = Vec::new();
        let mut bad = Vec::new();
        for (etag, size) in blobs {
            let path = self.blob_path(etag);
            let Ok(meta) = std::fs::metadata(&path) else {
                bad.push(etag.clone());
                continue;
            };
            if size.is_some_and(|s| s != meta.len()) {
                bad.push(etag.clone());
                continue;
            }
            let stamp = Stamp {
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
            };
            if verified.blobs.get(etag) != Some(&stamp) {
                to_hash.push((etag.clone(), meta.len()));
            }
        }
        if to_hash.is_empty() {
            return bad;
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(to_hash.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<(String, bool)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((etag, size)) = to_hash.get(i) else {
                                return out;
                            };
                            let ok = hash_file(&self.blob_path(etag), etag, *size).is_ok();
                            out.push((etag.clone(), ok));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let good: Vec<&str> = results
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(e, _)| e.as_str())
            .collect();
        if !good.is_empty() {
            self.mark_verified(&good);
        }
        bad.extend(results.into_iter().filter(|(_, ok)| !ok).map(|(e, _)| e));
        bad
    }
}

/// Hashes a whole file against `etag`; `Err` carries the hash found.
fn hash_file(path: &Path, etag: &str, size: u64) -> Result<(), String> {
    let digest = Digest::of_etag(etag);
    let mut h = Hasher::new(&digest, size);
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.check(&digest)
}

pub struct BlobLock {
    _file: std::fs::File,
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    let dir = path.parent().expect("file has a parent");
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}
