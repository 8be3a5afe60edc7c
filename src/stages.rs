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

#[cfg(test)]
mod tests {
    use super::*;

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
