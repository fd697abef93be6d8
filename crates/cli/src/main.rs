//! `flipsketch`: the command line. Thin: parse, validate, call the library.

mod animate;
mod bench;
mod device;
mod download;
mod interrupt;
mod model_source;
mod random_model;
mod serve;

use std::alloc::{GlobalAlloc, Layout};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use flipsketch_pipeline::components::Components;

#[derive(Parser)]
#[command(
    name = "flipsketch",
    version,
    about = "Sketch + text -> hand-drawn animation (FlipSketch, in Rust)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--dtype`: the compute precision. `auto` is what runs fastest at the stated tolerance:
/// bf16 on GPUs and on CPUs with AVX512-BF16 (the original app runs in bf16), f32 elsewhere
/// (without AVX512-BF16 a CPU has no bf16 products, so bf16 would only add conversions).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Precision {
    Auto,
    F32,
    Bf16,
}

impl Precision {
    /// The dtype on `device`.
    pub fn dtype(self, device: &candle_core::Device) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Auto if !device.is_cpu() || cpu_has_bf16() => DType::BF16,
            Precision::Auto => DType::F32,
        }
    }
}

/// The CPU computes bf16 products natively (AVX512-BF16).
fn cpu_has_bf16() -> bool {
    flipsketch_kernels::hardware_isa() == flipsketch_kernels::Isa::Avx512Bf16
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web app and the HTTP jobs API.
    Serve(Box<serve::ServeArgs>),
    /// Run the jobs of a shared PostgreSQL queue (`serve --queue postgres://...`) on this
    /// machine until stopped.
    Worker(Box<serve::WorkerArgs>),
    /// Benchmarks (timings of model parts at real shapes).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Animate a sketch: sketch + prompt -> GIFs (and PNG frames).
    Animate(Box<animate::AnimateArgs>),
    /// Download the model (and optionally the CLIP ranking model) into the HuggingFace cache
    /// ahead of time, check it, and print where it is.
    Download(download::DownloadArgs),
    /// Load every component of a model folder and report what it holds.
    Inspect {
        #[command(flatten)]
        model: model_source::ModelArgs,
        /// Compute dtype the weights are converted to.
        #[arg(long, value_enum, default_value = "auto")]
        dtype: Precision,
        /// Where the weights are loaded: auto, cpu, cuda[:N], metal[:N].
        #[arg(long, default_value = "auto")]
        device: device::DeviceArg,
    },
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), if known.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn inspect(
    source: model_source::ModelArgs,
    dtype: Precision,
    device: device::DeviceArg,
) -> Result<()> {
    let device = device.open()?;
    let model = source.resolve(true)?;
    let t0 = Instant::now();
    let dtype = dtype.dtype(&device);
    let components = Components::load(&model, dtype, &device, source.variant(), |name| {
        tracing::info!("loading {name}");
    })
    .with_context(|| format!("cannot load the model in {}", model.display()))?;
    println!("model: {}", model.display());
    println!("compute dtype: {}", flipsketch_pipeline::dtype_name(dtype));
    println!("device: {}", flipsketch_pipeline::device_name(&device));
    for r in &components.reports {
        println!("\n[{}] {}", r.name, r.summary);
        if let Some(w) = &r.weights {
            let files: Vec<String> = w.files.iter().map(|f| f.display().to_string()).collect();
            println!("  files: {}", files.join(", "));
            let dt: Vec<String> = w
                .dtypes_on_disk
                .iter()
                .map(|(d, n)| format!("{d} ({})", human(*n)))
                .collect();
            println!("  on disk: {}", dt.join(", "));
            println!("  parameters: {} ({})", human(w.parameters), w.parameters);
            if w.unexpected.is_empty() {
                println!("  unexpected tensors: none");
            } else {
                let shown: Vec<&str> = w.unexpected.iter().take(5).map(String::as_str).collect();
                println!(
                    "  unexpected tensors: {} (ignored), e.g. {}",
                    w.unexpected.len(),
                    shown.join(", ")
                );
            }
        }
        if let Some(w) = &r.weights {
            println!("  packed weights: {}", w.cache);
        }
        println!("  loaded in {:.2} s", r.seconds);
    }
    println!("\ntotal load time: {:.2} s", t0.elapsed().as_secs_f64());
    if let Some(p) = peak_rss_mib() {
        println!("peak memory: {p:.0} MiB");
    }
    Ok(())
}

/// Large activations are allocated and freed many times per UNet forward; mimalloc keeps the
/// pages mapped between uses instead of faulting fresh zeroed pages in each time. The wrapper
/// counts the bytes in use, so that `bench` can tell live memory from what the allocator keeps.
#[global_allocator]
static GLOBAL: Counting = Counting(mimalloc::MiMalloc);

struct Counting(mimalloc::MiMalloc);

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn grew(size: usize) {
        let now = LIVE_BYTES.fetch_add(size, Ordering::Relaxed) + size;
        PEAK_LIVE_BYTES.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to mimalloc unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

/// The most heap memory in use at once so far (MiB), as opposed to the resident set, which
/// also holds freed memory the allocator keeps for reuse.
pub(crate) fn peak_live_mib() -> f64 {
    PEAK_LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

/// Large transient work (an upload's decode) starts (`true`) or ends (`false`): while any
/// runs, freed memory goes back to the system at once instead of being kept for reuse (see
/// `main`), so that it does not stay resident afterwards. Frees of other threads in that window
/// are returned too, which costs them page faults later, nothing else.
pub(crate) fn release_memory_while(start: bool) {
    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    let delay = if start {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        0
    } else if ACTIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
        purge_delay()
    } else {
        return;
    };
    // SAFETY: mimalloc's option setter, callable from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay) };
}

/// The purge delay the process runs with: never, unless MIMALLOC_PURGE_DELAY says otherwise.
fn purge_delay() -> std::os::raw::c_long {
    std::env::var("MIMALLOC_PURGE_DELAY")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// Heap memory in use now (MiB).
pub(crate) fn live_mib() -> f64 {
    LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (between `eager_commit_delay`, 14,
/// and `use_numa_nodes`, 16, which libmimalloc-sys names).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // A closed pipe (`flipsketch inspect ... | head`) ends the process quietly, as for other
    // command-line tools, instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Never hand freed pages back to the OS: each UNet forward frees and reallocates the same
    // large buffers, and re-faulting them costs about 1.5 s per forward at 256 px.
    // MIMALLOC_PURGE_DELAY (milliseconds), when set, is mimalloc's own setting and wins.
    // SAFETY: plain option setter of the allocator in use.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay()) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect {
            model,
            dtype,
            device,
        } => inspect(model, dtype, device),
        Command::Animate(args) => animate::run(*args),
        Command::Bench(b) => bench::run(b),
        Command::Download(a) => download::run(a),
        Command::Serve(a) => serve::run(*a),
        Command::Worker(a) => serve::worker(*a),
    };
    let interrupted =
        matches!(&result, Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some());
    if !interrupted {
        // Packed-weight cache files still being written (the first load of a model): finish
        // them, so the next run maps them. Interrupted runs leave at once; the next write
        // removes what they left.
        flipsketch_models::packcache::wait_for_writes();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(interrupt::EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
