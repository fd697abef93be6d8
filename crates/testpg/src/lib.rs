//! PostgreSQL for tests, the real server: a cluster `initdb`'ed into a temporary folder,
//! started with `pg_ctl` on a free loopback port (trust authentication, no network), stopped
//! when dropped. A test that restarts the database gets its own cluster ([`TestPg::private`]);
//! others get a fresh database ([`TestPg::database`]) in the server `FLIPSKETCH_TEST_PG_URL`
//! names (what `.ci/run` starts) or, without it, in a cluster of their own.
//!
//! The binaries come from `FLIPSKETCH_PG_BIN`, else `pg_config --bindir`, else
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql`). As root, the server runs as the
//! `postgres` user (PostgreSQL refuses root). Without PostgreSQL, [`TestPg::database`] says why;
//! tests then print SKIPPED, unless `FLIPSKETCH_REQUIRE_PG=1` (CI), which makes it a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A PostgreSQL server or database for one test.
pub struct TestPg {
    /// `postgres://postgres@127.0.0.1:PORT/DB`
    pub url: String,
    cluster: Option<Cluster>,
}

struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
    as_postgres: bool,
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(b) = std::env::var("FLIPSKETCH_PG_BIN") {
        return Ok(PathBuf::from(b));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").is_file() {
            return Ok(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .filter(|p| p.join("initdb").is_file())
        .ok_or_else(|| {
            "no PostgreSQL server binaries (install Debian's postgresql, or set FLIPSKETCH_PG_BIN)"
                .into()
        })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn start(&self) -> Result<(), String> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.data.display()
        );
        let st = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        if !st.success() {
            let log = std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default();
            return Err(format!("pg_ctl start failed:\n{log}"));
        }
        Ok(())
    }

    fn stop(&self, mode: &str) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn new() -> Result<Self, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("flipsketch-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let as_postgres = is_root();
        if as_postgres {
            // the folder must be the postgres user's
            for p in [dir.path()] {
                let st = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(p)
                    .status()
                    .map_err(|e| format!("chown: {e}"))?;
                if !st.success() {
                    return Err("cannot give the data folder to the postgres user".into());
                }
            }
        }
        let c = Cluster {
            bin,
            data,
            port: free_port(),
            _dir: dir,
            as_postgres,
        };
        let out = c
            .command("initdb")
            .arg("-D")
            .arg(&c.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        c.start()?;
        Ok(c)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

fn psql(url: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl TestPg {
    /// A private cluster, which the test may [`TestPg::restart`].
    pub fn private() -> Result<Self, String> {
        let c = Cluster::new()?;
        Ok(Self {
            url: format!("postgres://postgres@127.0.0.1:{}/postgres", c.port),
            cluster: Some(c),
        })
    }

    /// A fresh database of its own.
    pub fn database() -> Result<Self, String> {
        let Ok(base) = std::env::var("FLIPSKETCH_TEST_PG_URL") else {
            return Self::private();
        };
        let name = format!("t{:016x}", rand_u64());
        psql(&base, &format!("CREATE DATABASE {name}"))?;
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => return Err(format!("FLIPSKETCH_TEST_PG_URL={base}: no database part")),
        };
        Ok(Self { url, cluster: None })
    }

    /// [`TestPg::database`], or `None` after printing why the test is skipped (a failure
    /// under `FLIPSKETCH_REQUIRE_PG=1`).
    pub fn or_skip(r: Result<Self, String>) -> Option<Self> {
        match r {
            Ok(pg) => Some(pg),
            Err(e) if std::env::var("FLIPSKETCH_REQUIRE_PG").is_ok_and(|v| v == "1") => {
                panic!("PostgreSQL is required (FLIPSKETCH_REQUIRE_PG=1): {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED (no PostgreSQL to test against: {e})");
                None
            }
        }
    }

    /// Restarts the server (a private cluster only): every connection is dropped.
    pub fn restart(&self) {
        let c = self
            .cluster
            .as_ref()
            .expect("restart needs TestPg::private");
        c.stop("fast");
        c.start().expect("restarting PostgreSQL");
    }

    /// Stops the server for `down`, then starts it again.
    pub fn outage(&self, down: Duration) {
        let c = self.cluster.as_ref().expect("outage needs TestPg::private");
        c.stop("fast");
        std::thread::sleep(down);
        c.start().expect("restarting PostgreSQL");
    }

    /// Runs SQL on the database (psql).
    pub fn sql(&self, sql: &str) -> Result<(), String> {
        psql(&self.url, sql)
    }

    /// One value of a query (psql -At).
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .arg(&self.url)
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits until the server accepts connections.
    pub fn wait_up(&self, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.query("SELECT 1").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn data_dir(&self) -> Option<&Path> {
        self.cluster.as_ref().map(|c| c.data.as_path())
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
