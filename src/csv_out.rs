//! `--csv PREFIX`: the summary as Locust writes it (`PREFIX_stats.csv`,
//! `PREFIX_stats_history.csv`, `PREFIX_failures.csv`, Locust's column names), so tools that read
//! Locust's CSV read ours. Times are in milliseconds, from the `latency` histograms.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::files;
use crate::stats::{RowSummary, Summary, decode_histogram, new_histogram};

/// Locust's percentile columns.
const PERCENTILES: [(f64, &str); 11] = [
    (0.50, "50%"),
    (0.66, "66%"),
    (0.75, "75%"),
    (0.80, "80%"),
    (0.90, "90%"),
    (0.95, "95%"),
    (0.98, "98%"),
    (0.99, "99%"),
    (0.999, "99.9%"),
    (0.9999, "99.99%"),
    (1.0, "100%"),
];

const STATS: [&str; 11] = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
];

const HISTORY_HEAD: [&str; 6] = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s"];
const HISTORY_TAIL: [&str; 7] = [
    "Total Request Count",
    "Total Failure Count",
    "Total Median Response Time",
    "Total Average Response Time",
    "Total Min Response Time",
    "Total Max Response Time",
    "Total Average Content Size",
];

const FAILURES: [&str; 4] = ["Method", "Name", "Error", "Occurrences"];

/// The three files' paths for `prefix`.
pub fn paths(prefix: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [with("_stats.csv"), with("_stats_history.csv"), with("_failures.csv")]
}

/// Header rows of the three files, as Locust writes them.
pub fn headers() -> [Vec<&'static str>; 3] {
    let percentiles = PERCENTILES.iter().map(|(_, n)| *n);
    let stats = STATS.iter().copied().chain(percentiles.clone()).collect();
    let history = HISTORY_HEAD
        .iter()
        .copied()
        .chain(percentiles)
        .chain(HISTORY_TAIL.iter().copied())
        .collect();
    [stats, history, FAILURES.to_vec()]
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn percentile_fields(h: &Histogram<u64>) -> Vec<String> {
    PERCENTILES
        .iter()
        .map(|(q, _)| {
            if h.is_empty() {
                "N/A".into()
            } else {
                ms(h.value_at_quantile(*q))
            }
        })
        .collect()
}

fn histogram_of(row: &RowSummary) -> Result<Histogram<u64>> {
    match &row.latency_hist {
        Some(text) => decode_histogram(text).map_err(|e| anyhow::anyhow!(e)),
        None => Ok(new_histogram()),
    }
}

fn stats_row(row: &RowSummary, secs: f64) -> Result<Vec<String>> {
    let h = histogram_of(row)?;
    let empty = h.is_empty();
    let or_zero = |v: String| if empty { "0".to_string() } else { v };
    let mut fields = vec![
        row.method.clone().unwrap_or_default(),
        row.name.clone().unwrap_or_else(|| "Aggregated".into()),
        row.requests.to_string(),
        row.failures.to_string(),
        or_zero(ms(h.value_at_quantile(0.5))),
        or_zero(format!("{:.3}", h.mean() / 1000.0)),
        or_zero(ms(h.min())),
        or_zero(ms(h.max())),
        format!("{:.1}", row.bytes_received as f64 / row.requests.max(1) as f64),
        format!("{:.3}", row.rps),
        // In proportion to `rps` (measured over the exact duration, which `secs` rounds).
        format!(
            "{:.3}",
            match row.requests {
                0 if secs > 0.0 => row.failures as f64 / secs,
                0 => 0.0,
                n => row.rps * row.failures as f64 / n as f64,
            }
        ),
    ];
    fields.extend(percentile_fields(&h));
    Ok(fields)
}

/// Writes the three files (each as [`files::write`] does: atomically, or into a device or FIFO).
pub fn write(prefix: &Path, s: &Summary) -> Result<()> {
    for (path, bytes) in paths(prefix).into_iter().zip(render(s)?) {
        files::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The three files' contents, in the order of [`paths`].
pub fn render(s: &Summary) -> Result<[Vec<u8>; 3]> {
    let [stats_head, history_head, failures_head] = headers();
    let open = || csv::Writer::from_writer(Vec::new());
    let done = |w: csv::Writer<Vec<u8>>| w.into_inner().map_err(|e| anyhow::anyhow!("{}", e.error()));

    let mut w = open();
    w.write_record(&stats_head)?;
    for row in s.endpoints.iter().chain(std::iter::once(&s.total)) {
        w.write_record(stats_row(row, s.duration_s)?)?;
    }
    let stats = done(w)?;

    // One row a second for the aggregate, with the totals so far (as Locust's history has).
    let start = humantime::parse_rfc3339(&s.started_at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let mut w = open();
    w.write_record(&history_head)?;
    let (mut so_far, mut requests, mut failures, mut last_t) = (new_histogram(), 0u64, 0u64, 0.0);
    let mut bytes = 0u64;
    for p in &s.series {
        let tick = match &p.latency_hist {
            Some(text) => decode_histogram(text).map_err(|e| anyhow::anyhow!(e))?,
            None => new_histogram(),
        };
        let _ = so_far.add(&tick);
        requests += p.requests;
        failures += p.failures;
        bytes += p.bytes;
        let length = (p.t_s - last_t).max(1e-3);
        last_t = p.t_s;
        let mut fields = vec![
            format!("{}", (start + p.t_s) as u64),
            p.users.to_string(),
            String::new(),
            "Aggregated".into(),
            format!("{:.2}", p.requests as f64 / length),
            format!("{:.2}", p.failures as f64 / length),
        ];
        fields.extend(percentile_fields(&tick));
        let empty = so_far.is_empty();
        fields.extend([
            requests.to_string(),
            failures.to_string(),
            if empty {
                "0".into()
            } else {
                ms(so_far.value_at_quantile(0.5))
            },
            if empty {
                "0".into()
            } else {
                format!("{:.3}", so_far.mean() / 1000.0)
            },
            if empty { "0".into() } else { ms(so_far.min()) },
            if empty { "0".into() } else { ms(so_far.max()) },
            format!("{:.1}", bytes as f64 / requests.max(1) as f64),
        ]);
        w.write_record(&fields)?;
    }
    let history = done(w)?;

    let mut w = open();
    w.write_record(&failures_head)?;
    for f in &s.failures {
        w.write_record([
            f.method.as_str(),
            f.name.as_str(),
            f.reason.as_str(),
            &f.count.to_string(),
        ])?;
    }
    Ok([stats, history, done(w)?])
}
