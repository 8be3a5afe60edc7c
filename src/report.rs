//! Rendering: the live table (stderr, redrawn in place on a terminal), the final summary and
//! failures tables (pure functions into a `Write`), and the JSON summary file.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tabled::builder::Builder;
use tabled::settings::object::Columns;
use tabled::settings::{Alignment, Style};

use crate::config::RunConfig;
use crate::files;
use crate::stats::{Aggregate, Latency, RowSummary, Summary};

/// Milliseconds with precision that suits their size.
fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn fails(requests: u64, failures: u64) -> String {
    if failures == 0 {
        "0".into()
    } else {
        let pct = 100.0 * failures as f64 / requests.max(1) as f64;
        if pct < 0.1 {
            format!("{failures} (<0.1%)")
        } else {
            format!("{failures} ({pct:.1}%)")
        }
    }
}

fn latency_cells(l: &Option<Latency>) -> [String; 8] {
    match l {
        Some(l) => [l.avg, l.min, l.max, l.p50, l.p90, l.p95, l.p99, l.p99_9].map(ms),
        None => std::array::from_fn(|_| "-".to_string()),
    }
}

const LATENCY_HEADERS: [&str; 8] = ["avg ms", "min", "max", "p50", "p90", "p95", "p99", "p99.9"];

/// One table: a row per endpoint and the total. `current` adds a column of the last tick's RPS.
fn stats_table(rows: &[(String, String, RowSummary, Option<f64>)], total: &(RowSummary, Option<f64>)) -> String {
    let live = total.1.is_some();
    let mut b = Builder::default();
    let mut header = vec![
        "Method".to_string(),
        "Name".into(),
        "# reqs".into(),
        "# fails".into(),
        "RPS".into(),
    ];
    if live {
        header.push("cur RPS".into());
    }
    header.extend(LATENCY_HEADERS.iter().map(|s| s.to_string()));
    b.push_record(header);
    let mut push = |method: &str, name: &str, r: &RowSummary, cur: Option<f64>| {
        let mut rec = vec![
            method.to_string(),
            name.to_string(),
            r.requests.to_string(),
            fails(r.requests, r.failures),
        ];
        rec.push(format!("{:.1}", r.rps));
        if let Some(c) = cur {
            rec.push(format!("{c:.1}"));
        }
        rec.extend(latency_cells(&r.latency_ms));
        b.push_record(rec);
    };
    for (method, name, r, cur) in rows {
        push(method, name, r, *cur);
    }
    push("", "Aggregated", &total.0, total.1);
    let mut t = b.build();
    t.with(Style::sharp()).modify(Columns::new(2..), Alignment::right());
    t.to_string()
}

/// The final tables: statistics, then failures (if any).
pub fn write_summary(w: &mut impl Write, s: &Summary) -> std::io::Result<()> {
    let rows: Vec<_> = s
        .endpoints
        .iter()
        .map(|r| {
            (
                r.method.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
                r.clone(),
                None,
            )
        })
        .collect();
    writeln!(
        w,
        "\nstormlight summary: {} user{}, {:.1}s{}",
        s.config.users,
        if s.config.users == 1 { "" } else { "s" },
        s.duration_s,
        if s.interrupted { " (interrupted)" } else { "" }
    )?;
    writeln!(w, "{}", stats_table(&rows, &(s.total.clone(), None)))?;
    if !s.protocols.is_empty() {
        let list: Vec<String> = s.protocols.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        writeln!(w, "complete responses by protocol: {}", list.join(", "))?;
    }
    if s.dropped_iterations > 0 {
        writeln!(
            w,
            "{} scheduled iterations were dropped: no user of the pool was free (raise --max-users)",
            s.dropped_iterations
        )?;
    }
    if s.script_errors > 0 {
        writeln!(
            w,
            "{} script errors outside requests (in scenario or a hook): see Failures, rows HOOK ...",
            s.script_errors
        )?;
    }
    if !s.stuck.is_empty() {
        writeln!(w, "still running when the run ended (stopped):")?;
        for what in &s.stuck {
            writeln!(w, "  {what}")?;
        }
    }
    let mut due = (s.config.users as f64 - 1.0) / s.config.spawn_rate;
    if let Some(seg) = s.segment {
        // Its users are every Nth of the whole test's, the first of them I/rate in.
        due += seg.index as f64 / (s.config.spawn_rate * seg.count as f64);
    }
    // With stages or the open model, users come and go by the plan: no spawn to judge (nor
    // for `setup` and `teardown`, which run no user).
    let planned = s.config.load.starts_with("stages") || s.config.load.contains("open model") || s.config.users == 0;
    match s.all_users_started_s {
        _ if planned => {}
        Some(t) if s.config.users == 1 => writeln!(w, "the user was running after {t:.2}s")?,
        Some(t) => writeln!(
            w,
            "all {} users were running after {t:.2}s (the spawn rate had them due by {due:.2}s)",
            s.config.users
        )?,
        None if s.config.users == 1 => writeln!(w, "the run ended before the user had started")?,
        None => writeln!(w, "the run ended before all {} users had started", s.config.users)?,
    }
    if !s.failures.is_empty() {
        let mut b = Builder::default();
        b.push_record(["# occurrences", "Method", "Name", "Reason"]);
        for f in &s.failures {
            b.push_record([f.count.to_string(), f.method.clone(), f.name.clone(), f.reason.clone()]);
        }
        let mut t = b.build();
        t.with(Style::sharp()).modify(Columns::first(), Alignment::right());
        writeln!(w, "\nFailures\n{t}")?;
    }
    if !s.thresholds.is_empty() {
        writeln!(w, "\nThresholds")?;
        for v in &s.thresholds {
            let value = match (v.value, &v.row) {
                (Some(x), _) if v.unit == "ms" => format!("{x} ms"),
                (Some(x), _) => format!("{x}{}", v.unit),
                (None, Some(row)) => format!("no data: no response in row {row} (is the row's name right?)"),
                (None, None) => "no data".to_string(),
            };
            let on = v.row.as_ref().map_or(String::new(), |r| format!("{r}: "));
            let mark = if v.ok { "pass" } else { "FAIL" };
            writeln!(w, "  {mark}  {on}{} (measured: {value})", v.threshold)?;
        }
    }
    if !s.checks.is_empty() {
        let mut b = Builder::default();
        b.push_record(["Check", "Passes", "Fails", "% passed"]);
        for c in &s.checks {
            let pct = 100.0 * c.passes as f64 / (c.passes + c.fails).max(1) as f64;
            b.push_record([
                c.name.clone(),
                c.passes.to_string(),
                c.fails.to_string(),
                format!("{pct:.1}"),
            ]);
        }
        let mut t = b.build();
        t.with(Style::sharp()).modify(Columns::new(1..), Alignment::right());
        writeln!(w, "\nChecks\n{t}")?;
    }
    Ok(())
}

/// Writes the summary as JSON (see [`write_file`]).
pub fn write_json(path: &Path, s: &Summary) -> Result<()> {
    let json = serde_json::to_vec_pretty(s).context("cannot encode the summary")?;
    write_file(path, &json)
}

/// Writes `bytes` to `path`: atomically to a regular file or a new path (a temporary file
/// beside it, then renamed), in place into a character device or a FIFO (see [`files::write`]).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    files::write(path, bytes).with_context(|| format!("cannot write the summary to {}", path.display()))
}

/// The live view on stderr.
pub struct Live {
    enabled: bool,
    terminal: bool,
    /// Lines drawn last time, to move back over on a terminal.
    drawn: usize,
}

impl Live {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            terminal: std::io::stderr().is_terminal(),
            drawn: 0,
        }
    }

    pub fn draw(&mut self, agg: &Aggregate, elapsed: Duration, users: u64, cfg: &RunConfig) {
        if !self.enabled {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let tick = crate::runner::TICK.as_secs_f64();
        let rows: Vec<_> = agg
            .rows()
            .filter(|(_, s)| s.requests > 0)
            .map(|(id, s)| {
                let cur = agg.last_tick_requests(Some(id)) as f64 / tick;
                (
                    id.method.clone(),
                    id.name.clone(),
                    RowSummary::new(&id.method, &id.name, s, secs),
                    Some(cur),
                )
            })
            .collect();
        let total = (
            RowSummary::new("", "", &agg.total(), secs),
            Some(agg.last_tick_requests(None) as f64 / tick),
        );
        let remaining = match cfg.duration {
            Some(d) => format!(", {:.0}s left", d.saturating_sub(elapsed).as_secs_f64()),
            None => ", until Ctrl-C".into(),
        };
        // A progress bar when the run has an end; coloured only on a terminal, never with
        // NO_COLOR set.
        let bar = match cfg.duration {
            Some(d) if !d.is_zero() => {
                let done = ((secs / d.as_secs_f64()).clamp(0.0, 1.0) * 20.0).round() as usize;
                let bar = format!("{}{}", "#".repeat(done), "-".repeat(20 - done));
                let colour = self.terminal && std::env::var_os("NO_COLOR").is_none();
                if colour {
                    format!("\x1b[32m[{bar}]\x1b[0m ")
                } else {
                    format!("[{bar}] ")
                }
            }
            _ => String::new(),
        };
        let text = format!(
            "{bar}{:.0}s elapsed{remaining} | users {users}/{}\n{}\n",
            secs,
            cfg.users,
            stats_table(&rows, &total)
        );
        // (Through the console: a terminal or pipe that does not take it never holds the run.)
        if self.terminal {
            let back = match self.drawn {
                0 => String::new(),
                n => format!("\x1b[{n}F\x1b[J"),
            };
            self.drawn = text.lines().count();
            crate::console::raw(back + &text);
        } else {
            crate::console::line(text);
        }
    }

    /// Removes the last live table from a terminal before the final summary.
    pub fn clear(&mut self) {
        if self.enabled && self.terminal && self.drawn > 0 {
            crate::console::raw(format!("\x1b[{}F\x1b[J", self.drawn));
            self.drawn = 0;
        }
    }
}
