//! The examples of `examples/` for running on many machines: the Kubernetes manifests are
//! valid against the Kubernetes schema (`kubernetes-validate`, installed by `.ci/run`;
//! elsewhere the test is skipped with a message when it is missing), and the shell example
//! runs three local segments and merges them into the whole test.

mod common;

use std::process::Command;

#[test]
fn the_kubernetes_manifests_validate_against_the_schema() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    let installed = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    let out = match installed {
        true => Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict"])
            .args(&files)
            .output()
            .expect("run kubernetes-validate"),
        false => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have kubernetes-validate (.ci/run installs it)"
            );
            eprintln!("skipped: no kubernetes-validate here (pip install kubernetes-validate; CI installs it)");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" passed ").count(), 4, "{text}");
    let job = std::fs::read_to_string(format!("{dir}/job.yaml")).unwrap();
    for needed in [
        "completionMode: Indexed",
        "completions: 3",
        "parallelism: 3",
        "$(JOB_COMPLETION_INDEX)/3",
        "$(START_AT)",
    ] {
        assert!(job.contains(needed), "job.yaml lacks {needed}");
    }
}

#[test]
fn the_shell_example_runs_three_segments_and_merges_them() {
    let t = common::target();
    let dir = std::env::temp_dir().join(format!("stormlight-segments-sh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("s.lua");
    std::fs::write(
        &script,
        "endpoints = { Task(\"GET\", \"/hello\") }\nwait_time = constant(0.05)\nthresholds = { \"fail_rate < 1%\" }\n",
    )
    .unwrap();
    let segments = |users: &str, delay: &str| {
        Command::new("timeout")
            .args([
                "60",
                "bash",
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples/segments.sh"),
                "3",
            ])
            .arg(&script)
            .args(["--host", &t.url(), "-u", users, "-t", "2s"])
            .env("STORMLIGHT", env!("CARGO_BIN_EXE_stormlight"))
            .env("OUT", &dir)
            .env("START_DELAY", delay)
            .output()
            .unwrap()
    };
    let out = segments("6", "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("merged.json")).unwrap()).unwrap();
    assert_eq!(merged["total"]["requests"].as_u64(), Some(t.counts.requests()));
    assert_eq!(merged["config"]["users"], 6);
    assert!(dir.join("report.html").exists());

    // Too few users for three segments: one refuses, so none starts and nothing is sent.
    let before = t.counts.requests();
    let out = segments("2", "3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("segment 2/3 ended before the start"), "{stderr}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(t.counts.requests(), before, "no segment sent anything");
    std::fs::remove_dir_all(&dir).unwrap();
}
