//! What an operator sees and does, with the real binary: `--metrics` (Prometheus text, `/status`
//! JSON, `/history`, the live page and its charts in headless Chromium), `/status` at 100,000
//! synthetic peers, the Grafana dashboard and the Prometheus alert rules in `dist/`, `--config`,
//! SIGTERM and SIGINT, systemd readiness, and the one-line errors with exit code 2.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use p2psp::media::HeaderSize;
use p2psp::metrics::{Exporter, Prom, Series, route};
use p2psp::peer::status::{PEER_SERIES, PeerExporter};
use p2psp::proto::team::TeamMember;
use p2psp::splitter::feed::{FeedStats, HeaderCell};
use p2psp::splitter::shard::{ShardStats, TeamSnapshot};
use p2psp::splitter::status::{Board, SPLITTER_SERIES, SplitterExporter};
use p2psp::splitter::{Settings, SplitterArgs};

use support::{
    BIN, Proc, Splitter, http_get, one_line_exit_2, peer_metrics_port, start_peer, start_peer_env,
    test_dir, tools_present, wait_until,
};

/// A splitter with the test source and `--metrics` on a free port, plus a monitor and `peers`
/// peers, all joined.
fn team(dir: &Path, peers: usize, extra: &[&str]) -> (Splitter, Vec<Proc>) {
    let mut args = vec![
        "--bitrate",
        "500k",
        "--shards",
        "2",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let splitter = Splitter::start(dir, &args, Stdio::null());
    assert!(splitter.metrics.is_some(), "no metrics address announced");
    let mut procs = vec![start_peer(
        dir,
        "monitor",
        splitter.port,
        &["--monitor", "--player-port", "0"],
    )];
    for i in 0..peers {
        procs.push(start_peer(
            dir,
            &format!("peer{i}"),
            splitter.port,
            &["--player-port", "0"],
        ));
    }
    let want = peers as u64 + 1;
    assert!(
        wait_until(Duration::from_secs(15), || peer_count(&splitter)
            == Some(want)),
        "the team did not form: {:?}",
        splitter.status()
    );
    (splitter, procs)
}

fn peer_count(s: &Splitter) -> Option<u64> {
    s.status()?["totals"]["peers"].as_u64()
}

/// Runs headless Chromium on `url` and returns the DOM after the page's scripts ran.
fn chromium_dom(dir: &Path, url: &str, screenshot: Option<&Path>) -> String {
    // A fresh profile for each run.
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let profile = dir.join(format!("chromium-{}", RUNS.fetch_add(1, Ordering::Relaxed)));
    let out_path = dir.join("dom.html");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(p) => {
            cmd.arg("--window-size=1100,1500")
                .arg(format!("--screenshot={}", p.display()));
        }
        None => {
            cmd.arg("--dump-dom");
        }
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    let mut p = Proc::spawn("chromium", &mut cmd);
    assert!(
        p.wait_exit(Duration::from_secs(60)).is_some(),
        "chromium did not finish within 60 s"
    );
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::read_to_string(out_path).unwrap_or_default()
}

/// The text of the element with id `id` in a dumped DOM.
fn element_text(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(rest[start..end].to_owned())
}

/// Where the tests keep pictures for people to look at: `target/tmp/ops-artifacts/`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ops-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The charts in a dumped DOM: title → points of its line with the fewest.
fn charts(dom: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    // Not the page's script, which writes them.
    let dom = &dom[..dom.find("<script").unwrap_or(dom.len())];
    for part in dom.split("<svg").skip(1) {
        let head = &part[..part.find('>').unwrap_or(part.len())];
        let attr = |name: &str| {
            let at = head.find(&format!("{name}=\""))? + name.len() + 2;
            Some(head[at..at + head[at..].find('"')?].to_owned())
        };
        if let (Some(chart), Some(points)) = (attr("data-chart"), attr("data-points")) {
            out.push((chart, points.parse().unwrap()));
        }
    }
    out
}

/// The chart titles of a table of series, in order, once each.
fn chart_titles(series: &[Series]) -> Vec<&'static str> {
    let mut titles: Vec<&'static str> = Vec::new();
    for s in series {
        if !titles.contains(&s.chart) {
            titles.push(s.chart);
        }
    }
    titles
}

/// Samples in an endpoint's `/history`.
fn history_len(port: u16) -> usize {
    http_get(port, "/history", 1 << 20)
        .and_then(|(_, b)| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|h| h["t"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn status_page_shows_the_live_peer_count_and_charts_in_headless_chromium() {
    if !tools_present(
        "status_page_shows_the_live_peer_count_and_charts_in_headless_chromium",
        &[("chromium", "--version")],
    ) {
        return;
    }
    let dir = test_dir("ops-page");
    let (splitter, _peers) = team(&dir, 2, &[]);
    let port = splitter.metrics.unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    // A few seconds of history: every rate has two points.
    assert!(
        wait_until(Duration::from_secs(10), || history_len(port) >= 4),
        "no history"
    );
    let dom = chromium_dom(&dir, &url, None);
    assert_eq!(
        element_text(&dom, "peers").as_deref(),
        Some("3"),
        "the page does not show 3 peers:\n{dom}"
    );
    assert!(dom.contains("127.0.0.1:"), "no peer endpoints listed");
    assert!(dom.contains("monitor"), "the monitor is not shown");
    let drawn = charts(&dom);
    let want = chart_titles(SPLITTER_SERIES);
    assert_eq!(
        drawn.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        want,
        "not the charts of SPLITTER_SERIES:\n{dom}"
    );
    for (chart, points) in &drawn {
        assert!(*points >= 2, "chart {chart}: {points} points");
    }

    // One more joins: the page shows it.
    let _late = start_peer(&dir, "late", splitter.port, &["--player-port", "0"]);
    assert!(wait_until(Duration::from_secs(10), || peer_count(
        &splitter
    ) == Some(4)));
    let dom = chromium_dom(&dir, &url, None);
    assert_eq!(element_text(&dom, "peers").as_deref(), Some("4"), "{dom}");
    // Pictures for people: kept under target/tmp/ops-artifacts/.
    let shot = artifacts().join("splitter-page.png");
    chromium_dom(&dir, &url, Some(&shot));
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());

    // A peer's page: its own charts.
    let mut watched = start_peer(
        &dir,
        "watched",
        splitter.port,
        &["--player-port", "0", "--metrics", "127.0.0.1:0"],
    );
    let peer_port = peer_metrics_port(&dir, &mut watched);
    assert!(
        wait_until(Duration::from_secs(10), || history_len(peer_port) >= 4),
        "no peer history"
    );
    let peer_url = format!("http://127.0.0.1:{peer_port}/");
    let dom = chromium_dom(&dir, &peer_url, None);
    let drawn = charts(&dom);
    assert_eq!(
        drawn.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        chart_titles(PEER_SERIES),
        "{dom}"
    );
    for (chart, points) in &drawn {
        // The buffer fill is charted once the peer's loop publishes it
        // (`DetailCell::set_buffered`); until then the chart says "no data yet".
        if chart.starts_with("buffer fill") && *points == 0 {
            continue;
        }
        assert!(*points >= 2, "peer chart {chart}: {points} points");
    }
    let shot = artifacts().join("peer-page.png");
    chromium_dom(&dir, &peer_url, Some(&shot));
    eprintln!("screenshot: {}", shot.display());
}

/// A splitter exporter over `shards` shards holding `peers` synthetic peers in teams of 16
/// (one monitor each), peer k with `k % 13` losses, and a full history.
fn synthetic_splitter(shards: usize, peers: u32) -> SplitterExporter {
    let stats: Vec<Arc<ShardStats>> = (0..shards).map(|_| Arc::default()).collect();
    let mut teams: Vec<Vec<TeamSnapshot>> = vec![Vec::new(); shards];
    let mut k = 0u32;
    let mut id = 0u32;
    while k < peers {
        let members: Vec<TeamMember> = (0..16.min(peers - k))
            .map(|j| {
                k += 1;
                TeamMember {
                    endpoint: std::net::SocketAddrV4::new(
                        std::net::Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8),
                        4000 + (k % 20_000) as u16,
                    ),
                    monitor: j == 0,
                    losses: k % 13,
                }
            })
            .collect();
        teams[id as usize % shards].push(TeamSnapshot {
            id,
            members,
            forwarded: Vec::new(),
        });
        id += 1;
    }
    for (s, t) in stats.iter().zip(teams) {
        let n = t.iter().map(|t| t.members.len()).sum::<usize>();
        s.set(p2psp::splitter::shard::ShardMetric::Peers, n as u64);
        s.set(p2psp::splitter::shard::ShardMetric::Teams, t.len() as u64);
        s.publish_teams(t);
    }
    let settings = Settings::from_args(&SplitterArgs::default()).unwrap();
    let e = SplitterExporter::new(
        &settings,
        8001,
        Arc::<FeedStats>::default(),
        Arc::new(HeaderCell::new(HeaderSize::Bytes(16))),
        stats,
        Arc::<Board>::default(),
    );
    let t0 = Instant::now();
    for s in 0..700 {
        e.tick(t0 + Duration::from_secs(s));
    }
    e
}

/// The body of `target` and the best of 5 times to build it.
fn timed(e: &dyn Exporter, target: &str) -> (Vec<u8>, Duration) {
    let mut best = Duration::MAX;
    let mut body = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (code, _, b) = route("GET", target, e);
        best = best.min(t.elapsed());
        assert_eq!(code, 200, "{target}: {}", String::from_utf8_lossy(&b));
        body = b;
    }
    (body, best)
}

#[test]
fn status_holds_at_100000_peers() {
    let e = synthetic_splitter(4, 100_000);
    let mut figures = String::new();
    let mut page_fetch = 0;
    let next = {
        let (b, _) = timed(&e, "/history");
        let h: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(h["t"].as_array().unwrap().len(), 600);
        h["next"].as_u64().unwrap()
    };
    for (target, per_second) in [
        ("/status".to_owned(), true),
        (
            "/status/peers?sort=lossiest&limit=25&offset=0".to_owned(),
            true,
        ),
        (format!("/history?since={}", next - 1), true),
        ("/history".to_owned(), false),
        ("/status/peers?team=1234".to_owned(), false),
        ("/status/peers?addr=10.1.134.160%3A4000".to_owned(), false),
        (
            "/status/peers?sort=endpoint&offset=99950&limit=1000".to_owned(),
            false,
        ),
        ("/status/teams?sort=lossiest&limit=1000".to_owned(), false),
    ] {
        let (body, took) = timed(&e, &target);
        let _ = writeln!(
            figures,
            "{target}: {} bytes in {:.2} ms",
            body.len(),
            took.as_secs_f64() * 1e3
        );
        assert!(
            body.len() < 50_000 || target.ends_with("limit=1000"),
            "{target}: {} bytes",
            body.len()
        );
        assert!(took < Duration::from_millis(20), "{target}: {took:?}");
        if per_second {
            page_fetch += body.len();
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if target == "/status" {
            assert_eq!(v["totals"]["peers"], 100_000);
            assert_eq!(v["totals"]["team_count"], 6250);
            assert_eq!(v["teams"].as_array().unwrap().len(), 20);
        }
        if target.contains("addr=") {
            assert_eq!(v["total"], 1, "{v}");
        }
        if target.contains("team=1234") {
            assert_eq!(v["total"], 16, "{v}");
        }
        if target.contains("sort=lossiest&limit=25") {
            assert_eq!(v["total"], 100_000);
            assert_eq!(v["peers"][0]["losses"], 12);
        }
    }
    let _ = writeln!(
        figures,
        "the page's fetches each second: {page_fetch} bytes"
    );
    eprint!("{figures}");
    assert!(page_fetch < 50_000, "{figures}");
}

/// The metric families the splitter and the peer export, from their tables.
fn exported_families() -> BTreeSet<String> {
    let splitter = synthetic_splitter(2, 10);
    let opts = p2psp::peer::PeerOptions {
        monitor: true,
        max_debt: 32,
        ..p2psp::peer::PeerOptions::new("127.0.0.1:8001".parse().unwrap())
    };
    let peer = PeerExporter::new(&opts);
    let mut names = BTreeSet::new();
    for e in [&splitter as &dyn Exporter, &peer] {
        let mut p = Prom::new();
        e.metrics(&mut p);
        for line in p.finish().lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                names.insert(rest.split(' ').next().unwrap().to_owned());
            }
        }
    }
    names
}

/// Every `p2psp_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("p2psp_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn grafana_dashboard_and_alert_rules_name_exported_metrics() {
    let exported = exported_families();
    assert!(
        exported.contains("p2psp_splitter_peers") && exported.contains("p2psp_peer_neighbours")
    );
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist");

    // The dashboard: what Grafana needs to import it, and the page's charts as panels.
    let path = dist.join("grafana/p2psp.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    assert!(d["time"]["from"].is_string() && d["time"]["to"].is_string());
    assert!(
        d.get("id").is_none_or(|id| id.is_null()),
        "an exported dashboard has no id"
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
    );
    let mut ids = BTreeSet::new();
    let mut titled: HashMap<String, Vec<String>> = HashMap::new();
    let mut queries = Vec::new();
    for v in vars {
        if let Some(q) = v["definition"].as_str() {
            queries.push(q.to_owned());
        }
    }
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "panel {} without gridPos.{k}", p["title"]);
        }
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{}",
            p["title"]
        );
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "id twice");
        let kind = p["type"].as_str().unwrap();
        if kind == "row" {
            continue;
        }
        assert!(["timeseries", "stat", "gauge"].contains(&kind), "{kind}");
        assert!(p["datasource"]["uid"] == "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap()), "refId twice");
            let expr = t["expr"].as_str().expect("target.expr");
            assert!(
                !metric_names(expr).is_empty(),
                "{expr} names no p2psp metric"
            );
            titled
                .entry(p["title"].as_str().unwrap().to_owned())
                .or_default()
                .push(expr.to_owned());
            queries.push(expr.to_owned());
        }
    }
    for q in &queries {
        for name in metric_names(q) {
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which no binary exports"
            );
        }
    }
    // The same panels as the pages: one per chart, on the charted metrics.
    for series in [SPLITTER_SERIES, PEER_SERIES] {
        for s in series {
            let exprs = titled
                .get(s.chart)
                .unwrap_or_else(|| panic!("no panel \"{}\" in the dashboard", s.chart));
            assert!(
                exprs.iter().any(|e| metric_names(e).contains(s.metric)),
                "panel \"{}\" does not query {}",
                s.chart,
                s.metric
            );
        }
    }

    // The alert rules.
    let rules = dist.join("prometheus/p2psp-alerts.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let alerts = text.matches("- alert: ").count();
    assert!(
        alerts >= 4 && text.matches("\n        expr: ").count() == alerts,
        "{text}"
    );
    for needed in [
        "p2psp_splitter_source_up",
        "p2psp_splitter_loss_reports_total",
        "p2psp_splitter_send_dropped_total",
        "p2psp_splitter_expelled_total",
    ] {
        assert!(text.contains(needed), "no alert on {needed}");
    }
    for name in metric_names(&text) {
        assert!(
            exported.contains(&name),
            "an alert names {name}, which no binary exports"
        );
    }
    // promtool (Debian: apt-get install prometheus; .ci/run installs it) checks the rules.
    if tools_present(
        "grafana_dashboard_and_alert_rules_name_exported_metrics (promtool)",
        &[("promtool", "--version")],
    ) {
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check rules:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Parses Prometheus text: sample name with labels → value. Checks the format on the way.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(kind == "counter" || kind == "gauge", "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {line}");
            }
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family twice: {name}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "odd line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        assert!(types.contains_key(name), "sample before its TYPE: {line}");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.insert(series.to_owned(), v);
    }
    samples
}

/// The send lag of each shard over its last second, in microseconds.
fn send_lags(m: &HashMap<String, f64>) -> Vec<f64> {
    m.iter()
        .filter(|(k, _)| k.starts_with("p2psp_splitter_send_lag_max_microseconds{shard="))
        .map(|(_, v)| *v)
        .collect()
}

#[test]
fn metrics_status_and_prometheus_text() {
    let dir = test_dir("ops-metrics");
    let (splitter, _peers) = team(&dir, 2, &["--lrs"]);
    let port = splitter.metrics.unwrap();
    // The shards publish their snapshots, and the status tick the rates, once a second: wait
    // until the shard serving the team measured its send lag over a second (above zero: a chunk
    // is never sent before it is read; far below the chunk period it has to keep up with) and the
    // input rate is in.
    let mut scraped = None;
    let mut status = None;
    let published = wait_until(Duration::from_secs(10), || {
        scraped = http_get(port, "/metrics", 1 << 20);
        status = splitter.status();
        scraped.as_ref().is_some_and(|(_, body)| {
            send_lags(&parse_prometheus(&String::from_utf8_lossy(body)))
                .iter()
                .any(|&v| v > 0.0 && v < 1_000_000.0)
        }) && status.as_ref().is_some_and(|s| {
            s["rates"]["bits_in_per_second"]
                .as_f64()
                .is_some_and(|b| b > 100_000.0)
        })
    });
    let (head, body) = scraped.expect("the metrics endpoint answers");
    let m = parse_prometheus(&String::from_utf8(body).unwrap());
    assert!(
        published,
        "no send lag in (0, 1 s) or input rate above 100 kbit/s within 10 s: send lags {:?}, status {status:?}",
        send_lags(&m)
    );
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert_eq!(m["p2psp_splitter_peers"], 3.0);
    assert_eq!(m["p2psp_splitter_teams"], 1.0);
    assert!(m["p2psp_splitter_chunks_in_total"] > 0.0);
    assert!(m["p2psp_splitter_joins_total"] >= 3.0);
    assert_eq!(m["p2psp_splitter_source_reconnects_total"], 0.0);
    let sent: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("p2psp_splitter_datagrams_sent_total{shard="))
        .map(|(_, v)| v)
        .sum();
    assert!(sent > 0.0);
    for family in [
        "p2psp_splitter_send_eagain_total{shard=\"0\"}",
        "p2psp_splitter_send_enobufs_total{shard=\"1\"}",
        "p2psp_splitter_loss_reports_total{shard=\"0\"}",
        "p2psp_splitter_expelled_total{shard=\"0\"}",
        "p2psp_splitter_lrs_resent_total{shard=\"0\"}",
        "p2psp_splitter_shard_peers{shard=\"1\"}",
    ] {
        assert!(m.contains_key(family), "missing {family}");
    }
    assert!(
        m.keys()
            .any(|k| k.starts_with("p2psp_splitter_bytes_sent_total{shard=\"0\",path=\"")),
        "no send path label"
    );
    assert_eq!(send_lags(&m).len(), 2, "one send lag per shard");

    let s = status.unwrap();
    assert_eq!(s["role"], "splitter");
    assert_eq!(s["stream"]["generation"], 1);
    let teams = s["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["size"], 3);
    assert_eq!(teams[0]["monitors"], 1);
    let json = |target: &str| -> serde_json::Value {
        let (head, body) = http_get(port, target, 1 << 20).unwrap();
        assert!(head.contains(" 200"), "{target}: {head}");
        serde_json::from_slice(&body).unwrap()
    };
    let listed = json("/status/peers");
    let members = listed["peers"].as_array().unwrap();
    assert_eq!(listed["total"], 3);
    assert_eq!(members.len(), 3);
    assert_eq!(members.iter().filter(|p| p["monitor"] == true).count(), 1);
    assert!(members.iter().all(|p| p["losses"].is_u64()));
    let one = members[1]["endpoint"].as_str().unwrap().replace(':', "%3A");
    let found = json(&format!("/status/peers?addr={one}"));
    assert_eq!(found["peers"][0]["endpoint"], members[1]["endpoint"]);
    assert_eq!(
        json("/status/peers?limit=1&offset=2")["peers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(json("/status/teams")["teams"][0]["size"], 3);
    let (head, body) = http_get(port, "/status/peers?sort=nope", 1 << 20).unwrap();
    assert!(
        head.contains(" 400") && String::from_utf8_lossy(&body).contains("sort=nope"),
        "{head}"
    );
    let history = json("/history");
    assert!(history["t"].as_array().unwrap().len() >= 2, "{history}");
    assert_eq!(
        history["values"]["peers"]
            .as_array()
            .unwrap()
            .last()
            .unwrap(),
        3
    );

    // A peer's own endpoint.
    let mut watched = start_peer(
        &dir,
        "watched",
        splitter.port,
        &["--player-port", "0", "--metrics", "127.0.0.1:0"],
    );
    let peer_metrics = peer_metrics_port(&dir, &mut watched);
    assert!(
        wait_until(Duration::from_secs(15), || {
            http_get(peer_metrics, "/metrics", 1 << 20).is_some_and(|(_, b)| {
                let m = parse_prometheus(&String::from_utf8_lossy(&b));
                m.get("p2psp_peer_chunks_played_total")
                    .is_some_and(|v| *v > 0.0)
            })
        }),
        "the peer's metrics never showed played chunks"
    );
    let (_, body) = http_get(peer_metrics, "/status", 1 << 20).unwrap();
    let s: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(s["role"], "peer");
    assert_eq!(s["state"], "playing");
    assert_eq!(s["neighbours"].as_array().unwrap().len(), 3);
    let (head, page) = http_get(peer_metrics, "/", 1 << 20).unwrap();
    assert!(head.contains("text/html"));
    assert!(String::from_utf8_lossy(&page).contains("fetch(\"/status\""));
    let (_, body) = http_get(peer_metrics, "/history", 1 << 20).unwrap();
    let h: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(h["series"].as_array().unwrap().len(), PEER_SERIES.len());
    assert!(
        http_get(peer_metrics, "/nope", 1024)
            .unwrap()
            .0
            .contains(" 404")
    );
}

#[test]
fn sigterm_and_sigint_splitter_says_goodbye_to_every_peer_and_exits_0_within_1s_and_peers_rejoin() {
    for sig in ["TERM", "INT"] {
        let dir = test_dir(&format!("ops-stop-{sig}"));
        let (mut splitter, mut peers) = team(&dir, 3, &[]);
        let t = Instant::now();
        splitter.proc.signal(sig);
        let status = splitter.proc.wait_exit(Duration::from_secs(5));
        let took = t.elapsed();
        let status = status.unwrap_or_else(|| panic!("SIG{sig}: the splitter did not exit"));
        assert!(status.success(), "SIG{sig}: exit {status}");
        assert!(
            took < Duration::from_secs(1),
            "SIG{sig}: took {took:?} to exit"
        );
        // Each peer hears the goodbye, says so, and keeps trying to join again (a restarted
        // splitter gets its audience back), its player endpoint still open.
        for p in &mut peers {
            let log = dir.join(format!("{}.log", p.name));
            let said = wait_until(Duration::from_secs(5), || {
                std::fs::read_to_string(&log).is_ok_and(|l| {
                    l.contains("the splitter said goodbye") && l.contains("rejoining (attempt 1)")
                })
            });
            assert!(
                said,
                "SIG{sig}: {} did not say it got the goodbye and is joining again:\n{}",
                p.name,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(p.running(), "SIG{sig}: {} exited", p.name);
        }
    }
}

#[test]
fn sigterm_peer_leaves_politely() {
    let dir = test_dir("ops-peer-leaves");
    let (splitter, mut peers) = team(&dir, 2, &[]);
    let mut leaver = peers.pop().unwrap();
    leaver.signal("TERM");
    let st = leaver.wait_exit(Duration::from_secs(5));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let log = std::fs::read_to_string(dir.join(format!("{}.log", leaver.name))).unwrap();
    assert!(
        log.contains("left the team (confirmed by the splitter)"),
        "{log}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            splitter.status().is_some_and(|s| {
                s["totals"]["peers"] == 2 && s["totals"]["goodbyes"].as_u64() >= Some(1)
            })
        }),
        "the splitter did not see the goodbye: {:?}",
        splitter.status()
    );
    for p in &mut peers {
        assert!(p.running(), "{} stopped", p.name);
    }
}

#[test]
fn setup_errors_are_one_line_and_exit_2() {
    // Ports in use.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = tcp.local_addr().unwrap().port().to_string();
    let e = one_line_exit_2(&["splitter", "--bind", "127.0.0.1", "--port", &taken]);
    assert!(e.contains("cannot listen on TCP"), "{e}");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_taken = udp.local_addr().unwrap().port().to_string();
    if TcpListener::bind(("127.0.0.1", udp.local_addr().unwrap().port())).is_ok() {
        let e = one_line_exit_2(&["splitter", "--bind", "127.0.0.1", "--port", &udp_taken]);
        assert!(e.contains("cannot bind UDP"), "{e}");
    }
    let metrics_taken = format!("127.0.0.1:{taken}");
    let e = one_line_exit_2(&[
        "splitter",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics",
        &metrics_taken,
    ]);
    assert!(e.contains("--metrics") && e.contains(&metrics_taken), "{e}");

    // Sources that cannot be used.
    let e = one_line_exit_2(&[
        "splitter",
        "--port",
        "0",
        "--source",
        "http://127.0.0.1:1/live",
    ]);
    assert!(e.contains("cannot open the source"), "{e}");
    let not_found = TcpListener::bind("127.0.0.1:0").unwrap();
    let nf_port = not_found.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in not_found.incoming().flatten().take(1) {
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut c, &mut buf);
            let _ = c.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n");
        }
    });
    let e = one_line_exit_2(&[
        "splitter",
        "--port",
        "0",
        "--source",
        &format!("http://127.0.0.1:{nf_port}/missing.ogg"),
    ]);
    assert!(e.contains("404"), "{e}");
    for bad in [
        "http://",
        "ftp://example.org/live",
        "https://example.org/live",
        "http://127.0.0.1:99999/live",
        "127.0.0.1:8000/live",
        "http://user:pw@127.0.0.1/live",
    ] {
        let e = one_line_exit_2(&["splitter", "--port", "0", "--source", bad]);
        assert!(e.contains("--source"), "{bad}: {e}");
    }

    // The peer: its ports, and a splitter that is not there.
    let e = one_line_exit_2(&["peer", "--splitter", "127.0.0.1:1", "--player-port", &taken]);
    assert!(e.contains("cannot listen for players"), "{e}");
    let e = one_line_exit_2(&[
        "peer",
        "--splitter",
        "127.0.0.1:1",
        "--player-port",
        "0",
        "--metrics",
        &metrics_taken,
    ]);
    assert!(e.contains("--metrics"), "{e}");
    let e = one_line_exit_2(&["peer", "--splitter", "127.0.0.1:1", "--player-port", "0"]);
    assert!(e.contains("cannot connect to the splitter"), "{e}");
    drop((tcp, udp));
}

#[test]
fn config_file_sets_flags_and_the_command_line_wins() {
    let dir = test_dir("ops-config");
    let file = dir.join("splitter.toml");
    std::fs::write(
        &file,
        "# p2psp splitter\nsource = \"test\"\nbitrate = \"300k\"\nchunk-size = 512\n\
         team-size = 4\nbuffer-size = 64\nlrs = true\nmetrics = \"127.0.0.1:0\"\nshards = 1\n",
    )
    .unwrap();
    let splitter = Splitter::start(
        &dir,
        &["--config", file.to_str().unwrap(), "--team-size", "8"],
        Stdio::null(),
    );
    let s = splitter.status().expect("metrics from the file");
    let c = &s["config"];
    assert_eq!(c["chunk_size"], 512);
    assert_eq!(c["buffer_size"], 64);
    assert_eq!(c["team_size"], 8, "the command line must win");
    assert_eq!(c["lrs"], true);
    assert_eq!(c["shards"], 1);

    // A peer's file.
    let pfile = dir.join("peer.toml");
    std::fs::write(
        &pfile,
        format!(
            "splitter = \"127.0.0.1:{}\"\nplayer-port = 0\nmonitor = true\nquiet = true\n",
            splitter.port
        ),
    )
    .unwrap();
    let mut peer = Proc::spawn(
        "peer",
        Command::new(BIN)
            .args(["peer", "--config", pfile.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            splitter
                .status()
                .is_some_and(|s| s["teams"][0]["monitors"] == 1 && s["totals"]["peers"] == 1)
        }),
        "the peer from the config file did not join as a monitor"
    );
    assert!(peer.running());
}

#[test]
fn shipped_example_configs_work() {
    let dir = test_dir("ops-dist");
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist");
    let splitter_toml = dist.join("splitter.toml");
    // Its source, port and metrics address are for a real host; the command line wins.
    let splitter = Splitter::start(
        &dir,
        &[
            "--config",
            splitter_toml.to_str().unwrap(),
            "--source",
            "test",
            "--bitrate",
            "200k",
            "--metrics",
            "127.0.0.1:0",
        ],
        Stdio::null(),
    );
    let s = splitter.status().unwrap();
    assert_eq!(s["config"]["lrs"], true);
    assert_eq!(s["config"]["header_size"], "auto");
    let peer_toml = dist.join("peer.toml");
    let splitter_addr = format!("127.0.0.1:{}", splitter.port);
    let mut peer = Proc::spawn(
        "peer",
        Command::new(BIN)
            .args(["peer", "--config", peer_toml.to_str().unwrap()])
            .args(["--splitter", &splitter_addr, "--player-port", "0"])
            .args(["--metrics", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || peer_count(&splitter) == Some(1)),
        "the peer with the example configuration did not join"
    );
    assert!(peer.running());
    for unit in ["p2psp-splitter.service", "p2psp-peer@.service"] {
        let text = std::fs::read_to_string(dist.join(unit)).unwrap();
        for needed in [
            "Type=notify",
            "LimitNOFILE=",
            "Restart=",
            "--config /etc/p2psp/",
        ] {
            assert!(text.contains(needed), "{unit} lacks {needed}");
        }
    }
}

#[test]
fn config_file_errors_name_the_key() {
    let dir = test_dir("ops-config-errors");
    for (name, text, want) in [
        ("unknown.toml", "sauce = \"test\"\n", "unknown key `sauce`"),
        ("type.toml", "chunk-size = \"large\"\n", "key `chunk-size`"),
        ("range.toml", "chunk-size = 10\n", "key `chunk-size`"),
        ("bool.toml", "lrs = 1\n", "key `lrs`"),
        ("url.toml", "source = \"ftp://x/y\"\n", "key `source`"),
        ("syntax.toml", "chunk-size = = 3\n", "line 1"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let e = one_line_exit_2(&[
            "splitter",
            "--port",
            "0",
            "--config",
            path.to_str().unwrap(),
        ]);
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
    }
    let e = one_line_exit_2(&["peer", "--config", "/nonexistent/peer.toml"]);
    assert!(e.contains("/nonexistent/peer.toml"), "{e}");
}

#[test]
fn systemd_readiness_is_notified() {
    let dir = test_dir("ops-notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap())];
    let splitter = Splitter::start_env(
        &dir,
        &["--bitrate", "200k", "--shards", "1"],
        Stdio::null(),
        &env,
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !got.iter().any(|m: &String| m.starts_with("STATUS=")) {
        let Ok(n) = sock.recv(&mut buf) else { break };
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got.iter().any(|m| m == "READY=1\n"), "{got:?}");
    assert!(
        got.iter()
            .any(|m| m.starts_with("STATUS=0 peers in 0 teams")),
        "{got:?}"
    );
    let peer = start_peer_env(
        &dir,
        "peer",
        splitter.port,
        &["--player-port", "0", "--monitor"],
        &env,
    );
    let mut ready = false;
    while !ready && Instant::now() < deadline + Duration::from_secs(10) {
        let Ok(n) = sock.recv(&mut buf) else { break };
        ready = &buf[..n] == b"READY=1\n";
    }
    assert!(ready, "the peer did not notify READY=1");
    drop(peer);
    splitter.proc.signal("TERM");
    let mut stopping = false;
    while !stopping {
        let Ok(n) = sock.recv(&mut buf) else { break };
        stopping = &buf[..n] == b"STOPPING=1\n";
    }
    assert!(stopping, "no STOPPING=1");
}
