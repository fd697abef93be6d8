//! A stand-in for the HuggingFace hub on loopback, for tests of the download code (ours and the
//! Python client's, which share the cache). It answers the hub's file API as the real hub does:
//!
//! - `GET /api/models/{repo}[/revision/{rev}]`: repository info (`sha`, `siblings`);
//! - `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`: the file listing with sizes,
//!   git blob ids and LFS sha256, paginated with a `Link: <...>; rel="next"` header;
//! - `HEAD|GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag`; LFS files (weights) are
//!   a `302` to a second origin (the "CDN", another port) with `X-Linked-Etag` (their sha256) and
//!   `X-Linked-Size`; other files are served directly with their git blob id as `ETag`;
//! - `Range: bytes=N-` (and `N-M`) answered with `206` and `Content-Range` on both origins;
//! - errors as the hub reports them: `X-Error-Code` `RepoNotFound`, `RevisionNotFound`,
//!   `EntryNotFound`, with a JSON body.
//!
//! Faults can be queued per file ([`Fault`]): cut the connection after some bytes, corrupt a
//! byte, ignore a `Range` header, answer with a status. Every request is recorded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha1::Digest as _;

/// A fault for one future content request (GET with a body) of a file, on whichever origin
/// serves its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Send the headers (with the full length) and this many body bytes, then drop the
    /// connection.
    CutAfter(usize),
    /// Send the body with one byte changed (at the middle of what is sent).
    Corrupt,
    /// Answer `200` with the whole file even when a `Range` was asked for.
    IgnoreRange,
    /// Answer with this status and no body.
    Status(u16),
    /// Send this many body bytes, then stall (keep the connection open, send nothing) for the
    /// given time before closing.
    StallAfter(usize, Duration),
}

/// One request as the hub saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query, percent-decoding not applied.
    pub target: String,
    /// `true` for the CDN origin.
    pub cdn: bool,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct File {
    bytes: Arc<Vec<u8>>,
    git_oid: String,
    sha256: Option<String>,
}

struct Commit {
    sha: String,
    files: BTreeMap<String, File>,
}

#[derive(Default)]
struct Repo {
    commits: Vec<Commit>,
    /// Branch and tag names -> commit sha.
    refs: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    faults: HashMap<String, VecDeque<Fault>>,
    seen: Vec<Seen>,
    /// Content served by sha256 on the CDN origin.
    blobs: HashMap<String, Arc<Vec<u8>>>,
    page_size: usize,
    /// Bytes per second at most for bodies (0: unlimited).
    rate: usize,
}

/// The running stand-in; stops when dropped.
pub struct TestHub {
    hub_port: u16,
    cdn_port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

/// Git's blob id: sha1 of `blob <len>\0` and the content.
pub fn git_oid(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

/// The git LFS pointer file that stands in the repository for an LFS file.
pub fn lfs_pointer(bytes: &[u8]) -> Vec<u8> {
    format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        sha256_hex(bytes),
        bytes.len()
    )
    .into_bytes()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Files stored with git LFS on the real hub (by its default `.gitattributes`): weights.
fn is_lfs(path: &str, len: usize) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gz",
        ".msgpack",
    ]
    .iter()
    .any(|e| path.ends_with(e))
        || len > 10 << 20
}

impl TestHub {
    /// Starts the hub and its CDN on two loopback ports.
    pub fn start() -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind test hub");
        let cdn = TcpListener::bind("127.0.0.1:0").expect("bind test cdn");
        let (hub_port, cdn_port) = (
            hub.local_addr().expect("addr").port(),
            cdn.local_addr().expect("addr").port(),
        );
        let state = Arc::new(Mutex::new(State {
            page_size: 50,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        for (listener, is_cdn) in [(hub, false), (cdn, true)] {
            let (state, stop) = (state.clone(), stop.clone());
            listener.set_nonblocking(true).expect("nonblocking");
            std::thread::spawn(move || loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        std::thread::spawn(move || {
                            let _ = serve_connection(stream, is_cdn, hub_port, cdn_port, &state);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            });
        }
        Self {
            hub_port,
            cdn_port,
            state,
            stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.hub_port)
    }

    pub fn cdn_port(&self) -> u16 {
        self.cdn_port
    }

    /// Adds a commit with these files to `repo` (created if new) and points each of `refs`
    /// (branch or tag names, e.g. "main") at it. Returns the commit sha (40 hex digits).
    pub fn push(&self, repo: &str, refs: &[&str], files: Vec<(String, Vec<u8>)>) -> String {
        let mut listing = sha1::Sha1::new();
        listing.update(repo.as_bytes());
        let mut map = BTreeMap::new();
        let mut st = self.lock();
        listing.update(
            st.repos
                .get(repo)
                .map_or(0, |r| r.commits.len())
                .to_le_bytes(),
        );
        for (path, bytes) in files {
            let sha256 = is_lfs(&path, bytes.len()).then(|| sha256_hex(&bytes));
            // git holds an LFS file's pointer, so its blob id is the pointer's
            let oid = match &sha256 {
                Some(_) => git_oid(&lfs_pointer(&bytes)),
                None => git_oid(&bytes),
            };
            listing.update(path.as_bytes());
            listing.update(oid.as_bytes());
            let bytes = Arc::new(bytes);
            if let Some(s) = &sha256 {
                st.blobs.insert(s.clone(), bytes.clone());
            }
            map.insert(
                path,
                File {
                    bytes,
                    git_oid: oid,
                    sha256,
                },
            );
        }
        let sha = hex(&listing.finalize());
        let r = st.repos.entry(repo.to_string()).or_default();
        r.commits.push(Commit {
            sha: sha.clone(),
            files: map,
        });
        for name in refs {
            r.refs.insert(name.to_string(), sha.clone());
        }
        sha
    }

    /// Queues a fault for the next content request of `path` (a repository path such as
    /// `checkpoint-2500/unet/diffusion_pytorch_model.safetensors`).
    pub fn fault(&self, path: &str, fault: Fault) {
        self.lock()
            .faults
            .entry(path.to_string())
            .or_default()
            .push_back(fault);
    }

    /// Drops the faults still queued.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Entries per page of the tree listing.
    pub fn set_page_size(&self, n: usize) {
        self.lock().page_size = n.max(1);
    }

    /// Limits body bytes per second (0: unlimited).
    pub fn set_rate(&self, bytes_per_s: usize) {
        self.lock().rate = bytes_per_s;
    }

    /// The requests so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.lock().seen.clear();
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Request {
    method: String,
    target: String,
    headers: HashMap<String, String>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    // Bodies are not used by any route; skip one if announced.
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut sink = vec![0; n.min(1 << 20)];
        r.read_exact(&mut sink)?;
    }
    Ok(Some(Request {
        method,
        target,
        headers,
    }))
}

fn serve_connection(
    stream: TcpStream,
    is_cdn: bool,
    hub_port: u16,
    cdn_port: u16,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    // One request per connection (answered with `Connection: close`).
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.seen.push(Seen {
            method: req.method.clone(),
            target: req.target.clone(),
            cdn: is_cdn,
            range: req.headers.get("range").cloned(),
            authorization: req.headers.get("authorization").cloned(),
        });
    }
    let reply = if is_cdn {
        route_cdn(&req, state)
    } else {
        route_hub(&req, hub_port, cdn_port, state)
    };
    write_reply(&mut out, &req, reply, state)
}

/// What to send.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

enum Body {
    Empty,
    Json(serde_json::Value),
    /// A file's bytes, the repository path (for faults), and whether ranges apply.
    File {
        bytes: Arc<Vec<u8>>,
        path: String,
    },
}

fn error(status: u16, code: &str, msg: &str) -> Reply {
    Reply {
        status,
        headers: vec![
            ("X-Error-Code".into(), code.into()),
            ("X-Error-Message".into(), msg.into()),
        ],
        body: Body::Json(serde_json::json!({ "error": msg })),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The commit a revision names: a branch or tag, or a commit sha.
fn find_commit<'a>(repo: &'a Repo, rev: &str) -> Option<&'a Commit> {
    let sha = repo.refs.get(rev).map(String::as_str).unwrap_or(rev);
    repo.commits.iter().find(|c| c.sha == sha)
}

/// Splits `owner/name/<rest>` into the repo id and the rest, if the repo exists.
fn split_repo<'a>(st: &State, path: &'a str) -> Option<(String, &'a str)> {
    let mut it = path.splitn(3, '/');
    let (owner, name) = (it.next()?, it.next()?);
    let id = format!("{owner}/{name}");
    st.repos
        .contains_key(&id)
        .then(|| (id, it.next().unwrap_or("")))
}

fn route_hub(req: &Request, hub_port: u16, cdn_port: u16, state: &Mutex<State>) -> Reply {
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let path = path.trim_start_matches('/');
    let repo_not_found = || error(404, "RepoNotFound", "Repository not found");
    if let Some(rest) = path.strip_prefix("api/models/") {
        let Some((id, rest)) = split_repo(&st, rest) else {
            return repo_not_found();
        };
        let repo = &st.repos[&id];
        if rest.is_empty() || rest.starts_with("revision/") {
            let rev = percent_decode(rest.strip_prefix("revision/").unwrap_or("main"));
            let Some(c) = find_commit(repo, &rev) else {
                return error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
            };
            let siblings: Vec<_> = c
                .files
                .keys()
                .map(|p| serde_json::json!({ "rfilename": p }))
                .collect();
            return Reply {
                status: 200,
                headers: vec![],
                body: Body::Json(serde_json::json!({
                    "_id": format!("{:024x}", id.len()),
                    "id": id, "modelId": id, "sha": c.sha, "private": false, "disabled": false,
                    "gated": false, "downloads": 0, "likes": 0, "tags": [],
                    "lastModified": "2025-01-01T00:00:00.000Z",
                    "createdAt": "2025-01-01T00:00:00.000Z",
                    "siblings": siblings,
                })),
            };
        }
        if let Some(tree) = rest.strip_prefix("tree/") {
            let (rev, sub) = tree.split_once('/').unwrap_or((tree, ""));
            let rev = percent_decode(rev);
            let sub = percent_decode(sub);
            let Some(c) = find_commit(repo, &rev) else {
                return error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
            };
            let recursive = query
                .split('&')
                .any(|kv| kv.eq_ignore_ascii_case("recursive=true"));
            let cursor: usize = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("cursor="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let prefix = if sub.is_empty() {
                String::new()
            } else {
                format!("{}/", sub.trim_end_matches('/'))
            };
            let mut entries: Vec<serde_json::Value> = Vec::new();
            let mut dirs = std::collections::BTreeSet::new();
            for (p, f) in &c.files {
                let Some(below) = p.strip_prefix(&prefix) else {
                    continue;
                };
                // directories on the way (all of them when recursive, the first level otherwise)
                let parts: Vec<&str> = below.split('/').collect();
                for k in 1..parts.len() {
                    if !recursive && k > 1 {
                        break;
                    }
                    dirs.insert(format!("{prefix}{}", parts[..k].join("/")));
                }
                if !recursive && parts.len() > 1 {
                    continue;
                }
                let mut e = serde_json::json!({
                    "type": "file", "oid": f.git_oid, "size": f.bytes.len(), "path": p,
                });
                if let Some(s) = &f.sha256 {
                    let pointer = lfs_pointer(&f.bytes).len();
                    e["lfs"] = serde_json::json!({ "oid": s, "size": f.bytes.len(), "pointerSize": pointer });
                }
                entries.push(e);
            }
            if !prefix.is_empty() && entries.is_empty() && dirs.is_empty() {
                return error(
                    404,
                    "EntryNotFound",
                    &format!("{sub} does not exist on \"{rev}\""),
                );
            }
            for d in dirs {
                entries.push(serde_json::json!({ "type": "directory", "oid": "0".repeat(40), "size": 0, "path": d }));
            }
            entries.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
            let page = st.page_size;
            let end = (cursor + page).min(entries.len());
            let mut headers = vec![];
            if end < entries.len() {
                let base = req.target.split('?').next().unwrap_or("");
                let q: Vec<&str> = query
                    .split('&')
                    .filter(|kv| !kv.is_empty() && !kv.starts_with("cursor="))
                    .collect();
                let mut q = q.join("&");
                if !q.is_empty() {
                    q.push('&');
                }
                headers.push((
                    "Link".into(),
                    format!("<http://127.0.0.1:{hub_port}{base}?{q}cursor={end}>; rel=\"next\""),
                ));
            }
            return Reply {
                status: 200,
                headers,
                body: Body::Json(serde_json::Value::Array(
                    entries[cursor.min(end)..end].to_vec(),
                )),
            };
        }
        return error(404, "EntryNotFound", "no such API route");
    }
    // /{owner}/{name}/resolve/{rev}/{path}
    let Some((id, rest)) = split_repo(&st, path) else {
        return repo_not_found();
    };
    let Some(rest) = rest.strip_prefix("resolve/") else {
        return error(404, "EntryNotFound", "no such route");
    };
    let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
    let (rev, file) = (percent_decode(rev), percent_decode(file));
    let Some(c) = find_commit(&st.repos[&id], &rev) else {
        return error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    };
    let Some(f) = c.files.get(&file) else {
        let mut r = error(
            404,
            "EntryNotFound",
            &format!("{file} does not exist on \"{rev}\""),
        );
        r.headers.push(("X-Repo-Commit".into(), c.sha.clone()));
        return r;
    };
    let mut headers = vec![
        ("X-Repo-Commit".into(), c.sha.clone()),
        ("Accept-Ranges".into(), "bytes".into()),
    ];
    match &f.sha256 {
        Some(sha) => {
            headers.extend([
                ("ETag".into(), format!("\"{}\"", f.git_oid)),
                ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                ("X-Linked-Size".into(), f.bytes.len().to_string()),
                (
                    "Location".into(),
                    format!("http://127.0.0.1:{cdn_port}/cdn/{sha}?file={file}"),
                ),
            ]);
            Reply {
                status: 302,
                headers,
                body: Body::Empty,
            }
        }
        None => {
            headers.push(("ETag".into(), format!("\"{}\"", f.git_oid)));
            Reply {
                status: 200,
                headers,
                body: Body::File {
                    bytes: f.bytes.clone(),
                    path: file,
                },
            }
        }
    }
}

fn route_cdn(req: &Request, state: &Mutex<State>) -> Reply {
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let sha = path.trim_start_matches("/cdn/");
    let file = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("file="))
        .map(percent_decode)
        .unwrap_or_default();
    match st.blobs.get(sha) {
        Some(b) => Reply {
            status: 200,
            headers: vec![
                ("Accept-Ranges".into(), "bytes".into()),
                ("ETag".into(), format!("\"{sha}\"")),
            ],
            body: Body::File {
                bytes: b.clone(),
                path: file,
            },
        },
        None => Reply {
            status: 404,
            headers: vec![],
            body: Body::Empty,
        },
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// `bytes=N-` or `bytes=N-M` within `len`.
fn parse_range(v: &str, len: usize) -> Option<(usize, usize)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

fn write_reply(
    out: &mut TcpStream,
    req: &Request,
    reply: Reply,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let head_only = req.method == "HEAD";
    let mut status = reply.status;
    let mut headers = reply.headers;
    headers.push(("Connection".into(), "close".into()));
    let (body, fault, rate): (Vec<u8>, Option<Fault>, usize) = match reply.body {
        Body::Empty => (Vec::new(), None, 0),
        Body::Json(v) => {
            headers.push(("Content-Type".into(), "application/json".into()));
            (v.to_string().into_bytes(), None, 0)
        }
        Body::File { bytes, path } => {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let rate = st.rate;
            let fault = if head_only {
                None
            } else {
                st.faults.get_mut(&path).and_then(|q| q.pop_front())
            };
            drop(st);
            if let Some(Fault::Status(s)) = fault {
                let msg = format!(
                    "HTTP/1.1 {s} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    reason(s)
                );
                return out.write_all(msg.as_bytes());
            }
            let range = req
                .headers
                .get("range")
                .filter(|_| fault != Some(Fault::IgnoreRange));
            let slice = match range {
                Some(r) => match parse_range(r, bytes.len()) {
                    Some((a, b)) => {
                        status = 206;
                        headers.push((
                            "Content-Range".into(),
                            format!("bytes {a}-{b}/{}", bytes.len()),
                        ));
                        bytes[a..=b].to_vec()
                    }
                    None => {
                        status = 416;
                        headers.push(("Content-Range".into(), format!("bytes */{}", bytes.len())));
                        Vec::new()
                    }
                },
                None => bytes.to_vec(),
            };
            (slice, fault, rate)
        }
    };
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    out.write_all(head.as_bytes())?;
    if head_only {
        return out.flush();
    }
    let mut body = body;
    let limit = match &fault {
        Some(Fault::CutAfter(n)) | Some(Fault::StallAfter(n, _)) => (*n).min(body.len()),
        Some(Fault::Corrupt) => {
            if !body.is_empty() {
                let mid = body.len() / 2;
                body[mid] ^= 0x5a;
            }
            body.len()
        }
        _ => body.len(),
    };
    let chunk = if rate > 0 {
        (rate / 20).max(1)
    } else {
        1 << 16
    };
    for part in body[..limit].chunks(chunk) {
        out.write_all(part)?;
        if rate > 0 {
            out.flush()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    out.flush()?;
    if let Some(Fault::StallAfter(_, d)) = fault {
        std::thread::sleep(d);
    }
    // A cut or stalled body ends here: dropping the stream closes the connection early.
    Ok(())
}
