//! `--html FILE` (and `stormlight report --html`): the summary as one self-contained page. The
//! charts are SVG drawn here, from the per-second series: no script, no network, nothing to
//! load, so the file opens anywhere.

use std::fmt::Write as _;

use crate::stats::{Latency, RowSummary, Summary};

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart: its name, colour and points (x in seconds).
struct Line<'a> {
    name: &'a str,
    colour: &'a str,
    points: Vec<(f64, f64)>,
}

const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 28.0;
const TOP: f64 = 12.0;
const RIGHT: f64 = 12.0;

/// A line chart as SVG, with axes, a grid, ticks and a legend.
fn chart(id: &str, title: &str, unit: &str, lines: &[Line]) -> String {
    let xmax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let ymax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    // Round steps on both axes; the y scale ends on a step above the highest point, and an
    // all-zero chart (no failures) gets a scale of 0 to 1, not a grid of zeros.
    let ystep = nice_step(if ymax > 0.0 { ymax / 4.0 } else { 0.25 }, &[1.0, 2.0, 2.5, 5.0]);
    let ytop = ((ymax / ystep).floor() + 1.0) * ystep;
    let xstep = match xmax / 4.5 {
        d if d <= 60.0 => nice_step(d, &[1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0]).max(1.0),
        d => 60.0 * nice_step(d / 60.0, &[1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0]),
    };
    let x = |v: f64| LEFT + v / xmax * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - v / ytop) * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<figure><figcaption>{}</figcaption><svg data-chart="{id}" viewBox="0 0 {W} {H}" role="img" aria-label="{}">"#,
        esc(title),
        esc(title)
    );
    let mut v = 0.0;
    while v <= ytop + ystep / 1e6 {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            short(v, unit),
            y = y(v)
        );
        v += ystep;
    }
    let mut v = 0.0;
    while v <= xmax + 1e-9 {
        // The last label ends at the axis' end rather than running past it.
        let anchor = if x(v) > W - RIGHT - 20.0 { "end" } else { "middle" };
        let label = match v {
            v if v >= 120.0 && v % 60.0 == 0.0 => format!("{}m", v / 60.0),
            v if v >= 120.0 => format!("{}m{}s", (v / 60.0).floor(), v % 60.0),
            v => format!("{v}s"),
        };
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="{anchor}" class="tick">{label}</text>"#,
            x(v),
            H - 8.0,
        );
        v += xstep;
    }
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#9ca3af"/><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#9ca3af"/>"##,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
    for l in lines {
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline data-line="{}" fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            esc(l.name),
            l.colour,
            pts.join(" ")
        );
    }
    svg.push_str("</svg><div class=\"legend\">");
    for l in lines {
        let _ = write!(
            svg,
            r#"<span><i style="background:{}"></i>{}</span>"#,
            l.colour,
            esc(l.name)
        );
    }
    svg.push_str("</div></figure>");
    svg
}

/// The smallest of `steps` (times a power of ten) that is at least `raw`.
fn nice_step(raw: f64, steps: &[f64]) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    for m in [magnitude, magnitude * 10.0] {
        if let Some(s) = steps.iter().map(|s| s * m).find(|s| *s >= raw * (1.0 - 1e-9)) {
            return s;
        }
    }
    raw
}

fn short(v: f64, unit: &str) -> String {
    let n = if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    };
    format!("{n}{unit}")
}

fn ms(l: Option<Latency>, f: impl Fn(&Latency) -> f64) -> String {
    l.map_or("-".into(), |l| format!("{:.2}", f(&l)))
}

fn row_cells(r: &RowSummary, method: &str, name: &str) -> String {
    let l = r.latency_ms;
    format!(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(method),
        esc(name),
        r.requests,
        r.failures,
        r.rps,
        ms(l, |l| l.avg),
        ms(l, |l| l.min),
        ms(l, |l| l.p50),
        ms(l, |l| l.p90),
        ms(l, |l| l.p95),
        ms(l, |l| l.p99),
        ms(l, |l| l.p99_9),
        ms(l, |l| l.max)
    )
}

/// The page.
pub fn render(s: &Summary) -> String {
    let mut page = String::new();
    let title = format!("stormlight: {}", s.config.script);
    let _ = write!(
        page,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{}</title><style>{STYLE}</style></head><body><main>"#,
        esc(&title)
    );
    let _ = write!(page, "<h1>{}</h1>", esc(&title));
    let _ = write!(
        page,
        r#"<p class="run">{} · {}{} · {:.1} s{} · host {}</p>"#,
        esc(&s.started_at),
        esc(&s.config.load),
        s.segment.map_or(String::new(), |seg| format!(
            " · segment {seg}: {} users",
            s.config.users
        )),
        s.duration_s,
        if s.interrupted { " (interrupted)" } else { "" },
        esc(s.config.host.as_deref().unwrap_or("(urls in the scenario)"))
    );
    page.push_str(&sections(s));
    page.push_str("</main></body></html>\n");
    page
}

/// The report's body: cards, charts and tables (also what the live dashboard shows each
/// second, see `web`).
pub fn sections(s: &Summary) -> String {
    let mut last = 0.0;
    let mut rps = Vec::new();
    let mut fps = Vec::new();
    let (mut p50, mut p95, mut p99, mut users) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in &s.series {
        let length = (p.t_s - last).max(1e-3);
        last = p.t_s;
        rps.push((p.t_s, p.requests as f64 / length));
        fps.push((p.t_s, p.failures as f64 / length));
        users.push((p.t_s, p.users as f64));
        for (v, into) in [(p.p50_ms, &mut p50), (p.p95_ms, &mut p95), (p.p99_ms, &mut p99)] {
            if let Some(v) = v {
                into.push((p.t_s, v));
            }
        }
    }
    let mut page = String::new();
    let t = &s.total;
    // Script errors outside requests are failures of the run too (a gate counts them).
    let script_errors = match s.script_errors {
        0 => String::new(),
        n => format!(r#"<div data-card="script-errors"><b>{n}</b>script errors</div>"#),
    };
    let _ = write!(
        page,
        r#"<section class="cards"><div><b>{}</b>requests</div><div><b>{}</b>failures</div>{script_errors}<div><b>{:.1}</b>requests/s</div><div><b>{}</b>p95 ms</div><div><b>{}</b>p99 ms</div></section>"#,
        t.requests,
        t.failures,
        t.rps,
        ms(t.latency_ms, |l| l.p95),
        ms(t.latency_ms, |l| l.p99)
    );
    page.push_str(r#"<section class="charts">"#);
    page.push_str(&chart(
        "rps",
        "Requests per second",
        "",
        &[Line {
            name: "requests/s",
            colour: "#2563eb",
            points: rps,
        }],
    ));
    page.push_str(&chart(
        "latency",
        "Latency (ms)",
        "",
        &[
            Line {
                name: "p50",
                colour: "#16a34a",
                points: p50,
            },
            Line {
                name: "p95",
                colour: "#d97706",
                points: p95,
            },
            Line {
                name: "p99",
                colour: "#dc2626",
                points: p99,
            },
        ],
    ));
    page.push_str(&chart(
        "users",
        "Users",
        "",
        &[Line {
            name: "users",
            colour: "#7c3aed",
            points: users,
        }],
    ));
    page.push_str(&chart(
        "failures",
        "Failures per second",
        "",
        &[Line {
            name: "failures/s",
            colour: "#dc2626",
            points: fps,
        }],
    ));
    page.push_str("</section>");

    page.push_str(r#"<h2>Requests</h2><table data-table="endpoints"><thead><tr><th>Method</th><th>Name</th><th># reqs</th><th># fails</th><th>RPS</th><th>avg ms</th><th>min</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr></thead><tbody>"#);
    for r in &s.endpoints {
        page.push_str(&row_cells(
            r,
            r.method.as_deref().unwrap_or(""),
            r.name.as_deref().unwrap_or(""),
        ));
    }
    page.push_str("</tbody><tfoot>");
    page.push_str(&row_cells(t, "", "Aggregated"));
    page.push_str("</tfoot></table>");

    if !s.failures.is_empty() {
        page.push_str(r#"<h2>Failures</h2><table data-table="failures"><thead><tr><th>#</th><th>Method</th><th>Name</th><th>Reason</th></tr></thead><tbody>"#);
        for f in &s.failures {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                f.count,
                esc(&f.method),
                esc(&f.name),
                esc(&f.reason)
            );
        }
        page.push_str("</tbody></table>");
    }
    if !s.stuck.is_empty() {
        page.push_str(r#"<h2>Still running when the run ended</h2><ul data-list="stuck">"#);
        for what in &s.stuck {
            let _ = write!(page, "<li>{}</li>", esc(what));
        }
        page.push_str("</ul>");
    }
    if !s.thresholds.is_empty() {
        page.push_str(r#"<h2>Thresholds</h2><table data-table="thresholds"><tbody>"#);
        for v in &s.thresholds {
            let value = v.value.map_or("no data".into(), |x| format!("{x} {}", v.unit));
            let _ = write!(
                page,
                r#"<tr class="{}"><td>{}</td><td>{}{}</td><td>{}</td></tr>"#,
                if v.ok { "pass" } else { "fail" },
                if v.ok { "pass" } else { "FAIL" },
                v.row.as_ref().map_or(String::new(), |r| format!("{}: ", esc(r))),
                esc(&v.threshold),
                esc(value.trim())
            );
        }
        page.push_str("</tbody></table>");
    }
    if !s.checks.is_empty() {
        page.push_str(r#"<h2>Checks</h2><table data-table="checks"><thead><tr><th>Check</th><th>Passes</th><th>Fails</th></tr></thead><tbody>"#);
        for c in &s.checks {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.name),
                c.passes,
                c.fails
            );
        }
        page.push_str("</tbody></table>");
    }
    let _ = write!(
        page,
        r#"<h2>Run</h2><table data-table="config"><tbody><tr><td>script</td><td>{}</td></tr><tr><td>load</td><td>{}</td></tr><tr><td>stormlight</td><td>{}</td></tr></tbody></table>"#,
        esc(&s.config.script),
        esc(&s.config.load),
        esc(&s.version)
    );
    page
}

/// The report's stylesheet (the dashboard's too).
pub const STYLE: &str = "body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#111827;background:#f9fafb;margin:0}\
main{max-width:1360px;margin:0 auto;padding:24px}h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}\
.run{color:#4b5563;margin:0 0 16px}.cards{display:flex;gap:12px;flex-wrap:wrap}.cards div{background:#fff;border:1px solid #e5e7eb;\
border-radius:8px;padding:10px 16px;color:#4b5563}.cards b{display:block;font-size:20px;color:#111827}\
.charts{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px;margin-top:16px}\
@media (max-width:900px){.charts{grid-template-columns:1fr}}\
figure{margin:0;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px}figcaption{font-weight:600;margin-bottom:6px}\
svg{width:100%;height:auto}.tick{font-size:13px;fill:#6b7280}.legend{display:flex;gap:14px;color:#374151;font-size:12px}\
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}\
table{border-collapse:collapse;background:#fff;border:1px solid #e5e7eb;width:100%}th,td{padding:6px 10px;border-bottom:1px solid #f3f4f6;text-align:right}\
th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}tfoot td{font-weight:600}tr.fail td:first-child{color:#dc2626;font-weight:600}\
tr.pass td:first-child{color:#16a34a}\
table[data-table=failures] :is(th,td){text-align:left}table[data-table=failures] :is(th,td):first-child{text-align:right;width:6em}\
table:is([data-table=failures],[data-table=thresholds],[data-table=checks],[data-table=config]){width:auto;min-width:50%}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_step_by_round_numbers() {
        let y = [1.0, 2.0, 2.5, 5.0];
        assert_eq!(nice_step(242.0, &y), 250.0);
        assert_eq!(nice_step(0.25, &y), 0.25);
        assert_eq!(nice_step(3.1, &y), 5.0);
        assert_eq!(nice_step(1000.0, &y), 1000.0);
        let secs = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0];
        assert_eq!(nice_step(2.75, &secs), 5.0);
        assert_eq!(nice_step(12.0, &secs), 20.0);
        let svg = chart(
            "c",
            "t",
            "",
            &[Line {
                name: "l",
                colour: "#000",
                points: vec![(1.0, 90.0), (11.0, 969.0)],
            }],
        );
        for tick in [">0<", ">250<", ">500<", ">750<", ">1.0k<", ">0s<", ">5s<", ">10s<"] {
            assert!(svg.contains(tick), "{tick} in {svg}");
        }
        assert!(!svg.contains(">11s<"), "ticks fall on the steps");
    }
}
