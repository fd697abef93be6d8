//! `flipsketch serve`: the HTTP jobs API and the web page, over a job queue (in-process or
//! PostgreSQL: the same routes, JSON and page either way).
//!
//! Routes (JSON; errors are `{"error": "..."}`):
//! - `GET /healthz`: 200 once the model is loaded, 503 while loading or if it failed
//! - `GET /api/info`: image size, defaults and limits for the page
//! - `POST /api/jobs` (multipart: `sketch`, `prompt`, optional `variants`, `frames`, `steps`,
//!   `lambda`, `seed`, `guidance`) -> 202 `{"id"}`; 400 bad field, 413 too large, 429 queue
//!   full, 503 not ready
//! - `GET /api/jobs/{id}`, `GET /api/jobs/{id}/events` (server-sent events), `DELETE /api/jobs/{id}`
//! - `GET /api/jobs/{id}/files/{name}`: only files the job wrote
//! - `GET /` and `GET /assets/{name}`: the page, embedded in the binary

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flipsketch_engine::{
    CancelOutcome, FileBody, JobQueue, JobRequest, JobStatus, JobView, Outputs, Readiness,
    SubmitError,
};
use flipsketch_media::writers::{variant_file_names, Format};
use serde::Serialize;
use serde_json::json;

/// The queue behind the routes (in-process or shared).
pub type Queue = Arc<dyn JobQueue>;

/// An API error: the HTTP status is decided here and nowhere else.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    TooLarge(String),
    NotFound(String),
    /// The queue is full; try again after this many seconds (`Retry-After`).
    QueueFull(String, u64),
    Unavailable(String),
    Internal(String),
}

/// The JSON error answer, `{"error": msg}`, with `status`.
fn error_response(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::QueueFull(m, after) => {
                let mut r = error_response(StatusCode::TOO_MANY_REQUESTS, &m);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(after));
                return r;
            }
            ApiError::Unavailable(m) => {
                // loading, or the queue's database away: worth asking again shortly
                let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, &m);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(5u64));
                return r;
            }
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        error_response(status, &msg)
    }
}

impl ApiError {
    async fn submit(e: SubmitError, queue: &Queue) -> Self {
        match e {
            SubmitError::NotReady | SubmitError::LoadFailed(_) | SubmitError::Unavailable(_) => {
                ApiError::Unavailable(e.to_string())
            }
            SubmitError::QueueFull(_) => {
                ApiError::QueueFull(e.to_string(), queue.retry_after_s().await)
            }
            SubmitError::Invalid(m) => ApiError::BadRequest(m),
        }
    }
}

/// The files of one variant, as URLs relative to the server root.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VariantFiles {
    pub gif: String,
    pub gif_raw: String,
    /// Animated PNG on transparent paper.
    pub apng: String,
    pub mp4: String,
    /// Sprite sheet and its frame rectangles.
    pub sheet: String,
    pub sheet_json: String,
    /// Animated SVG of the traced frames.
    pub svg: String,
    /// Numbered PNG frames.
    pub frames: Vec<String>,
}

/// The URL of a job's file.
pub fn file_url(id: &str, name: &str) -> String {
    format!("/api/jobs/{id}/files/{name}")
}

impl VariantFiles {
    /// Variant `k` of a done job; the file names are the writers' own
    /// (`flipsketch_media::writers::variant_file_names`).
    pub fn new(id: &str, k: usize, frames: usize) -> Self {
        let names = |f: Format| variant_file_names(k, frames, &[f]);
        let first = |f: Format| file_url(id, &names(f)[0]);
        let sheet = names(Format::Sheet);
        Self {
            gif: first(Format::Gif),
            gif_raw: first(Format::GifRaw),
            apng: first(Format::Apng),
            mp4: first(Format::Mp4),
            sheet: file_url(id, &sheet[0]),
            sheet_json: file_url(id, &sheet[1]),
            svg: first(Format::Svg),
            frames: names(Format::Png).iter().map(|n| file_url(id, n)).collect(),
        }
    }
}

/// A job as the API shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobJson {
    pub id: String,
    pub status: JobStatus,
    pub progress: f64,
    pub phase: Option<&'static str>,
    pub step: Option<usize>,
    pub steps: Option<usize>,
    pub eta_s: Option<f64>,
    pub queue_position: Option<usize>,
    pub seed: u64,
    /// How many times a worker has taken the job (2 after a worker was lost, ...).
    pub attempt: u32,
    pub results: Vec<VariantFiles>,
    pub error: Option<String>,
}

impl From<&JobView> for JobJson {
    fn from(v: &JobView) -> Self {
        let results = match v.outputs {
            Some(Outputs { variants, frames }) => (0..variants)
                .map(|k| VariantFiles::new(&v.id, k, frames))
                .collect(),
            None => vec![],
        };
        Self {
            id: v.id.clone(),
            status: v.status,
            progress: v.progress,
            phase: v.phase.map(|p| p.as_str()),
            step: v.step,
            steps: v.steps,
            eta_s: v.eta_s,
            queue_position: v.queue_position,
            seed: v.seed,
            attempt: v.attempt,
            results,
            error: v.error.clone(),
        }
    }
}

impl From<axum::extract::multipart::MultipartError> for ApiError {
    fn from(e: axum::extract::multipart::MultipartError) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("upload too large: {}", e.body_text()))
        } else {
            ApiError::BadRequest(format!("bad multipart request: {}", e.body_text()))
        }
    }
}

/// The example sketches of the repository's `examples/` folder, built into the binary: the
/// page offers them, and README's first command animates one.
const EXAMPLES: &[(&str, &[u8])] = &[
    (
        "examples.json",
        include_bytes!("../../../examples/examples.json"),
    ),
    ("cat.png", include_bytes!("../../../examples/cat.png")),
    ("person.png", include_bytes!("../../../examples/person.png")),
    ("fish.png", include_bytes!("../../../examples/fish.png")),
    ("flower.png", include_bytes!("../../../examples/flower.png")),
];

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// Longest request target and largest total of request headers answered; beyond them the
/// answer is 414 or 431 (as JSON, like every error).
pub const MAX_URI_BYTES: usize = 8 << 10;
pub const MAX_HEADER_BYTES: usize = 32 << 10;

/// Every error answer is JSON, also those produced before a handler runs (axum's rejections
/// of a bad path or multipart request, 405, oversized targets and headers): a non-JSON error
/// body becomes `{"error": "<reason>: <text>"}`, the status and other headers kept.
async fn json_errors(req: Request, next: Next) -> Response {
    if req.uri().to_string().len() > MAX_URI_BYTES {
        return error_response(
            StatusCode::URI_TOO_LONG,
            &format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        );
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!("the request headers take more than {MAX_HEADER_BYTES} bytes"),
        );
    }
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let msg = if text.is_empty() {
        reason
    } else {
        format!("{reason}: {}", truncate(&text, 300))
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(
        parts,
        axum::body::Body::from(json!({ "error": msg }).to_string()),
    )
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The router over a queue.
pub fn router(queue: Queue) -> Router {
    let limit = queue.config().limits.upload_max_bytes;
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/examples/{name}", get(example))
        .route("/healthz", get(healthz))
        .route("/api/info", get(info))
        .route(
            "/api/jobs",
            axum::routing::post(submit).layer(DefaultBodyLimit::max(limit + 64 * 1024)),
        )
        .route("/api/jobs/{id}", get(status).delete(cancel))
        .route("/api/jobs/{id}/events", get(events))
        .route("/api/jobs/{id}/files/{name}", get(file))
        .fallback(|| async { ApiError::NotFound("no such page".into()) })
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(queue)
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}

async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (body, mime) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return Err(ApiError::NotFound(format!("no asset {name:?}"))),
    };
    Ok(([(header::CONTENT_TYPE, mime)], body).into_response())
}

async fn example(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, body) = EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| ApiError::NotFound(format!("no example {name:?}")))?;
    let mime = if name.ends_with(".json") {
        "application/json"
    } else {
        "image/png"
    };
    Ok(([(header::CONTENT_TYPE, mime)], *body).into_response())
}

/// What `/healthz` and `/api/info` share: where the model runs and, for a shared queue, its
/// workers.
fn health_json(h: &flipsketch_engine::Health) -> serde_json::Value {
    let mut v = match &h.readiness {
        Readiness::Ready { device, dtype, .. } => {
            json!({"status": "ok", "device": device, "dtype": dtype})
        }
        Readiness::Loading => json!({"status": "loading"}),
        Readiness::Failed(e) => json!({"status": "failed", "error": e}),
    };
    v["queue"] = json!(h.queue);
    if let Some(w) = &h.workers {
        v["workers"] = json!(w);
    }
    v
}

async fn healthz(State(queue): State<Queue>) -> Response {
    let h = queue.health().await;
    let status = match h.readiness {
        Readiness::Ready { .. } => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(health_json(&h))).into_response()
}

async fn info(State(queue): State<Queue>) -> Json<serde_json::Value> {
    let h = queue.health().await;
    let (image_size, device, dtype) = match h.readiness {
        Readiness::Ready {
            image_size,
            device,
            dtype,
        } => (Some(image_size), Some(device), Some(dtype)),
        _ => (None, None, None),
    };
    let c = queue.config();
    Json(json!({
        "image_size": image_size,
        "device": device,
        "dtype": dtype,
        "queue": h.queue,
        "workers": h.workers,
        "defaults": c.defaults,
        "limits": c.limits
    }))
}

fn parse<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
    text.trim().parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "{name}: {:?} is not a valid number",
            truncate(text, 40)
        ))
    })
}

/// Largest text field (the prompt is at most 1000 characters).
const MAX_TEXT_FIELD_BYTES: usize = 16 << 10;

/// A text field's value, which must be UTF-8.
async fn text_field(
    field: axum::extract::multipart::Field<'_>,
    name: &str,
) -> Result<String, ApiError> {
    let bytes = field.bytes().await?;
    if bytes.len() > MAX_TEXT_FIELD_BYTES {
        return Err(ApiError::BadRequest(format!(
            "{name} is {} bytes, the limit is {MAX_TEXT_FIELD_BYTES}",
            bytes.len()
        )));
    }
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::BadRequest(format!("{name} is not valid UTF-8 text")))
}

async fn submit(
    State(queue): State<Queue>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::BadRequest(format!(
            "the request must be multipart/form-data with a boundary: {}",
            e.body_text()
        ))
    })?;
    // The queue and the model first: a full queue is refused before the upload is decoded
    // or kept. What the client still sends is read and dropped (within the upload limit), so
    // that it gets the answer instead of a connection reset.
    if let Err(e) = queue.precheck().await {
        while let Ok(Some(mut field)) = multipart.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
        return Err(ApiError::submit(e, &queue).await);
    }
    let mut r = JobRequest::default();
    let mut have_prompt = false;
    while let Some(field) = multipart.next_field().await? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "sketch" => {
                r.sketch = field.bytes().await?.to_vec();
                let max = queue.config().limits.upload_max_bytes;
                if r.sketch.len() > max {
                    return Err(ApiError::TooLarge(format!(
                        "upload too large: the sketch is {} bytes, the limit is {max}",
                        r.sketch.len()
                    )));
                }
            }
            "prompt" => {
                r.prompt = text_field(field, &name).await?;
                have_prompt = true;
            }
            "variants" => r.variants = Some(parse(&name, &text_field(field, &name).await?)?),
            "frames" => r.frames = Some(parse(&name, &text_field(field, &name).await?)?),
            "steps" => r.steps = Some(parse(&name, &text_field(field, &name).await?)?),
            "lambda" => r.lambda = Some(parse(&name, &text_field(field, &name).await?)?),
            "guidance" => r.guidance = Some(parse(&name, &text_field(field, &name).await?)?),
            "seed" => {
                let t = text_field(field, &name).await?;
                if !t.trim().is_empty() {
                    r.seed = Some(parse(&name, &t)?);
                }
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown field {:?} (the fields are sketch, prompt, variants, frames, steps, \
                     lambda, guidance, seed)",
                    truncate(other, 40)
                )))
            }
        }
    }
    if !have_prompt {
        return Err(ApiError::BadRequest("prompt is missing".into()));
    }
    let id = match queue.submit(r).await {
        Ok(id) => id,
        Err(e) => return Err(ApiError::submit(e, &queue).await),
    };
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response())
}

fn unknown(id: &str) -> ApiError {
    ApiError::NotFound(format!("no job {id:?}"))
}

impl From<flipsketch_engine::Unavailable> for ApiError {
    fn from(e: flipsketch_engine::Unavailable) -> Self {
        ApiError::Unavailable(e.0)
    }
}

async fn status(State(queue): State<Queue>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let view = queue.status(&id).await?.ok_or_else(|| unknown(&id))?;
    Ok(Json(JobJson::from(&view)).into_response())
}

async fn cancel(State(queue): State<Queue>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (view, outcome) = queue.cancel(&id).await?.ok_or_else(|| unknown(&id))?;
    // A running job stops at its next step and ends cancelled, whatever phase it is in; one
    // that had already ended says so with its real status.
    let body = match outcome {
        CancelOutcome::Cancelled | CancelOutcome::Stopping => {
            json!({ "status": JobStatus::Cancelled, "cancelled": true })
        }
        CancelOutcome::TooLate => json!({
            "status": view.status,
            "cancelled": false,
            "error": format!("too late: the job had already ended ({})", view.status.as_str()),
        }),
    };
    Ok(Json(body).into_response())
}

/// One `status` event; its id is the job's version, so that a client reconnecting with
/// `Last-Event-ID` gets what changed since.
fn status_event(view: &JobView) -> Event {
    Event::default()
        .event("status")
        .id(view.version.to_string())
        .json_data(JobJson::from(view))
        .unwrap_or_default()
}

async fn events(
    State(queue): State<Queue>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let rx = queue.watch(&id).await?.ok_or_else(|| unknown(&id))?;
    let last_seen: Option<u64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // One event per change, sent as soon as it is seen, a final one when the job ends; while
    // the stream is open the client counts as present (queued jobs whose client is gone are
    // dropped). A reconnecting client that already has the current version waits for the next.
    let stream = futures::stream::unfold(
        (rx, queue, id, last_seen, false),
        |(mut rx, queue, id, last_seen, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let view = rx.borrow_and_update().clone();
                if last_seen.is_some_and(|v| v >= view.version) && !view.status.is_final() {
                    // nothing new for this client yet
                    match tokio::time::timeout(Duration::from_secs(5), rx.changed()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return None, // the job is gone
                        Err(_) => queue.touch(&id).await,
                    }
                    continue;
                }
                let last = view.status.is_final();
                return Some((
                    Ok::<_, std::convert::Infallible>(status_event(&view)),
                    (rx, queue, id, Some(view.version), last),
                ));
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn file(
    State(queue): State<Queue>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let body = queue
        .file(&id, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no file {name:?} in job {id:?}")))?;
    let bytes = match body {
        FileBody::Bytes(b) => b,
        FileBody::Path(path) => tokio::fs::read(&path)
            .await
            .map_err(|_| ApiError::NotFound(format!("file {name:?} is gone")))?,
    };
    let mime = match name.rsplit('.').next() {
        Some("gif") => "image/gif",
        Some("png") => "image/png",
        Some("mp4") => "video/mp4",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    // A name unique to the job, so that downloads of several jobs do not collide.
    let short: String = id.chars().take(8).collect();
    let disposition = format!("inline; filename=\"flipsketch-{short}-{name}\"");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("inline")),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// Limits on the connections [`serve`] keeps.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Open connections at most; one more is answered 503 and closed at once.
    pub max_connections: usize,
    /// A request's headers must arrive within this time (a half-sent request is dropped).
    pub header_timeout: Duration,
    /// A connection with no bytes either way for this long is closed (event streams send a
    /// keep-alive every 15 s, so open streams are not idle).
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A stream that notes when bytes last went either way.
struct Watched<S> {
    inner: S,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Watched<S> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves until ctrl-c, with [`ConnectionLimits::default`].
pub async fn serve(listener: tokio::net::TcpListener, queue: Queue) -> std::io::Result<()> {
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve_with(listener, queue, ConnectionLimits::default(), shutdown).await
}

/// Serves until `shutdown` completes: HTTP/1.1 connections through hyper, each bounded by
/// `limits`; then open connections get 5 s to finish and the engine stops.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    queue: Queue,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let app = router(queue.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(1 << 20);
    let builder = Arc::new(builder.http1_only());
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // out of file descriptors and the like: wait, then accept again
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the limit: a short answer, and the connection closed.
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let body = r#"{"error":"too many connections; try again later"}"#;
                let msg = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let mut stream = stream;
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), stream.write_all(msg.as_bytes()))
                        .await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let last = Arc::new(AtomicU64::new(0));
        let io = Watched {
            inner: stream,
            last: last.clone(),
            epoch: Instant::now(),
        };
        let epoch = io.epoch;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let conn = watcher.watch(conn.into_owned());
            tokio::pin!(conn);
            let mut tick = tokio::time::interval(Duration::from_secs(1).min(idle));
            loop {
                tokio::select! {
                    _ = &mut conn => break,
                    _ = tick.tick() => {
                        let quiet = epoch.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                        if quiet > idle.as_millis() as u64 {
                            break; // dropping the connection closes it
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("closing the connections still open");
    }
    queue.shutdown();
    Ok(())
}
