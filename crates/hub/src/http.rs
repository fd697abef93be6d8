//! The hub's HTTP API as `huggingface_hub` uses it (ureq, redirects followed by hand so that
//! the token only goes to the hub's own origin).

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use crate::cache::TreeEntry;
use crate::{HubConfig, HubError};

pub struct Http {
    agent: ureq::Agent,
    retry_wait: Duration,
    endpoint: String,
    token: Option<String>,
}

/// What `HEAD .../resolve/<commit>/<file>` says about a file.
#[derive(Clone, Debug)]
pub struct FileMeta {
    pub etag: String,
    pub size: u64,
    pub commit: Option<String>,
    /// Where the bytes are (a CDN URL for LFS files, else the resolve URL).
    pub location: String,
}

/// The scheme, host and port of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..].find('/').map_or(url.len(), |i| after + i);
    &url[..end]
}

fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rsplit_once('/').map_or(base, |(d, _)| d);
        format!("{dir}/{location}")
    }
}

/// huggingface_hub's `_normalize_etag`: `W/"x"` and `"x"` become `x`.
fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// Percent-encodes a path segment (`quote(s, safe="")`).
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a file path, keeping its slashes.
fn quote_path(p: &str) -> String {
    p.split('/').map(quote).collect::<Vec<_>>().join("/")
}

impl Http {
    pub fn new(cfg: &HubConfig) -> Self {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(cfg.read_timeout)
            .user_agent(concat!("flipsketch/", env!("CARGO_PKG_VERSION")))
            .try_proxy_from_env(true)
            .build();
        Self {
            agent,
            retry_wait: cfg.retry_wait,
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
            token: cfg.token.clone(),
        }
    }

    pub fn retry_wait(&self) -> Duration {
        self.retry_wait
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let mut r = self.agent.request(method, url);
        if let Some(t) = &self.token {
            if origin(url) == origin(&self.endpoint) {
                r = r.set("Authorization", &format!("Bearer {t}"));
            }
        }
        r
    }

    /// Sends a request, following redirects within the hub's origin; a redirect elsewhere (the
    /// CDN) is returned as it is. Errors carry the hub's `X-Error-Code` and message.
    fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        what: &str,
    ) -> Result<ureq::Response, HubError> {
        let mut url = url.to_string();
        let mut failures = 0;
        for _ in 0..10 {
            let mut req = self.request(method, &url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            let resp = match req.call() {
                Ok(r) => r,
                // Every request here is a GET or HEAD: a dropped connection or a hub error
                // 5xx is tried again a few times.
                Err(ureq::Error::Status(status, _)) if status >= 500 && failures < 3 => {
                    failures += 1;
                    std::thread::sleep(self.retry_wait * failures);
                    continue;
                }
                Err(ureq::Error::Transport(_)) if failures < 3 => {
                    failures += 1;
                    std::thread::sleep(self.retry_wait * failures);
                    continue;
                }
                Err(ureq::Error::Status(status, r)) => {
                    return Err(HubError::Status {
                        what: what.to_string(),
                        status,
                        code: r.header("X-Error-Code").map(String::from),
                        message: r
                            .header("X-Error-Message")
                            .map(String::from)
                            .unwrap_or_else(|| r.status_text().to_string()),
                    })
                }
                Err(e) => {
                    return Err(HubError::Network {
                        what: what.to_string(),
                        msg: e.to_string(),
                    })
                }
            };
            if (300..400).contains(&resp.status()) {
                if let Some(loc) = resp.header("Location") {
                    let next = join_url(&url, loc);
                    if origin(&next) == origin(&url) {
                        url = next;
                        continue;
                    }
                }
            }
            return Ok(resp);
        }
        Err(HubError::Network {
            what: what.to_string(),
            msg: "too many redirects or retries".into(),
        })
    }

    fn json(&self, url: &str, what: &str) -> Result<(serde_json::Value, Option<String>), HubError> {
        let resp = self.call("GET", url, &[], what)?;
        let next = resp.header("Link").and_then(next_link);
        let text = resp.into_string().map_err(|e| HubError::Network {
            what: what.to_string(),
            msg: e.to_string(),
        })?;
        let v = serde_json::from_str(&text).map_err(|e| HubError::Protocol {
            what: what.to_string(),
            msg: format!("not JSON: {e}"),
        })?;
        Ok((v, next))
    }

    /// The commit a revision (branch, tag or commit) names: `GET /api/models/<repo>/revision/<rev>`.
    pub fn commit_of(&self, repo: &str, revision: &str) -> Result<String, HubError> {
        let what = format!("{repo} at revision {revision:?}");
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint,
            quote(revision)
        );
        let (v, _) = self.json(&url, &what)?;
        v["sha"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| HubError::Protocol {
                what,
                msg: "repository info without \"sha\"".into(),
            })
    }

    /// Every file of a commit with its size and hashes:
    /// `GET /api/models/<repo>/tree/<commit>?recursive=true`, all pages.
    pub fn tree(&self, repo: &str, commit: &str) -> Result<BTreeMap<String, TreeEntry>, HubError> {
        let what = format!("the file list of {repo} at {commit}");
        let mut url = Some(format!(
            "{}/api/models/{repo}/tree/{commit}?recursive=true&expand=false",
            self.endpoint
        ));
        let mut files = BTreeMap::new();
        let bad = |msg: String| HubError::Protocol {
            what: what.clone(),
            msg,
        };
        while let Some(u) = url.take() {
            let (v, next) = self.json(&u, &what)?;
            let list = v.as_array().ok_or_else(|| bad("not a list".into()))?;
            for e in list {
                if e["type"].as_str() != Some("file") {
                    continue;
                }
                let path = e["path"]
                    .as_str()
                    .ok_or_else(|| bad("entry without path".into()))?;
                let entry = TreeEntry {
                    size: e["size"]
                        .as_u64()
                        .ok_or_else(|| bad(format!("{path}: no size")))?,
                    blob_id: e["oid"]
                        .as_str()
                        .ok_or_else(|| bad(format!("{path}: no oid")))?
                        .to_string(),
                    lfs_sha256: e["lfs"]["oid"].as_str().map(String::from),
                    lfs_size: e["lfs"]["size"].as_u64(),
                    xet_hash: e["xetHash"].as_str().map(String::from),
                };
                files.insert(path.to_string(), entry);
            }
            url = next;
        }
        Ok(files)
    }

    pub fn resolve_url(&self, repo: &str, commit: &str, file: &str) -> String {
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            quote_path(file)
        )
    }

    /// `HEAD` of a file's resolve URL: its ETag, size, commit and download location.
    pub fn head(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta, HubError> {
        let url = self.resolve_url(repo, commit, file);
        let what = format!("{repo}/{file}");
        let resp = self.call("HEAD", &url, &[("Accept-Encoding", "identity")], &what)?;
        let redirect = (300..400).contains(&resp.status());
        let etag = resp
            .header("X-Linked-Etag")
            .or_else(|| resp.header("ETag"))
            .map(normalize_etag)
            .ok_or_else(|| HubError::Protocol {
                what: what.clone(),
                msg: "no ETag header".into(),
            })?;
        let size = resp
            .header("X-Linked-Size")
            .or_else(|| (!redirect).then(|| resp.header("Content-Length")).flatten())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HubError::Protocol {
                what: what.clone(),
                msg: "no size header".into(),
            })?;
        let location = match resp.header("Location") {
            Some(l) if redirect => join_url(resp.get_url(), l),
            _ => resp.get_url().to_string(),
        };
        Ok(FileMeta {
            etag,
            size,
            commit: resp.header("X-Repo-Commit").map(String::from),
            location,
        })
    }

    /// `GET` of a download location from byte `start` on.
    pub fn get_from(&self, location: &str, start: u64, what: &str) -> Result<Body, HubError> {
        let range = format!("bytes={start}-");
        let headers: &[(&str, &str)] = if start > 0 {
            &[("Range", &range), ("Accept-Encoding", "identity")]
        } else {
            &[("Accept-Encoding", "identity")]
        };
        let resp = match self.call("GET", location, headers, what) {
            Err(HubError::Status { status: 416, .. }) => {
                return Ok(Body {
                    status: 416,
                    range_start: None,
                    reader: Box::new(std::io::empty()),
                })
            }
            r => r?,
        };
        let status = resp.status();
        let range_start = resp.header("Content-Range").and_then(|v| {
            v.strip_prefix("bytes ")?
                .split('-')
                .next()?
                .trim()
                .parse()
                .ok()
        });
        Ok(Body {
            status,
            range_start,
            reader: resp.into_reader(),
        })
    }
}

/// A response body being downloaded.
pub struct Body {
    pub status: u16,
    /// The first byte a 206 answer holds.
    pub range_start: Option<u64>,
    pub reader: Box<dyn Read + Send + Sync>,
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(v: &str) -> Option<String> {
    v.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(origin("http://127.0.0.1:8/a/b"), "http://127.0.0.1:8");
        assert_eq!(origin("https://hf.co"), "https://hf.co");
        assert_eq!(join_url("http://h:1/a/b", "/c"), "http://h:1/c");
        assert_eq!(join_url("http://h:1/a/b", "http://x/y"), "http://x/y");
        assert_eq!(join_url("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(quote("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(quote_path("a b/c.json"), "a%20b/c.json");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(
            next_link("<http://h/x?cursor=2>; rel=\"next\""),
            Some("http://h/x?cursor=2".into())
        );
        assert_eq!(next_link("<http://h/x>; rel=\"prev\""), None);
    }
}
