//! `flipsketch serve`: the HTTP jobs API and the web page, over the job engine.
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

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flipsketch_engine::{Engine, JobRequest, Readiness, SubmitError};
use serde_json::json;

/// An API error: the HTTP status is decided here and nowhere else.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    TooLarge(String),
    NotFound(String),
    QueueFull(String),
    Unavailable(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::QueueFull(m) => (StatusCode::TOO_MANY_REQUESTS, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::NotReady | SubmitError::LoadFailed(_) => {
                ApiError::Unavailable(e.to_string())
            }
            SubmitError::QueueFull(_) => ApiError::QueueFull(e.to_string()),
            SubmitError::Invalid(m) => ApiError::BadRequest(m),
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

/// The router over an engine.
pub fn router(engine: Engine) -> Router {
    let limit = engine.config().limits.upload_max_bytes;
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
        .with_state(engine)
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

async fn healthz(State(engine): State<Engine>) -> Response {
    match engine.readiness() {
        Readiness::Ready { device, .. } => (
            StatusCode::OK,
            Json(json!({"status": "ok", "device": device})),
        )
            .into_response(),
        Readiness::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
        Readiness::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": e})),
        )
            .into_response(),
    }
}

async fn info(State(engine): State<Engine>) -> Json<serde_json::Value> {
    let (image_size, device) = match engine.readiness() {
        Readiness::Ready { image_size, device } => (Some(image_size), Some(device)),
        _ => (None, None),
    };
    let c = engine.config();
    Json(json!({
        "image_size": image_size,
        "device": device,
        "defaults": c.defaults,
        "limits": c.limits
    }))
}

fn parse<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
    text.trim()
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{name}: {text:?} is not a valid number")))
}

async fn submit(
    State(engine): State<Engine>,
    mut multipart: Multipart,
) -> Result<Response, ApiError> {
    let mut r = JobRequest::default();
    let mut have_prompt = false;
    while let Some(field) = multipart.next_field().await? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "sketch" => {
                r.sketch = field.bytes().await?.to_vec();
                let max = engine.config().limits.upload_max_bytes;
                if r.sketch.len() > max {
                    return Err(ApiError::TooLarge(format!(
                        "upload too large: the sketch is {} bytes, the limit is {max}",
                        r.sketch.len()
                    )));
                }
            }
            "prompt" => {
                r.prompt = field.text().await?;
                have_prompt = true;
            }
            "variants" => r.variants = Some(parse(&name, &field.text().await?)?),
            "frames" => r.frames = Some(parse(&name, &field.text().await?)?),
            "steps" => r.steps = Some(parse(&name, &field.text().await?)?),
            "lambda" => r.lambda = Some(parse(&name, &field.text().await?)?),
            "guidance" => r.guidance = Some(parse(&name, &field.text().await?)?),
            "seed" => {
                let t = field.text().await?;
                if !t.trim().is_empty() {
                    r.seed = Some(parse(&name, &t)?);
                }
            }
            other => return Err(ApiError::BadRequest(format!("unknown field {other:?}"))),
        }
    }
    if !have_prompt {
        return Err(ApiError::BadRequest("prompt is missing".into()));
    }
    // Decoding and resizing the sketch is CPU work: keep it off the async threads.
    let id = tokio::task::spawn_blocking(move || engine.submit(r))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response())
}

fn unknown(id: &str) -> ApiError {
    ApiError::NotFound(format!("no job {id:?}"))
}

async fn status(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = engine.status(&id).ok_or_else(|| unknown(&id))?;
    Ok(Json(view).into_response())
}

async fn cancel(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = engine.cancel(&id).ok_or_else(|| unknown(&id))?;
    // A running job stops at its next step; report what was asked.
    let status = if view.status.is_final() {
        view.status
    } else {
        flipsketch_engine::JobStatus::Cancelled
    };
    Ok(Json(json!({ "status": status })).into_response())
}

async fn events(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rx = engine.watch(&id).ok_or_else(|| unknown(&id))?;
    // One event per change, a final one when the job ends; while the stream is open the
    // client counts as present (the engine drops queued jobs whose client is gone).
    let stream = futures::stream::unfold(
        (rx, engine, id, false),
        |(mut rx, engine, id, ended)| async move {
            if ended {
                return None;
            }
            let view = rx.borrow_and_update().clone();
            let last = view.status.is_final();
            let event = Event::default()
                .event("status")
                .json_data(&view)
                .unwrap_or_default();
            if !last {
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), rx.changed()).await {
                        Ok(Ok(())) => break,
                        Ok(Err(_)) => break, // the job is gone; the next round sends its last state
                        Err(_) => engine.touch(&id),
                    }
                }
            }
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (rx, engine, id, last),
            ))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn file(
    State(engine): State<Engine>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = engine
        .file(&id, &name)
        .ok_or_else(|| ApiError::NotFound(format!("no file {name:?} in job {id:?}")))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::NotFound(format!("file {name:?} is gone")))?;
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

/// Serves until ctrl-c.
pub async fn serve(listener: tokio::net::TcpListener, engine: Engine) -> std::io::Result<()> {
    let app = router(engine.clone());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let r = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    engine.shutdown();
    r
}
