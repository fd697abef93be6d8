//! Optional per-kernel wall time and FLOP counters (for `flipsketch bench --breakdown`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The kernel families counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Linear,
    Conv2d,
    Attention,
    GroupNorm,
    Geglu,
}

pub const KERNELS: [Kernel; 5] = [
    Kernel::Linear,
    Kernel::Conv2d,
    Kernel::Attention,
    Kernel::GroupNorm,
    Kernel::Geglu,
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static FLOPS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static CALLS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
/// Per (kernel, shape): calls, nanoseconds, FLOPs.
type ShapeTable = HashMap<(Kernel, [usize; 4]), (u64, u64, u64)>;
static SHAPES: Mutex<Option<ShapeTable>> = Mutex::new(None);

/// Starts counting (from zero).
pub fn enable() {
    for k in 0..KERNELS.len() {
        NANOS[k].store(0, Ordering::Relaxed);
        FLOPS[k].store(0, Ordering::Relaxed);
        CALLS[k].store(0, Ordering::Relaxed);
    }
    *SHAPES.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    ENABLED.store(true, Ordering::Relaxed);
}

/// (kernel, calls, seconds, GFLOP) since [`enable`].
pub fn snapshot() -> Vec<(Kernel, u64, f64, f64)> {
    KERNELS
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            (
                k,
                CALLS[i].load(Ordering::Relaxed),
                NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                FLOPS[i].load(Ordering::Relaxed) as f64 * 1e-9,
            )
        })
        .collect()
}

/// One line of [`shapes`].
#[derive(Clone, Copy, Debug)]
pub struct ShapeStat {
    pub kernel: Kernel,
    /// Linear: rows, k, columns, 0. Conv2d: images, k (c_in x taps), pixels, c_out.
    /// Attention: items (batch x heads), query length, key length, head size. GroupNorm and
    /// GEGLU: their input's element count, 0, 0, 0.
    pub shape: [usize; 4],
    pub calls: u64,
    pub seconds: f64,
    pub gflop: f64,
}

/// The time per kernel and shape since [`enable`], longest first.
pub fn shapes() -> Vec<ShapeStat> {
    let table = SHAPES.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<ShapeStat> = table
        .iter()
        .flatten()
        .map(|(&(kernel, shape), &(calls, nanos, flops))| ShapeStat {
            kernel,
            shape,
            calls,
            seconds: nanos as f64 * 1e-9,
            gflop: flops as f64 * 1e-9,
        })
        .collect();
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    v
}

/// Times `f` as one call of `kernel` at `shape` doing `flops` floating-point operations.
#[inline]
pub(crate) fn timed<R>(kernel: Kernel, shape: [usize; 4], flops: u64, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let r = f();
    record(kernel, shape, t.elapsed().as_nanos() as u64, flops);
    r
}

/// Adds one call to its family's counters and to its shape's line.
fn record(kernel: Kernel, shape: [usize; 4], nanos: u64, flops: u64) {
    count(kernel, nanos, flops);
    if let Some(table) = SHAPES.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let e = table.entry((kernel, shape)).or_default();
        *e = (e.0 + 1, e.1 + nanos, e.2 + flops);
    }
}

/// Counts the time until it is dropped as one call (for kernels with early returns).
pub(crate) struct Timer(Option<(Kernel, [usize; 4], u64, Instant)>);

impl Timer {
    pub(crate) fn start(kernel: Kernel, shape: [usize; 4], flops: u64) -> Self {
        Self(
            ENABLED
                .load(Ordering::Relaxed)
                .then(|| (kernel, shape, flops, Instant::now())),
        )
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((kernel, shape, flops, t)) = self.0 {
            record(kernel, shape, t.elapsed().as_nanos() as u64, flops);
        }
    }
}

/// Adds one call of `kernel` to its family's counters.
fn count(kernel: Kernel, nanos: u64, flops: u64) {
    let i = kernel as usize;
    NANOS[i].fetch_add(nanos, Ordering::Relaxed);
    FLOPS[i].fetch_add(flops, Ordering::Relaxed);
    CALLS[i].fetch_add(1, Ordering::Relaxed);
}
