//! Issue 6: result files that keep everything. Histograms in HdrHistogram's interchange
//! encoding, a per-second series, and exact merging.

use std::path::Path;
use std::time::Duration;

use stormlight::config::Overrides;
use stormlight::scenario::sandbox::Limits;
use stormlight::stats::decode_histogram;

mod common;

#[test]
fn result_files_carry_histograms_and_a_series_and_merge_exactly() {
    let t = common::target();
    let s = common::run_scenario(
        Path::new("outputs.lua"),
        r#"endpoints = { Task("GET", "/hello"), Task("GET", "/slow?ms=5", { name = "slow" }) }"#,
        Limits::default(),
        Overrides {
            host: Some(t.url()),
            users: Some(4),
            duration: Some(Duration::from_millis(2500)),
            ..Default::default()
        },
    );
    let dir = std::env::temp_dir().join(format!("stormlight-outputs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.json");
    stormlight::report::write_json(&file, &s).unwrap();
    let read = stormlight::merge::read(&file).unwrap();

    // The histograms decode to the counts of the summary.
    let total = decode_histogram(read.total.service_hist.as_ref().expect("total histogram")).unwrap();
    assert_eq!(total.len(), read.total.requests);
    for row in &read.endpoints {
        let h = decode_histogram(row.service_hist.as_ref().unwrap()).unwrap();
        assert_eq!(h.len(), row.requests, "{:?}", row.name);
        let p99 = h.value_at_quantile(0.99) as f64 / 1000.0;
        assert!((p99 - row.service_ms.unwrap().p99).abs() < 0.01, "{:?}", row.name);
    }
    // The series adds up to the run.
    assert!(read.series.len() >= 3, "a point a second: {:?}", read.series.len());
    let in_series: u64 = read.series.iter().map(|p| p.requests).sum();
    assert_eq!(in_series, read.total.requests);
    assert!(read.series.iter().all(|p| p.users <= 4));

    // Merging a file with itself doubles every count and leaves every percentile as it was.
    let twice = stormlight::merge::merge(&[read.clone(), read.clone()]).unwrap();
    assert_eq!(twice.total.requests, 2 * read.total.requests);
    assert_eq!(twice.total.failures, 2 * read.total.failures);
    assert_eq!(twice.total.latency_ms, read.total.latency_ms);
    assert_eq!(twice.total.service_ms, read.total.service_ms);
    for (a, b) in twice.endpoints.iter().zip(&read.endpoints) {
        assert_eq!(a.requests, 2 * b.requests);
        assert_eq!(a.latency_ms, b.latency_ms);
    }
    let merged = decode_histogram(twice.total.service_hist.as_ref().unwrap()).unwrap();
    let mut added = total.clone();
    added.add(&total).unwrap();
    assert_eq!(merged, added, "the merged histogram is the two added");
    let series: u64 = twice.series.iter().map(|p| p.requests).sum();
    assert_eq!(series, 2 * read.total.requests);

    // `stormlight report` prints it and writes the merged file.
    let merged_file = dir.join("merged.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stormlight"))
        .args([
            "report",
            file.to_str().unwrap(),
            file.to_str().unwrap(),
            "--out",
            merged_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Aggregated"));
    assert_eq!(
        stormlight::merge::read(&merged_file).unwrap().total.requests,
        2 * read.total.requests
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
