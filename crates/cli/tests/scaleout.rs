//! The PostgreSQL queue across processes: `flipsketch serve --queue postgres://...` front ends
//! and `flipsketch worker` processes (the real binary, the tiny model) on a real PostgreSQL
//! server (flipsketch-testpg), with the faults caused for real: a worker killed (SIGKILL)
//! mid-job, a worker paused (SIGSTOP) past its lease and resumed, a worker stopped (SIGTERM)
//! mid-job, a front end killed and started again, the database restarted and away for
//! seconds, a worker whose model does not load. SKIPPED without PostgreSQL binaries (a
//! failure under FLIPSKETCH_REQUIRE_PG=1, as in CI).
//!
//! The tests measure times (a lost job's re-run, a worker's absence in the health report), so
//! they run one at a time: the machine may have only two cores.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    free_port, get, get_bytes, http, sketch, submit, tiny_model, wait_end, wait_job, Proc,
};
use flipsketch_testpg::TestPg;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A short job: a few seconds on the tiny model.
const SMALL: &[(&str, &str)] = &[
    ("prompt", "a cat"),
    ("steps", "10"),
    ("frames", "8"),
    ("variants", "1"),
];

fn spawn(args: &[&str], log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flipsketch"));
    cmd.args(args)
        .env("RUST_LOG", "warn,flipsketch_pgqueue=info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            File::options().create(true).append(true).open(log).unwrap(),
        ));
    cmd
}

/// A front end only (`--workers 0`) on `port`, the queue at `url`; `queue` are the lease and
/// heartbeat flags, the same for every process of a test.
fn front(url: &str, dir: &Path, port: u16, queue: &[&str]) -> Proc {
    front_env(url, dir, port, queue, &[])
}

/// [`front`] with more environment variables.
fn front_env(url: &str, dir: &Path, port: u16, queue: &[&str], env: &[(&str, &str)]) -> Proc {
    let port_s = port.to_string();
    let jobs = dir.join(format!("jobs-{port}"));
    let mut args = vec![
        "serve",
        "--port",
        &port_s,
        "--queue",
        url,
        "--queue-size",
        "16",
        "--output-size",
        "64",
    ];
    args.extend(queue);
    let mut cmd = spawn(&args, &dir.join(format!("front-{port}.log")));
    cmd.envs(env.iter().copied());
    cmd.arg("--jobs-dir")
        .arg(jobs)
        .arg("--model")
        .arg(tiny_model());
    let p = Proc {
        child: cmd.spawn().unwrap(),
        addr: format!("127.0.0.1:{port}"),
    };
    p.wait_listening();
    p
}

/// `flipsketch worker --name name` on `model`; its log is `dir/name.log`.
fn worker(url: &str, dir: &Path, name: &str, model: &Path, queue: &[&str]) -> Proc {
    worker_env(url, dir, name, model, queue, &[])
}

/// [`worker`] with more environment variables.
fn worker_env(
    url: &str,
    dir: &Path,
    name: &str,
    model: &Path,
    queue: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut args = vec![
        "worker",
        "--queue",
        url,
        "--name",
        name,
        "--output-size",
        "64",
    ];
    args.extend(queue);
    let mut cmd = spawn(&args, &dir.join(format!("{name}.log")));
    cmd.envs(env.iter().copied());
    cmd.arg("--model")
        .arg(model)
        .arg("--scratch")
        .arg(dir.join(format!("scratch-{name}")));
    Proc {
        child: cmd.spawn().unwrap(),
        addr: String::new(),
    }
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Polls until `f` gives a value (or panics after `timeout`, saying `what`).
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn alive_workers(addr: &str) -> i64 {
    get(addr, "/healthz").1["workers"]["alive"]
        .as_i64()
        .unwrap_or(-1)
}

fn submit_ok(addr: &str, fields: &[(&str, &str)]) -> String {
    let (code, v) = submit(addr, &sketch(), fields);
    assert_eq!(code, 202, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// The one value of a query, e.g. `SELECT worker FROM ...`.
fn q(pg: &TestPg, sql: &str) -> String {
    pg.query(sql).unwrap()
}

/// The job `id` as a worker runs it, once past `progress`: the worker's name.
fn running_past(pg: &TestPg, id: &str, progress: f64) -> String {
    eventually(Duration::from_secs(60), "the job to run", || {
        let w = q(
            pg,
            &format!(
                "SELECT worker FROM flipsketch_jobs WHERE id = '{id}' AND state = 'running' \
                 AND progress > {progress}"
            ),
        );
        (!w.is_empty()).then_some(w)
    })
}

/// Every stored file is one that a done job names, once (GIFs, frames, videos).
const FILES_MATCH: &str = "SELECT (SELECT count(*) FROM flipsketch_files) = \
     (SELECT coalesce(sum(cardinality(files)), 0) FROM flipsketch_jobs WHERE state = 'done') \
     AND NOT EXISTS (SELECT 1 FROM flipsketch_files f JOIN flipsketch_jobs j ON j.id = f.job_id \
     WHERE NOT f.name = ANY(j.files))";

/// Every result file of a done job is there and is a GIF.
fn assert_files(addr: &str, job: &Value) -> usize {
    let results = job["results"].as_array().unwrap();
    assert!(!results.is_empty(), "{job}");
    for r in results {
        let url = r["gif"].as_str().unwrap();
        let (code, bytes) = get_bytes(addr, url);
        assert_eq!(code, 200, "{url}");
        assert!(bytes.starts_with(b"GIF89a"), "{url}: not a GIF");
    }
    results.len()
}

#[test]
fn scaleout_a_killed_workers_job_runs_again_once_on_another() {
    let _g = serial();
    let Some(pg) = TestPg::or_skip(TestPg::database()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flags = ["--lease-s", "3", "--heartbeat-s", "1"];
    let fe = front(&pg.url, d, free_port(), &flags);
    let mut w1 = worker(&pg.url, d, "w1", &tiny_model(), &flags);
    let _w2 = worker(&pg.url, d, "w2", &tiny_model(), &flags);
    eventually(Duration::from_secs(60), "two workers", || {
        (alive_workers(&fe.addr) == 2).then_some(())
    });
    let ids: Vec<String> = (0..10).map(|_| submit_ok(&fe.addr, SMALL)).collect();

    // w1 is killed a fifth into one of its jobs
    let victim = eventually(Duration::from_secs(60), "a job on w1", || {
        let id = q(
            &pg,
            "SELECT id FROM flipsketch_jobs WHERE worker = 'w1' AND state = 'running' \
             AND progress > 0.2 LIMIT 1",
        );
        (!id.is_empty()).then_some(id)
    });
    w1.signal(libc::SIGKILL);
    let killed = Instant::now();
    assert!(w1.wait_exit(Duration::from_secs(5)).is_some());

    // after the lease, the job runs again (attempt 2, on w2); after three missed heartbeats
    // w1 is out of the health report
    let (mut rerun, mut gone) = (None, None);
    eventually(
        Duration::from_secs(30),
        "the re-run and w1's absence",
        || {
            let (_, v) = get(&fe.addr, &format!("/api/jobs/{victim}"));
            if rerun.is_none() && v["attempt"] == 2 && v["status"] != "queued" {
                rerun = Some(killed.elapsed());
            }
            if gone.is_none() && alive_workers(&fe.addr) == 1 {
                gone = Some(killed.elapsed());
            }
            rerun.and(gone)
        },
    );
    let (rerun, gone) = (rerun.unwrap(), gone.unwrap());

    let mut files = 0;
    for id in &ids {
        let end = wait_end(&fe.addr, id);
        assert_eq!(end["status"], "done", "{end}");
        let want = if *id == victim { 2 } else { 1 };
        assert_eq!(end["attempt"], want, "{end}");
        files += assert_files(&fe.addr, &end);
    }
    // one result per job, written by the attempt that holds it; the victim's by w2 after
    // one lost lease; no file of the killed attempt
    assert_eq!(
        q(
            &pg,
            "SELECT count(*) FROM flipsketch_jobs WHERE state = 'done' AND result_attempt = attempt"
        ),
        "10"
    );
    assert_eq!(
        q(
            &pg,
            &format!("SELECT lost, worker FROM flipsketch_jobs WHERE id = '{victim}'")
        ),
        "1|w2"
    );
    assert_eq!(q(&pg, FILES_MATCH), "t");
    assert!(files >= 10);
    assert_eq!(
        q(&pg, "SELECT sum(lost) FROM flipsketch_jobs"),
        "1",
        "only the killed job was lost"
    );
    eprintln!(
        "killed worker: its job running again after {:.2} s (lease 3 s), the worker out of \
         the health report after {:.2} s (3 heartbeats of 1 s)",
        rerun.as_secs_f64(),
        gone.as_secs_f64()
    );
    assert!(rerun < Duration::from_secs(9), "re-run after {rerun:?}");

    // started again with the same name and scratch folder, w1 clears what a killed worker
    // leaves there (a job folder written into when it died) and works
    let stale = d.join("scratch-w1").join(&victim);
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("variant-0.gif"), b"GIF8").unwrap();
    let _w1 = worker(&pg.url, d, "w1", &tiny_model(), &flags);
    eventually(Duration::from_secs(60), "w1 back", || {
        (alive_workers(&fe.addr) == 2).then_some(())
    });
    let left: Vec<_> = std::fs::read_dir(d.join("scratch-w1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn scaleout_a_paused_worker_past_its_lease_records_nothing() {
    let _g = serial();
    let Some(pg) = TestPg::or_skip(TestPg::database()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flags = ["--lease-s", "3", "--heartbeat-s", "1"];
    let fe = front(&pg.url, d, free_port(), &flags);
    let workers = vec![
        ("wa", worker(&pg.url, d, "wa", &tiny_model(), &flags)),
        ("wb", worker(&pg.url, d, "wb", &tiny_model(), &flags)),
    ];
    eventually(Duration::from_secs(60), "two workers", || {
        (alive_workers(&fe.addr) == 2).then_some(())
    });
    let id = submit_ok(
        &fe.addr,
        &[
            ("prompt", "a cat"),
            ("steps", "20"),
            ("frames", "8"),
            ("variants", "1"),
        ],
    );
    let first = running_past(&pg, &id, 0.15);
    let (paused, other) = if first == "wa" { (0, 1) } else { (1, 0) };
    workers[paused].1.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // the lease runs out; the other worker takes the job
    wait_job(&fe.addr, &id, Duration::from_secs(30), |v| {
        v["attempt"] == 2 && v["status"] == "running"
    });
    let taken = stopped.elapsed();
    assert_eq!(
        q(
            &pg,
            &format!("SELECT worker FROM flipsketch_jobs WHERE id = '{id}'")
        ),
        workers[other].0
    );
    // resumed while the other runs the job: its next write finds the job not its own
    workers[paused].1.signal(libc::SIGCONT);
    let end = wait_end(&fe.addr, &id);
    assert_eq!(end["status"], "done", "{end}");
    assert_eq!(end["attempt"], 2, "{end}");
    assert_eq!(
        q(
            &pg,
            &format!("SELECT result_attempt, worker, lost FROM flipsketch_jobs WHERE id = '{id}'")
        ),
        format!("2|{}|1", workers[other].0)
    );
    let name = workers[paused].0;
    let said = eventually(
        Duration::from_secs(20),
        "the resumed worker to give up",
        || {
            let l = log(d, name);
            (l.contains("attempt 1 lost its lease")
                || l.contains("the late result of attempt 1 was refused"))
            .then_some(l)
        },
    );
    assert!(!said.contains("panicked"), "{said}");
    assert_files(&fe.addr, &end);
    assert_eq!(q(&pg, FILES_MATCH), "t");
    eprintln!(
        "paused worker: the job taken again {:.2} s after the pause (lease 3 s); the late \
         attempt recorded nothing",
        taken.as_secs_f64()
    );

    // the resumed worker works on: alone now, it runs the next job
    workers[other].1.signal(libc::SIGKILL);
    let id2 = submit_ok(&fe.addr, SMALL);
    let end2 = wait_end(&fe.addr, &id2);
    assert_eq!(end2["status"], "done", "{end2}");
    assert_eq!(
        q(
            &pg,
            &format!("SELECT worker FROM flipsketch_jobs WHERE id = '{id2}'")
        ),
        name
    );
}

#[test]
fn scaleout_a_stopped_worker_hands_its_job_back_at_once() {
    let _g = serial();
    let Some(pg) = TestPg::or_skip(TestPg::database()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // a long lease: a quick re-run is the hand-back, not an expiry
    let flags = ["--lease-s", "60", "--heartbeat-s", "1"];
    let fe = front(&pg.url, d, free_port(), &flags);
    let mut workers = vec![
        ("wa", worker(&pg.url, d, "wa", &tiny_model(), &flags)),
        ("wb", worker(&pg.url, d, "wb", &tiny_model(), &flags)),
    ];
    eventually(Duration::from_secs(60), "two workers", || {
        (alive_workers(&fe.addr) == 2).then_some(())
    });
    let id = submit_ok(
        &fe.addr,
        &[
            ("prompt", "a cat"),
            ("steps", "100"),
            ("frames", "8"),
            ("variants", "1"),
        ],
    );
    let first = running_past(&pg, &id, 0.05);
    let (stopping, other) = if first == "wa" { (0, 1) } else { (1, 0) };
    workers[stopping].1.signal(libc::SIGTERM);
    let t = Instant::now();
    let code = workers[stopping].1.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(Some(0)), "the stopped worker exits cleanly");
    let exited = t.elapsed();
    wait_job(&fe.addr, &id, Duration::from_secs(20), |v| {
        v["attempt"] == 2 && v["status"] == "running"
    });
    let rerun = t.elapsed();
    assert!(
        rerun < Duration::from_secs(20),
        "taken again after {rerun:?} (the lease is 60 s)"
    );
    // handing back is not a lost attempt: the job keeps all its tries
    assert_eq!(
        q(
            &pg,
            &format!("SELECT lost, max_attempts, worker FROM flipsketch_jobs WHERE id = '{id}'")
        ),
        format!("0|4|{}", workers[other].0)
    );
    assert_eq!(
        q(
            &pg,
            &format!(
                "SELECT state FROM flipsketch_workers WHERE id = '{}'",
                workers[stopping].0
            )
        ),
        "stopped"
    );
    assert!(log(d, workers[stopping].0).contains("handed back to the queue"));

    // a cancel reaches the worker running the job at its next renewal
    let (code, body) = http(
        &fe.addr,
        "DELETE",
        &format!("/api/jobs/{id}"),
        "text/plain",
        b"",
    );
    assert_eq!(code, 200, "{body}");
    let asked = Instant::now();
    let end = wait_end(&fe.addr, &id);
    assert_eq!(end["status"], "cancelled", "{end}");
    let cancelled = asked.elapsed();
    assert_eq!(
        q(
            &pg,
            &format!("SELECT count(*) FROM flipsketch_files WHERE job_id = '{id}'")
        ),
        "0"
    );
    // the worker is free again
    let id2 = submit_ok(&fe.addr, SMALL);
    assert_eq!(wait_end(&fe.addr, &id2)["status"], "done");
    eprintln!(
        "SIGTERM: the worker exited after {:.2} s, the job running again after {:.2} s \
         (lease 60 s); a cancel of a running job took {:.2} s",
        exited.as_secs_f64(),
        rerun.as_secs_f64(),
        cancelled.as_secs_f64()
    );
}

/// One event of a stream: (id, status, attempt).
type Event = (u64, String, i64);

/// Reads the event stream of `id` from the server at `port` until the job ends, connecting
/// again (with `Last-Event-ID`) whenever the connection is lost; the events and the number of
/// reconnections.
fn follow(port: u16, id: &str, timeout: Duration) -> (Vec<Event>, usize) {
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    let mut events: Vec<Event> = Vec::new();
    let mut reconnects = 0;
    let mut connected_once = false;
    while t.elapsed() < timeout {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if connected_once {
            reconnects += 1;
        }
        connected_once = true;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let last = events
            .last()
            .map(|e| format!("last-event-id: {}\r\n", e.0))
            .unwrap_or_default();
        // HTTP/1.0: the body is the stream until the connection closes (no chunks)
        if write!(
            s,
            "GET /api/jobs/{id}/events HTTP/1.0\r\nhost: {addr}\r\n{last}\r\n"
        )
        .is_err()
        {
            continue;
        }
        let mut event_id = None;
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("id: ") {
                event_id = v.trim().parse::<u64>().ok();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                let status = v["status"].as_str().unwrap().to_string();
                let end = common::is_final(&v["status"]);
                events.push((
                    event_id.expect("every event has an id"),
                    status,
                    v["attempt"].as_i64().unwrap(),
                ));
                if end {
                    return (events, reconnects);
                }
            }
        }
    }
    panic!("the event stream of {id} never ended: {events:?}");
}

#[test]
fn scaleout_restarts_of_a_front_end_and_of_the_database_lose_no_job() {
    let _g = serial();
    // a cluster of its own: the test restarts it
    let Some(pg) = TestPg::or_skip(TestPg::private()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // the lease outlasts the database's absence: nothing is lost, nothing runs twice
    let flags = ["--lease-s", "30", "--heartbeat-s", "1"];
    let (p1, p2) = (free_port(), free_port());
    let fe1 = front(&pg.url, d, p1, &flags);
    let mut fe2 = front(&pg.url, d, p2, &flags);
    let _w = worker(&pg.url, d, "w", &tiny_model(), &flags);
    eventually(Duration::from_secs(60), "the worker", || {
        (alive_workers(&fe1.addr) == 1).then_some(())
    });
    let ids: Vec<String> = (0..4).map(|_| submit_ok(&fe1.addr, SMALL)).collect();
    let last = ids[3].clone();
    std::thread::scope(|scope| {
        // a client of the second front end follows the last job from its submission to its end
        let follower = scope.spawn(|| follow(p2, &last, Duration::from_secs(240)));

        // the second front end is killed while the first job runs, and started again
        running_past(&pg, &ids[0], 0.1);
        fe2.signal(libc::SIGKILL);
        fe2.wait_exit(Duration::from_secs(5));
        drop(fe2);
        fe2 = front(&pg.url, d, p2, &flags);
        let (code, v) = get(&fe2.addr, &format!("/api/jobs/{}", ids[0]));
        assert_eq!(code, 200, "{v}");

        // the database restarts while the second job runs
        running_past(&pg, &ids[1], 0.1);
        let t = Instant::now();
        pg.restart();
        eventually(
            Duration::from_secs(30),
            "the front end to reach it again",
            || (get(&fe1.addr, "/healthz").0 == 200).then_some(()),
        );
        eprintln!(
            "database restart: the front end answering again after {:.2} s",
            t.elapsed().as_secs_f64()
        );

        // then it is away for 10 s: clients are told so at once (503, not "no such job")
        running_past(&pg, &ids[2], 0.0);
        let outage = scope.spawn(|| pg.outage(Duration::from_secs(10)));
        let (code, v) = eventually(Duration::from_secs(10), "a 503 during the outage", || {
            let (code, v) = get(&fe1.addr, &format!("/api/jobs/{}", ids[2]));
            (code == 503).then_some((code, v))
        });
        assert!(
            v["error"].as_str().unwrap().contains("PostgreSQL"),
            "{code} {v}"
        );
        let (code, v) = submit(&fe1.addr, &sketch(), SMALL);
        assert_eq!(code, 503, "{v}");
        outage.join().unwrap();

        for id in &ids {
            let end = wait_end(&fe1.addr, id);
            assert_eq!(end["status"], "done", "{end}");
            assert_eq!(end["attempt"], 1, "no job ran twice: {end}");
            assert_files(&fe2.addr, &end);
        }
        let (events, reconnects) = follower.join().unwrap();
        assert!(reconnects >= 1, "the stream was cut by the kill");
        assert_eq!(events.last().unwrap().1, "done", "{events:?}");
        assert!(
            events.windows(2).all(|w| w[0].0 < w[1].0),
            "event ids only grow, none repeated after reconnecting: {events:?}"
        );
        // (a state stream: changes made while a front end could not hear of them, the
        // database away, arrive as the state they led to)
        assert_eq!(events[0].1, "queued", "{events:?}");
        eprintln!(
            "event stream: {} events, {reconnects} reconnection(s)",
            events.len()
        );
    });
    assert_eq!(
        q(
            &pg,
            "SELECT count(*) FROM flipsketch_jobs WHERE state = 'done' AND lost = 0"
        ),
        "4"
    );
}

#[test]
fn scaleout_a_worker_whose_model_fails_takes_no_job_and_says_why() {
    let _g = serial();
    let Some(pg) = TestPg::or_skip(TestPg::database()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flags = ["--lease-s", "60", "--heartbeat-s", "1"];
    // the tiny model with its UNet weights cut short
    let broken = d.join("broken-model");
    copy_dir(&tiny_model(), &broken);
    let unet = broken.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();

    let fe = front(&pg.url, d, free_port(), &flags);
    let mut good = worker(&pg.url, d, "good", &tiny_model(), &flags);
    eventually(Duration::from_secs(60), "the good worker", || {
        (alive_workers(&fe.addr) == 1).then_some(())
    });
    let id = submit_ok(
        &fe.addr,
        &[
            ("prompt", "a cat"),
            ("steps", "100"),
            ("frames", "8"),
            ("variants", "1"),
        ],
    );
    running_past(&pg, &id, 0.0);
    let mut bad = worker(&pg.url, d, "bad", &broken, &flags);
    let code = bad.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(Some(1)), "the broken worker exits with an error");
    let said = log(d, "bad");
    assert!(
        said.contains("diffusion_pytorch_model.safetensors"),
        "{said}"
    );
    let row = q(
        &pg,
        "SELECT state, error FROM flipsketch_workers WHERE id = 'bad'",
    );
    assert!(row.starts_with("failed|the model failed to load"), "{row}");
    assert_eq!(
        q(
            &pg,
            "SELECT count(*) FROM flipsketch_jobs WHERE worker = 'bad'"
        ),
        "0"
    );

    // the good worker stops (its job handed back): no worker is ready, and clients are
    // told why; the waiting job is kept
    good.signal(libc::SIGTERM);
    assert_eq!(good.wait_exit(Duration::from_secs(15)), Some(Some(0)));
    let (code, h) = eventually(Duration::from_secs(10), "the health to fail", || {
        let (code, h) = get(&fe.addr, "/healthz");
        (code == 503).then_some((code, h))
    });
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .contains("the model failed to load"),
        "{code} {h}"
    );
    let (code, v) = submit(&fe.addr, &sketch(), SMALL);
    assert_eq!(code, 503, "{v}");
    assert_eq!(
        get(&fe.addr, &format!("/api/jobs/{id}")).1["status"],
        "queued"
    );

    // a new worker takes it
    let _again = worker(&pg.url, d, "again", &tiny_model(), &flags);
    wait_job(&fe.addr, &id, Duration::from_secs(60), |v| {
        v["status"] == "running" && v["attempt"] == 2
    });
    let (code, body) = http(
        &fe.addr,
        "DELETE",
        &format!("/api/jobs/{id}"),
        "text/plain",
        b"",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(wait_end(&fe.addr, &id)["status"], "cancelled");
    let id2 = submit_ok(&fe.addr, SMALL);
    assert_eq!(wait_end(&fe.addr, &id2)["status"], "done");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// `moto_server` (the S3-compatible server of the Python package moto, pinned in
/// tools/s3/requirements.txt) from `FLIPSKETCH_MOTO_SERVER`; without it the S3 test prints
/// SKIPPED, unless `FLIPSKETCH_REQUIRE_S3=1` (CI), which makes it a failure.
fn moto_server() -> Option<String> {
    match std::env::var("FLIPSKETCH_MOTO_SERVER") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            assert!(
                std::env::var("FLIPSKETCH_REQUIRE_S3").as_deref() != Ok("1"),
                "FLIPSKETCH_REQUIRE_S3=1 but FLIPSKETCH_MOTO_SERVER names no moto_server"
            );
            eprintln!("SKIPPED: no S3-compatible server (set FLIPSKETCH_MOTO_SERVER)");
            None
        }
    }
}

/// A fresh, empty S3 server (moto keeps everything in memory) on `port` with the bucket
/// `flipsketch`.
fn start_s3(bin: &str, port: u16, dir: &Path) -> Proc {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("s3.log"))
        .unwrap();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let p = Proc {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    p.wait_listening();
    let (code, body) = http(
        &p.addr,
        "PUT",
        "/flipsketch",
        "application/octet-stream",
        b"",
    );
    assert_eq!(code, 200, "creating the bucket: {body}");
    p
}

/// The objects in the bucket under `jobs/`: (key, size). (moto lists for anyone but serves
/// objects only to signed requests.)
fn s3_objects(addr: &str) -> Vec<(String, usize)> {
    let (code, body) = http(
        addr,
        "GET",
        "/flipsketch?list-type=2&prefix=jobs/",
        "text/plain",
        b"",
    );
    assert_eq!(code, 200, "{body}");
    let field = |c: &str, tag: &str| -> Option<String> {
        let open = format!("<{tag}>");
        let rest = &c[c.find(&open)? + open.len()..];
        Some(rest[..rest.find('<')?].to_string())
    };
    body.split("<Contents>")
        .skip(1)
        .map(|c| {
            let size = field(c, "Size").and_then(|s| s.parse().ok());
            (field(c, "Key").unwrap(), size.unwrap())
        })
        .collect()
}

fn s3_keys(addr: &str) -> Vec<String> {
    s3_objects(addr).into_iter().map(|(k, _)| k).collect()
}

#[test]
fn scaleout_files_in_an_s3_bucket_are_served_expire_and_fail_clearly_when_it_is_away() {
    let _g = serial();
    let Some(pg) = TestPg::or_skip(TestPg::database()) else {
        return;
    };
    let Some(bin) = moto_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3_port = free_port();
    let mut s3 = start_s3(&bin, s3_port, d);
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let flags = [
        "--lease-s",
        "3",
        "--heartbeat-s",
        "1",
        "--store",
        "s3://flipsketch/jobs",
    ];

    // a bucket that does not exist is said at start, before any job
    let mut bad = worker_env(
        &pg.url,
        d,
        "bad",
        &tiny_model(),
        &["--store", "s3://no-such-bucket/jobs"],
        &env,
    );
    assert_eq!(bad.wait_exit(Duration::from_secs(60)), Some(Some(1)));
    let said = log(d, "bad");
    assert!(
        said.contains("s3://no-such-bucket/jobs: the bucket cannot be read"),
        "{said}"
    );

    let fe = front_env(&pg.url, d, free_port(), &flags, &env);
    let _w = worker_env(&pg.url, d, "w", &tiny_model(), &flags, &env);
    eventually(Duration::from_secs(60), "the worker", || {
        (alive_workers(&fe.addr) == 1).then_some(())
    });
    let ids: Vec<String> = (0..2).map(|_| submit_ok(&fe.addr, SMALL)).collect();
    let mut served = Vec::new();
    for id in &ids {
        let end = wait_end(&fe.addr, id);
        assert_eq!(end["status"], "done", "{end}");
        assert_files(&fe.addr, &end);
        for r in end["results"].as_array().unwrap() {
            let url = r["gif"].as_str().unwrap().to_string();
            let name = url.rsplit('/').next().unwrap().to_string();
            // what the front end serves is the attempt's object in the bucket
            let (_, via_front) = get_bytes(&fe.addr, &url);
            let key = format!("jobs/{id}/a1/{name}");
            let objects = s3_objects(&s3.addr);
            let size = objects.iter().find(|(k, _)| *k == key).map(|(_, n)| *n);
            assert_eq!(size, Some(via_front.len()), "{key} in {objects:?}");
            served.push(url);
        }
    }
    // the database names the files but holds none of their bytes
    assert_eq!(
        q(
            &pg,
            "SELECT count(*) FILTER (WHERE bytes IS NULL) = count(*) AND count(*) > 0 \
             FROM flipsketch_files"
        ),
        "t"
    );
    assert_eq!(q(&pg, FILES_MATCH), "t");
    let stored = s3_keys(&s3.addr);
    assert_eq!(
        stored.len(),
        q(&pg, "SELECT count(*) FROM flipsketch_files")
            .parse::<usize>()
            .unwrap(),
        "{stored:?}"
    );

    // the bucket away: a download answers 503 soon, the job's status still answers
    s3.signal(libc::SIGKILL);
    s3.wait_exit(Duration::from_secs(10));
    let t = Instant::now();
    let (code, body) = http(&fe.addr, "GET", &served[0], "text/plain", b"");
    let answered = t.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("files cannot be read"), "{body}");
    assert!(answered < Duration::from_secs(20), "503 after {answered:?}");
    assert_eq!(
        get(&fe.addr, &format!("/api/jobs/{}", ids[0])).1["status"],
        "done"
    );
    // a job that ends while the bucket is away fails with the reason once a lease has passed
    // (running it again elsewhere would meet the same bucket); the worker goes on
    let id = submit_ok(&fe.addr, SMALL);
    let submitted = Instant::now();
    let end = wait_end(&fe.addr, &id);
    let failed_after = submitted.elapsed();
    assert_eq!(end["status"], "failed", "{end}");
    let error = end["error"].as_str().unwrap();
    assert!(
        error.contains("the result's files could not be stored"),
        "{error}"
    );
    assert_eq!(end["attempt"], 1, "{end}");
    assert_eq!(alive_workers(&fe.addr), 1);

    // the bucket back (empty: moto keeps nothing): the next job is stored and served
    let s3 = start_s3(&bin, s3_port, d);
    let id = submit_ok(&fe.addr, SMALL);
    let end = wait_end(&fe.addr, &id);
    assert_eq!(end["status"], "done", "{end}");
    assert_files(&fe.addr, &end);
    assert!(!s3_keys(&s3.addr).is_empty());
    drop(fe);
    drop(_w);

    // kept 3 s (--keep-minutes 0.05): finished jobs go, their rows and their objects
    let keep = ["--keep-minutes", "0.05"];
    let fe = front_env(&pg.url, d, free_port(), &[&flags[..], &keep].concat(), &env);
    let _w = worker_env(
        &pg.url,
        d,
        "w2",
        &tiny_model(),
        &[&flags[..], &keep].concat(),
        &env,
    );
    eventually(Duration::from_secs(60), "the worker", || {
        (get(&fe.addr, "/healthz").0 == 200).then_some(())
    });
    let id = submit_ok(&fe.addr, SMALL);
    let end = wait_end(&fe.addr, &id);
    assert_eq!(end["status"], "done", "{end}");
    let done = Instant::now();
    assert!(s3_keys(&s3.addr).iter().any(|k| k.contains(&id)));
    let gone = eventually(Duration::from_secs(30), "the expiry", || {
        let status = get(&fe.addr, &format!("/api/jobs/{id}")).0;
        (status == 404 && s3_keys(&s3.addr).is_empty()).then(|| done.elapsed())
    });
    assert_eq!(q(&pg, "SELECT count(*) FROM flipsketch_jobs"), "0");
    assert_eq!(q(&pg, "SELECT count(*) FROM flipsketch_files"), "0");
    eprintln!(
        "S3 store: a download answered 503 {:.2} s after the bucket went away; a job ending \
         then failed {:.1} s after its submission (lease 3 s); a done job and its objects gone \
         {:.1} s after it ended (kept 3 s, janitor every 2 s)",
        answered.as_secs_f64(),
        failed_after.as_secs_f64(),
        gone.as_secs_f64()
    );
}
