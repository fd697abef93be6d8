//! Models from the HuggingFace hub, fetched into the standard HF cache and shared with the
//! Python `huggingface_hub` client (same folders, symlinks, refs, tree listings and locks; see
//! [`cache`]).
//!
//! What a user's first run needs, and why this is not the `hf-hub` crate: a 7 GB download that
//! resumes after a dropped connection (also across runs: the partial file is kept), is checked
//! against the hub's hashes (sha256 for LFS files, the git blob id for others) before it is
//! used, shows bytes, speed and time left for the whole model, and works offline from a
//! complete cache while naming the files a partial cache lacks. `hf-hub` 0.4 does not check
//! what it downloads, appends a resumed body without checking that the server honoured the
//! range, and reports progress per file only.
//!
//! Environment, as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_HUB_CACHE` (or
//! `HF_HOME/hub`, default `~/.cache/huggingface/hub`), `HF_TOKEN` (or `HF_HOME/token`),
//! `HF_HUB_OFFLINE`, `HF_HUB_DOWNLOAD_TIMEOUT` (seconds without data before a read is retried).

pub mod cache;
mod http;

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flipsketch_models::loading::{index_folder, join_folder, shard_names, FolderLayout, Selection};

pub use cache::{is_commit_hash, RepoCache, TreeEntry};
use cache::{Digest, Hasher};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the hub for {what}: {msg}")]
    Network { what: String, msg: String },
    #[error("{}", describe_status(what, *status, code.as_deref(), message))]
    Status {
        what: String,
        status: u16,
        code: Option<String>,
        message: String,
    },
    #[error("{what}: unexpected answer from the hub: {msg}")]
    Protocol { what: String, msg: String },
    #[error("{repo} at {revision} has no folder {subfolder}/{}", if available.is_empty() { String::new() } else { format!(" (it has: {})", available.join(", ")) })]
    NoSubfolder {
        repo: String,
        revision: String,
        subfolder: String,
        available: Vec<String>,
    },
    #[error("{repo} at {revision}: {} is missing: {}", if subfolder.is_empty() { "the model folder".to_string() } else { format!("{subfolder}/") }, missing.join("; "))]
    MissingFiles {
        repo: String,
        revision: String,
        subfolder: String,
        missing: Vec<String>,
    },
    #[error("{repo} ({revision}) is not complete in the HuggingFace cache at {} and downloads are off (HF_HUB_OFFLINE): {}", cache.display(), describe_missing(missing))]
    OfflineIncomplete {
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: Vec<String>,
    },
    #[error("{file}: the downloaded bytes do not match the hub's checksum twice (expected {expected}, got {found})")]
    Checksum {
        file: String,
        expected: String,
        found: String,
    },
    #[error("{file}: the hub announced {expected} bytes but sent {found}")]
    Size {
        file: String,
        expected: u64,
        found: u64,
    },
    #[error("{file}: the download failed {attempts} times in a row: {last}")]
    Retries {
        file: String,
        attempts: usize,
        last: String,
    },
}

fn describe_missing(m: &[String]) -> String {
    const SHOW: usize = 12;
    let mut s = m.iter().take(SHOW).cloned().collect::<Vec<_>>().join(", ");
    if m.len() > SHOW {
        s.push_str(&format!(" and {} more", m.len() - SHOW));
    }
    s
}

fn describe_status(what: &str, status: u16, code: Option<&str>, message: &str) -> String {
    match code {
        Some("RepoNotFound") => format!(
            "{what}: repository not found on the hub (a typo, or a private or gated repository: set HF_TOKEN)"
        ),
        Some("RevisionNotFound") => format!("{what}: no such revision on the hub ({message})"),
        Some("EntryNotFound") => format!("{what}: no such file on the hub ({message})"),
        Some("GatedRepo") => {
            format!("{what}: the repository is gated: accept its terms on the hub and set HF_TOKEN")
        }
        _ if status == 401 || status == 403 => format!(
            "{what}: the hub refused access ({status} {message}); for a private repository set HF_TOKEN"
        ),
        _ => format!("{what}: the hub answered {status} {message}"),
    }
}

/// Where the hub is and how to reach it.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub endpoint: String,
    /// The hub cache folder (`HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// A read that gets no data for this long fails and is retried (resumed).
    pub read_timeout: Duration,
    /// The wait before the first retry of a failed transfer (doubled for each further one,
    /// at most 16 times this).
    pub retry_wait: Duration,
}

fn env_truthy(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl HubConfig {
    /// The configuration huggingface_hub would use in this environment.
    pub fn from_env() -> Self {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        let hf_home = env_path("HF_HOME").unwrap_or_else(|| {
            env_path("XDG_CACHE_HOME")
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = env_path("HF_HUB_CACHE")
            .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = std::env::var("HF_TOKEN")
            .ok()
            .or_else(|| std::env::var("HUGGING_FACE_HUB_TOKEN").ok())
            .or_else(|| std::fs::read_to_string(hf_home.join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let read_timeout = std::env::var("HF_HUB_DOWNLOAD_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .map_or(Duration::from_secs(30), Duration::from_secs_f64);
        Self {
            endpoint,
            cache_dir,
            token,
            offline: env_truthy("HF_HUB_OFFLINE"),
            read_timeout,
            retry_wait: Duration::from_millis(500),
        }
    }
}

/// A model folder in a hub repository.
#[derive(Clone, Debug)]
pub struct ModelRef {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit hash.
    pub revision: String,
    /// Folder of the repository holding the model ("" for the root).
    pub subfolder: String,
    /// Weight variant preferred (`fp16`).
    pub variant: Option<String>,
}

/// When to ask the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Use a complete, intact cached copy without any network access; download otherwise.
    CacheFirst,
    /// Ask the hub what the revision holds now and fetch what the cache lacks.
    Refresh,
}

/// Progress of a download, summed over all files.
pub trait DownloadProgress {
    /// Once before the first byte: files and bytes to fetch.
    fn start(&mut self, _files: usize, _bytes: u64) {}
    /// A file starts (repository path).
    fn file(&mut self, _name: &str) {}
    /// `n` more bytes arrived.
    fn bytes(&mut self, _n: u64) {}
    /// `n` bytes counted before must be fetched again (a restarted or corrupt file).
    fn undo(&mut self, _n: u64) {}
    /// All done.
    fn finish(&mut self) {}
}

impl DownloadProgress for () {}

/// A model folder ready to load.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `snapshots/<commit>/<subfolder>`.
    pub dir: PathBuf,
    pub commit: String,
    /// Repository paths of the files it consists of.
    pub files: Vec<String>,
    /// Bytes fetched by this call (0 when the cache had everything).
    pub downloaded: u64,
}

fn io(path: &Path, e: std::io::Error) -> HubError {
    HubError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// The selection of `layout`'s files in `listing` (repository paths), shards included (their
/// index files are read with `read_index`). Paths in the result are repository paths.
fn select_files(
    layout: &FolderLayout,
    subfolder: &str,
    variant: Option<&str>,
    exists: &dyn Fn(&str) -> bool,
    read_index: &mut dyn FnMut(&str) -> Result<String, HubError>,
) -> Result<Selection, HubError> {
    let mut s = layout.select(variant, |f| exists(&join_folder(subfolder, f)));
    for index in s.indexes.clone() {
        let path = join_folder(subfolder, &index);
        let text = read_index(&path)?;
        let shards = shard_names(&text).map_err(|msg| HubError::Protocol {
            what: path.clone(),
            msg,
        })?;
        for shard in shards {
            let f = join_folder(index_folder(&index), &shard);
            if exists(&join_folder(subfolder, &f)) {
                s.files.push(f);
            } else {
                s.missing.push(format!("{f} (a shard listed in {index})"));
            }
        }
    }
    for f in s.files.iter_mut() {
        *f = join_folder(subfolder, f);
    }
    s.files.sort();
    s.files.dedup();
    Ok(s)
}

/// The model folder for `model`, from the cache or the hub (see [`Fetch`]).
pub fn resolve(
    cfg: &HubConfig,
    model: &ModelRef,
    layout: &FolderLayout,
    fetch: Fetch,
    progress: &mut dyn DownloadProgress,
) -> Result<Resolved, HubError> {
    let rc = RepoCache::new(&cfg.cache_dir, &model.repo);
    let cached = from_cache(&rc, model, layout);
    if fetch == Fetch::CacheFirst || cfg.offline {
        match &cached {
            Ok(r) => {
                let bad = check_cached(&rc, r);
                if bad.is_empty() {
                    tracing::info!("using the cached {} in {}", model.repo, r.dir.display());
                    return Ok(r.clone());
                }
                if cfg.offline {
                    return Err(HubError::OfflineIncomplete {
                        repo: model.repo.clone(),
                        revision: model.revision.clone(),
                        cache: cfg.cache_dir.clone(),
                        missing: bad.iter().map(|f| format!("{f} (corrupt)")).collect(),
                    });
                }
                tracing::warn!(
                    "{} cached file(s) of {} are corrupt and will be fetched again: {}",
                    bad.len(),
                    model.repo,
                    bad.join(", ")
                );
            }
            Err(missing) if cfg.offline => {
                return Err(HubError::OfflineIncomplete {
                    repo: model.repo.clone(),
                    revision: model.revision.clone(),
                    cache: cfg.cache_dir.clone(),
                    missing: missing.clone(),
                })
            }
            Err(_) => {}
        }
    }
    match download(cfg, &rc, model, layout, progress) {
        // The hub is out of reach but the cache has the revision, intact: use it, as
        // huggingface_hub does.
        Err(e @ HubError::Network { .. }) => match cached {
            Ok(r) if check_cached(&rc, &r).is_empty() => {
                tracing::warn!("{e}; using the cached copy in {}", r.dir.display());
                Ok(r)
            }
            _ => Err(e),
        },
        r => r,
    }
}

/// The cached snapshot of `model` when it holds every file `layout` needs (not yet checked
/// for corruption), else the missing files.
fn from_cache(
    rc: &RepoCache,
    model: &ModelRef,
    layout: &FolderLayout,
) -> Result<Resolved, Vec<String>> {
    let Some(commit) = rc.commit_of(&model.revision) else {
        return Err(vec![format!(
            "the revision {:?} (nothing of {} is cached for it)",
            model.revision, model.repo
        )]);
    };
    let snapshot = rc.snapshot_dir(&commit);
    let exists = |p: &str| rc.pointer_path(&commit, p).is_file();
    let mut read_index = |p: &str| {
        std::fs::read_to_string(rc.pointer_path(&commit, p))
            .map_err(|e| io(&rc.pointer_path(&commit, p), e))
    };
    let sel = select_files(
        layout,
        &model.subfolder,
        model.variant.as_deref(),
        &exists,
        &mut read_index,
    )
    .map_err(|e| vec![e.to_string()])?;
    if !sel.missing.is_empty() {
        let base = if model.subfolder.is_empty() {
            String::new()
        } else {
            format!("{}/", model.subfolder)
        };
        return Err(sel.missing.iter().map(|m| format!("{base}{m}")).collect());
    }
    Ok(Resolved {
        dir: snapshot.join(&model.subfolder),
        commit,
        files: sel.files,
        downloaded: 0,
    })
}

/// The files of a cached snapshot whose blobs are missing, truncated or corrupt.
fn check_cached(rc: &RepoCache, r: &Resolved) -> Vec<String> {
    let tree = rc.read_tree(&r.commit);
    let mut blobs = Vec::new();
    let mut by_etag: BTreeMap<String, String> = BTreeMap::new();
    for f in &r.files {
        let pointer = rc.pointer_path(&r.commit, f);
        // The blob's name is its etag; a copy instead of a symlink (no symlinks on this
        // system) is checked under the name the tree listing gives.
        let etag = std::fs::read_link(&pointer)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
            .or_else(|| tree.as_ref()?.get(f).map(|e| e.etag().to_string()));
        let Some(etag) = etag else { continue };
        let size = tree.as_ref().and_then(|t| t.get(f)).map(|e| e.size);
        by_etag.insert(etag.clone(), f.clone());
        blobs.push((etag, size));
    }
    rc.check_blobs(&blobs)
        .into_iter()
        .filter_map(|e| by_etag.get(&e).cloned())
        .collect()
}

/// Asks the hub, then fetches what the cache lacks.
fn download(
    cfg: &HubConfig,
    rc: &RepoCache,
    model: &ModelRef,
    layout: &FolderLayout,
    progress: &mut dyn DownloadProgress,
) -> Result<Resolved, HubError> {
    let http = http::Http::new(cfg);
    let repo = &model.repo;
    // 1. the commit and its file list (cached per commit, which never changes)
    let commit = if is_commit_hash(&model.revision) {
        model.revision.clone()
    } else {
        http.commit_of(repo, &model.revision)?
    };
    let tree = match rc.read_tree(&commit) {
        Some(t) => t,
        None => {
            let t = http.tree(repo, &commit)?;
            rc.write_tree(&commit, &t)?;
            t
        }
    };
    if !model.subfolder.is_empty() {
        let prefix = format!("{}/", model.subfolder);
        if !tree.keys().any(|k| k.starts_with(&prefix)) {
            let mut available: Vec<String> = tree
                .keys()
                .filter_map(|k| k.split_once('/').map(|(d, _)| format!("{d}/")))
                .collect();
            available.dedup();
            return Err(HubError::NoSubfolder {
                repo: repo.clone(),
                revision: model.revision.clone(),
                subfolder: model.subfolder.clone(),
                available,
            });
        }
    }
    // 2. which files (shard indexes are fetched first to know their shards)
    let mut fetched = 0u64;
    let exists = |p: &str| tree.contains_key(p);
    let mut read_index = |p: &str| {
        let entry = tree.get(p).expect("selected from the tree");
        let path = fetch_file(&http, rc, repo, &commit, p, entry, &mut (), &mut fetched)?;
        std::fs::read_to_string(&path).map_err(|e| io(&path, e))
    };
    let sel = select_files(
        layout,
        &model.subfolder,
        model.variant.as_deref(),
        &exists,
        &mut read_index,
    )?;
    if !sel.missing.is_empty() {
        return Err(HubError::MissingFiles {
            repo: repo.clone(),
            revision: model.revision.clone(),
            subfolder: model.subfolder.clone(),
            missing: sel.missing,
        });
    }
    // 3. what is already here, intact
    let present: Vec<(String, Option<u64>)> = sel
        .files
        .iter()
        .map(|f| (tree[f].etag().to_string(), Some(tree[f].size)))
        .filter(|(e, _)| rc.blob_path(e).is_file())
        .collect();
    let bad = rc.check_blobs(&present);
    for etag in &bad {
        tracing::warn!("cached blob {etag} of {repo} is corrupt; fetching it again");
        let _ = std::fs::remove_file(rc.blob_path(etag));
    }
    let todo: Vec<&String> = sel
        .files
        .iter()
        .filter(|f| !rc.blob_path(tree[*f].etag()).is_file())
        .collect();
    let partial =
        |f: &str| std::fs::metadata(incomplete_path(rc, tree[f].etag())).map_or(0, |m| m.len());
    let total: u64 = todo
        .iter()
        .map(|f| tree[*f].size.saturating_sub(partial(f)))
        .sum();
    progress.start(todo.len(), total);
    // 4. fetch and link
    for f in &sel.files {
        fetch_file(
            &http,
            rc,
            repo,
            &commit,
            f,
            &tree[f],
            progress,
            &mut fetched,
        )?;
    }
    rc.write_ref(&model.revision, &commit)?;
    rc.write_cachedir_tag();
    progress.finish();
    Ok(Resolved {
        dir: rc.snapshot_dir(&commit).join(&model.subfolder),
        commit,
        files: sel.files,
        downloaded: fetched,
    })
}

fn incomplete_path(rc: &RepoCache, etag: &str) -> PathBuf {
    rc.blob_path(&format!("{etag}.incomplete"))
}

/// Makes `snapshots/<commit>/<file>` available: links an intact blob, or downloads it.
#[allow(clippy::too_many_arguments)]
fn fetch_file(
    http: &http::Http,
    rc: &RepoCache,
    repo: &str,
    commit: &str,
    file: &str,
    entry: &TreeEntry,
    progress: &mut dyn DownloadProgress,
    fetched: &mut u64,
) -> Result<PathBuf, HubError> {
    let etag = entry.etag();
    let blob = rc.blob_path(etag);
    if !blob.is_file() {
        let _lock = rc.lock_blob(etag)?;
        // Another process may have finished it while we waited for the lock.
        if !blob.is_file() {
            progress.file(file);
            let meta = http.head(repo, commit, file)?;
            let moved = meta.commit.as_deref().is_some_and(|c| c != commit);
            if meta.etag != etag || meta.size != entry.size || moved {
                return Err(HubError::Protocol {
                    what: format!("{repo}/{file}"),
                    msg: format!(
                        "the file list of commit {commit} says etag {etag} and {} bytes, the file itself etag {} and {} bytes (commit {})",
                        entry.size,
                        meta.etag,
                        meta.size,
                        meta.commit.as_deref().unwrap_or("not given")
                    ),
                });
            }
            *fetched += download_blob(http, rc, file, &meta, progress)?;
            rc.mark_verified(&[etag]);
        }
    }
    rc.link(commit, file, etag)
}

/// Downloads one blob into `blobs/<etag>.incomplete` (resuming what is there), checks its
/// size and hash, and renames it into place. Returns the bytes fetched.
fn download_blob(
    http: &http::Http,
    rc: &RepoCache,
    file: &str,
    meta: &http::FileMeta,
    progress: &mut dyn DownloadProgress,
) -> Result<u64, HubError> {
    const MAX_FAILURES: usize = 6;
    let digest = Digest::of_etag(&meta.etag);
    let part = incomplete_path(rc, &meta.etag);
    let blob = rc.blob_path(&meta.etag);
    let dir = blob.parent().expect("blob has a folder");
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut fetched = 0u64;
    let mut corrupt_once = false;
    let retry_wait = http.retry_wait();
    'whole: loop {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| io(&part, e))?;
        // What a previous run left: hashed again, then continued.
        let mut hasher = Hasher::new(&digest, meta.size);
        let mut have = 0u64;
        {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = out.read(&mut buf).map_err(|e| io(&part, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                have += n as u64;
            }
        }
        if have > meta.size {
            out.set_len(0).map_err(|e| io(&part, e))?;
            continue 'whole;
        }
        let mut failures = 0;
        let mut last_error = String::new();
        while have < meta.size {
            if failures >= MAX_FAILURES {
                return Err(HubError::Retries {
                    file: file.to_string(),
                    attempts: failures,
                    last: last_error,
                });
            }
            if failures > 0 {
                let wait = retry_wait * (1u32 << (failures - 1).min(4));
                tracing::info!("{file}: {last_error}; resuming at byte {have} in {wait:?}");
                std::thread::sleep(wait);
            }
            let body = match http.get_from(&meta.location, have, file) {
                Ok(b) => b,
                Err(e @ (HubError::Network { .. } | HubError::Status { status: 500.., .. })) => {
                    failures += 1;
                    last_error = e.to_string();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let honoured = match body.status {
                206 => body.range_start == Some(have),
                200 => have == 0,
                _ => false,
            };
            if !honoured {
                // The server ignored the range (or answered 416): start the file again.
                tracing::info!("{file}: the hub did not resume at byte {have}; starting again");
                progress.undo(have);
                out.set_len(0).map_err(|e| io(&part, e))?;
                out.seek(std::io::SeekFrom::Start(0))
                    .map_err(|e| io(&part, e))?;
                hasher = Hasher::new(&digest, meta.size);
                have = 0;
                if body.status != 200 {
                    failures += 1;
                    last_error = format!("answer {} to a range request", body.status);
                    continue;
                }
            }
            out.seek(std::io::SeekFrom::Start(have))
                .map_err(|e| io(&part, e))?;
            let mut reader = body.reader;
            let mut buf = vec![0u8; 1 << 16];
            let before = have;
            let end = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => {
                        let n = n.min((meta.size - have) as usize);
                        out.write_all(&buf[..n]).map_err(|e| io(&part, e))?;
                        hasher.update(&buf[..n]);
                        have += n as u64;
                        fetched += n as u64;
                        progress.bytes(n as u64);
                        if have == meta.size {
                            break None;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e.to_string()),
                }
            };
            if have < meta.size {
                last_error = end.unwrap_or_else(|| {
                    format!("the connection closed at byte {have} of {}", meta.size)
                });
                // Progress made: the count of failures in a row starts again.
                failures = if have > before { 1 } else { failures + 1 };
            }
        }
        out.flush().map_err(|e| io(&part, e))?;
        out.sync_all().map_err(|e| io(&part, e))?;
        drop(out);
        let len = std::fs::metadata(&part).map_err(|e| io(&part, e))?.len();
        if len != meta.size {
            return Err(HubError::Size {
                file: file.to_string(),
                expected: meta.size,
                found: len,
            });
        }
        match hasher.check(&digest) {
            Ok(()) => break,
            Err(found) => {
                let _ = std::fs::remove_file(&part);
                progress.undo(meta.size);
                if corrupt_once {
                    return Err(HubError::Checksum {
                        file: file.to_string(),
                        expected: meta.etag.clone(),
                        found,
                    });
                }
                tracing::warn!(
                    "{file}: the download does not match its checksum; fetching it again"
                );
                corrupt_once = true;
            }
        }
    }
    std::fs::rename(&part, &blob).map_err(|e| io(&blob, e))?;
    Ok(fetched)
}
