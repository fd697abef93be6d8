//! The download path against a hub stand-in on loopback (`flipsketch-testhub`, which answers
//! the hub's file API as the real hub does), with faults caused for real: connections cut
//! mid-file, bodies corrupted, ranges ignored, stalled reads, cached files damaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flipsketch_hub::{resolve, DownloadProgress, Fetch, HubConfig, HubError, ModelRef, RepoCache};
use flipsketch_models::loading::FolderLayout;
use flipsketch_pipeline::components::MODEL_FILES;
use flipsketch_testhub::{git_oid, lfs_pointer, sha256_hex, Fault, TestHub};

const REPO: &str = "Hmrishav/t2v_sketch-lora";
const SUB: &str = "checkpoint-2500";
const UNET: &str = "checkpoint-2500/unet/diffusion_pytorch_model.safetensors";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Every file under `dir`, as (path relative to it, bytes).
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A repository shaped like the real one: the tiny model under checkpoint-2500/, its LoRA
/// pickles (not used, never fetched), another checkpoint and a README.
fn repo_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = files_of(&fixtures().join("tiny"))
        .into_iter()
        .map(|(p, b)| (format!("{SUB}/{p}"), b))
        .collect();
    files.push((format!("{SUB}/lora/2500_unet.pt"), vec![7u8; 300_000]));
    files.push(("checkpoint-500/unet/config.json".into(), b"{}".to_vec()));
    files.push(("README.md".into(), b"# t2v sketch\n".to_vec()));
    files
}

fn model(revision: &str) -> ModelRef {
    ModelRef {
        repo: REPO.into(),
        revision: revision.into(),
        subfolder: SUB.into(),
        variant: None,
    }
}

fn config(hub: &TestHub, cache: &Path) -> HubConfig {
    HubConfig {
        endpoint: hub.endpoint(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        read_timeout: Duration::from_secs(5),
        retry_wait: Duration::from_millis(10),
    }
}

/// Records what the download reported.
#[derive(Default)]
struct Recorded {
    starts: Vec<(usize, u64)>,
    files: Vec<String>,
    bytes: u64,
    undone: u64,
    finished: bool,
}

impl DownloadProgress for Recorded {
    fn start(&mut self, files: usize, bytes: u64) {
        self.starts.push((files, bytes));
    }
    fn file(&mut self, name: &str) {
        self.files.push(name.to_string());
    }
    fn bytes(&mut self, n: u64) {
        self.bytes += n;
    }
    fn undo(&mut self, n: u64) {
        self.undone += n;
    }
    fn finish(&mut self) {
        self.finished = true;
    }
}

fn get(
    cfg: &HubConfig,
    m: &ModelRef,
    fetch: Fetch,
) -> Result<(flipsketch_hub::Resolved, Recorded), HubError> {
    let mut rec = Recorded::default();
    resolve(cfg, m, &MODEL_FILES, fetch, &mut rec).map(|r| (r, rec))
}

/// The repository paths the model needs (what a complete download holds).
fn needed() -> Vec<String> {
    let all: BTreeMap<String, Vec<u8>> = repo_files().into_iter().collect();
    let sel = MODEL_FILES.select(None, |f| all.contains_key(&format!("{SUB}/{f}")));
    assert!(sel.missing.is_empty() && sel.indexes.is_empty());
    let mut v: Vec<String> = sel.files.iter().map(|f| format!("{SUB}/{f}")).collect();
    v.sort();
    v
}

fn content_gets(hub: &TestHub, path: &str) -> Vec<Option<String>> {
    hub.seen()
        .into_iter()
        .filter(|s| {
            s.method == "GET"
                && (s.target.contains(&format!("file={path}")) || s.target.ends_with(path))
        })
        .map(|s| s.range)
        .collect()
}

#[test]
fn fresh_download_lays_out_the_cache_as_huggingface_hub() {
    let hub = TestHub::start();
    let commit = hub.push(REPO, &["main"], repo_files());
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let (r, rec) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    let rc = RepoCache::new(cache.path(), REPO);
    assert_eq!(r.commit, commit);
    assert_eq!(r.dir, rc.snapshot_dir(&commit).join(SUB));
    assert_eq!(r.files, needed());
    // refs/main holds the commit without a newline
    assert_eq!(
        std::fs::read_to_string(rc.repo_dir.join("refs/main")).unwrap(),
        commit
    );
    assert!(cache.path().join("CACHEDIR.TAG").is_file());
    let all: BTreeMap<String, Vec<u8>> = repo_files().into_iter().collect();
    let mut total = 0u64;
    for f in &r.files {
        let bytes = &all[f];
        total += bytes.len() as u64;
        let pointer = rc.pointer_path(&commit, f);
        // a relative symlink into blobs/, named by sha256 (LFS) or the git blob id
        let etag = if f.ends_with(".safetensors") {
            sha256_hex(bytes)
        } else {
            git_oid(bytes)
        };
        let depth = f.split('/').count() + 1;
        let want: PathBuf = std::iter::repeat_n("..", depth)
            .chain(["blobs", etag.as_str()])
            .collect();
        assert_eq!(std::fs::read_link(&pointer).unwrap(), want, "{f}");
        assert_eq!(&std::fs::read(&pointer).unwrap(), bytes, "{f}");
    }
    // the tree listing of the commit, as huggingface_hub caches it
    let tree: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rc.repo_dir.join(format!("trees/{commit}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(tree["format_version"], 1);
    assert_eq!(tree["files"].as_object().unwrap().len(), all.len());
    let unet = &tree["files"][UNET];
    assert_eq!(unet["lfs_sha256"], sha256_hex(&all[UNET]));
    assert_eq!(unet["blob_id"], git_oid(&lfs_pointer(&all[UNET])));
    assert_eq!(
        tree["files"]["README.md"]["blob_id"],
        git_oid(b"# t2v sketch\n")
    );
    // unused files are not fetched, nothing partial is left
    let blobs: Vec<String> = std::fs::read_dir(rc.repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(blobs.len(), r.files.len());
    assert!(blobs.iter().all(|b| !b.ends_with(".incomplete")));
    assert!(!content_gets(&hub, "lora/2500_unet.pt").iter().any(|_| true));
    // progress: one start with the whole size, every byte counted once
    assert_eq!(rec.starts, vec![(r.files.len(), total)]);
    assert_eq!(rec.bytes, total);
    assert_eq!(r.downloaded, total);
    assert_eq!(rec.undone, 0);
    assert!(rec.finished);
    // a second run uses the cache without any request
    hub.clear_seen();
    let (again, rec2) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    assert_eq!(again.dir, r.dir);
    assert_eq!(again.downloaded, 0);
    assert!(rec2.starts.is_empty());
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
}
