//! Ctrl-C (SIGINT, and SIGTERM) during `animate`: before the run starts the process ends at
//! once; while the model runs it stops at the next step, and while files are written before the
//! next variant. Then the files this run wrote are removed (and the output folder if this run
//! created it and it is empty), a line says so, and the exit status is 130. A second Ctrl-C
//! ends the process at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicBool = AtomicBool::new(false);
static PRESSES: AtomicUsize = AtomicUsize::new(0);
/// The output folder, when this run created it.
static CREATED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The exit status of a run stopped by Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The error `main` turns into exit status 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {0}")]
pub struct Interrupted(pub String);

fn remove_created_if_empty() {
    if let Some(dir) = CREATED.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = std::fs::remove_dir(dir); // only succeeds when empty
    }
}

/// Installs the handler; `created` is the output folder if this run made it.
pub fn install(created: Option<PathBuf>) {
    *CREATED.lock().unwrap_or_else(|p| p.into_inner()) = created;
    let r = ctrlc::set_handler(|| {
        let n = PRESSES.fetch_add(1, Ordering::SeqCst);
        if n > 0 || !RUNNING.load(Ordering::SeqCst) {
            remove_created_if_empty();
            eprintln!("\ninterrupted");
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
        REQUESTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: stopping at the next step (Ctrl-C again to quit at once)");
    });
    if let Err(e) = r {
        tracing::warn!("cannot handle Ctrl-C: {e}");
    }
}

/// Whether the run is under way (a Ctrl-C then stops it cleanly instead of exiting).
pub fn running(on: bool) {
    RUNNING.store(on, Ordering::SeqCst);
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Removes what this run wrote and returns the error to end with.
pub fn stopped(written: &[PathBuf]) -> anyhow::Error {
    let mut removed = 0;
    for f in written {
        if std::fs::remove_file(f).is_ok() {
            removed += 1;
        }
    }
    if let Some(dir) = written.first().and_then(|f| f.parent()) {
        remove_staging(dir);
    }
    remove_created_if_empty();
    Interrupted(format!(
        "stopped before the end; {removed} file(s) written so far were removed"
    ))
    .into()
}

/// Staging folders of unfinished variants left in `dir`.
fn remove_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(flipsketch_media::writers::STAGING_PREFIX) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
