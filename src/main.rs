//! The binary: parse the command line, run the command, map the outcome to an exit code
//! (SPEC: 0 finished, 1 threshold failed, 2 bad input, 130 interrupted; and 3: an output
//! file could not be written at the end, after the summary was printed; 4: `setup()` failed).

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use stormlight::cli::{Cli, Command};
use stormlight::{Exit, RunRequest, Signals, say};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => match rt.block_on(execute(cli)) {
            Ok(Exit::Success) => ExitCode::SUCCESS,
            Ok(Exit::Interrupted) => ExitCode::from(130),
            Ok(Exit::OutputFailed) => ExitCode::from(3),
            Ok(Exit::SetupFailed) => ExitCode::from(4),
            Ok(Exit::ThresholdFailed) => ExitCode::from(1),
            Err(e) => {
                say!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Err(e) => {
            say!("error: cannot start the runtime: {e}");
            ExitCode::from(2)
        }
    };
    // What went to stderr (scripts' lines among it) goes out before the process ends, if
    // stderr takes it within a second.
    stormlight::console::flush(std::time::Duration::from_secs(1));
    code
}

async fn execute(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Check { script } => {
            print!("{}", stormlight::check(&script)?);
            Ok(Exit::Success)
        }
        Command::Report { files, out, html } => {
            if let Some(out) = &out {
                stormlight::files::check_writable(out, "--out")?;
            }
            if let Some(html) = &html {
                stormlight::files::check_writable(html, "--html")?;
            }
            let named: Vec<(String, _)> = files
                .iter()
                .map(|f| Ok((f.display().to_string(), stormlight::merge::read(f)?)))
                .collect::<anyhow::Result<_>>()?;
            stormlight::segment::check_set(&named)?;
            let read: Vec<_> = named.into_iter().map(|(_, s)| s).collect();
            let merged = stormlight::merge::merge(&read)?;
            // The files first: a closed stdout (`| head`) must not lose them.
            if let Some(out) = out {
                stormlight::report::write_json(&out, &merged)?;
                say!("merged result written to {}", out.display());
            }
            if let Some(html) = html {
                stormlight::report::write_file(&html, stormlight::html::render(&merged).as_bytes())?;
                say!("HTML report written to {}", html.display());
            }
            let _ = stormlight::report::write_summary(&mut std::io::stdout().lock(), &merged);
            if let Some(t) = &merged.aborted_by {
                say!("a generator stopped early: threshold {t} failed (abort_on_fail)");
            }
            // The thresholds, judged on the merged numbers, set the exit code.
            match merged.aborted_by.is_some() || merged.thresholds.iter().any(|v| !v.ok) {
                true => Ok(Exit::ThresholdFailed),
                false => Ok(Exit::Success),
            }
        }
        Command::Setup { args, out } => stormlight::setup(args.script.clone(), args.overrides(None), out).await,
        Command::Teardown { args, setup_data } => {
            stormlight::teardown(args.script.clone(), args.overrides(Some(setup_data))).await
        }
        Command::Run(args) => {
            let req = RunRequest {
                script: args.script.clone(),
                flags: args.load.overrides(args.host.clone()),
                out: args.load.out.clone(),
                live: args.load.live(),
            };
            let (cfg, plan) = stormlight::prepare(&req, None)?;
            stormlight::run(cfg, plan, signals()).await
        }
        Command::Demo(args) => {
            stormlight::demo(
                args.load.overrides(None),
                args.load.out.clone(),
                args.load.live(),
                signals(),
            )
            .await
        }
        Command::Target {
            port,
            bind,
            idle_close,
            silent_close,
            tls,
        } => {
            let tls = tls.then_some(stormlight::target::LOCAL_NAMES);
            let options = stormlight::target::Options {
                idle_close,
                silent_close,
                tls,
                client_ca: None,
            };
            let target = stormlight::target::Target::start_with(SocketAddr::new(bind, port), options).await?;
            if let Some(pem) = &target.cert_pem {
                let path = std::env::temp_dir().join(format!("stormlight-target-{}.pem", target.addr.port()));
                std::fs::write(&path, pem)?;
                println!(
                    "self-signed certificate: {} (run --ca-cert {0}, or --insecure)",
                    path.display()
                );
            }
            println!("stormlight target listening on {} (Ctrl-C to stop)", target.url());
            let _ = tokio::signal::ctrl_c().await;
            println!("received {} requests", target.counts.requests());
            Ok(Exit::Success)
        }
    }
}

/// The interrupts (Ctrl-C, SIGTERM), counted: the first stops the run (summary and outputs
/// after the grace period), a second cuts the grace period short (summary and outputs at
/// once), a third exits without them.
fn signals() -> Signals {
    let (count, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            signal().await;
            count.send_modify(|n| *n += 1);
            if *count.borrow() >= 3 {
                say!("\nthird interrupt: exiting without a summary");
                stormlight::console::flush(std::time::Duration::from_millis(200));
                std::process::exit(130);
            }
        }
    });
    Signals::new(rx)
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
