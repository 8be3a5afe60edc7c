//! Ramping stages for the closed model: `--stages 30s:100,1m:100,30s:0` or
//! `options.stages = { { duration = "30s", users = 100 }, ... }`. Within a stage the number of
//! users moves linearly from the previous stage's target (0 at the start) to its own.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::config::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub users: u64,
}

/// Parses `30s:100,1m:100,30s:0`.
pub fn parse(text: &str) -> Result<Vec<Stage>> {
    let mut stages = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (d, n) = part
            .split_once(':')
            .with_context(|| format!("stage {part:?}: expected DURATION:USERS, like 30s:100"))?;
        let duration = parse_duration(d.trim()).with_context(|| format!("stage {part:?}"))?;
        let users = n
            .trim()
            .parse::<u64>()
            .with_context(|| format!("stage {part:?}: users must be a whole number"))?;
        stages.push(Stage { duration, users });
    }
    check(&stages)?;
    Ok(stages)
}

/// A stage list that can run: not empty, some time, some users.
pub fn check(stages: &[Stage]) -> Result<()> {
    if stages.is_empty() {
        bail!("stages: give at least one, like 30s:100");
    }
    if total(stages).is_zero() {
        bail!("stages: their durations add up to nothing");
    }
    if peak(stages) == 0 {
        bail!("stages: no stage has any user");
    }
    Ok(())
}

/// How long the stages last in all.
pub fn total(stages: &[Stage]) -> Duration {
    stages.iter().map(|s| s.duration).sum()
}

/// The most users any stage asks for.
pub fn peak(stages: &[Stage]) -> u64 {
    stages.iter().map(|s| s.users).max().unwrap_or(0)
}

/// Users wanted `t` after the start (rounded to the nearest whole user); after the last stage,
/// its target.
pub fn users_at(stages: &[Stage], t: Duration) -> u64 {
    let mut from = 0.0;
    let mut start = Duration::ZERO;
    for s in stages {
        let end = start + s.duration;
        if t < end {
            let frac = (t - start).as_secs_f64() / s.duration.as_secs_f64();
            return (from + (s.users as f64 - from) * frac).round() as u64;
        }
        from = s.users as f64;
        start = end;
    }
    stages.last().map_or(0, |s| s.users)
}

/// A stage of the open model: the rate (iterations per second) moves linearly to `rate` over
/// `duration`, from the previous stage's (0 at the start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateStage {
    pub duration: Duration,
    pub rate: f64,
}

/// Parses `30s:100/s,1m:200/s` (rates); `None` if the list is of users (no `/s`).
pub fn parse_rates(text: &str) -> Option<Result<Vec<RateStage>>> {
    if !text.contains("/s") {
        return None;
    }
    let parse = || -> Result<Vec<RateStage>> {
        let mut stages = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (d, r) = part
                .split_once(':')
                .with_context(|| format!("stage {part:?}: expected DURATION:RATE/s, like 30s:100/s"))?;
            let duration = parse_duration(d.trim()).with_context(|| format!("stage {part:?}"))?;
            let rate = r
                .trim()
                .strip_suffix("/s")
                .and_then(|n| n.trim().parse::<f64>().ok())
                .filter(|n| n.is_finite() && *n >= 0.0)
                .with_context(|| format!("stage {part:?}: a rate is a number per second, like 100/s"))?;
            stages.push(RateStage { duration, rate });
        }
        check_rates(&stages)?;
        Ok(stages)
    };
    Some(parse())
}

/// A rate stage list that can run.
pub fn check_rates(stages: &[RateStage]) -> Result<()> {
    if stages.is_empty() || stages.iter().map(|s| s.duration).sum::<Duration>().is_zero() {
        bail!("stages: give at least one with some duration, like 30s:100/s");
    }
    if stages.iter().all(|s| s.rate == 0.0) {
        bail!("stages: no stage has a rate above 0");
    }
    Ok(())
}

/// Iterations due in the first `t` of the rate stages, starting from rate `from`: the area
/// under the rate (linear within each stage).
fn iterations_by(stages: &[RateStage], from: f64, t: Duration) -> f64 {
    let (mut r0, mut start, mut area) = (from, Duration::ZERO, 0.0);
    for s in stages {
        let d = s.duration.as_secs_f64();
        let end = start + s.duration;
        let tau = (t.min(end).saturating_sub(start)).as_secs_f64();
        if d > 0.0 {
            area += r0 * tau + (s.rate - r0) * tau * tau / (2.0 * d);
        }
        if t <= end {
            return area;
        }
        r0 = s.rate;
        start = end;
    }
    area + r0 * (t - start).as_secs_f64()
}

/// When iteration `k` (0-based) is due under the rate stages (starting from rate `from`): the
/// first moment `k` iterations' worth of rate has passed; `None` past the last stage.
pub fn iteration_time(stages: &[RateStage], from: f64, k: u64) -> Option<Duration> {
    let total: Duration = stages.iter().map(|s| s.duration).sum();
    let k = k as f64;
    if iterations_by(stages, from, total) <= k {
        return None;
    }
    let (mut lo, mut hi) = (0.0, total.as_secs_f64());
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if iterations_by(stages, from, Duration::from_secs_f64(mid)) >= k {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(Duration::from_secs_f64(hi))
}

/// How many iterations (0, 1, ...) are due in the first `t` of the rate stages: those whose
/// [`iteration_time`] is at most `t`.
pub fn iterations_due(stages: &[RateStage], from: f64, t: Duration) -> u64 {
    let total: Duration = stages.iter().map(|s| s.duration).sum();
    let all = iterations_by(stages, from, total).ceil();
    (iterations_by(stages, from, t).floor() + 1.0).min(all).max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_stages_schedule_iterations_by_the_area_under_the_rate() {
        let stages = parse_rates("10s:10/s, 10s:10/s").unwrap().unwrap();
        // From 0 to 10/s over 10 s: 50 iterations; then 10/s for 10 s: 100 more.
        let at = |k| iteration_time(&stages, 0.0, k).map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
        assert_eq!(at(0), Some(0.0));
        assert_eq!(at(50), Some(10.0));
        assert_eq!(at(60), Some(11.0));
        assert_eq!(at(149), Some(19.9));
        assert_eq!(at(150), None);
        // Iteration k of the ramp is due when k = t^2 / 2 (rate t per second): t = sqrt(2k).
        assert_eq!(at(8), Some(4.0));
        // A constant rate from the start.
        let hold = [RateStage {
            duration: Duration::from_secs(1),
            rate: 100.0,
        }];
        assert_eq!(
            iteration_time(&hold, 100.0, 37),
            Some(Duration::from_secs_f64(0.37)).map(|d| {
                let got = iteration_time(&hold, 100.0, 37).unwrap();
                assert!((got.as_secs_f64() - d.as_secs_f64()).abs() < 1e-9);
                got
            })
        );
        assert!(parse_rates("30s:100").is_none(), "users, not rates");
        assert!(parse_rates("30s:x/s").unwrap().is_err());
        assert!(parse_rates("30s:0/s").unwrap().is_err());
    }

    #[test]
    fn users_ramp_linearly_within_each_stage() {
        let stages = parse("10s:100, 20s:100, 10s:0").unwrap();
        let at = |s: f64| users_at(&stages, Duration::from_secs_f64(s));
        assert_eq!([at(0.0), at(2.5), at(5.0), at(9.99), at(10.0)], [0, 25, 50, 100, 100]);
        assert_eq!(
            [at(20.0), at(30.0), at(35.0), at(39.9), at(40.0), at(99.0)],
            [100, 100, 50, 1, 0, 0]
        );
        assert_eq!(total(&stages), Duration::from_secs(40));
        assert_eq!(peak(&stages), 100);
        // A stage of zero length jumps.
        let jump = parse("0s:10,10s:10").unwrap();
        assert_eq!(users_at(&jump, Duration::ZERO), 10);
        for bad in ["", "30s", "30s:-1", "soon:5", "0s:0", "10s:0"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
