//! Running one test on several machines (issue #7), with no coordinator of our own: each
//! process runs an exact share of the test (`--segment I/N`), they start together
//! (`--start-at`), and `stormlight report` merges their result files exactly and judges the
//! thresholds on the whole.
//!
//! How the whole splits: things numbered 0, 1, 2, ... (users in spawn order, the open model's
//! iterations in schedule order, the users a stage wants) are dealt out like cards, number
//! `g` to segment `g mod N`. So the shares always add up to the whole with no rounding
//! loss, every segment keeps the one global schedule (user `g` is still due at `g / rate`,
//! iteration `k` still fires at its own instant, just in one segment only), and a user's
//! global number is unique across the segments.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::files;
use crate::stats::Summary;

/// `--segment I/N`: this process is share `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub index: u32,
    pub count: u32,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Segment {
    /// `I/N` with 0 <= I < N (a Kubernetes Indexed Job's completion index is I as it is).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "segment {text:?}: expected I/N with I from 0 to N-1 (the Kubernetes completion index as it is), like 0/3"
            )
        };
        let (i, n) = text.trim().split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Of `total` things numbered from 0, how many are this segment's.
    pub fn share(&self, total: u64) -> u64 {
        let (i, n) = (self.index as u64, self.count as u64);
        (total + n - 1 - i) / n
    }

    /// The global number of this segment's `local`-th thing (both from 0).
    pub fn global(&self, local: u64) -> u64 {
        local * self.count as u64 + self.index as u64
    }
}

/// What `--segment` changes, applied where the whole test's numbers are used.
pub trait Split {
    fn share(&self, total: u64) -> u64;
    fn global(&self, local: u64) -> u64;
    fn first(&self) -> u64;
    fn step(&self) -> u64;
}

impl Split for Option<Segment> {
    fn share(&self, total: u64) -> u64 {
        self.map_or(total, |s| s.share(total))
    }
    fn global(&self, local: u64) -> u64 {
        self.map_or(local, |s| s.global(local))
    }
    /// The first iteration of the schedule that is this process's.
    fn first(&self) -> u64 {
        self.map_or(0, |s| s.index as u64)
    }
    /// From one of this process's iterations to its next.
    fn step(&self) -> u64 {
        self.map_or(1, |s| s.count as u64)
    }
}

/// `--start-at`: RFC 3339 (`2026-11-28T10:00:00Z`) or unix seconds (`1795860000`).
pub fn parse_start_at(text: &str) -> Result<SystemTime> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            bail!("--start-at {text:?}: unix seconds must be a positive number");
        }
        return Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs));
    }
    humantime::parse_rfc3339_weak(t)
        .or_else(|_| humantime::parse_rfc3339(t))
        .with_context(|| {
            format!("--start-at {text:?}: expected RFC 3339 (2026-11-28T10:00:00Z) or unix seconds (1795860000)")
        })
}

/// A FNV-1a fingerprint of a scenario's source, so that `report` can tell the files of
/// different scenarios apart (not a security measure).
pub fn fingerprint(source: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Reads `--setup-data FILE` (written by `stormlight setup --out FILE`) for the scenario with
/// this fingerprint.
pub fn read_setup_data(path: &Path, fingerprint: &str) -> Result<serde_json::Value> {
    let text = files::read(path, &format!("--setup-data {}", path.display()), files::SETUP_DATA_MAX)?;
    let file: SetupFile = serde_json::from_slice(&text).with_context(|| {
        format!(
            "--setup-data: {} is not a file written by `stormlight setup`",
            path.display()
        )
    })?;
    if file.scenario_fingerprint != fingerprint {
        bail!(
            "--setup-data: {} was made by the setup() of another scenario ({}, or an earlier version of it): run `stormlight setup` again",
            path.display(),
            file.script
        );
    }
    Ok(file.setup_data)
}

/// The file `stormlight setup --out` writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetupFile {
    /// What `setup()` returned (`null` when it returned nothing).
    pub setup_data: serde_json::Value,
    pub script: String,
    pub scenario_fingerprint: String,
}

/// Refuses a set of segment files that is not one whole test: a segment missing or given
/// twice, different segment counts, different scenarios, or segments mixed with whole runs.
/// Plain files (no `--segment`) may still be merged as several generators' results.
pub fn check_set(files: &[(String, Summary)]) -> Result<()> {
    let segmented: Vec<_> = files
        .iter()
        .filter_map(|(name, s)| s.segment.map(|seg| (name, seg)))
        .collect();
    if segmented.is_empty() {
        return Ok(());
    }
    if let Some((name, seg)) = segmented.iter().find(|(_, s)| s.count == 0 || s.index >= s.count) {
        bail!("{name}: segment {seg} is not a segment (the index runs from 0 to the count - 1)");
    }
    if let Some((name, _)) = files.iter().find(|(_, s)| s.segment.is_none()) {
        bail!(
            "{name} is not a segment (it ran without --segment) but the other files are: merge a test's segments alone"
        );
    }
    let count = segmented[0].1.count;
    if let Some((name, seg)) = segmented.iter().find(|(_, s)| s.count != count) {
        bail!(
            "{name} is segment {seg}, but {} is one of {count}: these files are not from one test",
            segmented[0].0
        );
    }
    let fingerprint = &files[0].1.scenario_fingerprint;
    if let Some((name, s)) = files.iter().find(|(_, s)| s.scenario_fingerprint != *fingerprint) {
        bail!(
            "{name} ran a different scenario ({}) from {} ({}): these files are not from one test",
            s.config.script,
            files[0].0,
            files[0].1.config.script
        );
    }
    // One run: the same whole-test load, duration and start.
    let whole = |s: &Summary| (s.config.load.clone(), s.config.duration_s, s.config.start_at_ms);
    let (first_name, first) = (&files[0].0, &files[0].1);
    for (name, s) in &files[1..] {
        let (a, b) = (whole(first), whole(s));
        if a != b {
            let show = |w: &(String, Option<f64>, Option<u64>)| {
                format!(
                    "{}, {}, --start-at {}",
                    w.0,
                    w.1.map_or("until interrupted".into(), |d| format!("{d}s")),
                    w.2.map_or("none".into(), |ms| format!("{}", ms as f64 / 1000.0))
                )
            };
            bail!(
                "{name} and {first_name} are segments of different runs ({} / {}): merge the segments of one run",
                show(&b),
                show(&a)
            );
        }
    }
    if first.config.start_at_ms.is_some() {
        let earliest = files.iter().map(|(_, s)| s.started_at_ms).min().unwrap_or(0);
        if let Some((name, s)) = files.iter().find(|(_, s)| s.started_at_ms > earliest + 1000) {
            bail!(
                "{name} started {:.1}s after the first segment: it missed the --start-at, so the merged numbers would not be one test",
                (s.started_at_ms - earliest) as f64 / 1000.0
            );
        }
    }
    let mut seen: std::collections::BTreeMap<u32, &String> = Default::default();
    for (name, seg) in &segmented {
        if let Some(first) = seen.insert(seg.index, name) {
            bail!("segment {seg} is given twice: {first} and {name}");
        }
    }
    let absent = count as usize - seen.len();
    if absent > 0 {
        let missing: Vec<String> = (0..count)
            .filter(|i| !seen.contains_key(i))
            .take(10)
            .map(|i| format!("{i}/{count}"))
            .collect();
        let (noun, verb) = if absent == 1 {
            ("segment", "is")
        } else {
            ("segments", "are")
        };
        let more = if absent > missing.len() {
            format!(" and {} more", absent - missing.len())
        } else {
            String::new()
        };
        bail!(
            "{noun} {}{more} {verb} missing: the merged result would not be the whole test",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_whole_and_never_overlap() {
        for n in 1..=7u32 {
            for total in 0..50u64 {
                let segs: Vec<Segment> = (0..n).map(|index| Segment { index, count: n }).collect();
                let sum: u64 = segs.iter().map(|s| s.share(total)).sum();
                assert_eq!(sum, total, "{total} split {n} ways");
                let mut all: Vec<u64> = segs
                    .iter()
                    .flat_map(|s| (0..s.share(total)).map(|l| s.global(l)))
                    .collect();
                all.sort();
                assert_eq!(all, (0..total).collect::<Vec<_>>(), "each number once");
            }
        }
        // The open model's schedule: segment 1 of 3 fires iterations 1, 4, 7, ...
        let s = Some(Segment { index: 1, count: 3 });
        let fired: Vec<u64> = (0..3).map(|k| s.first() + k * s.step()).collect();
        assert_eq!(fired, [1, 4, 7]);
        assert_eq!((None::<Segment>.first(), None::<Segment>.step()), (0, 1));
    }

    #[test]
    fn segments_and_start_times_parse() {
        assert_eq!(Segment::parse("2/3").unwrap(), Segment { index: 2, count: 3 });
        for bad in ["3/3", "1", "-1/3", "1/0", "a/b", ""] {
            assert!(Segment::parse(bad).is_err(), "{bad:?}");
        }
        let t = parse_start_at("2026-11-28T10:00:00Z").unwrap();
        assert_eq!(t, parse_start_at("1795860000").unwrap());
        assert!(parse_start_at("tomorrow").is_err());
    }
}
