//! The command line (clap derive). Raw flags stop here: [`LoadArgs::overrides`] turns them into
//! [`Overrides`], and `config` merges those over the scenario's options.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{LiveMode, Overrides, parse_duration};

#[derive(Debug, Parser)]
#[command(
    name = "stormlight",
    version,
    about = "A scripted HTTP load tester: scenarios in Lua, numbers you can trust.",
    after_help = "Examples:\n  stormlight demo\n  stormlight run scripts/stormlight_file.lua --host http://127.0.0.1:8000 -u 10 -r 2 -t 30s\n  stormlight check scripts/hooks.lua\n  stormlight target --port 8000\n  stormlight run scenario.lua -u 300 -t 5m --segment 0/3 --start-at 1795860000 --out seg-0.json\n\nExit codes: 0 finished, 1 a threshold failed, 2 bad input (nothing sent), 3 the summary was\nprinted but --out could not be written at the end, 4 setup() failed (no user started),\n130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a scenario: spawn users, send requests, show live stats, print a summary.
    #[command(
        after_help = "Examples:\n  stormlight run scripts/stormlight_file.lua --host http://127.0.0.1:8000 -u 10 -r 2 -t 30s\n  stormlight run scenario.lua -u 100 -t 2m --out result.json\n\nEach flag falls back to the scenario's `options` table (users, spawn_rate, duration,\ntimeout, grace, script_timeout, script_memory, stages, rate, max_users) and `host`, then to the default: 1 user, all users started within the\nfirst second, until Ctrl-C, timeout 30s, grace 5s.\nDurations: 30 (seconds), 1.5s, 30s, 2m, 1h30m, 500ms.\nCtrl-C stops the run, prints the summary and writes --out (exit 130); a second Ctrl-C does\nso at once, counting requests in flight as aborted; a third exits without them."
    )]
    Run(RunArgs),
    /// Load and validate a scenario in the sandbox and print what it defines; sends nothing.
    #[command(after_help = "Example:\n  stormlight check scripts/hooks.lua")]
    Check {
        /// The scenario file (Lua).
        script: PathBuf,
    },
    /// Start the built-in target on loopback and run the bundled example against it
    /// (10 users, spawn rate 5, 10 s).
    #[command(
        after_help = "Examples:\n  stormlight demo\n  stormlight demo -t 30s --out demo.json\n\nWithout flags: 10 users, 5 started per second, for 10 s."
    )]
    Demo(DemoArgs),
    /// Print the summary of result files (--out), merging several exactly: counts summed,
    /// histograms added, time series aligned by second.
    #[command(
        after_help = "Examples:\n  stormlight report result.json\n  stormlight report gen1.json gen2.json --out merged.json\n  stormlight report seg-0.json seg-1.json seg-2.json --html report.html\n\nThe files' thresholds are judged again on the merged numbers. A set of --segment files\nmust be one whole test: every segment once, one scenario.\nExit codes: 0 merged (every threshold held), 1 a threshold failed on the merged result,\n2 a file cannot be read or merged, or the segments are not one whole test."
    )]
    Report {
        /// Result files written by `run --out`.
        #[arg(required = true, value_name = "FILE.json")]
        files: Vec<PathBuf>,
        /// Write the merged result to this file.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Write an HTML report of it.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Run the scenario's setup() alone and write what it returned, for `run --setup-data`:
    /// setup once for all the segments of a test run on several machines.
    #[command(
        after_help = "Example:\n  stormlight setup scenario.lua --host http://127.0.0.1:8000 --out setup.json\n  stormlight run scenario.lua --segment 0/3 --setup-data setup.json ...\n  stormlight teardown scenario.lua --setup-data setup.json\n\nExit codes: 0 written, 2 bad input (or no setup() in the scenario), 3 --out could not be\nwritten, 4 setup() failed."
    )]
    Setup {
        #[command(flatten)]
        args: AloneArgs,
        /// Where to write setup()'s data (JSON).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Run the scenario's teardown(data) alone, with the data `stormlight setup` wrote (runs
    /// given --setup-data do not run teardown themselves).
    #[command(
        after_help = "Example:\n  stormlight teardown scenario.lua --host http://127.0.0.1:8000 --setup-data setup.json\n\nExit codes: 0 done, 2 bad input (or no teardown() in the scenario), 4 teardown() failed."
    )]
    Teardown {
        #[command(flatten)]
        args: AloneArgs,
        /// The file `stormlight setup --out` wrote.
        #[arg(long, value_name = "FILE")]
        setup_data: PathBuf,
    },
    /// Run the built-in target alone, for trying scenarios by hand.
    #[command(
        after_help = "Example:\n  stormlight target --port 8000\n  # then: stormlight run scripts/stormlight_file.lua --host http://127.0.0.1:8000 -t 10s\n\nRoutes: GET /hello, POST /api/upload (echoes JSON), GET /items/ID, /slow?ms=N,\n/stall?ms=N (headers now, body after N ms), /status/N, /reset (TCP reset),\n/auth?user=U&pass=P (200 with that Basic auth, else 401), /redirect?to=URL (a 302),\nGET /__stats (requests received), /__down?ms=N (refuse connections for N ms),\n/__stall?ms=N (hold every answer for N ms),\n/fault/... (resets, trickles, hangs, huge or endless bodies, a bad status line,\nredirect chains; see the README).\nLogin flows: POST /login {\"user\": NAME} gives a token and a session cookie; /account and\nPOST /orders need both (else 401)."
    )]
    Target {
        /// Port to listen on (0: any free port).
        #[arg(short, long, default_value_t = 8000)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        bind: IpAddr,
        /// Close keep-alive connections idle for longer than this (like many real servers), and
        /// say so in a `Keep-Alive: timeout=N` header (whole seconds), as Node and Apache do.
        #[arg(long, value_name = "D", value_parser = duration)]
        idle_close: Option<Duration>,
        /// With --idle-close: do not send the Keep-Alive header (a server that closes silently).
        #[arg(long, requires = "idle_close")]
        silent_close: bool,
        /// Serve HTTPS with a self-signed certificate made now (its PEM file is printed: pass
        /// it to `run --ca-cert`, or use `run --insecure`).
        #[arg(long)]
        tls: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The scenario file (Lua).
    pub script: PathBuf,
    /// Base URL the endpoints' paths are joined to (wins over the scenario's `host`). A user and
    /// password in it (http://user:pass@host) are sent as Basic auth, and shown as user:***.
    #[arg(long, value_name = "URL")]
    pub host: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Flags shared by `run` and `demo`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Number of virtual users.
    #[arg(short, long, value_name = "N")]
    pub users: Option<u32>,
    /// Users started per second (at least 0.000001).
    #[arg(short = 'r', long, value_name = "R", allow_negative_numbers = true)]
    pub spawn_rate: Option<f64>,
    /// How long to run: 30, 1.5s, 30s, 2m, 1h30m, 500ms.
    #[arg(short = 't', long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// Request timeout, unless an endpoint sets its own.
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
    /// How long requests in flight at the end may finish before they count as aborted.
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub grace: Option<Duration>,
    /// How long one call into the scenario (a hook, scenario(), setup, teardown, loading the
    /// file) may run, not counting its waits on http and sleep; past it the call stops and
    /// counts as "script limit" [default: 5s].
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub script_timeout: Option<Duration>,
    /// How much memory each user's Lua state may hold (1MiB to 1GiB); past it a call fails with
    /// "memory limit". All users' states together are held to 3/4 of the machine's available
    /// memory whatever this is [default: 16MiB].
    #[arg(long, value_name = "BYTES", value_parser = bytes_size)]
    pub script_memory: Option<u64>,
    /// Connect timeout (capped by --timeout) [default: 10s].
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub connect_timeout: Option<Duration>,
    /// Largest response body read; a longer one fails as "body too large" [default: 64MiB].
    #[arg(long, value_name = "BYTES", value_parser = bytes_size)]
    pub max_body: Option<u64>,
    /// Redirects followed within one request (0: none; a 3xx then counts as it is) [default: 10].
    #[arg(long, value_name = "N")]
    pub max_redirects: Option<u32>,
    /// A kept-alive connection idle this long is closed, not reused (below the 5 s of Node,
    /// Apache and uvicorn); 0: a new connection per request [default: 4s].
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub keepalive_idle: Option<Duration>,
    /// Ramping stages instead of --users: DURATION:USERS,... (30s:100,1m:100,30s:0), or of an
    /// open model's rate: DURATION:RATE/s,... (30s:100/s,1m:200/s). Linear within each stage;
    /// the run lasts as long as the stages.
    #[arg(long, value_name = "STAGES", value_parser = stages_value)]
    pub stages: Option<Stages>,
    /// Open model: start R iterations per second whatever the answers take (constant arrival
    /// rate; 0.000001 to 10000000), with a pool of --max-users users; an iteration that finds
    /// no free user is dropped and counted.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// With --rate: the pool of users [default: R, rounded up].
    #[arg(long, value_name = "M")]
    pub max_users: Option<u32>,
    /// A pass/fail criterion, repeatable: 'p95<200ms', 'fail_rate<1%', 'rps>100', 'checks>99%',
    /// or on one row 'GET /hello: p99<50ms'. Any that fails makes the exit code 1.
    #[arg(long = "threshold", value_name = "EXPR")]
    pub thresholds: Vec<String>,
    /// Distinct request names with a row of their own (at most 10000: each keeps its
    /// histograms, about 100 KB); past it, new names share one overflow row (and a warning says
    /// so). The same number caps the distinct failure reasons with text from the script, and
    /// the distinct check names, each on its own [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_names: Option<usize>,
    /// Do not verify TLS certificates (self-signed test servers). Printed in the run header.
    #[arg(long, short = 'k')]
    pub insecure: bool,
    /// Trust the certificates in this PEM file instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// HTTP/1.1 only (no HTTP/2, even where TLS would negotiate it).
    #[arg(long, conflicts_with = "http2")]
    pub http1: bool,
    /// HTTP/2 on plain http too, by prior knowledge (h2c). On https, HTTP/2 is used whenever
    /// the server offers it.
    #[arg(long)]
    pub http2: bool,
    /// Client certificate (PEM) for servers that ask for one (mutual TLS); needs --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// Write the summary as Locust's CSV files too: PREFIX_stats.csv, PREFIX_stats_history.csv,
    /// PREFIX_failures.csv (Locust's columns).
    #[arg(long, value_name = "PREFIX")]
    pub csv: Option<PathBuf>,
    /// Write an HTML report to FILE: one self-contained page (charts over time, tables), no
    /// network needed to view it.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Write the final summary as JSON to FILE: atomically (a temporary file, renamed over
    /// it), or in place into a device such as /dev/null or a FIFO; never over a directory, a
    /// block device, a socket, a loop of symbolic links or a file the run reads.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Serve a live dashboard (charts, tables, a Stop button) and Prometheus metrics
    /// (/metrics) while the test runs, at 127.0.0.1:8089, or at --web=ADDR (IP:PORT, or PORT
    /// on 127.0.0.1; note the `=`). Beyond loopback anyone who can reach it can read it and
    /// press Stop: see --web-auth.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, require_equals = true, default_missing_value = "127.0.0.1:8089", value_parser = web_addr)]
    pub web: Option<std::net::SocketAddr>,
    /// With --web: keep serving the dashboard and /metrics after the run, until Ctrl-C.
    #[arg(long, requires = "web")]
    pub linger: bool,
    /// With --web: ask for HTTP Basic credentials USER:PASS on every route (the page, its
    /// events, /metrics, Stop). Also from the environment variable STORMLIGHT_WEB_AUTH, which
    /// keeps the password out of `ps`; the flag wins.
    #[arg(long, value_name = "USER:PASS")]
    pub web_auth: Option<String>,
    /// Run share I (0 to N-1) of a test split over N processes or machines: users, their
    /// spawn schedule, stages and the arrival rate are dealt out so the shares add up to the
    /// whole; `user.id` stays unique. See "Running on many machines" in the README.
    #[arg(long, value_name = "I/N", env = "STORMLIGHT_SEGMENT", value_parser = segment_value)]
    pub segment: Option<crate::segment::Segment>,
    /// Wait until TIME to start (after preparing the users), so that segments begin
    /// together: RFC 3339 (2026-11-28T10:00:00Z) or unix seconds.
    #[arg(long, value_name = "TIME", value_parser = start_at_value)]
    pub start_at: Option<std::time::SystemTime>,
    /// Hand users this data (from `stormlight setup --out FILE`) instead of running setup();
    /// teardown() is then not run either.
    #[arg(long, value_name = "FILE")]
    pub setup_data: Option<PathBuf>,
    /// No live table (the final summary still goes to stdout).
    #[arg(short, long)]
    pub quiet: bool,
}

/// What `setup` and `teardown` take: the scenario, where it sends, and how.
#[derive(Debug, Args)]
pub struct AloneArgs {
    /// The scenario file (Lua).
    pub script: PathBuf,
    /// Base URL for paths (overrides the scenario's `host`); a user:pass@ in it is sent as
    /// Basic auth.
    #[arg(long, value_name = "URL")]
    pub host: Option<String>,
    /// Request timeout; teardown() may take this long too.
    #[arg(long, value_name = "D", value_parser = duration)]
    pub timeout: Option<Duration>,
    /// Do not verify TLS certificates.
    #[arg(short = 'k', long)]
    pub insecure: bool,
    /// Trust the certificates in this PEM file instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl AloneArgs {
    pub fn overrides(&self, setup_data: Option<PathBuf>) -> Overrides {
        Overrides {
            host: self.host.clone(),
            timeout: self.timeout,
            setup_data,
            tls: crate::http::TlsOptions {
                insecure: self.insecure,
                ca_cert: self.ca_cert.clone(),
                client_cert: None,
            },
            ..Default::default()
        }
    }
}

/// `--stages`: of users, or of rates.
#[derive(Debug, Clone)]
pub enum Stages {
    Users(Vec<crate::stages::Stage>),
    Rates(Vec<crate::stages::RateStage>),
}

fn stages_value(s: &str) -> Result<Stages, String> {
    match crate::stages::parse_rates(s) {
        Some(rates) => rates.map(Stages::Rates).map_err(|e| format!("{e:#}")),
        None => crate::stages::parse(s).map(Stages::Users).map_err(|e| format!("{e:#}")),
    }
}

fn segment_value(s: &str) -> Result<crate::segment::Segment, String> {
    crate::segment::Segment::parse(s).map_err(|e| e.to_string())
}

fn start_at_value(s: &str) -> Result<std::time::SystemTime, String> {
    crate::segment::parse_start_at(s).map_err(|e| format!("{e:#}"))
}

fn web_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let port = s.strip_prefix(':').unwrap_or(s);
    match (s.parse(), port.parse::<u16>()) {
        (Ok(addr), _) => Ok(addr),
        (_, Ok(port)) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        _ => Err("expected IP:PORT (127.0.0.1:8089, [::1]:8089) or a port".into()),
    }
}

fn bytes_size(s: &str) -> Result<u64, String> {
    crate::config::parse_bytes(s).map_err(|e| e.to_string())
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

impl LoadArgs {
    pub fn overrides(&self, host: Option<String>) -> Overrides {
        Overrides {
            host,
            users: self.users,
            spawn_rate: self.spawn_rate,
            duration: self.duration,
            timeout: self.timeout,
            grace: self.grace,
            script_timeout: self.script_timeout,
            script_memory: self.script_memory,
            connect_timeout: self.connect_timeout,
            max_body: self.max_body,
            max_redirects: self.max_redirects,
            keepalive_idle: self.keepalive_idle,
            max_names: self.max_names,
            thresholds: self.thresholds.clone(),
            scenario_thresholds: Vec::new(),
            stages: match &self.stages {
                Some(Stages::Users(s)) => Some(s.clone()),
                _ => None,
            },
            rate_stages: match &self.stages {
                Some(Stages::Rates(s)) => Some(s.clone()),
                _ => None,
            },
            rate: self.rate,
            max_users: self.max_users,
            csv: self.csv.clone(),
            html: self.html.clone(),
            web: self.web,
            linger: self.linger,
            web_auth: self.web_auth.clone().or_else(|| {
                // The environment's credentials serve a --web run; elsewhere they are not asked for.
                let from_env = std::env::var("STORMLIGHT_WEB_AUTH").ok().filter(|v| !v.is_empty());
                self.web.and(from_env)
            }),
            segment: self.segment,
            start_at: self.start_at,
            setup_data: self.setup_data.clone(),
            protocol: if self.http1 {
                Some(crate::http::Protocol::Http1)
            } else if self.http2 {
                Some(crate::http::Protocol::Http2)
            } else {
                None
            },
            tls: crate::http::TlsOptions {
                insecure: self.insecure,
                ca_cert: self.ca_cert.clone(),
                client_cert: self.cert.clone().zip(self.key.clone()),
            },
        }
    }

    pub fn live(&self) -> LiveMode {
        if self.quiet { LiveMode::Off } else { LiveMode::Auto }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_parse_into_overrides() {
        let cli = Cli::try_parse_from([
            "stormlight",
            "run",
            "s.lua",
            "--host",
            "http://h",
            "-u",
            "10",
            "-r",
            "2",
            "-t",
            "1m30s",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let o = args.load.overrides(args.host.clone());
        assert_eq!(o.users, Some(10));
        assert_eq!(o.spawn_rate, Some(2.0));
        assert_eq!(o.duration, Some(Duration::from_secs(90)));
        assert_eq!(o.host.as_deref(), Some("http://h"));
        assert!(Cli::try_parse_from(["stormlight", "run", "s.lua", "-t", "soon"]).is_err());
        assert!(Cli::try_parse_from(["stormlight", "run", "s.lua", "-u", "-3"]).is_err());
    }
}
