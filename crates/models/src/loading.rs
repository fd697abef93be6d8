//! Weight loading: safetensors (single file or sharded with an index, memory-mapped) and PyTorch
//! zip pickles, any of f32/f16/bf16 on disk, converted to the compute dtype.
//!
//! A [`WeightStore`] backs a candle `VarBuilder`. It never fails on the first bad tensor: a
//! missing tensor or a wrong shape is recorded and a cheap placeholder returned, so that a
//! single [`WeightStore::finish`] after building the model reports *every* problem by name.
//! Tensors in the files that the model never asked for are counted as unexpected (diffusers
//! and transformers ignore them with a warning; so do we).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::compute::ComputePlan;
pub use crate::compute::Vb;
use crate::packcache::{CacheUse, PackCache};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The weight file names one library writes for a model folder (diffusers models, transformers
/// models), single-file or sharded (`*.index.json`), safetensors or PyTorch pickle, with or
/// without a variant (`diffusion_pytorch_model.fp16.safetensors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightNames {
    pub safetensors: &'static str,
    pub pickle: &'static str,
}

/// diffusers' `ModelMixin.save_pretrained` names.
pub const DIFFUSERS_WEIGHTS: WeightNames = WeightNames {
    safetensors: "diffusion_pytorch_model.safetensors",
    pickle: "diffusion_pytorch_model.bin",
};
/// transformers' `PreTrainedModel.save_pretrained` names.
pub const TRANSFORMERS_WEIGHTS: WeightNames = WeightNames {
    safetensors: "model.safetensors",
    pickle: "pytorch_model.bin",
};

/// Variants tried when none is asked for and a folder holds no plain weight file.
pub const FALLBACK_VARIANTS: &[&str] = &["fp16", "bf16"];

/// diffusers/transformers `_add_variant`: the variant goes before the last dot-separated part
/// (`model.safetensors` -> `model.fp16.safetensors`, `model.safetensors.index.json` ->
/// `model.safetensors.index.fp16.json`).
pub fn add_variant(name: &str, variant: Option<&str>) -> String {
    match (variant, name.rsplit_once('.')) {
        (Some(v), Some((head, ext))) => format!("{head}.{v}.{ext}"),
        _ => name.to_string(),
    }
}

impl WeightNames {
    /// The file names a folder may hold for `variant`, most preferred first: safetensors before
    /// pickles, a single file before a shard index, and the variant's files before the plain
    /// ones (a component without variant files loads its plain files, as diffusers' pipeline
    /// loader does). Without a variant the plain files come first, then those of
    /// [`FALLBACK_VARIANTS`], so a folder that only has `*.fp16.safetensors` still loads.
    pub fn candidates(&self, variant: Option<&str>) -> Vec<String> {
        let of = |v: Option<&str>| {
            [self.safetensors, self.pickle]
                .into_iter()
                .flat_map(move |base| {
                    [
                        add_variant(base, v),
                        add_variant(&format!("{base}.index.json"), v),
                    ]
                })
                .collect::<Vec<_>>()
        };
        let mut out = Vec::new();
        match variant {
            Some(v) => {
                out.extend(of(Some(v)));
                out.extend(of(None));
            }
            None => {
                out.extend(of(None));
                for v in FALLBACK_VARIANTS {
                    out.extend(of(Some(v)));
                }
            }
        }
        out
    }

    /// The first of [`Self::candidates`] for which `exists` says yes.
    pub fn pick(&self, variant: Option<&str>, exists: impl Fn(&str) -> bool) -> Option<String> {
        self.candidates(variant).into_iter().find(|c| exists(c))
    }
}

/// Resolves the weight files of a component folder: the first candidate that exists, expanded
/// through its `*.index.json` when sharded.
pub fn find_weight_files<S: AsRef<str>>(dir: &Path, candidates: &[S]) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "folder not found"),
        });
    }
    for name in candidates {
        let name = name.as_ref();
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if name.ends_with(".json") {
            return shard_files(&path);
        }
        return Ok(vec![path]);
    }
    Err(Error::NoWeights {
        dir: dir.to_path_buf(),
        candidates: candidates.iter().map(|s| s.as_ref().to_string()).collect(),
    })
}

/// The shard file names a `*.index.json` lists (its `weight_map` values), sorted, each once.
pub fn shard_names(index_json: &str) -> std::result::Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: Index =
        serde_json::from_str(index_json).map_err(|e| format!("not a valid shard index: {e}"))?;
    let mut names: Vec<String> = parsed.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    if let Some(bad) = names
        .iter()
        .find(|f| f.contains('/') || f.contains('\\') || f.contains(".."))
    {
        return Err(format!("shard name {bad:?} is not a plain file name"));
    }
    if names.is_empty() {
        return Err("empty weight_map".into());
    }
    Ok(names)
}

/// The shard files named by a `*.index.json`, which must all exist.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = read_to_string(index)?;
    let bad = |msg: String| Error::BadFile {
        path: index.to_path_buf(),
        msg,
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for name in shard_names(&text).map_err(bad)? {
        let path = dir.join(&name);
        if !path.is_file() {
            return Err(bad(format!("shard {} is missing", path.display())));
        }
        files.push(path);
    }
    Ok(files)
}

pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and parses a JSON config file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

enum Source {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pickle(candle_core::pickle::PthTensors),
}

#[derive(Clone, Debug)]
struct Entry {
    source: usize,
    shape: Vec<usize>,
    dtype: DType,
}

#[derive(Default)]
struct Tracking {
    used: HashSet<String>,
    missing: Vec<(String, Vec<usize>)>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Read failures after the header was fine (e.g. a truncated pickle): (name, message).
    unreadable: Vec<(String, String)>,
}

/// The tensors of one component's weight files.
pub struct WeightStore {
    component: String,
    files: Vec<PathBuf>,
    sources: Vec<Source>,
    index: HashMap<String, Entry>,
    tracking: Mutex<Tracking>,
}

/// What a successful load found.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub component: String,
    pub files: Vec<PathBuf>,
    /// Element count per dtype on disk, over the tensors the model uses.
    pub dtypes_on_disk: BTreeMap<String, usize>,
    /// Number of scalar parameters the model uses.
    pub parameters: usize,
    /// Tensors in the files the model does not use (sorted).
    pub unexpected: Vec<String>,
    /// Where the packed weights came from.
    pub cache: CacheUse,
}

impl WeightStore {
    /// Opens (memory-maps or indexes) every file and reads their headers.
    pub fn open(component: &str, files: &[PathBuf]) -> Result<Arc<Self>> {
        let mut sources = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let is_pickle = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("bin") | Some("pt") | Some("pth") | Some("ckpt")
            );
            if is_pickle {
                let mut pth = candle_core::pickle::PthTensors::new(path, None)
                    .map_err(|e| bad_file(path, "not a readable PyTorch pickle", e))?;
                if pth.tensor_infos().is_empty() {
                    // Some checkpoints wrap the weights as {"state_dict": {...}}.
                    if let Ok(inner) =
                        candle_core::pickle::PthTensors::new(path, Some("state_dict"))
                    {
                        pth = inner;
                    }
                }
                for (name, info) in pth.tensor_infos() {
                    index.insert(
                        name.clone(),
                        Entry {
                            source: i,
                            shape: info.layout.dims().to_vec(),
                            dtype: info.dtype,
                        },
                    );
                }
                sources.push(Source::Pickle(pth));
            } else {
                // SAFETY: the mapping is read-only; like every mmap-based loader we assume the
                // file is not modified while it is mapped.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                    .map_err(|e| bad_file(path, "not a readable safetensors file", e))?;
                for (name, view) in st.tensors() {
                    let dtype = DType::try_from(view.dtype()).map_err(|e| Error::BadFile {
                        path: path.clone(),
                        msg: format!("tensor {name}: unsupported dtype: {e}"),
                    })?;
                    index.insert(
                        name,
                        Entry {
                            source: i,
                            shape: view.shape().to_vec(),
                            dtype,
                        },
                    );
                }
                sources.push(Source::Safetensors(st));
            }
        }
        Ok(Arc::new(Self {
            component: component.to_string(),
            files: files.to_vec(),
            sources,
            index,
            tracking: Mutex::new(Tracking::default()),
        }))
    }

    /// Opens the weights of a component folder (see [`find_weight_files`]).
    pub fn open_dir<S: AsRef<str>>(
        component: &str,
        dir: &Path,
        candidates: &[S],
    ) -> Result<Arc<Self>> {
        let files = find_weight_files(dir, candidates)?;
        Self::open(component, &files)
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn component(&self) -> &str {
        &self.component
    }

    /// Marks `name` as used without reading it (its packed form comes from elsewhere) when
    /// the files hold it with `shape`; returns whether they do. Nothing is recorded when they
    /// do not: the caller then loads it the usual way, which reports the problem.
    pub fn claim(&self, name: &str, shape: &[usize]) -> bool {
        match self.index.get(name) {
            Some(e) if e.shape == shape => {
                let mut tr = self.tracking.lock().expect("weight tracking lock");
                tr.used.insert(name.to_string());
                true
            }
            _ => false,
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The builder of a model reading from this store for `plan`, tensors converted to
    /// `plan.dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, plan: ComputePlan, device: &Device) -> Vb {
        let backend: Box<dyn SimpleBackend> = Box::new(Tracked(self.clone()));
        Vb::new(
            VarBuilder::from_backend(backend, plan.dtype, device.clone()),
            plan,
        )
    }

    /// [`Self::var_builder`] whose packed weights go through the cache in folder `root`
    /// (see [`crate::packcache`]), when the plan packs any.
    pub fn cached_var_builder(
        self: &Arc<Self>,
        plan: ComputePlan,
        device: &Device,
        root: Option<&Path>,
    ) -> Vb {
        let vb = self.var_builder(plan, device);
        match (root, plan.matmul.kernels()) {
            (Some(root), Some(prec)) => match PackCache::open(root, self, prec) {
                Some(cache) => vb.with_pack_cache(Arc::new(cache)),
                None => vb,
            },
            _ => vb,
        }
    }

    /// Loads one tensor as stored (no shape check, no tracking).
    pub fn load_raw(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(entry) = self.index.get(name) else {
            return Ok(None);
        };
        let path = &self.files[entry.source];
        let t = match &self.sources[entry.source] {
            Source::Safetensors(st) => st.get(name).and_then(|view| {
                use candle_core::safetensors::Load;
                let t = view.load(device)?;
                // The values are copied out: let the kernel drop the mapped pages, so that a
                // whole checkpoint never sits in memory next to the loaded model.
                release_pages(view.data());
                Ok(t)
            }),
            Source::Pickle(p) => p
                .get(name)
                .map(|t| t.expect("indexed"))
                .and_then(|t| t.to_device(device)),
        };
        t.map(Some)
            .map_err(|e| bad_file(path, &format!("tensor {name} cannot be read"), e))
    }

    fn get_checked(
        &self,
        shape: &Shape,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut tr = self.tracking.lock().expect("weight tracking lock");
        let placeholder = || Tensor::zeros((), dtype, dev)?.broadcast_as(shape.clone());
        let Some(entry) = self.index.get(name) else {
            tr.missing.push((name.to_string(), shape.dims().to_vec()));
            return placeholder();
        };
        tr.used.insert(name.to_string());
        if entry.shape != shape.dims() {
            tr.mismatched
                .push((name.to_string(), shape.dims().to_vec(), entry.shape.clone()));
            return placeholder();
        }
        drop(tr);
        match self.load_raw(name, dev) {
            Ok(Some(t)) => t.to_dtype(dtype),
            Ok(None) => unreachable!("indexed tensor"),
            Err(e) => {
                let mut tr = self.tracking.lock().expect("weight tracking lock");
                tr.unreadable.push((name.to_string(), e.to_string()));
                placeholder()
            }
        }
    }

    /// Checks that every tensor the model asked for was present with the right shape, and
    /// reports what the files hold beyond that.
    pub fn finish(&self) -> Result<LoadReport> {
        let tr = self.tracking.lock().expect("weight tracking lock");
        if let Some((name, msg)) = tr.unreadable.first() {
            return Err(Error::BadFile {
                path: self.files.first().cloned().unwrap_or_default(),
                msg: format!(
                    "{} tensor(s) unreadable, first {name}: {msg}",
                    tr.unreadable.len()
                ),
            });
        }
        if !tr.missing.is_empty() || !tr.mismatched.is_empty() {
            return Err(Error::Weights {
                component: self.component.clone(),
                files: self.files.clone(),
                missing: tr.missing.clone(),
                mismatched: tr.mismatched.clone(),
            });
        }
        let mut dtypes_on_disk = BTreeMap::new();
        let mut parameters = 0;
        for name in &tr.used {
            let e = &self.index[name];
            let n: usize = e.shape.iter().product();
            parameters += n;
            *dtypes_on_disk
                .entry(format!("{:?}", e.dtype).to_lowercase())
                .or_insert(0) += n;
        }
        let mut unexpected: Vec<String> = self
            .index
            .keys()
            .filter(|k| !tr.used.contains(*k))
            .cloned()
            .collect();
        unexpected.sort();
        if !unexpected.is_empty() {
            tracing::warn!(
                "{}: {} unexpected tensor(s) ignored, e.g. {}",
                self.component,
                unexpected.len(),
                unexpected[0]
            );
        }
        Ok(LoadReport {
            component: self.component.clone(),
            files: self.files.clone(),
            dtypes_on_disk,
            parameters,
            unexpected,
            cache: CacheUse::Off,
        })
    }
}

fn bad_file(path: &Path, what: &str, e: candle_core::Error) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        msg: format!("{what}: {e}"),
    }
}

struct Tracked(Arc<WeightStore>);

impl SimpleBackend for Tracked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get_checked(&s, name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let store = &self.0;
        match store.load_raw(name, dev) {
            Ok(Some(t)) => {
                store
                    .tracking
                    .lock()
                    .expect("weight tracking lock")
                    .used
                    .insert(name.to_string());
                t.to_dtype(dtype)
            }
            Ok(None) => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
            Err(e) => Err(candle_core::Error::Msg(e.to_string())),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.index.contains_key(name)
    }
}

/// Tells the kernel that the mapped file pages under `bytes` are not needed any more (they
/// are read again from the file if touched). Partial pages at both ends are kept.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let start = (bytes.as_ptr() as usize).div_ceil(PAGE) * PAGE;
        let end = (bytes.as_ptr() as usize + bytes.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside a read-only file mapping that stays mapped;
            // MADV_DONTNEED on it only drops pages that the kernel can read back from the file.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// The weights under `prefix` when the files use it, else at the root: transformers 4 writes a
/// `CLIPTextModel` as `text_model.embeddings...` and transformers 5 as `embeddings...` (a
/// `CLIPVisionModel` likewise with `vision_model.`). The layout is decided once, from which
/// of the `probes` (tensor names below the prefix) exist; when neither layout has any, the
/// prefixed one is used, so that a missing tensor is named as transformers 4 names it.
pub fn optional_prefix(vb: &Vb, prefix: &str, probes: &[&str]) -> Vb {
    let prefixed = vb.pp(prefix);
    let any = |v: &Vb| probes.iter().any(|p| v.contains_tensor(p));
    if !any(&prefixed) && any(vb) {
        vb.clone()
    } else {
        prefixed
    }
}

/// Builds a model from a component folder and checks its weights in one go, packed weights
/// through the cache the environment names ([`crate::packcache::default_root`]).
///
/// `dtype` is the requested compute dtype; how it runs on `device` (which ops take the CPU
/// kernels, in which precision) is [`ComputePlan::current`]'s.
pub fn load_component<M, S: AsRef<str>>(
    component: &str,
    dir: &Path,
    candidates: &[S],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(Vb) -> candle_core::Result<M>,
) -> Result<(M, LoadReport)> {
    let root = crate::packcache::default_root();
    load_component_cached(
        component,
        dir,
        candidates,
        dtype,
        device,
        root.as_deref(),
        build,
    )
}

/// [`load_component`] with the packed-weight cache in `cache_root` (`None`: no cache).
pub fn load_component_cached<M, S: AsRef<str>>(
    component: &str,
    dir: &Path,
    candidates: &[S],
    dtype: DType,
    device: &Device,
    cache_root: Option<&Path>,
    build: impl FnOnce(Vb) -> candle_core::Result<M>,
) -> Result<(M, LoadReport)> {
    let plan = ComputePlan::current(dtype, device).map_err(Error::Invalid)?;
    let store = WeightStore::open_dir(component, dir, candidates)?;
    let vb = store.cached_var_builder(plan, device, cache_root);
    let cache = vb.pack_cache().cloned();
    let model = build(vb)?;
    let mut report = store.finish()?;
    if let Some(cache) = cache {
        report.cache = cache.finish();
    }
    Ok((model, report))
}

/// The files a model folder consists of, relative to its root: what a download fetches and a
/// cached copy must hold.
#[derive(Clone, Copy, Debug)]
pub struct FolderLayout {
    /// Files every such folder has.
    pub required: &'static [&'static str],
    /// Files taken when present.
    pub optional: &'static [&'static str],
    /// Groups of alternatives: per group, the first alternative whose files all exist is
    /// taken (a tokenizer as `vocab.json` + `merges.txt`, or as `tokenizer.json`).
    pub one_of: &'static [&'static [&'static [&'static str]]],
    /// Component folders ("" for the root) and the weight files their library writes.
    pub weights: &'static [(&'static str, WeightNames)],
    /// A file whose presence marks a folder of this kind.
    pub marker: &'static str,
}

/// What [`FolderLayout::select`] found in a listing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// Files to use (shard indexes included; their shards are not, see `indexes`).
    pub files: Vec<String>,
    /// The picked `*.index.json` files, whose shards ([`shard_names`], relative to the index's
    /// folder) belong to the selection too.
    pub indexes: Vec<String>,
    /// What is missing, one description per problem (file names, or the weight file names
    /// looked for in a component folder).
    pub missing: Vec<String>,
}

/// `dir/file`, or `file` when `dir` is empty.
pub fn join_folder(dir: &str, file: &str) -> String {
    if dir.is_empty() {
        file.to_string()
    } else {
        format!("{dir}/{file}")
    }
}

impl FolderLayout {
    /// Picks this layout's files among those `exists` knows (paths relative to the folder),
    /// weights by [`WeightNames::pick`] for `variant`.
    pub fn select(&self, variant: Option<&str>, exists: impl Fn(&str) -> bool) -> Selection {
        let mut s = Selection::default();
        for f in self.required {
            if exists(f) {
                s.files.push(f.to_string());
            } else {
                s.missing.push(f.to_string());
            }
        }
        s.files.extend(
            self.optional
                .iter()
                .filter(|f| exists(f))
                .map(|f| f.to_string()),
        );
        for group in self.one_of {
            match group.iter().find(|alt| alt.iter().all(|f| exists(f))) {
                Some(alt) => s.files.extend(alt.iter().map(|f| f.to_string())),
                None => s.missing.push(
                    group
                        .iter()
                        .map(|alt| alt.join(" + "))
                        .collect::<Vec<_>>()
                        .join(" or "),
                ),
            }
        }
        for (dir, names) in self.weights {
            match names.pick(variant, |c| exists(&join_folder(dir, c))) {
                Some(name) => {
                    let path = join_folder(dir, &name);
                    if name.ends_with(".json") {
                        s.indexes.push(path.clone());
                    }
                    s.files.push(path);
                }
                None => s.missing.push(format!(
                    "weights in {}/ (one of {})",
                    if dir.is_empty() { "." } else { dir },
                    names.candidates(variant).join(", ")
                )),
            }
        }
        s
    }
}

/// The folder of a `*.index.json` path ("" at the root), for joining its shard names.
pub fn index_folder(index: &str) -> &str {
    index.rsplit_once('/').map_or("", |(d, _)| d)
}
