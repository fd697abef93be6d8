//! The PostgreSQL job queue: front ends (`flipsketch serve --queue postgres://...`) and any
//! number of workers (`flipsketch worker`) on any machines share one database.
//!
//! The life of a job (table `flipsketch_jobs`, migrations in `migrations/`, applied at start):
//! 1. a front end validates the request, decodes the sketch (kept as a small PNG) and inserts
//!    the job `queued` (refused beyond the queue size, counted under an advisory lock);
//! 2. a worker claims the oldest queued job with `FOR UPDATE SKIP LOCKED`, which makes it
//!    `running`, increments `attempt` (the fencing token of every later write of that worker)
//!    and gives it a lease;
//! 3. at every step the worker renews the lease with its progress, in one statement that also
//!    reads a cancel request; a renewal that finds the job no longer its (`attempt`, `worker`)
//!    stops the run;
//! 4. the worker writes the files (into PostgreSQL, or an S3-compatible bucket) and marks the
//!    job `done` in one transaction that only succeeds for its attempt: a late worker's result
//!    is refused;
//! 5. a lease that expires (the worker killed, its machine gone, or stopped) puts the job back
//!    in the queue, up to `max_attempts`, then fails it with the reason; a worker stopped by
//!    SIGTERM hands its job back at once;
//! 6. finished jobs and their files expire after the keep time.
//!
//! Every change a client can see bumps the job's `version` and is announced with NOTIFY on the
//! channel `flipsketch_jobs`; front ends LISTEN and push it to their event streams.

mod frontend;
pub mod store;
mod worker;

use std::time::Duration;

pub use frontend::PgQueue;
pub use store::Store;
pub use worker::{run_worker, WorkerOptions};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// How the queue's jobs are held.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// How long a worker's claim lasts without a renewal.
    pub lease: Duration,
    /// Times a job may be taken before a lost worker fails it.
    pub max_attempts: u32,
    /// How often workers say they are alive; one not heard of for three times this is gone.
    pub heartbeat: Duration,
    /// How often expired leases, departed clients and old jobs are looked for.
    pub janitor_every: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            max_attempts: 3,
            heartbeat: Duration::from_secs(5),
            janitor_every: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL URL {url}: {msg}")]
    Url { url: String, msg: String },
    #[error("cannot reach PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot bring the schema of PostgreSQL at {url} up to date: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("{0}")]
    Store(String),
}

/// `url` without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    match auth {
        Some(a) => {
            let user = a.split(':').next().unwrap_or("");
            if a.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => format!("{scheme}://{host}"),
    }
}

/// Connects (credentials from the URL, else from PostgreSQL's environment: `PGPASSWORD`,
/// `PGUSER`, ...) and applies the schema migrations this build carries (each once, under
/// sqlx's lock, so that processes starting together do not race).
pub async fn connect(url: &str) -> Result<PgPool, PgError> {
    let shown = redact_url(url);
    let opts: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| PgError::Url {
        url: shown.clone(),
        msg: e.to_string(),
    })?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        // a client asking while the database is away is answered 503 within this
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(opts)
        .await
        .map_err(|source| PgError::Connect {
            url: shown.clone(),
            source,
        })?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .map_err(|source| PgError::Migrate { url: shown, source })?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://me:secret@db:5432/fs"),
            "postgres://me:***@db:5432/fs"
        );
        assert_eq!(redact_url("postgres://me@db/fs"), "postgres://me@db/fs");
        assert_eq!(
            redact_url("postgres:///fs?host=/tmp"),
            "postgres:///fs?host=/tmp"
        );
    }
}
