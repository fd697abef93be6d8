//! The HTTP API through real HTTP on 127.0.0.1 against the tiny random model: a job to done,
//! every error, a full queue, cancellation mid-run, clients that go away, path traversal.
//!
//! Every test runs twice, against both queues: `memory` (in-process) and `postgres` (a real
//! PostgreSQL server, flipsketch-testpg, a front end and one worker in this process; SKIPPED
//! without PostgreSQL unless FLIPSKETCH_REQUIRE_PG=1).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use flipsketch_engine::{Engine, EngineConfig};
use flipsketch_pgqueue::{PgQueue, QueueOptions, Store, WorkerOptions};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::Pipeline;
use flipsketch_testpg::TestPg;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sketch_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("golden/pipeline_sketch.png")).unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Memory,
    Postgres,
}

struct Server {
    base: String,
    client: reqwest::Client,
    _jobs: tempfile::TempDir,
    _pg: Option<TestPg>,
    _stop: Option<tokio::sync::watch::Sender<bool>>,
}

/// Runs `$test(Backend)` as two tests, `memory` and `postgres`.
macro_rules! both {
    ($test:ident) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$test(super::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(super::Backend::Postgres).await
            }
        }
    };
}

fn loader(
    delay: Duration,
    fail: bool,
) -> impl FnOnce() -> Result<Pipeline, String> + Send + 'static {
    move || {
        std::thread::sleep(delay);
        if fail {
            return Err("weights are broken".into());
        }
        let c = Components::load(
            &fixtures().join("tiny"),
            DType::F32,
            &Device::Cpu,
            None,
            |_| {},
        )
        .map_err(|e| e.to_string())?;
        // as `flipsketch serve` makes it: keeping recent sketches' reference noises
        Ok(Pipeline::new(c, Device::Cpu).with_inversion_cache(8))
    }
}

/// A server over `backend`, its model loading after `delay` (or failing to); `None` when
/// the backend cannot run here (no PostgreSQL).
async fn start(
    backend: Backend,
    tweak: impl FnOnce(&mut EngineConfig),
    delay: Duration,
    fail: bool,
) -> Option<Server> {
    let jobs = tempfile::tempdir().unwrap();
    let mut config = EngineConfig {
        jobs_dir: jobs.path().to_path_buf(),
        output_size: 32,
        ..EngineConfig::default()
    };
    tweak(&mut config);
    let (queue, pg, stop): (flipsketch_server::Queue, _, _) = match backend {
        Backend::Memory => (
            Arc::new(Engine::start(config, Box::new(loader(delay, fail)))),
            None,
            None,
        ),
        Backend::Postgres => {
            let pg = TestPg::or_skip(TestPg::database())?;
            let pool = flipsketch_pgqueue::connect(&pg.url).await.unwrap();
            let qopts = QueueOptions {
                lease: Duration::from_secs(10),
                heartbeat: Duration::from_millis(500),
                janitor_every: Duration::from_millis(250),
                ..QueueOptions::default()
            };
            let queue =
                PgQueue::start(pool.clone(), config.clone(), qopts.clone(), Store::Postgres);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let opts = WorkerOptions {
                queue: qopts,
                scratch: config.jobs_dir.clone(),
                name: "test-worker".into(),
                dtype: "f32".into(),
            };
            tokio::spawn(flipsketch_pgqueue::run_worker(
                pool,
                config,
                opts,
                Store::Postgres,
                loader(delay, fail),
                stop_rx,
            ));
            (queue, Some(pg), Some(stop_tx))
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(flipsketch_server::serve(listener, queue));
    Some(Server {
        base,
        client: reqwest::Client::new(),
        _jobs: jobs,
        _pg: pg,
        _stop: stop,
    })
}

/// A server whose model has loaded.
async fn start_ready(backend: Backend, tweak: impl FnOnce(&mut EngineConfig)) -> Option<Server> {
    let s = start(backend, tweak, Duration::ZERO, false).await?;
    s.wait_ready().await;
    Some(s)
}

impl Server {
    async fn wait_ready(&self) {
        let t = Instant::now();
        while self
            .client
            .get(format!("{}/healthz", self.base))
            .send()
            .await
            .unwrap()
            .status()
            != 200
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "model never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn form(&self, fields: &[(&str, &str)]) -> Form {
        let mut f = Form::new().part("sketch", Part::bytes(sketch_bytes()).file_name("s.png"));
        for (k, v) in fields {
            f = f.text(k.to_string(), v.to_string());
        }
        f
    }

    async fn submit(&self, form: Form) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/api/jobs", self.base))
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A job's whole event stream, to its end: the status of every event.
    async fn events(&self, id: &str) -> Vec<Value> {
        let body = self
            .client
            .get(format!("{}/api/jobs/{id}/events", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| serde_json::from_str(d.trim()).unwrap())
            .collect()
    }

    /// DELETE of a job; the JSON answer.
    async fn delete(&self, id: &str) -> Value {
        self.client
            .delete(format!("{}/api/jobs/{id}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_status(&self, id: &str, want: &[&str], timeout: Duration) -> Value {
        let t = Instant::now();
        loop {
            let (code, v) = self.get(&format!("/api/jobs/{id}")).await;
            assert_eq!(code, 200);
            if want.contains(&v["status"].as_str().unwrap()) {
                return v;
            }
            assert!(t.elapsed() < timeout, "job {id} stuck in {v}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}

const QUICK: &[(&str, &str)] = &[
    ("prompt", "a cat jumps"),
    ("variants", "2"),
    ("frames", "3"),
    ("steps", "3"),
    ("seed", "7"),
];
const SLOW: &[(&str, &str)] = &[
    ("prompt", "a cat jumps"),
    ("variants", "2"),
    ("frames", "8"),
    ("steps", "100"),
];

async fn job_runs_to_done_with_files_and_events(b: Backend) {
    let Some(s) = start_ready(b, |_| {}).await else {
        return;
    };
    let (code, info) = s.get("/api/info").await;
    assert_eq!(code, 200);
    assert_eq!(info["image_size"], 16);
    let (code, v) = s.submit(s.form(QUICK)).await;
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // the event stream ends with the final status
    let events = s.events(&id).await;
    assert!(!events.is_empty());
    assert_eq!(events.last().unwrap()["status"], "done", "{events:?}");
    let progress: Vec<f64> = events
        .iter()
        .map(|e| e["progress"].as_f64().unwrap())
        .collect();
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress goes forward: {progress:?}"
    );
    let done = s.wait_status(&id, &["done"], Duration::from_secs(30)).await;
    assert_eq!(done["progress"], 1.0);
    assert_eq!(done["seed"], 7);
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let kinds: [(&str, &str, &[u8]); 7] = [
            ("svg", "image/svg+xml", b"<svg"),
            ("gif", "image/gif", b"GIF8"),
            ("gif_raw", "image/gif", b"GIF8"),
            ("apng", "image/png", b"\x89PNG"),
            ("sheet", "image/png", b"\x89PNG"),
            ("sheet_json", "application/json", b"{"),
            ("mp4", "video/mp4", b"\0\0\0"),
        ];
        for (key, mime, magic) in kinds {
            let resp = s
                .client
                .get(format!("{}{}", s.base, r[key].as_str().unwrap()))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{key}");
            assert_eq!(resp.headers()["content-type"], mime, "{key}");
            let bytes = resp.bytes().await.unwrap();
            assert!(bytes.starts_with(magic), "{key}");
            let frames = r["frames"].as_array().unwrap();
            assert_eq!(frames.len(), 3);
            let f0 = s
                .client
                .get(format!("{}{}", s.base, frames[0].as_str().unwrap()))
                .send()
                .await
                .unwrap();
            assert_eq!(f0.headers()["content-type"], "image/png");
            if key == "mp4" {
                assert_eq!(&bytes[4..8], b"ftyp");
            }
        }
    }
    // page and assets
    for (path, ty) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
    ] {
        let r = s
            .client
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(ty));
    }
}
both!(job_runs_to_done_with_files_and_events);

async fn bad_requests_name_the_problem(b: Backend) {
    let Some(s) = start_ready(b, |c| c.limits.upload_max_bytes = 4096).await else {
        return;
    };
    let cases: Vec<(Form, u16, &str)> = vec![
        (s.form(&[]), 400, "prompt is missing"),
        (s.form(&[("prompt", "   ")]), 400, "prompt is empty"),
        (
            s.form(&[("prompt", "x"), ("variants", "abc")]),
            400,
            "variants",
        ),
        (
            s.form(&[("prompt", "x"), ("variants", "99")]),
            400,
            "variants must be between",
        ),
        (s.form(&[("prompt", "x"), ("frames", "0")]), 400, "frames"),
        (s.form(&[("prompt", "x"), ("steps", "-3")]), 400, "steps"),
        (s.form(&[("prompt", "x"), ("lambda", "nan")]), 400, "lambda"),
        (
            s.form(&[("prompt", "x"), ("colour", "red")]),
            400,
            "unknown field",
        ),
        (Form::new().text("prompt", "x"), 400, "sketch is missing"),
        (
            Form::new()
                .text("prompt", "x")
                .part("sketch", Part::bytes(b"hello".to_vec())),
            400,
            "not an image",
        ),
        (
            Form::new()
                .text("prompt", "x")
                .part("sketch", Part::bytes(vec![7u8; 20000])),
            413,
            "too large",
        ),
    ];
    for (form, want, needle) in cases {
        let (code, v) = s.submit(form).await;
        assert_eq!(code, want, "{needle}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{needle}: {v}"
        );
    }
    // not multipart at all
    let r = s
        .client
        .post(format!("{}/api/jobs", s.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let unknown = "0123456789abcdef0123456789abcdef";
    for path in [
        format!("/api/jobs/{unknown}"),
        format!("/api/jobs/{unknown}/events"),
        format!("/api/jobs/{unknown}/files/variant-0.gif"),
    ] {
        let (code, v) = s.get(&path).await;
        assert_eq!(code, 404, "{path}");
        assert!(v["error"].is_string());
    }
    let r = s
        .client
        .delete(format!("{}/api/jobs/{unknown}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(s.get("/assets/../../Cargo.toml").await.0, 404);
    assert_eq!(s.get("/assets/secret.txt").await.0, 404);
}
both!(bad_requests_name_the_problem);

async fn files_outside_the_job_are_unreachable(b: Backend) {
    let Some(s) = start_ready(b, |_| {}).await else {
        return;
    };
    let (_, v) = s.submit(s.form(QUICK)).await;
    let id = v["id"].as_str().unwrap().to_string();
    s.wait_status(&id, &["done"], Duration::from_secs(30)).await;
    for name in [
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "..",
        ".",
        "variant-9.gif",
        "..%2Fvariant-0.gif",
        "result.json",
    ] {
        let code = s
            .client
            .get(format!("{}/api/jobs/{id}/files/{name}", s.base))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(code, 404, "{name}");
    }
    let other = "ffffffffffffffffffffffffffffffff";
    let code = s
        .client
        .get(format!("{}/api/jobs/{other}/files/variant-0.gif", s.base))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(code, 404);
}
both!(files_outside_the_job_are_unreachable);

async fn full_queue_is_429_and_cancel_stops_a_running_job(b: Backend) {
    let Some(s) = start_ready(b, |c| c.queue_capacity = 1).await else {
        return;
    };
    let (code, v) = s.submit(s.form(SLOW)).await;
    assert_eq!(code, 202);
    let running = v["id"].as_str().unwrap().to_string();
    s.wait_status(&running, &["running"], Duration::from_secs(10))
        .await;
    // one may wait; the rest of a burst is refused
    let forms: Vec<Form> = (0..4).map(|_| s.form(SLOW)).collect();
    let codes: Vec<u16> = futures::future::join_all(forms.into_iter().map(|f| s.submit(f)))
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(codes.iter().filter(|&&c| c == 202).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 3, "{codes:?}");
    let (_, listing) = s.get(&format!("/api/jobs/{running}")).await;
    assert_eq!(listing["queue_position"], Value::Null);

    let r = s
        .client
        .delete(format!("{}/api/jobs/{running}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = s
        .wait_status(
            &running,
            &["cancelled", "done", "failed"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(v["progress"].as_f64().unwrap() < 1.0);
}
both!(full_queue_is_429_and_cancel_stops_a_running_job);

/// An event stream sends the state it finds at once, not when the job next changes (a queued
/// job behind a long one changes rarely).
async fn an_event_stream_starts_with_the_state_at_once(b: Backend) {
    let Some(s) = start_ready(b, |_| {}).await else {
        return;
    };
    let (_, v) = s.submit(s.form(SLOW)).await;
    let running = v["id"].as_str().unwrap().to_string();
    s.wait_status(&running, &["running"], Duration::from_secs(10))
        .await;
    let (_, v) = s.submit(s.form(SLOW)).await;
    let queued = v["id"].as_str().unwrap().to_string();
    for id in [&queued, &running] {
        let mut r = s
            .client
            .get(format!("{}/api/jobs/{id}/events", s.base))
            .send()
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(2), r.chunk())
            .await
            .expect("no event within 2 s")
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&first);
        assert!(text.contains("event: status"), "{text}");
        assert!(text.contains(&format!("\"id\":\"{id}\"")), "{text}");
    }
    for id in [&queued, &running] {
        s.delete(id).await;
    }
}
both!(an_event_stream_starts_with_the_state_at_once);

async fn queued_jobs_of_departed_clients_are_dropped(b: Backend) {
    let Some(s) = start_ready(b, |c| c.client_timeout = Duration::from_millis(700)).await else {
        return;
    };
    let (_, a) = s.submit(s.form(SLOW)).await;
    let a = a["id"].as_str().unwrap().to_string();
    s.wait_status(&a, &["running"], Duration::from_secs(10))
        .await;
    let (_, b) = s.submit(s.form(QUICK)).await;
    let b = b["id"].as_str().unwrap().to_string();
    let (_, v) = s.get(&format!("/api/jobs/{b}")).await;
    assert_eq!(v["status"], "queued");
    assert_eq!(v["queue_position"], 0);
    // nobody asks about b for longer than the timeout
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, v) = s.get(&format!("/api/jobs/{b}")).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(v["error"].as_str().unwrap().contains("went away"));
    s.client
        .delete(format!("{}/api/jobs/{a}", s.base))
        .send()
        .await
        .unwrap();
}
both!(queued_jobs_of_departed_clients_are_dropped);

async fn health_reports_failure(b: Backend) {
    let Some(s) = start(b, |_| {}, Duration::ZERO, true).await else {
        return;
    };
    let t = Instant::now();
    loop {
        let (code, v) = s.get("/healthz").await;
        assert_eq!(code, 503);
        if v["status"] == "failed" {
            assert!(v["error"].as_str().unwrap().contains("weights are broken"));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, v) = s.submit(s.form(QUICK)).await;
    assert_eq!(code, 503, "{v}");
}
both!(health_reports_failure);

async fn loading_is_503_then_ready(b: Backend) {
    let Some(s) = start(b, |_| {}, Duration::from_millis(1500), false).await else {
        return;
    };
    let (code, v) = s.get("/healthz").await;
    assert_eq!(code, 503);
    assert_eq!(v["status"], "loading");
    let (code, v) = s.submit(s.form(QUICK)).await;
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("loading"));
    let (_, info) = s.get("/api/info").await;
    assert!(
        info["device"].is_null(),
        "no device before the model is loaded: {info}"
    );
    s.wait_ready().await;
    let (code, v) = s.get("/healthz").await;
    assert_eq!(
        (code, &v["status"], &v["device"]),
        (200, &"ok".into(), &"cpu".into()),
        "{v}"
    );
    let (_, info) = s.get("/api/info").await;
    assert_eq!(info["device"], "cpu");
    let (code, _) = s.submit(s.form(QUICK)).await;
    assert_eq!(code, 202);
}
both!(loading_is_503_then_ready);

async fn the_repository_examples_are_served(b: Backend) {
    let Some(s) = start(b, |_| {}, Duration::ZERO, false).await else {
        return;
    };
    let examples = fixtures().join("../../examples");
    let (code, list) = s.get("/examples/examples.json").await;
    assert_eq!(code, 200);
    let list = list.as_array().unwrap().clone();
    let mut pngs: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    let mut listed: Vec<String> = list
        .iter()
        .map(|e| e["file"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, pngs, "examples.json lists every examples/*.png");
    for e in &list {
        assert!(!e["prompt"].as_str().unwrap().trim().is_empty());
        let file = e["file"].as_str().unwrap();
        let r = s
            .client
            .get(format!("{}/examples/{file}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let body = r.bytes().await.unwrap();
        assert_eq!(
            body.as_ref(),
            std::fs::read(examples.join(file)).unwrap(),
            "{file}"
        );
    }
    let (code, v) = s.get("/examples/../Cargo.toml").await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = s.get("/examples/nope.png").await;
    assert_eq!(code, 404);
    assert!(v["error"].as_str().unwrap().contains("nope.png"));
}
both!(the_repository_examples_are_served);

/// Sends raw bytes and returns (status, headers+body text) of the answer.
async fn raw(base: &str, request: Vec<u8>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The JSON body of a raw answer.
fn raw_json(text: &str) -> Value {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

async fn every_error_is_json_and_short(b: Backend) {
    let Some(s) = start_ready(b, |_| {}).await else {
        return;
    };
    let host = s.base.trim_start_matches("http://").to_string();
    // a multipart request without a boundary
    let (code, text) = raw(
        &s.base,
        format!("POST /api/jobs HTTP/1.1\r\nhost: {host}\r\ncontent-type: multipart/form-data\r\ncontent-length: 2\r\nconnection: close\r\n\r\nxx").into_bytes(),
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(
        raw_json(&text)["error"]
            .as_str()
            .unwrap()
            .contains("boundary"),
        "{text}"
    );
    // invalid UTF-8 in the path
    let (code, text) = raw(
        &s.base,
        format!("GET /api/jobs/%FF%FE HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
            .into_bytes(),
    )
    .await;
    assert_eq!(code, 400, "{text}");
    raw_json(&text);
    // a method the route does not take
    let (code, text) = raw(
        &s.base,
        format!("PUT /api/jobs HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").into_bytes(),
    )
    .await;
    assert_eq!(code, 405, "{text}");
    assert!(raw_json(&text)["error"]
        .as_str()
        .unwrap()
        .contains("method not allowed"));
    // a 10 KB target and 40 KB of headers
    let long = "a".repeat(10 << 10);
    let (code, text) = raw(
        &s.base,
        format!("GET /{long} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").into_bytes(),
    )
    .await;
    assert_eq!(code, 414, "{}", &text[..200.min(text.len())]);
    raw_json(&text);
    let big = "b".repeat(40 << 10);
    let (code, text) = raw(
        &s.base,
        format!(
            "GET /healthz HTTP/1.1\r\nhost: {host}\r\nx-big: {big}\r\nconnection: close\r\n\r\n"
        )
        .into_bytes(),
    )
    .await;
    assert_eq!(code, 431, "{}", &text[..200.min(text.len())]);
    raw_json(&text);

    // prompts without visible characters, or not UTF-8
    for p in ["\u{200B}\u{200D}\u{FEFF}", "\0\0\u{7}", " \t\n "] {
        let (code, v) = s.submit(s.form(&[("prompt", p)])).await;
        assert_eq!(code, 400, "{p:?}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("no visible characters") || e.contains("empty"),
            "{e}"
        );
    }
    let form = Form::new()
        .part("sketch", Part::bytes(sketch_bytes()).file_name("s.png"))
        .part("prompt", Part::bytes(vec![0xff, 0xfe, b'a']));
    let (code, v) = s.submit(form).await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("not valid UTF-8"),
        "{v}"
    );
    // an unknown field of a megabyte: its name is not echoed whole
    let name = "z".repeat(1 << 20);
    let (code, v) = s
        .submit(s.form(&[("prompt", "x"), (name.as_str(), "1")]))
        .await;
    assert_eq!(code, 400, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("unknown field") && e.len() < 400,
        "{} bytes",
        e.len()
    );
    // a huge number is printed short
    let (code, v) = s
        .submit(s.form(&[("prompt", "x"), ("guidance", "1e308")]))
        .await;
    assert_eq!(code, 400);
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("1.000e308") && e.len() < 100, "{e}");
}
both!(every_error_is_json_and_short);

async fn a_full_queue_answers_429_with_retry_after_before_reading_the_upload(b: Backend) {
    let Some(s) = start_ready(b, |c| c.queue_capacity = 1).await else {
        return;
    };
    let (_, v) = s.submit(s.form(SLOW)).await;
    let running = v["id"].as_str().unwrap().to_string();
    s.wait_status(&running, &["running"], Duration::from_secs(30))
        .await;
    let (code, _) = s.submit(s.form(SLOW)).await;
    assert_eq!(code, 202);
    // a 12 MB body: refused without being decoded
    let form = Form::new().text("prompt", "x").part(
        "sketch",
        Part::bytes(vec![1u8; 12 << 20]).file_name("big.png"),
    );
    let t = Instant::now();
    let r = s
        .client
        .post(format!("{}/api/jobs", s.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((5..=600).contains(&after), "{after}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("queue is full"));
    let _ = s
        .client
        .delete(format!("{}/api/jobs/{running}", s.base))
        .send()
        .await;
}
both!(a_full_queue_answers_429_with_retry_after_before_reading_the_upload);

async fn a_cancel_while_writing_files_ends_the_job_cancelled_without_files(b: Backend) {
    let jobs = tempfile::tempdir().unwrap();
    let jobs_path = jobs.path().to_path_buf();
    let Some(s) = start_ready(b, move |c| {
        c.output_size = 512;
        c.jobs_dir = jobs_path;
    })
    .await
    else {
        return;
    };
    let form = s.form(&[
        ("prompt", "x"),
        ("variants", "8"),
        ("frames", "24"),
        ("steps", "3"),
    ]);
    let (code, v) = s.submit(form).await;
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let (_, v) = s.get(&format!("/api/jobs/{id}")).await;
        if v["phase"] == "writing" {
            break;
        }
        assert!(v["status"] == "running" || v["status"] == "queued", "{v}");
        assert!(t.elapsed() < Duration::from_secs(60), "never writing: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = s.delete(&id).await;
    assert_eq!(r["status"], "cancelled");
    assert_eq!(r["cancelled"], true);
    let end = s
        .wait_status(
            &id,
            &["done", "cancelled", "failed"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(end["status"], "cancelled", "{end}");
    assert!(end["results"].as_array().unwrap().is_empty());
    // its folder is gone at once
    assert!(!jobs.path().join(&id).exists());
    // and a cancel after the end says it came too late
    let (_, v) = s.submit(s.form(QUICK)).await;
    let done = v["id"].as_str().unwrap().to_string();
    s.wait_status(&done, &["done"], Duration::from_secs(60))
        .await;
    let r = s.delete(&done).await;
    assert_eq!(r["status"], "done");
    assert_eq!(r["cancelled"], false);
    assert!(r["error"].as_str().unwrap().contains("too late"));
}
both!(a_cancel_while_writing_files_ends_the_job_cancelled_without_files);

async fn a_job_whose_run_panics_fails_with_the_message_and_the_next_one_runs(b: Backend) {
    let Some(s) = start_ready(b, |c| c.panic_marker = Some("[[panic]]".into())).await else {
        return;
    };
    let (_, v) = s
        .submit(s.form(&[
            ("prompt", "a cat [[panic]]"),
            ("steps", "3"),
            ("frames", "2"),
            ("variants", "1"),
        ]))
        .await;
    let bad = v["id"].as_str().unwrap().to_string();
    let (_, v) = s.submit(s.form(QUICK)).await;
    let good = v["id"].as_str().unwrap().to_string();
    let end = s
        .wait_status(&bad, &["failed", "done"], Duration::from_secs(60))
        .await;
    assert_eq!(end["status"], "failed", "{end}");
    assert!(
        end["error"]
            .as_str()
            .unwrap()
            .contains("failpoint: a panic inside the run"),
        "{end}"
    );
    let end = s
        .wait_status(&good, &["done", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(end["status"], "done", "{end}");
    let (code, h) = s.get("/healthz").await;
    assert_eq!(code, 200, "{h}");
}
both!(a_job_whose_run_panics_fails_with_the_message_and_the_next_one_runs);

async fn a_second_prompt_on_a_sketch_skips_its_inversion_and_progress_says_so(b: Backend) {
    let Some(s) = start_ready(b, |_| {}).await else {
        return;
    };
    let (info_code, info) = s.get("/api/info").await;
    assert_eq!(info_code, 200);
    assert_eq!(info["dtype"], "f32", "{info}");
    // the same sketch, steps and seed; another prompt
    let job = |prompt: &'static str| {
        [
            ("prompt", prompt),
            ("variants", "1"),
            ("frames", "3"),
            ("steps", "20"),
            ("seed", "11"),
        ]
    };
    let tau = EngineConfig::default().defaults.tau;
    let plan = flipsketch_pipeline::WorkPlan::new(1, 3, 20, tau);
    let cached = plan.without_inversion();
    let mut seen = Vec::new();
    for (prompt, want) in [("a cat jumps", &plan), ("a cat sleeps", &cached)] {
        let (code, v) = s.submit(s.form(&job(prompt))).await;
        assert_eq!(code, 202, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let events = s.events(&id).await;
        assert_eq!(events.last().unwrap()["status"], "done", "{events:?}");
        // every denoising report is weighted by the plan of the run that happened
        let mut denoising = 0;
        for e in &events {
            if e["phase"] == "denoising" {
                let step = e["step"].as_u64().unwrap() as usize;
                let p = (want.units_before(flipsketch_pipeline::Phase::Denoising, step)
                    / want.total())
                .min(0.99);
                let got = e["progress"].as_f64().unwrap();
                assert!(
                    (got - p).abs() < 1e-9,
                    "{prompt}: step {step}: {got} != {p}"
                );
                denoising += 1;
            }
        }
        assert!(denoising > 0, "{events:?}");
        seen.push(events.iter().any(|e| e["phase"] == "inversion"));
    }
    // the second job's stream never shows an inversion; the first's did, unless its whole
    // inversion happened between two events (the stream carries states, not every step)
    assert!(!seen[1], "the second job ran an inversion");
}
both!(a_second_prompt_on_a_sketch_skips_its_inversion_and_progress_says_so);
