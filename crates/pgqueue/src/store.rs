//! Where done jobs' files live, so that every front end can serve them: in PostgreSQL (the
//! default; the files are small, a few MB a job) or in an S3-compatible bucket
//! (`s3://bucket/prefix`, through `object_store`; endpoint, region and credentials from the
//! usual `AWS_*` environment, e.g. `AWS_ENDPOINT_URL` for MinIO or another S3-compatible
//! server). Objects are named `prefix/<job>/a<attempt>/<file>`: a worker whose result was
//! refused deletes its own attempt's objects and can never overwrite the accepted ones.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use sqlx::PgPool;

use crate::PgError;

#[derive(Clone)]
pub enum Store {
    Postgres,
    S3 {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        url: String,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Postgres => write!(f, "postgres"),
            Store::S3 { url, .. } => write!(f, "{url}"),
        }
    }
}

impl Store {
    /// `postgres` (or none) keeps files in the database; `s3://bucket/prefix` in a bucket.
    pub fn from_spec(spec: Option<&str>) -> Result<Self, PgError> {
        match spec {
            None | Some("postgres") | Some("") => Ok(Store::Postgres),
            Some(url) if url.starts_with("s3://") => {
                let rest = &url["s3://".len()..];
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(PgError::Store(format!("--store {url}: no bucket name")));
                }
                // A request is retried a few times over at most 15 s (the crate's default is
                // 10 times over 3 minutes): a worker recording its result and a front end
                // answering a download should say soon that the bucket is away.
                let retry = object_store::RetryConfig {
                    backoff: Default::default(),
                    max_retries: 3,
                    retry_timeout: std::time::Duration::from_secs(15),
                };
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                    b = b
                        .with_endpoint(&endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                let store = b
                    .build()
                    .map_err(|e| PgError::Store(format!("--store {url}: {e}")))?;
                Ok(Store::S3 {
                    store: Arc::new(store),
                    prefix: ObjectPath::from(prefix.trim_matches('/')),
                    url: url.to_string(),
                })
            }
            Some(other) => Err(PgError::Store(format!(
                "--store {other:?}: expected postgres or s3://bucket/prefix"
            ))),
        }
    }

    /// Checks at start that the bucket can be listed (it exists, the credentials are good),
    /// so that a wrong `--store` is said at once and not after a job's whole run.
    pub async fn check(&self) -> Result<(), PgError> {
        if let Store::S3 { store, prefix, url } = self {
            store.list_with_delimiter(Some(prefix)).await.map_err(|e| {
                PgError::Store(format!("--store {url}: the bucket cannot be read: {e}"))
            })?;
        }
        Ok(())
    }

    fn key(prefix: &ObjectPath, job: &str, attempt: i32, name: &str) -> ObjectPath {
        prefix.child(job).child(format!("a{attempt}")).child(name)
    }

    /// Puts the files of one attempt where they will be served from once the attempt's
    /// result is accepted. For PostgreSQL nothing happens here: the rows go in with the
    /// result, in the same transaction ([`Store::insert_rows`]).
    pub async fn put(
        &self,
        job: &str,
        attempt: i32,
        files: &[(String, Vec<u8>)],
    ) -> Result<(), String> {
        use futures::{StreamExt, TryStreamExt};
        if let Store::S3 { store, prefix, .. } = self {
            // a few uploads at once: a job has up to 8 variants of GIF, MP4, frames
            // (each upload owns what it needs: futures borrowing across the stream are not
            // Send for every lifetime, which a spawned worker requires)
            let uploads: Vec<_> = files
                .iter()
                .map(|(name, bytes)| {
                    let (store, name) = (store.clone(), name.clone());
                    let key = Self::key(prefix, job, attempt, &name);
                    let payload = PutPayload::from(bytes.clone());
                    async move {
                        store
                            .put(&key, payload)
                            .await
                            .map_err(|e| format!("cannot store {name}: {e}"))
                    }
                })
                .collect();
            futures::stream::iter(uploads)
                .buffer_unordered(4)
                .try_collect::<Vec<_>>()
                .await?;
        }
        Ok(())
    }

    /// The rows of the files in `flipsketch_files`, in the transaction that accepts the result.
    pub async fn insert_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        job: &str,
        files: &[(String, Vec<u8>)],
    ) -> Result<(), sqlx::Error> {
        for (name, bytes) in files {
            let body = match self {
                Store::Postgres => Some(bytes.as_slice()),
                Store::S3 { .. } => None,
            };
            sqlx::query("INSERT INTO flipsketch_files (job_id, name, bytes) VALUES ($1, $2, $3)")
                .bind(job)
                .bind(name)
                .bind(body)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Deletes what [`Store::put`] wrote for an attempt whose result was refused.
    pub async fn discard(&self, job: &str, attempt: i32, names: &[String]) {
        if let Store::S3 { store, prefix, .. } = self {
            for name in names {
                let _ = store.delete(&Self::key(prefix, job, attempt, name)).await;
            }
        }
    }

    /// A served file's bytes.
    pub async fn get(
        &self,
        pool: &PgPool,
        job: &str,
        attempt: i32,
        name: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        match self {
            Store::Postgres => sqlx::query_scalar::<_, Option<Vec<u8>>>(
                "SELECT bytes FROM flipsketch_files WHERE job_id = $1 AND name = $2",
            )
            .bind(job)
            .bind(name)
            .fetch_optional(pool)
            .await
            .map(|o| o.flatten())
            .map_err(|e| e.to_string()),
            Store::S3 { store, prefix, .. } => {
                match store.get(&Self::key(prefix, job, attempt, name)).await {
                    Ok(r) => r
                        .bytes()
                        .await
                        .map(|b| Some(b.to_vec()))
                        .map_err(|e| e.to_string()),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// Deletes every object of expired jobs (their rows go with the jobs).
    pub async fn delete_jobs(&self, jobs: &[String]) {
        if let Store::S3 { store, prefix, .. } = self {
            use futures::TryStreamExt;
            for job in jobs {
                let listed: Vec<_> = store
                    .list(Some(&prefix.child(job.as_str())))
                    .map_ok(|m| m.location)
                    .try_collect()
                    .await
                    .unwrap_or_default();
                for p in listed {
                    let _ = store.delete(&p).await;
                }
            }
        }
    }
}
