//! What the tests of the real binary share: starting it, plain HTTP/1.1 on a fresh
//! connection, job submission and waiting.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny_model() -> PathBuf {
    root().join("tests/fixtures/tiny")
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    /// `host:port` for a server, empty otherwise.
    pub addr: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: a plain kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits up to `timeout` for the process to end: its exit code (None: still running, or
    /// ended by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Blocks until the server accepts connections.
    pub fn wait_listening(&self) {
        let t = Instant::now();
        while TcpStream::connect(&self.addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the server at {} never listened",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP exchange on a fresh connection: (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() || s.write_all(body).is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A GET of JSON: (status, value; Null when not JSON). Status 0: no connection.
pub fn get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http(addr, "GET", path, "text/plain", b"");
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A GET of bytes (a result file): (status, body bytes).
pub fn get_bytes(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |i| i + 4);
    let status = String::from_utf8_lossy(&out[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out[split..].to_vec())
}

/// A multipart job submission.
pub fn submit(addr: &str, sketch: &[u8], fields: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let b = "flipsketchboundary";
    let mut body = Vec::new();
    body.extend(format!("--{b}\r\ncontent-disposition: form-data; name=\"sketch\"; filename=\"s.png\"\r\ncontent-type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend(sketch);
    body.extend(b"\r\n");
    for (k, v) in fields {
        body.extend(
            format!("--{b}\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    body.extend(format!("--{b}--\r\n").as_bytes());
    let (code, text) = http(
        addr,
        "POST",
        "/api/jobs",
        &format!("multipart/form-data; boundary={b}"),
        &body,
    );
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Waits for /healthz to say ready (200) or failed; its answer.
pub fn wait_ready(addr: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (code, v) = get(addr, "/healthz");
        if code == 200 || v["status"] == "failed" {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never ready: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn is_final(status: &serde_json::Value) -> bool {
    ["done", "failed", "cancelled"].contains(&status.as_str().unwrap_or(""))
}

/// Polls a job until it ends (done, failed, cancelled); its last view.
pub fn wait_end(addr: &str, id: &str) -> serde_json::Value {
    wait_job(addr, id, Duration::from_secs(120), |v| {
        is_final(&v["status"])
    })
}

/// Polls a job until `until` holds for its view (answers that are not 200 are skipped).
pub fn wait_job(
    addr: &str,
    id: &str,
    timeout: Duration,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (code, v) = get(addr, &format!("/api/jobs/{id}"));
        if code == 200 && until(&v) {
            return v;
        }
        assert!(t.elapsed() < timeout, "job {id}: still {code} {v}");
        std::thread::sleep(Duration::from_millis(30));
    }
}

pub fn sketch() -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/golden/pipeline_sketch.png")).unwrap()
}
