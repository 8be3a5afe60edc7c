//! `stormlight report`: reads result files and merges them exactly. Counts are summed and the
//! histograms the files carry are added, so the merged percentiles are those of all the
//! requests together (not an average of percentiles); time series are aligned by second.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

use crate::files;
use crate::stats::{
    CheckSummary, FailureSummary, Latency, RowSummary, SeriesPoint, Summary, decode_histogram, encode_histogram,
    new_histogram,
};

/// Reads a result file written by `--out` (at most [`files::RESULT_MAX`] bytes).
pub fn read(path: &Path) -> Result<Summary> {
    let text = files::read(path, &path.display().to_string(), files::RESULT_MAX)?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not a stormlight result file", path.display()))
}

/// Adds an encoded histogram into `into`.
fn add(into: &mut Histogram<u64>, encoded: Option<&String>, what: &str) -> Result<()> {
    if let Some(text) = encoded {
        let h = decode_histogram(text).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        into.add(&h).map_err(|e| anyhow::anyhow!("{what}: {e:?}"))?;
    }
    Ok(())
}

/// One row (or the total) of several files: counts summed, histograms added.
#[derive(Default)]
struct RowSum {
    requests: u64,
    failures: u64,
    bytes: u64,
    latency: Option<Histogram<u64>>,
    service: Option<Histogram<u64>>,
}

impl RowSum {
    fn add(&mut self, r: &RowSummary, what: &str) -> Result<()> {
        if r.requests > 0 && r.latency_ms.is_some() && r.latency_hist.is_none() {
            bail!("{what}: the file has no histograms (written by an older stormlight): it cannot be merged exactly");
        }
        self.requests += r.requests;
        self.failures += r.failures;
        self.bytes += r.bytes_received;
        add(
            self.latency.get_or_insert_with(new_histogram),
            r.latency_hist.as_ref(),
            what,
        )?;
        add(
            self.service.get_or_insert_with(new_histogram),
            r.service_hist.as_ref(),
            what,
        )?;
        Ok(())
    }

    fn summary(&self, method: Option<String>, name: Option<String>, secs: f64) -> RowSummary {
        let of = |h: &Option<Histogram<u64>>| h.as_ref().and_then(Latency::of);
        let hist = |h: &Option<Histogram<u64>>| h.as_ref().filter(|h| !h.is_empty()).map(encode_histogram);
        RowSummary {
            method,
            name,
            requests: self.requests,
            failures: self.failures,
            rps: if secs > 0.0 {
                (self.requests as f64 / secs * 1000.0).round() / 1000.0
            } else {
                0.0
            },
            bytes_received: self.bytes,
            latency_ms: of(&self.latency),
            service_ms: of(&self.service),
            latency_hist: hist(&self.latency),
            service_hist: hist(&self.service),
        }
    }
}

/// Merges result files: what several generators measured of one test, as one result.
pub fn merge(files: &[Summary]) -> Result<Summary> {
    let Some(first) = files.first() else {
        bail!("no result file to merge");
    };
    let secs = files.iter().map(|s| s.duration_s).fold(0.0, f64::max);
    let mut total = RowSum::default();
    let mut rows: Vec<((String, String), RowSum)> = Vec::new();
    let mut failures: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut checks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut protocols: BTreeMap<String, u64> = BTreeMap::new();
    let mut series: BTreeMap<i64, (SeriesPoint, Histogram<u64>)> = BTreeMap::new();
    // Series are aligned by wall-clock second: each file's from its own start.
    // (0: a file from before start times were recorded; it is aligned by its own start.)
    let first_start = files
        .iter()
        .map(|s| s.started_at_ms)
        .filter(|ms| *ms > 0)
        .min()
        .unwrap_or(0);
    for (i, s) in files.iter().enumerate() {
        let offset = match s.started_at_ms {
            0 => 0.0,
            ms => ms.saturating_sub(first_start) as f64 / 1000.0,
        };
        let what = format!("file {}", i + 1);
        total.add(&s.total, &what)?;
        for r in &s.endpoints {
            let key = (r.method.clone().unwrap_or_default(), r.name.clone().unwrap_or_default());
            let at = match rows.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    rows.push((key, RowSum::default()));
                    rows.len() - 1
                }
            };
            rows[at].1.add(r, &what)?;
        }
        for f in &s.failures {
            *failures
                .entry((f.method.clone(), f.name.clone(), f.reason.clone()))
                .or_default() += f.count;
        }
        for c in &s.checks {
            let e = checks.entry(c.name.clone()).or_default();
            e.0 += c.passes;
            e.1 += c.fails;
        }
        for (p, n) in &s.protocols {
            *protocols.entry(p.clone()).or_default() += n;
        }
        for p in &s.series {
            let at = (p.t_s + offset).round();
            let (point, h) = series.entry(at as i64).or_insert_with(|| {
                let empty = SeriesPoint {
                    t_s: at,
                    requests: 0,
                    failures: 0,
                    p50_ms: None,
                    p95_ms: None,
                    p99_ms: None,
                    users: 0,
                    bytes: 0,
                    latency_hist: None,
                };
                (empty, new_histogram())
            });
            point.requests += p.requests;
            point.failures += p.failures;
            point.users += p.users;
            point.bytes += p.bytes;
            add(h, p.latency_hist.as_ref(), &what)?;
        }
    }
    let mut out = first.clone();
    out.duration_s = secs;
    out.interrupted = files.iter().any(|s| s.interrupted);
    // Every generator's users were up by the latest of their times (unknown if one's were not).
    out.all_users_started_s = files
        .iter()
        .map(|s| s.all_users_started_s)
        .try_fold(0.0_f64, |latest, t| t.map(|t| latest.max(t)));
    out.started_at = files.iter().map(|s| s.started_at.clone()).min().unwrap_or_default();
    out.config.users = files.iter().map(|s| s.config.users).sum();
    out.config.spawn_rate = files.iter().map(|s| s.config.spawn_rate).sum();
    out.started_at_ms = first_start;
    let segments = files.iter().filter(|s| s.segment.is_some()).count();
    out.config.load = match files.len() {
        // One file: its own description.
        1 => first.config.load.clone(),
        // A whole test from its segments (checked by `segment::check_set`): they all describe it.
        n if segments == n => format!("{} ({segments} segments merged)", first.config.load),
        n => format!("{n} result files merged"),
    };
    out.segment = None;
    out.total = total.summary(None, None, secs);
    out.endpoints = rows
        .iter()
        .map(|((m, n), r)| r.summary(Some(m.clone()), Some(n.clone()), secs))
        .collect();
    out.failures = failures
        .into_iter()
        .map(|((method, name, reason), count)| FailureSummary {
            method,
            name,
            reason,
            count,
        })
        .collect();
    out.failures.sort_by_key(|f| std::cmp::Reverse(f.count));
    out.checks = checks
        .into_iter()
        .map(|(name, (passes, fails))| CheckSummary { name, passes, fails })
        .collect();
    out.protocols = protocols;
    out.script_errors = files.iter().map(|s| s.script_errors).sum();
    out.dropped_iterations = files.iter().map(|s| s.dropped_iterations).sum();
    out.stuck = files
        .iter()
        .flat_map(|s| {
            let seg = s.segment.map(|seg| format!(" (segment {seg})")).unwrap_or_default();
            s.stuck.iter().map(move |what| format!("{what}{seg}"))
        })
        .collect();
    // A generator stopped by its own abort_on_fail threshold cut the test short: said, and
    // `report` fails.
    out.aborted_by = files.iter().find_map(|s| {
        let t = s.aborted_by.as_ref()?;
        Some(match s.segment {
            Some(seg) => format!("{t} (segment {seg})"),
            None => t.clone(),
        })
    });
    out.series = series
        .into_values()
        .map(|(mut p, h)| {
            let q = |x: f64| (!h.is_empty()).then(|| h.value_at_quantile(x) as f64 / 1000.0);
            (p.p50_ms, p.p95_ms, p.p99_ms) = (q(0.5), q(0.95), q(0.99));
            p.latency_hist = (!h.is_empty()).then(|| encode_histogram(&h));
            p
        })
        .collect();
    // The files' thresholds, judged again on the merged numbers: a test split over several
    // machines passes or fails as a whole.
    out.thresholds = Vec::new();
    let mut seen = Vec::new();
    for v in files.iter().flat_map(|s| &s.thresholds) {
        if seen.contains(&(&v.row, &v.threshold)) {
            continue;
        }
        seen.push((&v.row, &v.threshold));
        let t = crate::threshold::Threshold::from_verdict(v)?;
        let verdict = t.judge_summary(&out)?;
        out.thresholds.push(verdict);
    }
    Ok(out)
}
