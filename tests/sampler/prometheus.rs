//! The operators' view, with the real parts: a daemon serving decode traffic with sampling on,
//! scraped by a real Prometheus (`prometheus` on the PATH; Debian's package, 2.42) loading
//! `config/prometheus.yml` (its target pointed at the test's daemon) and the alert rules of
//! `config/kvdex-alerts.yml`. The test asks Prometheus's HTTP API for the recall histogram,
//! runs every query of the dashboard's Quality row and of the alert rule, and checks the rule
//! file with `promtool check rules`. Without `prometheus` and `promtool` it says so and skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_client::{Client, SessionToken};
use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;
use serde_json::{json, Value};

use crate::common::{http, Daemon};
use crate::shm_common::values;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A child process killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Quality row's PromQL, with the dashboard's variables filled in as Grafana would.
fn quality_row_queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("config/grafana/kvdex-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let row = panels
        .iter()
        .position(|p| p["type"] == "row" && p["title"] == "Quality")
        .expect("the dashboard has a Quality row");
    let exprs: Vec<String> = panels[row + 1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$job", "kvdex")
                .replace("$__rate_interval", "1m")
        })
        .collect();
    assert!(exprs.len() >= 6, "the Quality row queries {exprs:?}");
    exprs
}

/// An instant query; panics unless Prometheus answers `success`.
fn query(prom: &str, q: &str) -> Vec<Value> {
    let url = format!("{prom}/api/v1/query?query={}", urlencode(q));
    let (code, v) = http::get_json(&url, "");
    assert_eq!(code, 200, "{q}: {v}");
    assert_eq!(v["status"], "success", "{q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes `config/prometheus.yml` with its target replaced by `target` and its rule file made
/// absolute, with a 1 s scrape and evaluation interval; returns its path.
fn generated_config(dir: &Path, target: &str) -> PathBuf {
    let shipped = std::fs::read_to_string(Path::new(ROOT).join("config/prometheus.yml")).unwrap();
    assert!(shipped.contains("127.0.0.1:7070") && shipped.contains("kvdex-alerts.yml"));
    let rules = Path::new(ROOT).join("config/kvdex-alerts.yml");
    let text = shipped
        .replace("127.0.0.1:7070", target)
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("evaluation_interval: 5s", "evaluation_interval: 1s")
        .replace("\"kvdex-alerts.yml\"", &format!("\"{}\"", rules.display()));
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn prometheus_scrapes_the_quality_histograms_and_runs_the_dashboard_and_alert_queries() {
    if !on_path("prometheus") || !on_path("promtool") {
        eprintln!(
            "SKIPPED: `prometheus` and `promtool` are not on the PATH (Debian: apt-get install \
             prometheus; scripts/test.sh installs it where it runs as root)"
        );
        return;
    }
    let rules = Path::new(ROOT).join("config/kvdex-alerts.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A daemon sampling every retrieve of the session (its own rate), its index built.
    let d = Daemon::start(&[
        ("KVDEX_DECODE__SINKS", "4"),
        ("KVDEX_DECODE__WINDOW", "8"),
        ("KVDEX_DECODE__SAMPLE_CPU_SHARE", "1.0"),
        ("KVDEX_DECODE__BUILD_THREADS", "1"),
    ]);
    let body = json!({"layers": 1, "q_heads": 4, "kv_heads": 2, "head_dim": 16,
                      "dtype": "f32", "sample_rate": 1.0});
    let (code, text) = http::send(ureq::post(&format!("{}/v1/sessions", d.base)), Some(&body));
    assert_eq!(code, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let mut s = Client::attach(
        created["shm_path"].as_str().unwrap(),
        SessionToken::parse(&token).unwrap().as_bytes(),
    )
    .unwrap();
    let (n, dim) = (3000usize, 16usize);
    let k = values(2 * n * dim, 21);
    s.append(
        0,
        n as u32,
        bytemuck::cast_slice(&k),
        bytemuck::cast_slice(&values(2 * n * dim, 22)),
    )
    .unwrap();
    let positions: Vec<u32> = (0..200u32).map(|i| 10 + 14 * i).collect();
    s.seal(
        0,
        IndexKind::Graph,
        Some((&values(4 * 200 * dim, 23), &positions)),
    )
    .unwrap();
    let info = |base: &str| {
        let req = ureq::get(&format!(
            "{base}/v1/sessions/{}",
            created["id"].as_str().unwrap()
        ))
        .set("Authorization", &format!("Bearer {token}"));
        let (code, text) = http::send(req, None);
        assert_eq!(code, 200, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let t = Instant::now();
    while info(&d.base)["layers"][0]["build"]["state"] != "ready" {
        assert!(t.elapsed() < Duration::from_secs(60), "build timed out");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Prometheus on loopback, scraping the daemon every second.
    let dir = std::env::temp_dir().join(format!("kvdex-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = d.base.trim_start_matches("http://").to_owned();
    let config = generated_config(&dir, &target);
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let prom = format!("http://127.0.0.1:{port}");
    let _prometheus = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Decode traffic while Prometheus scrapes: adaptive budgets, so the coverage error shows.
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let traffic = sc.spawn(|| {
            let p = RetrieveParams {
                budget: Budget::Adaptive(BudgetParams::new(0.9, 4, 64).unwrap()),
                attend: true,
                gather: false,
                scale: None,
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                s.retrieve(0, &values(4 * dim, 1000 + i), &p).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // Wait until Prometheus holds a few scrapes of a non-zero recall histogram.
        let t = Instant::now();
        let ready = "increase(kvdex_quality_mass_recall_count[1m]) > 0 and on() \
                     count_over_time(kvdex_quality_mass_recall_count[1m]) >= 4";
        loop {
            let up = ureq::get(&format!("{prom}/-/ready")).call().is_ok();
            if up && !query(&prom, ready).is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "Prometheus saw no samples"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        // The recall histogram, through Prometheus: buckets per kind and layer group.
        let buckets = query(&prom, "kvdex_quality_mass_recall_bucket{kind=\"graph\"}");
        assert!(buckets.len() >= 10, "{buckets:?}");
        assert!(buckets
            .iter()
            .all(|b| b["metric"]["layer_group"] == "0-7" && b["metric"]["job"] == "kvdex"));
        let count = query(
            &prom,
            "sum(kvdex_quality_mass_recall_count{kind=\"graph\"})",
        );
        let count: f64 = count[0]["value"][1].as_str().unwrap().parse().unwrap();
        assert!(count >= 4.0, "{count}");
        // Every query of the dashboard's Quality row returns data.
        for q in quality_row_queries() {
            let r = query(&prom, &q);
            assert!(!r.is_empty(), "no data for the dashboard query {q}");
        }
        // The alert rule is loaded and healthy; its expression runs, and without its
        // threshold returns the quantile it compares (a recall, within 0..=1, for the graph).
        let (code, v) = http::get_json(&prom, "/api/v1/rules");
        assert_eq!(code, 200);
        let rule = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .find(|r| r["type"] == "alerting")
            .expect("an alerting rule is loaded");
        assert_eq!(rule["health"], "ok", "{rule}");
        let expr = rule["query"].as_str().unwrap().to_owned();
        query(&prom, &expr);
        let quantile = expr
            .rsplit_once('<')
            .map(|(q, _)| q.trim().to_owned())
            .unwrap();
        let r = query(&prom, &quantile);
        assert!(!r.is_empty(), "no data for {quantile}");
        // The graph's, from its samples (the kinds created at zero have none: NaN).
        let graph = r
            .iter()
            .find(|s| s["metric"]["kind"] == "graph")
            .unwrap_or_else(|| panic!("no graph series in {r:?}"));
        let x: f64 = graph["value"][1].as_str().unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&x), "{quantile} = {x}");
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap();
    });
    // The session's own figures.
    let q = &info(&d.base)["quality"];
    assert_eq!(q["sample_rate"], 1.0);
    assert!(q["sampled_requests"].as_u64().unwrap() >= 4, "{q}");
    let m = q["mass_recall"]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&m), "{q}");
    assert!(q["coverage_error"]["count"].as_u64().unwrap() > 0, "{q}");
    assert_eq!(q["layers"][0]["layer"], 0, "{q}");
    let _ = std::fs::remove_dir_all(&dir);
}
