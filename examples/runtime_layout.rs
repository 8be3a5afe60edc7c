//! Measures the runtime layout choice of `runner.rs`: the same HTTP loop (stormlight's own
//! client, 50 concurrent users) on current-thread runtimes with a `LocalSet` (one per thread,
//! as the runner does) and on a multi-thread runtime with as many workers. Prints CPU
//! microseconds per request for each. Against a local server:
//!
//!     cargo run --release --example runtime_layout -- http://127.0.0.1:18090/hello 5 [THREADS]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use stormlight::http::{Client, Prepared, Session};
use stormlight::scenario::api::{RequestSpec, Target};

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15 of the line)
}

async fn user(client: Client, req: Arc<Prepared>, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut session = Session::default();
    while !stop.load(Ordering::Relaxed) {
        if client.send(&mut session, &req, false).await.is_ok() {
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs `users` loops on one runtime for `secs` seconds.
fn drive(rt: tokio::runtime::Runtime, local: bool, users: usize, req: Arc<Prepared>, secs: u64, done: Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let client = Client::new(Duration::from_secs(10));
    let run = async {
        let mut tasks = Vec::new();
        for _ in 0..users {
            let f = user(client.clone(), req.clone(), stop.clone(), done.clone());
            tasks.push(if local {
                tokio::task::spawn_local(f)
            } else {
                tokio::spawn(f)
            });
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    };
    if local {
        tokio::task::LocalSet::new().block_on(&rt, run);
    } else {
        rt.block_on(run);
    }
}

fn report(name: &str, before: f64, done: &AtomicU64) {
    let cpu = cpu_seconds() - before;
    let n = done.load(Ordering::Relaxed).max(1);
    println!(
        "{name:<44} {n:>9} requests  {:6.2} CPU us/request",
        cpu * 1e6 / n as f64
    );
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "http://127.0.0.1:18090/hello".into());
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let spec = RequestSpec {
        method: hyper::Method::GET,
        target: Target::Url(url),
        headers: Default::default(),
        query: Vec::new(),
        body: None,
        name: "x".into(),
        weight: 1,
        timeout: None,
    };
    let req = Arc::new(Prepared::new(None, &spec)?);
    let (done, before) = (Arc::new(AtomicU64::new(0)), cpu_seconds());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (req, done) = (req.clone(), done.clone());
            scope.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                drive(rt, true, 50 / threads, req, secs, done);
            });
        }
    });
    report(
        &format!("{threads} current-thread runtime(s) + LocalSet"),
        before,
        &done,
    );

    let (done, before) = (Arc::new(AtomicU64::new(0)), cpu_seconds());
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    drive(multi, false, 50, req, secs, done.clone());
    report(&format!("multi-thread runtime, {threads} worker(s)"), before, &done);
    Ok(())
}
