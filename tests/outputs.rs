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

#[test]
fn csv_files_have_locusts_columns_and_match_the_json() {
    let t = common::target();
    let dir = std::env::temp_dir().join(format!("stormlight-csv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("s.lua");
    std::fs::write(
        &script,
        r#"endpoints = { Task("GET", "/hello"), Task("GET", "/status/500", { name = "broken" }) }"#,
    )
    .unwrap();
    let (prefix, out, html) = (dir.join("run"), dir.join("run.json"), dir.join("run.html"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_stormlight"))
        .args([
            "run",
            script.to_str().unwrap(),
            "--host",
            &t.url(),
            "-u",
            "2",
            "-t",
            "2s",
            "-q",
        ])
        .args(["--csv", prefix.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--html", html.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let json = stormlight::merge::read(&out).unwrap();
    let read = |suffix: &str| {
        let text = std::fs::read_to_string(dir.join(format!("run_{suffix}.csv"))).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let head: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
        let rows: Vec<Vec<String>> = r
            .records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect();
        (head, rows)
    };
    // Locust's columns, as its CSV writer has them.
    let pct = [
        "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%",
    ];
    let mut stats_head = vec![
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
    stats_head.extend(pct);
    let mut history_head = vec!["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s"];
    history_head.extend(pct);
    history_head.extend([
        "Total Request Count",
        "Total Failure Count",
        "Total Median Response Time",
        "Total Average Response Time",
        "Total Min Response Time",
        "Total Max Response Time",
        "Total Average Content Size",
    ]);
    let (head, stats) = read("stats");
    assert_eq!(head, stats_head);
    let (head, history) = read("stats_history");
    assert_eq!(head, history_head);
    let (head, failures) = read("failures");
    assert_eq!(head, ["Method", "Name", "Error", "Occurrences"]);

    // Rows match the JSON: one per endpoint, then Aggregated.
    assert_eq!(stats.len(), json.endpoints.len() + 1);
    for (row, e) in stats.iter().zip(&json.endpoints) {
        assert_eq!(row[1], e.name.clone().unwrap());
        assert_eq!(row[2], e.requests.to_string());
        assert_eq!(row[3], e.failures.to_string());
        let p99: f64 = row[18].parse().unwrap();
        assert!((p99 - e.latency_ms.unwrap().p99).abs() < 0.01, "{row:?}");
    }
    let total = stats.last().unwrap();
    assert_eq!(
        (total[1].as_str(), total[2].clone()),
        ("Aggregated", json.total.requests.to_string())
    );
    assert_eq!(
        history.last().unwrap()[17],
        json.total.requests.to_string(),
        "the history ends at the total"
    );
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0][1].as_str(), failures[0][2].as_str()),
        ("broken", "HTTP 500")
    );
    assert_eq!(failures[0][3], json.failures[0].count.to_string());

    // The HTML report: self-contained (nothing fetched), drawn charts, the rows.
    let page = std::fs::read_to_string(&html).unwrap();
    for fetch in ["src=", "href=", "<script", "<link", "@import", "url("] {
        assert!(!page.contains(fetch), "self-contained: {fetch} found");
    }
    for chart in ["rps", "latency", "users", "failures"] {
        let at = page
            .find(&format!("data-chart=\"{chart}\""))
            .unwrap_or_else(|| panic!("no {chart} chart"));
        let svg = &page[at..at + page[at..].find("</svg>").unwrap()];
        let points = svg
            .split("points=\"")
            .nth(1)
            .expect("a drawn line")
            .split('"')
            .next()
            .unwrap();
        assert_eq!(
            points.split(' ').count(),
            json.series.len(),
            "{chart}: a point a second"
        );
    }
    for e in &json.endpoints {
        assert!(
            page.contains(&format!("<td>{}</td><td>{}</td>", e.requests, e.failures)),
            "{:?}",
            e.name
        );
    }
    assert!(page.contains("data-table=\"failures\"") && page.contains("HTTP 500"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Headless Chromium, if there is one (CI installs it: there the test must run).
fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have Chromium (.ci/run installs it)"
        );
        eprintln!("skipped: no Chromium here (CI installs it)");
    }
    found
}

#[test]
fn the_html_report_opens_in_headless_chromium_with_rows_and_drawn_charts() {
    let Some(browser) = chromium() else { return };
    let t = common::target();
    let s = common::run_scenario(
        Path::new("html.lua"),
        r#"endpoints = { Task("GET", "/hello"), Task("GET", "/status/503", { name = "down" }) }"#,
        Limits::default(),
        Overrides {
            host: Some(t.url()),
            users: Some(2),
            duration: Some(Duration::from_millis(2500)),
            ..Default::default()
        },
    );
    let dir = std::env::temp_dir().join(format!("stormlight-html-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("report.html");
    stormlight::report::write_file(&page, stormlight::html::render(&s).as_bytes()).unwrap();
    // No network: the page must not need any.
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--proxy-server=127.0.0.1:9",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("<table data-table=\"endpoints\""), "{dom}");
    for e in &s.endpoints {
        assert!(
            dom.contains(&format!(">{}</td>", e.name.as_deref().unwrap())),
            "{:?}",
            e.name
        );
    }
    assert!(dom.contains("HTTP 503"), "the failures are listed");
    let drawn = dom.matches("<polyline").count();
    assert!(drawn >= 6, "every chart has its lines: {drawn}");
    assert!(!dom.contains("points=\"\""), "no empty line");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_html_report_counts_script_errors_in_its_cards() {
    let t = common::target();
    let run = |source: &str| {
        common::run_scenario(
            Path::new("cards.lua"),
            source,
            Limits::default(),
            Overrides {
                host: Some(t.url()),
                users: Some(1),
                duration: Some(Duration::from_millis(500)),
                ..Default::default()
            },
        )
    };
    let failing = run("function scenario(user) http.get('/hello') error('boom') end");
    assert!(failing.script_errors > 0);
    let page = stormlight::html::render(&failing);
    assert!(
        page.contains(&format!(
            r#"<div data-card="script-errors"><b>{}</b>script errors</div>"#,
            failing.script_errors
        )),
        "the card"
    );
    let clean = run("endpoints = { Task('GET', '/hello') }");
    assert!(!stormlight::html::render(&clean).contains("data-card=\"script-errors\""));
}
