//! A disk cache of packed weights, so that loading a model a second time maps the matrices
//! the CPU kernels multiply with instead of reading, converting and packing them again.
//!
//! Packing is most of what loading costs on the CPU: every Linear, Conv2d and temporal
//! convolution weight is read from the checkpoint, converted and re-laid out (in bf16 also
//! rounded) into fresh memory, which the kernel must fault in and zero page by page. A cache
//! file holds the packed matrices of one component in one precision; a later load maps it
//! read-only and the layers use its pages in place (they are the page cache's: nothing is
//! copied, zeroed or converted, and the kernel may drop and re-read them under memory
//! pressure).
//!
//! - **Where:** `FLIPSKETCH_WEIGHT_CACHE` names the folder (`off` turns the cache off);
//!   unset, `$XDG_CACHE_HOME/flipsketch/packed-weights` or `~/.cache/flipsketch/packed-weights`.
//! - **Validity:** a file's name and its header carry a SHA-256 key over the component, the
//!   precision, the kernels' packed layout and ISA, and each weight file's canonical path,
//!   size and modification time; anything else (a changed checkpoint, another precision,
//!   another build's layout) misses and packs afresh. A file that is short, unreadable or
//!   for another key is ignored and replaced.
//! - **Writing** happens after a load that packed anything itself, on a background thread
//!   (the model is usable at once), into a temporary file that is synced and then renamed:
//!   a reader never sees a partial file. [`wait_for_writes`] lets a short-lived process
//!   finish them before it exits; a failure (disk full, read-only folder) is logged and
//!   costs nothing but the next load's speed.
//! - **Size:** after each write the least recently used files go until the folder holds at
//!   most `FLIPSKETCH_WEIGHT_CACHE_MAX_GB` (default 20) gigabytes; the file just written stays.
//!
//! File layout: 8 bytes of magic, a little-endian u64 header length, the JSON header
//! ([`Header`]), then each matrix's `u32` slots (native little-endian) at an offset that is a
//! multiple of 4096.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flipsketch_kernels::{PackedCols, PackedRows, Precision, Slots};
use sha2::{Digest, Sha256};

use crate::loading::WeightStore;

const MAGIC: &[u8; 8] = b"FSPACK\0\x01";
const ALIGN: u64 = 4096;
const EXTENSION: &str = "fspack";
const DEFAULT_MAX_GB: f64 = 20.0;

/// The cache folder the environment asks for (module docs), `None` when it is off.
pub fn default_root() -> Option<PathBuf> {
    match std::env::var_os("FLIPSKETCH_WEIGHT_CACHE") {
        Some(v) => {
            let s = v.to_string_lossy();
            if matches!(
                s.trim().to_ascii_lowercase().as_str(),
                "off" | "0" | "none" | ""
            ) {
                None
            } else {
                Some(PathBuf::from(v))
            }
        }
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|v| !v.is_empty())
                        .map(|h| PathBuf::from(h).join(".cache"))
                })?;
            Some(base.join("flipsketch").join("packed-weights"))
        }
    }
}

/// How a component's packed weights were obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// No cache: turned off, or nothing of this component is packed (GPU, candle ops).
    Off,
    /// Every packed weight came from this file.
    Hit(PathBuf),
    /// The weights were packed here; this file is being written for the next load.
    Writing(PathBuf),
}

impl std::fmt::Display for CacheUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheUse::Off => write!(f, "not cached"),
            CacheUse::Hit(p) => write!(f, "mapped from {}", p.display()),
            CacheUse::Writing(p) => write!(f, "packed, being cached in {}", p.display()),
        }
    }
}

/// The JSON header of a cache file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    key: String,
    component: String,
    entries: Vec<Entry>,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Entry {
    /// The checkpoint tensor's name.
    name: String,
    /// How it was packed: "cols" (Linear), "rows" (Conv2d), "taps" (Conv2d packed for the
    /// direct convolution), "winograd" (Conv2d packed for the Winograd convolution),
    /// "frames-winograd" (temporal convolution, packed for Winograd over the frames).
    tag: String,
    /// Rows (or columns) and depth of the packed matrix.
    m: usize,
    k: usize,
    /// Byte offset of the slots in the file, and their number.
    offset: u64,
    slots: u64,
}

#[derive(Clone)]
enum Packed {
    Rows(Arc<PackedRows>),
    Cols(Arc<PackedCols>),
}

impl Packed {
    fn slots(&self) -> &[u32] {
        match self {
            Packed::Rows(p) => p.slots(),
            Packed::Cols(p) => p.slots(),
        }
    }
}

struct Mapped {
    map: Arc<memmap2::Mmap>,
    entries: HashMap<(String, String), Entry>,
}

#[derive(Default)]
struct State {
    /// Every packed matrix of the load, in order: what a new file holds.
    items: Vec<(String, String, usize, usize, Packed)>,
    hits: usize,
    misses: usize,
}

/// One component's packed weights in one precision: those found in its cache file, and
/// those packed during this load.
pub struct PackCache {
    store: Arc<WeightStore>,
    precision: Precision,
    key: String,
    path: PathBuf,
    mapped: Option<Mapped>,
    state: Mutex<State>,
}

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    }
}

/// The key of `component`'s weights `files` packed in `precision` (module docs).
fn cache_key(component: &str, files: &[PathBuf], precision: Precision) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut line = |s: &str| {
        h.update(s.as_bytes());
        h.update(b"\n");
    };
    line("flipsketch packed weights 1");
    line(component);
    line(precision_name(precision));
    line(&flipsketch_kernels::pack_layout());
    line(&format!("{:?}", flipsketch_kernels::isa()));
    line(if cfg!(target_endian = "little") {
        "le"
    } else {
        "be"
    });
    for f in files {
        let path = f.canonicalize()?;
        let meta = std::fs::metadata(&path)?;
        let mtime = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        line(&format!("{} {} {}", path.display(), meta.len(), mtime));
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads and maps the cache file at `path` when it is one for `key` and whole.
fn open_mapped(path: &Path, key: &str) -> Result<Mapped, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; 16];
    file.read_exact(&mut head)
        .map_err(|e| format!("header: {e}"))?;
    if &head[..8] != MAGIC {
        return Err("not a packed-weight file of this version".into());
    }
    let hlen = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if hlen > len.saturating_sub(16) || hlen > 256 << 20 {
        return Err(format!(
            "header length {hlen} does not fit a {len}-byte file"
        ));
    }
    let mut json = vec![0u8; hlen as usize];
    file.read_exact(&mut json)
        .map_err(|e| format!("header: {e}"))?;
    let header: Header = serde_json::from_slice(&json).map_err(|e| format!("header: {e}"))?;
    if header.key != key {
        return Err("written for other weights".into());
    }
    for e in &header.entries {
        let end = e.slots.checked_mul(4).and_then(|b| b.checked_add(e.offset));
        if e.offset % ALIGN != 0 || end.is_none_or(|end| end > len) {
            return Err(format!(
                "{}: slots beyond the end of the file (short file)",
                e.name
            ));
        }
    }
    // SAFETY: the mapping is read-only, and files in the cache are only ever replaced by
    // renaming a new file over them, never modified in place; like any mmap-based loader we
    // assume nobody else truncates them while they are mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    #[cfg(unix)]
    {
        // Start reading what is not in the page cache yet; pages are mapped as they are used.
        let _ = map.advise(memmap2::Advice::WillNeed);
    }
    let entries = header
        .entries
        .into_iter()
        .map(|e| ((e.name.clone(), e.tag.clone()), e))
        .collect();
    Ok(Mapped {
        map: Arc::new(map),
        entries,
    })
}

impl PackCache {
    /// The cache of `store`'s component for weights packed in `precision`, in folder `root`:
    /// its file mapped when there is a valid one. `None` when the key cannot be made (a weight
    /// file's metadata unreadable), which only turns the cache off for this load.
    pub fn open(root: &Path, store: &Arc<WeightStore>, precision: Precision) -> Option<Self> {
        let component = store.component();
        let key = match cache_key(component, store.files(), precision) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("{component}: packed-weight cache off for this load: {e}");
                return None;
            }
        };
        let path = root.join(format!(
            "{component}-{}-{}.{EXTENSION}",
            precision_name(precision),
            &key[..16]
        ));
        let mapped = if path.exists() {
            match open_mapped(&path, &key) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(
                        "{component}: ignoring the packed-weight cache {}: {e}",
                        path.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        Some(Self {
            store: store.clone(),
            precision,
            key,
            path,
            mapped,
            state: Mutex::new(State::default()),
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The slots of `name` packed as `tag` (`m` x `k`) in the file, when it has them and the
    /// checkpoint holds `name` with `shape` (else the caller loads it, and the loader reports
    /// what is wrong).
    fn find(&self, name: &str, shape: &[usize], tag: &str, m: usize, k: usize) -> Option<Slots> {
        let mapped = self.mapped.as_ref()?;
        let e = mapped.entries.get(&(name.to_string(), tag.to_string()))?;
        if (e.m, e.k) != (m, k) || !self.store.claim(name, shape) {
            return None;
        }
        let bytes = &mapped.map[e.offset as usize..][..e.slots as usize * 4];
        // SAFETY: the offset is a multiple of 4096 inside a page-aligned mapping (so the
        // pointer is aligned for u32), the range was checked against the file's length at
        // open, and the mapping is read-only and lives as long as the Arc held by the Slots.
        Some(unsafe {
            Slots::borrowed(
                mapped.map.clone(),
                bytes.as_ptr() as *const u32,
                e.slots as usize,
            )
        })
    }

    fn note(&self, name: &str, tag: &str, m: usize, k: usize, p: Packed, hit: bool) {
        let mut st = self.state.lock().expect("pack cache lock");
        if hit {
            st.hits += 1;
        } else {
            st.misses += 1;
        }
        st.items.push((name.to_string(), tag.to_string(), m, k, p));
    }

    /// `name` (`shape` in the checkpoint) packed as rows (`m` x `k`) under `tag`, from the file.
    pub fn rows(
        &self,
        name: &str,
        shape: &[usize],
        tag: &str,
        m: usize,
        k: usize,
    ) -> Option<Arc<PackedRows>> {
        self.rows_with(name, shape, tag, m, k, |prec, slots| {
            PackedRows::from_slots(prec, m, k, slots)
        })
    }

    /// [`Self::rows`] for rows in another layout, rebuilt from their slots by `make`.
    pub fn rows_with(
        &self,
        name: &str,
        shape: &[usize],
        tag: &str,
        m: usize,
        k: usize,
        make: impl FnOnce(Precision, Slots) -> Result<PackedRows, String>,
    ) -> Option<Arc<PackedRows>> {
        let slots = self.find(name, shape, tag, m, k)?;
        let p = Arc::new(make(self.precision, slots).ok()?);
        self.note(name, tag, m, k, Packed::Rows(p.clone()), true);
        Some(p)
    }

    /// `name` packed as the columns of `W^T` (`W` is `n` x `k`) under `tag`, from the file.
    pub fn cols(
        &self,
        name: &str,
        shape: &[usize],
        tag: &str,
        n: usize,
        k: usize,
    ) -> Option<Arc<PackedCols>> {
        let slots = self.find(name, shape, tag, n, k)?;
        let p = Arc::new(PackedCols::from_slots(self.precision, n, k, slots).ok()?);
        self.note(name, tag, n, k, Packed::Cols(p.clone()), true);
        Some(p)
    }

    /// Records rows packed during this load, for the next file.
    pub fn put_rows(&self, name: &str, tag: &str, p: &Arc<PackedRows>) {
        self.note(
            name,
            tag,
            p.rows(),
            p.depth(),
            Packed::Rows(p.clone()),
            false,
        );
    }

    /// Records columns packed during this load, for the next file.
    pub fn put_cols(&self, name: &str, tag: &str, p: &Arc<PackedCols>) {
        self.note(
            name,
            tag,
            p.cols(),
            p.depth(),
            Packed::Cols(p.clone()),
            false,
        );
    }

    /// After the model is built: what the load did, and when it packed anything itself, a
    /// background write of a new file holding every packed matrix (see [`wait_for_writes`]).
    pub fn finish(&self) -> CacheUse {
        let mut st = self.state.lock().expect("pack cache lock");
        if st.items.is_empty() {
            return CacheUse::Off;
        }
        if st.misses == 0 {
            // Most recently used first in the eviction order.
            let _ = std::fs::File::options()
                .append(true)
                .open(&self.path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return CacheUse::Hit(self.path.clone());
        }
        let items = std::mem::take(&mut st.items);
        let job = WriteJob {
            path: self.path.clone(),
            header: Header {
                key: self.key.clone(),
                component: self.store.component().to_string(),
                entries: Vec::new(),
            },
            items,
        };
        let handle = std::thread::Builder::new()
            .name(format!("pack-cache-{}", self.store.component()))
            .spawn(move || job.run());
        match handle {
            Ok(h) => {
                PENDING.lock().expect("pending cache writes").push(h);
                CacheUse::Writing(self.path.clone())
            }
            Err(e) => {
                tracing::warn!("cannot start writing the packed-weight cache: {e}");
                CacheUse::Off
            }
        }
    }
}

static PENDING: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits until every cache file being written has been written (or has failed, which is
/// logged). A process that exits right after loading calls this so the next load finds them.
pub fn wait_for_writes() {
    let handles = std::mem::take(&mut *PENDING.lock().expect("pending cache writes"));
    for h in handles {
        let _ = h.join();
    }
}

struct WriteJob {
    path: PathBuf,
    header: Header,
    items: Vec<(String, String, usize, usize, Packed)>,
}

impl WriteJob {
    fn run(mut self) {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        // Unique per writer: two loads of one model in a process may write at the same time.
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.{}-{}.tmp",
            self.path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id(),
            WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let t0 = std::time::Instant::now();
        match self.write(&dir, &tmp) {
            Ok(bytes) => {
                tracing::info!(
                    "packed weights cached in {} ({:.0} MiB, {:.1} s)",
                    self.path.display(),
                    bytes as f64 / (1u64 << 20) as f64,
                    t0.elapsed().as_secs_f64()
                );
                evict(&dir, &self.path, max_bytes());
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(
                    "could not cache the packed weights in {}: {e} (the next load packs them again)",
                    self.path.display()
                );
            }
        }
    }

    fn write(&mut self, dir: &Path, tmp: &Path) -> std::io::Result<u64> {
        std::fs::create_dir_all(dir)?;
        remove_stale_temporaries(dir);
        // Offsets: the header's length depends on them, so lay out with room to spare.
        let mut entries = Vec::with_capacity(self.items.len());
        for (name, tag, m, k, p) in &self.items {
            entries.push(Entry {
                name: name.clone(),
                tag: tag.clone(),
                m: *m,
                k: *k,
                offset: 0,
                slots: p.slots().len() as u64,
            });
        }
        self.header.entries = entries;
        let guess = serde_json::to_vec(&self.header)?.len() as u64 + 16;
        // Each offset has at most 20 digits where the guess wrote one.
        let mut offset = (guess + 20 * self.items.len() as u64).div_ceil(ALIGN) * ALIGN;
        for e in &mut self.header.entries {
            e.offset = offset;
            offset = (offset + e.slots * 4).div_ceil(ALIGN) * ALIGN;
        }
        let json = serde_json::to_vec(&self.header)?;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(tmp)?);
        f.write_all(MAGIC)?;
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        let mut pos = 16 + json.len() as u64;
        let zeros = vec![0u8; ALIGN as usize];
        for (e, (_, _, _, _, p)) in self.header.entries.iter().zip(&self.items) {
            if pos > e.offset {
                return Err(std::io::Error::other("header larger than laid out"));
            }
            let mut gap = e.offset - pos;
            while gap > 0 {
                let n = gap.min(ALIGN);
                f.write_all(&zeros[..n as usize])?;
                gap -= n;
            }
            let slots = p.slots();
            // SAFETY: a u32 slice viewed as its bytes (native order, little-endian per the key).
            let bytes =
                unsafe { std::slice::from_raw_parts(slots.as_ptr() as *const u8, slots.len() * 4) };
            f.write_all(bytes)?;
            pos = e.offset + bytes.len() as u64;
        }
        let file = f.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(tmp, &self.path)?;
        Ok(pos)
    }
}

fn max_bytes() -> u64 {
    let gb = std::env::var("FLIPSKETCH_WEIGHT_CACHE_MAX_GB")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|g| g.is_finite() && *g >= 0.0)
        .unwrap_or(DEFAULT_MAX_GB);
    (gb * 1e9) as u64
}

/// Temporary files of writers that are gone (their process no longer runs, or a day old).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    for e in list.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_suffix(".tmp").filter(|_| name.starts_with('.')) else {
            continue;
        };
        // `.<file>.<pid>-<n>.tmp`
        let pid = rest
            .rsplit('.')
            .next()
            .and_then(|p| p.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 86_400);
        let dead = pid.is_some_and(|p| {
            p != std::process::id()
                && cfg!(target_os = "linux")
                && !Path::new(&format!("/proc/{p}")).exists()
        });
        if dead || old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes the least recently used cache files until the folder holds at most `max` bytes,
/// never `keep`.
fn evict(dir: &Path, keep: &Path, max: u64) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = list
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == EXTENSION))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(
                "packed-weight cache: removed {} (least recently used)",
                path.display()
            );
            total -= len;
        }
    }
}
