//! Thresholds: pass/fail criteria on a run's numbers, k6-like. `p95 < 200ms`,
//! `fail_rate < 1%`, `rps > 100`, `checks > 99%`, on the whole run or on one row
//! (`GET /hello`). Any that fails makes the exit code 1; one marked `abort_on_fail` stops the
//! run as soon as it fails at a tick (after its `delay`).

use std::fmt;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use hdrhistogram::Histogram;

use crate::stats::{Aggregate, RowStats, Summary, decode_histogram};

/// What a threshold is judged on besides the latencies.
struct Counts {
    requests: u64,
    failures: u64,
    /// Passed and failed checks, all names together.
    checks: (u64, u64),
    /// The run's length so far.
    secs: f64,
}

/// What a threshold measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// A latency percentile (0-100), in milliseconds.
    Percentile(f64),
    Avg,
    Min,
    Max,
    /// Failed requests over requests, in percent.
    FailRate,
    /// Requests per second over the run.
    Rps,
    Requests,
    Failures,
    /// Passed checks over checks, in percent (the whole run only).
    Checks,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

/// One criterion: `metric op value` on the whole run or on one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// `None`: the whole run; else the row's method and name (`"GET /hello"`).
    pub row: Option<(String, String)>,
    pub metric: Metric,
    pub op: Op,
    /// In the metric's unit: milliseconds, percent, per second, a count.
    pub value: f64,
    /// The text as written, for the report.
    pub text: String,
    pub abort_on_fail: bool,
    /// With `abort_on_fail`: not judged before this much of the run has passed.
    pub delay: Duration,
}

/// How a threshold came out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    /// `"GET /hello"`, or absent for the whole run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub row: Option<String>,
    pub threshold: String,
    /// The measured value (`null` when there was nothing to measure).
    pub value: Option<f64>,
    /// The value's unit: `ms`, `%`, `/s`, or empty for counts.
    #[serde(default)]
    pub unit: String,
    pub ok: bool,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        })
    }
}

/// Parses `metric op value`, e.g. `p95 < 200ms`, `fail_rate<1%`, `rps > 100`.
pub fn parse(text: &str) -> Result<Threshold> {
    let t = text.trim();
    let at = t
        .find(['<', '>'])
        .ok_or_else(|| anyhow::anyhow!("threshold {text:?}: expected `metric < value` or `metric > value`"))?;
    let (name, rest) = t.split_at(at);
    let (op, value) = match rest.as_bytes() {
        [b'<', b'=', ..] => (Op::Le, &rest[2..]),
        [b'>', b'=', ..] => (Op::Ge, &rest[2..]),
        [b'<', ..] => (Op::Lt, &rest[1..]),
        _ => (Op::Gt, &rest[1..]),
    };
    let name = name.trim().to_ascii_lowercase();
    let value = value.trim();
    let metric = match name.as_str() {
        "avg" => Metric::Avg,
        "min" => Metric::Min,
        "max" => Metric::Max,
        "med" => Metric::Percentile(50.0),
        "fail_rate" => Metric::FailRate,
        "rps" => Metric::Rps,
        "requests" => Metric::Requests,
        "failures" => Metric::Failures,
        "checks" => Metric::Checks,
        p if p.starts_with('p') => {
            let n = p[1..].trim_start_matches('(').trim_end_matches(')');
            match n.parse::<f64>() {
                Ok(n) if n > 0.0 && n <= 100.0 => Metric::Percentile(n),
                _ => bail!("threshold {text:?}: a percentile is p1 to p100 (p95, p99.9)"),
            }
        }
        other => bail!(
            "threshold {text:?}: unknown metric {other:?} (known: p50, p90, p95, p99, p99.9 or any pN, avg, min, max, med, fail_rate, rps, requests, failures, checks)"
        ),
    };
    let value = match metric {
        Metric::Percentile(_) | Metric::Avg | Metric::Min | Metric::Max => latency_ms(value)
            .ok_or_else(|| anyhow::anyhow!("threshold {text:?}: a latency is a duration like 200ms, 1.5s or 800us"))?,
        Metric::FailRate | Metric::Checks => percent(value)
            .ok_or_else(|| anyhow::anyhow!("threshold {text:?}: a rate is a percentage with its %, like 1%"))?,
        Metric::Rps | Metric::Requests | Metric::Failures => value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| anyhow::anyhow!("threshold {text:?}: expected a number"))?,
    };
    Ok(Threshold {
        row: None,
        metric,
        op,
        value,
        text: t.to_string(),
        abort_on_fail: false,
        delay: Duration::ZERO,
    })
}

/// A `--threshold` flag: `p95<200ms`, or on one row, `GET /hello: p99<50ms`.
pub fn parse_flag(text: &str) -> Result<Threshold> {
    match text.rsplit_once(':') {
        Some((row, expr)) => parse(expr)?.on_row(row),
        None => parse(text),
    }
}

fn latency_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (n, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("us").or_else(|| s.strip_suffix("µs")) {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    n.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v * scale)
}

/// A percentage, with its `%` (a bare `1` could mean 1 % or 100 %).
fn percent(s: &str) -> Option<f64> {
    let v = s.trim().strip_suffix('%')?.trim().parse::<f64>().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

impl Threshold {
    /// The value this threshold measures in `agg`, if there is anything to measure.
    pub fn measure(&self, agg: &Aggregate, elapsed: Duration) -> Option<f64> {
        let total;
        let stats: &RowStats = match &self.row {
            None => {
                total = agg.total();
                &total
            }
            Some((method, name)) => agg.rows().find(|(id, _)| id.method == *method && id.name == *name)?.1,
        };
        let counts = Counts {
            requests: stats.requests,
            failures: stats.failures,
            checks: agg.check_totals(),
            secs: elapsed.as_secs_f64(),
        };
        self.value(&counts, &stats.latency_us)
    }

    /// The value this threshold measures in a result file (or a merge of several).
    pub fn measure_summary(&self, s: &Summary) -> Result<Option<f64>> {
        let row = match &self.row {
            None => &s.total,
            Some((method, name)) => {
                match s
                    .endpoints
                    .iter()
                    .find(|r| r.method.as_deref() == Some(method) && r.name.as_deref() == Some(name))
                {
                    Some(r) => r,
                    None => return Ok(None),
                }
            }
        };
        let h = match &row.latency_hist {
            Some(text) => decode_histogram(text).map_err(|e| anyhow::anyhow!("threshold {:?}: {e}", self.text))?,
            None => crate::stats::new_histogram(),
        };
        let checks = s.checks.iter().fold((0, 0), |(p, f), c| (p + c.passes, f + c.fails));
        let counts = Counts {
            requests: row.requests,
            failures: row.failures,
            checks,
            secs: s.duration_s,
        };
        Ok(self.value(&counts, &h))
    }

    fn value(&self, c: &Counts, h: &Histogram<u64>) -> Option<f64> {
        let ms = |us: u64| us as f64 / 1000.0;
        match self.metric {
            Metric::Percentile(p) => (!h.is_empty()).then(|| ms(h.value_at_quantile(p / 100.0))),
            Metric::Avg => (!h.is_empty()).then(|| h.mean() / 1000.0),
            Metric::Min => (!h.is_empty()).then(|| ms(h.min())),
            Metric::Max => (!h.is_empty()).then(|| ms(h.max())),
            Metric::FailRate => (c.requests > 0).then(|| 100.0 * c.failures as f64 / c.requests as f64),
            Metric::Rps => (c.secs > 0.0).then(|| c.requests as f64 / c.secs),
            Metric::Requests => Some(c.requests as f64),
            Metric::Failures => Some(c.failures as f64),
            Metric::Checks => {
                let (passes, fails) = c.checks;
                (passes + fails > 0).then(|| 100.0 * passes as f64 / (passes + fails) as f64)
            }
        }
    }

    /// Rebuilds a threshold from its verdict in a result file, to judge it again (on a merge).
    pub fn from_verdict(v: &Verdict) -> Result<Self> {
        let t = parse(&v.threshold)?;
        match &v.row {
            Some(row) => t.on_row(row),
            None => Ok(t),
        }
    }

    /// Whether `value` meets the threshold. Nothing to measure fails it (a `p95 < 200ms`
    /// on a run that got no response has not held).
    pub fn holds(&self, value: Option<f64>) -> bool {
        let Some(v) = value else { return false };
        match self.op {
            Op::Lt => v < self.value,
            Op::Le => v <= self.value,
            Op::Gt => v > self.value,
            Op::Ge => v >= self.value,
        }
    }

    pub fn judge(&self, agg: &Aggregate, elapsed: Duration) -> Verdict {
        self.verdict(self.measure(agg, elapsed))
    }

    pub fn judge_summary(&self, s: &Summary) -> Result<Verdict> {
        Ok(self.verdict(self.measure_summary(s)?))
    }

    fn verdict(&self, value: Option<f64>) -> Verdict {
        Verdict {
            row: self.row.as_ref().map(|(m, n)| format!("{m} {n}")),
            threshold: self.text.clone(),
            value: value.map(|v| (v * 1000.0).round() / 1000.0),
            unit: match self.metric {
                Metric::Percentile(_) | Metric::Avg | Metric::Min | Metric::Max => "ms",
                Metric::FailRate | Metric::Checks => "%",
                Metric::Rps => "/s",
                Metric::Requests | Metric::Failures => "",
            }
            .to_string(),
            ok: self.holds(value),
        }
    }

    /// A row key like `"GET /hello"` (or a bare name, then any method: `"/hello"`).
    pub fn on_row(mut self, key: &str) -> Result<Self> {
        let key = key.trim();
        let (method, name) = match key.split_once(' ') {
            Some((m, n)) if !m.is_empty() && m.chars().all(|c| c.is_ascii_alphabetic()) => {
                (m.to_ascii_uppercase(), n.trim().to_string())
            }
            _ => bail!("thresholds: a row is named \"METHOD name\", like \"GET /hello\"; got {key:?}"),
        };
        if self.metric == Metric::Checks {
            bail!("thresholds: `checks` is for the whole run, not for a row ({key:?})");
        }
        self.row = Some((method, name));
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_with_their_units() {
        let t = parse("p95 < 200ms").unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Percentile(95.0), Op::Lt, 200.0));
        let t = parse("p99.9<=1.5s").unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Percentile(99.9), Op::Le, 1500.0));
        assert_eq!(parse("fail_rate < 1%").unwrap().value, 1.0);
        assert!(parse("fail_rate < 1").is_err(), "1 % or 100 %? the % is required");
        assert_eq!(parse("checks > 99%").unwrap().metric, Metric::Checks);
        let t = parse("rps >= 100").unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Rps, Op::Ge, 100.0));
        assert_eq!(parse("avg < 800us").unwrap().value, 0.8);
        for bad in [
            "p95 200ms",
            "p95 < 200",
            "latency < 1s",
            "p0 < 1ms",
            "fail_rate < 200%",
            "rps > lots",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(parse("p95 < 1s").unwrap().on_row("GET /hello").is_ok());
        assert!(parse("p95 < 1s").unwrap().on_row("/hello").is_err());
        assert!(parse("checks > 1%").unwrap().on_row("GET /x").is_err());
    }

    #[test]
    fn nothing_measured_does_not_hold() {
        let t = parse("p95 < 1s").unwrap();
        assert!(!t.holds(None));
        assert!(t.holds(Some(999.0)) && !t.holds(Some(1000.0)));
    }
}
