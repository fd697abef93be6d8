//! `flipsketch serve` as a process (the real binary on the tiny model, loopback), with its
//! faults caused for real: huge uploads (memory measured from /proc), a read-only and a full
//! jobs folder (a tmpfs mounted for the test when running as root, else a read-only folder
//! and a file-size limit), a restart after a kill, idle and half-sent connections, too many
//! connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get, http, sketch, submit, tiny_model, wait_end, wait_ready, Proc};

/// Starts `flipsketch serve` on a free port with `args`; returns once it listens.
fn serve(jobs: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flipsketch"));
    cmd.args(["serve", "--port", &port.to_string(), "--jobs-dir"])
        .arg(jobs)
        .arg("--model")
        .arg(tiny_model())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        if *k == "FLIPSKETCH_TEST_FSIZE" {
            // No file of the server may grow beyond 256 KB (SIGXFSZ ignored: writes fail
            // with EFBIG instead), standing in for a full disk.
            use std::os::unix::process::CommandExt;
            // SAFETY: async-signal-safe calls only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 256 << 10,
                        rlim_max: 256 << 10,
                    };
                    libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        } else {
            cmd.env(k, v);
        }
    }
    let s = Proc {
        child: cmd.spawn().unwrap(),
        addr: format!("127.0.0.1:{port}"),
    };
    s.wait_listening();
    s
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A white greyscale PNG of `w` x `h` (compresses to almost nothing).
fn white_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_compression(png::Compression::Fast);
        let mut wr = enc.write_header().unwrap();
        let mut stream = wr.stream_writer().unwrap();
        let row = vec![255u8; w as usize];
        for _ in 0..h {
            stream.write_all(&row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

/// A 35-byte GIF whose logical screen is 11000 x 11000.
fn huge_screen_gif() -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend(11000u16.to_le_bytes());
    g.extend(11000u16.to_le_bytes());
    g.extend([0x00, 0x00, 0x00]); // no global table
    g.extend([0x2c, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // one 1x1 image
    g.extend([0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    g
}

#[test]
fn huge_uploads_are_refused_from_the_header_and_memory_stays_bounded() {
    let jobs = tempfile::tempdir().unwrap();
    let s = serve(jobs.path(), &["--queue-size", "2"], &[]);
    wait_ready(&s.addr);
    let pid = s.child.id();
    let (rss0, hwm0) = memory_mib(pid);
    // 64 megapixels of greyscale PNG (200 KB), and a GIF screen of 121 megapixels in 35 bytes
    let png = white_png(8000, 8000);
    assert!(png.len() < 1 << 20, "{} bytes", png.len());
    for (name, bytes) in [("png", png), ("gif", huge_screen_gif())] {
        let t = Instant::now();
        let (code, v) = submit(&s.addr, &bytes, &[("prompt", "x")]);
        assert_eq!(code, 400, "{name}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("megapixels"),
            "{name}: {v}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            t.elapsed()
        );
    }
    let (rss1, hwm1) = memory_mib(pid);
    eprintln!(
        "refused uploads: resident {rss0:.0} -> {rss1:.0} MiB, peak {hwm0:.0} -> {hwm1:.0} MiB"
    );
    assert!(hwm1 - hwm0 < 64.0, "peak grew by {:.0} MiB", hwm1 - hwm0);

    // The largest allowed image (6000 x 6000, 36 megapixels), two at once: decoded and
    // reduced without full-size copies; the peak stays within the stated budget.
    let big = white_png(6000, 6000);
    let addr = s.addr.clone();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (addr, big) = (addr.clone(), big.clone());
            std::thread::spawn(move || {
                submit(
                    &addr,
                    &big,
                    &[
                        ("prompt", "x"),
                        ("steps", "1"),
                        ("frames", "1"),
                        ("variants", "1"),
                    ],
                )
            })
        })
        .collect();
    for t in threads {
        let (code, v) = t.join().unwrap();
        assert_eq!(code, 202, "{v}");
    }
    let (rss2, hwm2) = memory_mib(pid);
    eprintln!("two 36-megapixel uploads: resident {rss1:.0} -> {rss2:.0} MiB, peak {hwm1:.0} -> {hwm2:.0} MiB");
    // Each decode holds the 36 MB greyscale image and its reduction (measured: peak +92 MiB
    // for the two); the bound leaves room for the multipart buffers. The decoders' memory is
    // handed back (measured: +27 MiB resident afterwards, the two small jobs they queued
    // running meanwhile).
    assert!(hwm2 - hwm1 < 300.0, "peak grew by {:.0} MiB", hwm2 - hwm1);
    assert!(
        rss2 - rss1 < 64.0,
        "resident stayed {:.0} MiB higher",
        rss2 - rss1
    );
}

/// A tmpfs of `size` mounted at `dir` (read-only if `ro`), when this process may mount; the
/// guard unmounts it.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn tmpfs(dir: &Path, size: &str, ro: bool) -> Option<Mount> {
    let mut opts = format!("size={size}");
    if ro {
        opts.push_str(",ro");
    }
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(dir.to_path_buf()))
}

#[test]
fn an_unwritable_jobs_folder_is_reported_at_start() {
    let base = tempfile::tempdir().unwrap();
    let jobs = base.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    let _m = tmpfs(&jobs, "1m", true);
    if _m.is_none() {
        // without mount rights: a folder without write permission (works for non-root)
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&jobs, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let s = serve(&jobs, &[], &[]);
    let t = Instant::now();
    let h = wait_ready(&s.addr);
    assert_eq!(h["status"], "failed", "{h}");
    let e = h["error"].as_str().unwrap();
    assert!(e.contains("not writable"), "{e}");
    assert!(
        !e.contains(base.path().to_str().unwrap()),
        "no server path shown: {e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let (code, v) = submit(&s.addr, &sketch(), &[("prompt", "x")]);
    assert_eq!(code, 503, "{v}");
}

#[test]
fn a_full_disk_fails_the_job_removes_its_files_and_the_next_job_runs() {
    let base = tempfile::tempdir().unwrap();
    let jobs = base.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    let mounted = tmpfs(&jobs, "3m", false);
    let s = if mounted.is_some() {
        serve(&jobs, &["--output-size", "512"], &[])
    } else {
        eprintln!("no tmpfs (not root): a file-size limit stands in for the full disk");
        serve(
            &jobs,
            &["--output-size", "512"],
            &[("FLIPSKETCH_TEST_FSIZE", "1")],
        )
    };
    wait_ready(&s.addr);
    let (code, v) = submit(
        &s.addr,
        &sketch(),
        &[
            ("prompt", "x"),
            ("variants", "8"),
            ("frames", "24"),
            ("steps", "1"),
        ],
    );
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let end = wait_end(&s.addr, &id);
    assert_eq!(end["status"], "failed", "{end}");
    let e = end["error"].as_str().unwrap();
    assert!(
        !e.contains(jobs.to_str().unwrap()) && !e.contains("/tmp/"),
        "a server path in {e}"
    );
    // the partial files went with the failure
    assert!(!jobs.join(&id).exists());
    // and the disk has room again for a small job
    let (code, v) = submit(
        &s.addr,
        &sketch(),
        &[
            ("prompt", "x"),
            ("variants", "1"),
            ("frames", "2"),
            ("steps", "1"),
        ],
    );
    assert_eq!(code, 202, "{v}");
    let end = wait_end(&s.addr, v["id"].as_str().unwrap());
    assert_eq!(end["status"], "done", "{end}");
    drop(s);
}

#[test]
fn a_restart_after_a_kill_clears_what_no_live_job_owns() {
    let jobs = tempfile::tempdir().unwrap();
    // left by an earlier process: a job folder, a staging folder
    let stale = jobs.path().join("0123456789abcdef0123456789abcdef");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("variant-0.gif"), b"GIF8").unwrap();
    std::fs::create_dir(jobs.path().join(".flipsketch-partial-0-99")).unwrap();
    std::fs::write(jobs.path().join("keep-me.txt"), b"not ours").unwrap();
    let mut s = serve(jobs.path(), &[], &[]);
    wait_ready(&s.addr);
    assert!(!stale.exists());
    assert!(!jobs.path().join(".flipsketch-partial-0-99").exists());
    assert!(
        jobs.path().join("keep-me.txt").exists(),
        "only job folders are removed"
    );
    // a second server on the same folder is refused
    let other = serve(jobs.path(), &[], &[]);
    let h = wait_ready(&other.addr);
    assert!(h["error"].as_str().unwrap_or("").contains("in use"), "{h}");
    drop(other);
    // kill -9 while a job runs, then start again
    let (_, v) = submit(
        &s.addr,
        &sketch(),
        &[("prompt", "x"), ("steps", "100"), ("frames", "8")],
    );
    let id = v["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    while !jobs.path().join(&id).exists() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    assert!(jobs.path().join(&id).exists());
    let s2 = serve(jobs.path(), &[], &[]);
    wait_ready(&s2.addr);
    assert!(
        !jobs.path().join(&id).exists(),
        "the killed job's folder is cleared"
    );
}

#[test]
fn idle_half_sent_and_surplus_connections_are_closed() {
    let jobs = tempfile::tempdir().unwrap();
    let s = serve(
        jobs.path(),
        &[
            "--max-connections",
            "4",
            "--idle-timeout",
            "1",
            "--header-timeout",
            "1",
        ],
        &[],
    );
    wait_ready(&s.addr);
    // an idle connection and a half-sent request are closed within a few seconds
    let closed_within = |mut c: TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 256];
        let _ = c.read(&mut buf); // 0 (closed) or an error answer
        t.elapsed()
    };
    let idle = TcpStream::connect(&s.addr).unwrap();
    let mut half = TcpStream::connect(&s.addr).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .unwrap();
    assert!(closed_within(idle) < Duration::from_secs(4));
    assert!(closed_within(half) < Duration::from_secs(4));
    // four held connections: the fifth is answered 503 and closed
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (code, body) = http(&s.addr, "GET", "/healthz", "text/plain", b"");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    drop(held);
    // they close on their own (idle); then the server answers again
    std::thread::sleep(Duration::from_millis(2500));
    let (code, _) = get(&s.addr, "/healthz");
    assert_eq!(code, 200);
}
