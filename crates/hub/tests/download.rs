//! The download path against a hub stand-in on loopback (`flipsketch-testhub`, which answers
//! the hub's file API as the real hub does), with faults caused for real: connections cut
//! mid-file, bodies corrupted, ranges ignored, stalled reads, cached files damaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flipsketch_hub::{resolve, DownloadProgress, Fetch, HubConfig, HubError, ModelRef, RepoCache};
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

fn unet_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors")).unwrap()
}

#[test]
fn a_connection_cut_halfway_resumes_without_restarting_the_file() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    let half = unet_bytes().len() / 2;
    hub.fault(UNET, Fault::CutAfter(half));
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let (r, rec) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    assert_eq!(
        content_gets(&hub, UNET),
        vec![None, Some(format!("bytes={half}-"))]
    );
    let total: u64 = r.files.len() as u64;
    assert!(total > 0);
    // every byte was fetched once
    assert_eq!(rec.undone, 0);
    assert_eq!(rec.bytes, rec.starts[0].1);
    assert_eq!(r.downloaded, rec.starts[0].1);
    assert_eq!(
        std::fs::read(r.dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet_bytes()
    );
}

#[test]
fn a_stalled_connection_is_resumed_after_the_read_timeout() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    let third = unet_bytes().len() / 3;
    hub.fault(UNET, Fault::StallAfter(third, Duration::from_secs(20)));
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&hub, cache.path());
    cfg.read_timeout = Duration::from_millis(500);
    let t0 = std::time::Instant::now();
    let (r, _) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(
        content_gets(&hub, UNET),
        vec![None, Some(format!("bytes={third}-"))]
    );
    assert_eq!(
        std::fs::read(r.dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet_bytes()
    );
}

#[test]
fn a_partial_file_from_an_earlier_run_is_continued() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    let part = 100_000;
    hub.fault(UNET, Fault::CutAfter(part));
    for _ in 0..100 {
        hub.fault(UNET, Fault::Status(503));
    }
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let err = get(&cfg, &model("main"), Fetch::CacheFirst)
        .err()
        .expect("the hub keeps failing");
    let msg = err.to_string();
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("in a row"),
        "{msg}"
    );
    let rc = RepoCache::new(cache.path(), REPO);
    let etag = sha256_hex(&unet_bytes());
    let incomplete = rc.blob_path(&format!("{etag}.incomplete"));
    assert_eq!(std::fs::metadata(&incomplete).unwrap().len(), part as u64);
    assert!(
        !rc.blob_path(&etag).exists(),
        "a partial file is never a blob"
    );
    // the next run starts where the last one stopped
    hub.clear_faults();
    hub.clear_seen();
    let (r, rec) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    assert_eq!(
        content_gets(&hub, UNET),
        vec![Some(format!("bytes={part}-"))]
    );
    let unet_total = unet_bytes().len() as u64;
    assert!(rec.starts[0].1 >= unet_total - part as u64);
    assert_eq!(
        std::fs::read(r.dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet_bytes()
    );
    assert!(!incomplete.exists());
}

#[test]
fn a_server_that_ignores_the_range_restarts_the_file() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    let half = unet_bytes().len() / 2;
    hub.fault(UNET, Fault::CutAfter(half));
    hub.fault(UNET, Fault::IgnoreRange);
    let cache = tempfile::tempdir().unwrap();
    let (r, rec) = get(
        &config(&hub, cache.path()),
        &model("main"),
        Fetch::CacheFirst,
    )
    .unwrap();
    // the half received first is counted back, and the whole file came with the 200
    assert_eq!(rec.undone, half as u64);
    assert_eq!(rec.bytes - rec.undone, rec.starts[0].1);
    assert_eq!(
        std::fs::read(r.dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet_bytes()
    );
}

#[test]
fn a_corrupted_download_is_fetched_again_and_never_used() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    hub.fault(UNET, Fault::Corrupt);
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let (r, rec) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    assert_eq!(content_gets(&hub, UNET).len(), 2);
    assert_eq!(rec.undone, unet_bytes().len() as u64);
    assert_eq!(
        std::fs::read(r.dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet_bytes()
    );

    // corrupt twice in a row: an error naming the file, and nothing of it in the cache
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    hub.fault(UNET, Fault::Corrupt);
    hub.fault(UNET, Fault::Corrupt);
    let cache = tempfile::tempdir().unwrap();
    let err = get(
        &config(&hub, cache.path()),
        &model("main"),
        Fetch::CacheFirst,
    )
    .err()
    .expect("corrupt twice");
    assert!(matches!(err, HubError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(UNET), "{err}");
    let rc = RepoCache::new(cache.path(), REPO);
    let etag = sha256_hex(&unet_bytes());
    assert!(!rc.blob_path(&etag).exists());
    assert!(!rc.blob_path(&format!("{etag}.incomplete")).exists());
}

/// Downloads the model into a fresh cache; returns the cache, the config and the result.
fn downloaded(hub: &TestHub) -> (tempfile::TempDir, HubConfig, flipsketch_hub::Resolved) {
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(hub, cache.path());
    let (r, _) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    (cache, cfg, r)
}

fn unet_blob(cache: &Path) -> PathBuf {
    RepoCache::new(cache, REPO).blob_path(&sha256_hex(&unet_bytes()))
}

#[test]
fn a_damaged_cached_file_is_detected_and_fetched_again() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    for damage in ["flip a byte", "truncate"] {
        let (cache, cfg, r) = downloaded(&hub);
        let blob = unet_blob(cache.path());
        let mut bytes = std::fs::read(&blob).unwrap();
        if damage == "truncate" {
            bytes.truncate(bytes.len() - 1000);
        } else {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 1;
        }
        // the mtime moves on, so the blob is checked again
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&blob, &bytes).unwrap();

        // offline: refused, naming the file
        let offline = HubConfig {
            offline: true,
            ..cfg.clone()
        };
        let err = get(&offline, &model("main"), Fetch::CacheFirst)
            .err()
            .expect(damage);
        let msg = err.to_string();
        assert!(
            matches!(err, HubError::OfflineIncomplete { .. }),
            "{damage}: {msg}"
        );
        assert!(
            msg.contains(UNET) && msg.contains("corrupt"),
            "{damage}: {msg}"
        );
        // online: fetched again, intact
        hub.clear_seen();
        let (again, _) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
        assert_eq!(content_gets(&hub, UNET).len(), 1, "{damage}");
        assert_eq!(
            std::fs::read(again.dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
            unet_bytes()
        );
        assert_eq!(again.dir, r.dir);
    }
}

#[test]
fn offline_with_a_complete_cache_works_and_with_a_partial_one_names_what_is_missing() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    let (cache, cfg, r) = downloaded(&hub);
    // no hub at all
    let offline = HubConfig {
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        ..cfg.clone()
    };
    let (o, _) = get(&offline, &model("main"), Fetch::CacheFirst).unwrap();
    assert_eq!(o.dir, r.dir);
    let (o, _) = get(&offline, &model("main"), Fetch::Refresh).unwrap();
    assert_eq!(o.dir, r.dir);
    // a pointer and a blob gone
    let rc = RepoCache::new(cache.path(), REPO);
    std::fs::remove_file(rc.pointer_path(&r.commit, &format!("{SUB}/vae/config.json"))).unwrap();
    std::fs::remove_file(unet_blob(cache.path())).unwrap();
    let err = get(&offline, &model("main"), Fetch::CacheFirst)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(msg.contains(&format!("{SUB}/vae/config.json")), "{msg}");
    assert!(msg.contains("unet/"), "{msg}");
    // an unknown revision offline
    let err = get(&offline, &model("v9"), Fetch::CacheFirst)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("\"v9\""), "{err}");
}

#[test]
fn the_hub_out_of_reach_falls_back_to_a_complete_cache() {
    let hub = TestHub::start();
    hub.push(REPO, &["main"], repo_files());
    let (_cache, cfg, r) = downloaded(&hub);
    let gone = HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        ..cfg
    };
    let (again, _) = get(&gone, &model("main"), Fetch::Refresh).unwrap();
    assert_eq!(again.dir, r.dir);
}

#[test]
fn missing_repository_subfolder_and_files_are_named() {
    let hub = TestHub::start();
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let err = get(&cfg, &model("main"), Fetch::CacheFirst)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(REPO) && err.contains("repository not found"),
        "{err}"
    );

    // a repository without checkpoint-2500/
    let files: Vec<(String, Vec<u8>)> = repo_files()
        .into_iter()
        .map(|(p, b)| (p.replace("checkpoint-2500/", "checkpoint-2000/"), b))
        .collect();
    hub.push(REPO, &["main"], files);
    let err = get(&cfg, &model("main"), Fetch::CacheFirst).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, HubError::NoSubfolder { .. }), "{msg}");
    assert!(
        msg.contains("checkpoint-2500/") && msg.contains("checkpoint-2000/"),
        "{msg}"
    );

    // checkpoint-2500/ without UNet weights and tokenizer merges
    let files: Vec<(String, Vec<u8>)> = repo_files()
        .into_iter()
        .filter(|(p, _)| p != UNET && !p.ends_with("merges.txt"))
        .collect();
    hub.push(REPO, &["main"], files);
    let err = get(&cfg, &model("main"), Fetch::CacheFirst).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, HubError::MissingFiles { .. }), "{msg}");
    assert!(
        msg.contains("weights in unet/") && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
    assert!(
        msg.contains("tokenizer/vocab.json + tokenizer/merges.txt or tokenizer/tokenizer.json"),
        "{msg}"
    );

    // an unknown revision
    let err = get(&cfg, &model("no-such-branch"), Fetch::CacheFirst)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no such revision"), "{err}");
}

#[test]
fn a_revision_pins_a_commit_and_refresh_follows_the_branch() {
    let hub = TestHub::start();
    let first = hub.push(REPO, &["main", "v1"], repo_files());
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let (a, _) = get(&cfg, &model("main"), Fetch::CacheFirst).unwrap();
    assert_eq!(a.commit, first);
    // main moves on: a changed UNet config
    let second = hub.push(
        REPO,
        &["main"],
        repo_files()
            .into_iter()
            .map(|(p, b)| {
                if p.ends_with("unet/config.json") {
                    (p, [b.as_slice(), b"\n"].concat())
                } else {
                    (p, b)
                }
            })
            .collect(),
    );
    assert_ne!(first, second);
    // the cached main is used as long as the cache is trusted ...
    assert_eq!(
        get(&cfg, &model("main"), Fetch::CacheFirst)
            .unwrap()
            .0
            .commit,
        first
    );
    // ... a refresh asks the hub, fetches only the changed file and moves refs/main
    hub.clear_seen();
    let (b, rec) = get(&cfg, &model("main"), Fetch::Refresh).unwrap();
    assert_eq!(b.commit, second);
    assert_eq!(rec.starts[0].0, 1, "only the changed file is fetched");
    let rc = RepoCache::new(cache.path(), REPO);
    assert_eq!(
        std::fs::read_to_string(rc.repo_dir.join("refs/main")).unwrap(),
        second
    );
    // a commit hash or a tag pins the first commit, without writing a ref for the hash
    for rev in [first.as_str(), "v1"] {
        let (p, _) = get(&cfg, &model(rev), Fetch::Refresh).unwrap();
        assert_eq!(p.commit, first, "{rev}");
        assert_eq!(p.dir, rc.snapshot_dir(&first).join(SUB));
    }
    assert!(!rc.repo_dir.join(format!("refs/{first}")).exists());
    assert_eq!(
        std::fs::read_to_string(rc.repo_dir.join("refs/v1")).unwrap(),
        first
    );
}

#[test]
fn listing_pages_variants_shards_and_the_token() {
    let hub = TestHub::start();
    hub.set_page_size(4);
    // the fp16 variant of the current layout: a sharded UNet variant, tokenizer.json only
    let files: Vec<(String, Vec<u8>)> = files_of(&fixtures().join("layouts/current"))
        .into_iter()
        .map(|(p, b)| (format!("{SUB}/{p}"), b))
        .collect();
    hub.push(REPO, &["main"], files);
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&hub, cache.path());
    cfg.token = Some("hf_secret".into());
    let mut m = model("main");
    m.variant = Some("fp16".into());
    let (r, _) = get(&cfg, &m, Fetch::CacheFirst).unwrap();
    let names: Vec<&str> = r
        .files
        .iter()
        .map(|f| f.strip_prefix("checkpoint-2500/").unwrap())
        .collect();
    assert!(
        names.contains(&"unet/diffusion_pytorch_model.safetensors.index.fp16.json"),
        "{names:?}"
    );
    for k in 1..=3 {
        let shard = format!("unet/diffusion_pytorch_model.fp16-0000{k}-of-00003.safetensors");
        assert!(names.contains(&shard.as_str()), "{names:?}");
    }
    assert!(names.contains(&"text_encoder/model.fp16.safetensors"));
    assert!(names.contains(&"tokenizer/tokenizer.json"));
    assert!(
        !names
            .iter()
            .any(|n| *n == "unet/diffusion_pytorch_model.safetensors"),
        "the plain UNet is not fetched"
    );
    // the tree came in pages
    assert!(
        hub.seen()
            .iter()
            .filter(|s| s.target.contains("/tree/"))
            .count()
            > 3
    );
    // the token went to the hub, never to the CDN
    let seen = hub.seen();
    assert!(seen
        .iter()
        .filter(|s| !s.cdn)
        .all(|s| s.authorization.as_deref() == Some("Bearer hf_secret")));
    assert!(seen.iter().any(|s| s.cdn));
    assert!(seen
        .iter()
        .filter(|s| s.cdn)
        .all(|s| s.authorization.is_none()));
}
