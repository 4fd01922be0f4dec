//! End-to-end tests of the real `kvdex serve` binary: configuration, HTTP control plane, and
//! shutdown.

mod common;

use std::process::Command;

use common::{http, kvdex, Daemon};

#[test]
fn bad_config_values_are_refused_at_start_up_naming_the_key() {
    /// (environment, flags, what stderr must say).
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (
            &[("KVDEX_MEMORY__BUDGET_BYTES", "lots")],
            &[],
            "`memory.budget_bytes`: expected an integer",
        ),
        (
            &[("KVDEX_MEMORY__BUDGET_BYTES", "0")],
            &[],
            "`memory.budget_bytes`: must be greater than 0",
        ),
        (
            &[("KVDEX_HTTP__LISTNE", "127.0.0.1:0")],
            &[],
            "unknown key `http.listne`",
        ),
        (
            &[],
            &["--listen", "0.0.0.0:0"],
            "`http.listen`: 0.0.0.0:0 is not a loopback address",
        ),
        (
            &[],
            &["--listen", "nowhere"],
            "`http.listen`: \"nowhere\" is not an address",
        ),
        (
            &[],
            &["--config", "/nonexistent/kvdex.toml"],
            "cannot read /nonexistent/kvdex.toml",
        ),
    ];
    for (env, args, want) in cases {
        let mut cmd = kvdex();
        cmd.arg("serve").args(*args);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} {args:?} was accepted");
        assert!(
            stderr.contains(want),
            "{env:?} {args:?}: want {want:?} in {stderr}"
        );
    }
    let dir = std::env::temp_dir().join(format!("kvdex-test-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kvdex.toml");
    std::fs::write(&file, "[sessions]\nmax_sessions = \"many\"\n").unwrap();
    let out = kvdex()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`sessions.max_sessions`: expected an integer, got a string"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_the_commands() {
    let out = kvdex().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("serve") && text.contains("bench"), "{text}");
    let out = kvdex().args(["serve", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--listen"));
}

#[test]
fn serves_on_tcp_and_unix_socket_and_stops_cleanly_on_sigterm() {
    let sock = std::env::temp_dir().join(format!("kvdex-test-{}.sock", std::process::id()));
    let d = Daemon::start(&[("KVDEX_HTTP__UNIX_SOCKET", sock.to_str().unwrap())]);
    assert_eq!(http::get(&d.base, "/healthz").0, 200);
    assert_eq!(http::get(&d.base, "/readyz").0, 200);
    let (st, stats) = http::get_json(&d.base, "/stats");
    assert_eq!(st, 200);
    assert_eq!(stats["sessions"], 0);
    // The same routes over the Unix socket (curl-free: a raw HTTP/1.0 request).
    let reply = http::unix_get(&sock, "/healthz");
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.ends_with("ok\n"),
        "{reply}"
    );
    let status = d.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");
    assert!(!sock.exists(), "the Unix socket is removed at shutdown");
}

#[test]
fn prints_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvdex"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kvdex "));
}

// ---- The data plane through the real daemon: real client, real shared memory. ----

use kvdex::client::{Client, SessionOptions};
use kvdex::store::Shape;
use kvdex_index::KeyDtype;
use serde_json::{json, Value};

fn shape() -> Shape {
    Shape {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 16,
        dtype: KeyDtype::F32,
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn stats(base: &str) -> Value {
    let (st, v) = http::get_json(base, "/stats");
    assert_eq!(st, 200);
    v
}

/// Polls `/stats` until `done` holds (the reaper runs asynchronously), for up to 20 s.
fn wait_stats(base: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = stats(base);
        if done(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn append_search_gather_through_the_daemon_match_brute_force() {
    let d = Daemon::start(&[]);
    let client = Client::connect(&d.base).unwrap();
    let mut s = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let id = s.id().unwrap().to_string();
    let (kvh, dim) = (2usize, 16usize);
    let mut keys = vec![Vec::new(); kvh];
    let mut vals = vec![Vec::new(); kvh];
    let mut n = 0usize;
    for (i, tokens) in [7usize, 100, 1, 300, 64].into_iter().enumerate() {
        let k = values(kvh * tokens * dim, 10 + i as u64);
        let v = values(kvh * tokens * dim, 50 + i as u64);
        n = s
            .append(
                1,
                tokens as u32,
                bytemuck::cast_slice(&k),
                bytemuck::cast_slice(&v),
            )
            .unwrap() as usize;
        for h in 0..kvh {
            keys[h].extend_from_slice(&k[h * tokens * dim..(h + 1) * tokens * dim]);
            vals[h].extend_from_slice(&v[h * tokens * dim..(h + 1) * tokens * dim]);
        }
    }
    assert_eq!(n, 472);
    let q = values(4 * dim, 99);
    let (mut ids, mut scores) = (vec![0u32; 4 * 10], vec![0f32; 4 * 10]);
    assert_eq!(s.search(1, &q, 10, &mut ids, &mut scores).unwrap(), 10);
    for qh in 0..4 {
        let kv = &keys[qh / 2];
        let mut brute: Vec<(f32, u32)> = (0..n)
            .map(|t| {
                (
                    (0..dim).map(|j| q[qh * dim + j] * kv[t * dim + j]).sum(),
                    t as u32,
                )
            })
            .collect();
        brute.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (r, &(score, tid)) in brute[..10].iter().enumerate() {
            assert_eq!(ids[qh * 10 + r], tid, "query head {qh} rank {r}");
            assert!((scores[qh * 10 + r] - score).abs() < 1e-4);
        }
    }
    let want_ids = [471u32, 0, 200, 7];
    let rows = s.gather(1, 1, &want_ids).unwrap();
    let (gk, gv): (&[f32], &[f32]) = (bytemuck::cast_slice(rows.k), bytemuck::cast_slice(rows.v));
    for (i, &t) in want_ids.iter().enumerate() {
        let t = t as usize;
        assert_eq!(
            &gk[i * dim..(i + 1) * dim],
            &keys[1][t * dim..(t + 1) * dim]
        );
        assert_eq!(
            &gv[i * dim..(i + 1) * dim],
            &vals[1][t * dim..(t + 1) * dim]
        );
    }
    assert_eq!(s.ping(b"hello").unwrap(), b"hello");

    let st = stats(&d.base);
    assert_eq!(st["sessions"], 1);
    let resident = (2 * n * kvh * dim * 4) as u64;
    assert_eq!(st["resident_bytes"], resident);
    assert_eq!(st["per_session"][0]["id"], json!(id));
    assert_eq!(st["per_session"][0]["layers"][1]["tokens"], n);
    assert_eq!(st["per_session"][0]["layers"][1]["indexed"], n);
    assert!(st["budget_used_bytes"].as_u64().unwrap() >= resident);
    let shm_path = st["per_session"][0]["shm_path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(std::path::Path::new(&shm_path).exists());

    s.drop_session().unwrap();
    let st = wait_stats(&d.base, "the session to end", |s| s["sessions"] == 0);
    assert_eq!(
        (st["budget_used_bytes"].as_u64(), st["link_bytes"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        !std::path::Path::new(&shm_path).exists(),
        "the region file is removed"
    );

    // Every metric the Grafana dashboard queries is exported by this daemon after this traffic.
    let (_, text) = http::get(&d.base, "/metrics");
    assert!(
        text.contains("kvdex_requests_total{op=\"search\",status=\"ok\"} 1"),
        "{text}"
    );
    // Appended bytes count the request payloads (rows plus a small header per append).
    let appended: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kvdex_appended_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("kvdex_appended_bytes_total");
    assert!(
        (resident..resident + 5 * 256).contains(&appended),
        "appended {appended}, resident {resident}"
    );
    for name in dashboard_metric_names() {
        let exported = text.lines().any(|l| {
            !l.starts_with('#')
                && l.strip_prefix(name.as_str()).is_some_and(|rest| {
                    rest.starts_with(['{', ' '])
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| rest.starts_with(s))
                })
        });
        assert!(
            exported,
            "the dashboard queries {name}, which /metrics does not export:\n{text}"
        );
    }
}

/// Every `kvdex_*` name in the dashboard's queries, histogram series suffixes removed.
fn dashboard_metric_names() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/grafana/kvdex-dashboard.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = Vec::new();
    for panel in json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("kvdex_") {
                let tail = &expr[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                names.push(base.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    names
}

#[test]
fn tokens_guard_the_routes_and_the_region() {
    let d = Daemon::start(&[]);
    let body = json!({"layers": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 8, "dtype": "bf16", "payload_bytes": 65536});
    let (st, text) = http::send(ureq::post(&format!("{}/v1/sessions", d.base)), Some(&body));
    assert_eq!(st, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let url = format!("{}/v1/sessions/{id}", d.base);
    let bearer = |t: &str| format!("Bearer {t}");
    let wrong: String = token.chars().rev().collect();
    assert_eq!(http::send(ureq::get(&url), None).0, 401, "missing token");
    assert_eq!(
        http::send(ureq::get(&url).set("Authorization", &bearer(&wrong)), None).0,
        401
    );
    assert_eq!(
        http::send(
            ureq::delete(&url).set("Authorization", &bearer(&wrong)),
            None
        )
        .0,
        401
    );
    let (st, info) = http::send(ureq::get(&url).set("Authorization", &bearer(token)), None);
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["shape"]["dtype"], "bf16");
    assert_eq!(info["layers"][0]["index"], "flat");

    let shm = created["shm_path"].as_str().unwrap();
    let mut wrong_bytes = kvdex::client::http::parse_token(token).unwrap();
    wrong_bytes[5] ^= 1;
    let Err(e) = Client::attach(shm, &wrong_bytes) else {
        panic!("a wrong token must not attach");
    };
    assert!(e.to_string().contains("refused the token"), "{e}");
    let mut s = Client::attach(shm, &kvdex::client::http::parse_token(token).unwrap()).unwrap();
    assert_eq!(s.ping(&[7u8; 64]).unwrap(), &[7u8; 64]);
    assert_eq!(
        http::send(
            ureq::delete(&url).set("Authorization", &bearer(token)),
            None
        )
        .0,
        204
    );
    assert_eq!(
        http::send(ureq::get(&url).set("Authorization", &bearer(token)), None).0,
        404
    );
    assert!(
        s.ping(b"x").is_err(),
        "the region is closed once the session is deleted"
    );
}

#[test]
fn append_past_the_budget_fails_and_other_sessions_stay_intact() {
    // Budget 64 KiB; a layer's first allocation holds 16 tokens: 2 heads x (K+V) x 16 x 64 B = 4 KiB.
    let d = Daemon::start(&[
        ("KVDEX_MEMORY__BUDGET_BYTES", "65536"),
        ("KVDEX_MEMORY__INITIAL_TOKENS", "16"),
    ]);
    let client = Client::connect(&d.base).unwrap();
    let mut a = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let mut b = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let ka = values(2 * 100 * 16, 1);
    a.append(0, 100, bytemuck::cast_slice(&ka), bytemuck::cast_slice(&ka))
        .unwrap();
    let used = stats(&d.base)["budget_used_bytes"].as_u64().unwrap();
    assert!(used > 0 && used < 65536);
    let big = values(2 * 400 * 16, 2);
    let e = b
        .append(
            0,
            400,
            bytemuck::cast_slice(&big),
            bytemuck::cast_slice(&big),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("memory budget exceeded") && e.contains("asked for") && e.contains("left"),
        "{e}"
    );
    let st = stats(&d.base);
    assert_eq!(
        st["budget_used_bytes"].as_u64(),
        Some(used),
        "the refused append reserved nothing"
    );
    // Both sessions still work: A's rows are intact, B can take what fits.
    let rows = a.gather(0, 1, &[99]).unwrap();
    assert_eq!(
        bytemuck::cast_slice::<u8, f32>(rows.k),
        &ka[(100 + 99) * 16..(100 + 100) * 16]
    );
    let small = values(2 * 10 * 16, 3);
    assert_eq!(
        b.append(
            0,
            10,
            bytemuck::cast_slice(&small),
            bytemuck::cast_slice(&small)
        )
        .unwrap(),
        10
    );
    let (mut ids, mut sc) = (vec![0u32; 4], vec![0f32; 4]);
    assert_eq!(
        a.search(0, &values(4 * 16, 4), 1, &mut ids, &mut sc)
            .unwrap(),
        1
    );
    a.drop_session().unwrap();
    b.drop_session().unwrap();
    wait_stats(&d.base, "all memory back", |s| {
        s["budget_used_bytes"] == 0 && s["sessions"] == 0
    });
}

/// Not a test on its own: the body of the client process that
/// `a_client_killed_mid_request_is_reaped_and_others_keep_being_served` spawns and SIGKILLs
/// (this test binary re-executed with `KVDEX_TEST_CHILD_BASE` set). Without the variable it
/// does nothing.
#[test]
fn child_client_process() {
    let Ok(base) = std::env::var("KVDEX_TEST_CHILD_BASE") else {
        return;
    };
    let client = Client::connect(&base).unwrap();
    let mut s = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let k = values(2 * 256 * 16, 5);
    s.append(0, 256, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
        .unwrap();
    println!("child-ready {}", s.id().unwrap());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let (mut ids, mut sc) = (vec![0u32; 4 * 64], vec![0f32; 4 * 64]);
    let q = values(4 * 16, 6);
    loop {
        s.append(1, 256, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
            .unwrap();
        s.search(1, &q, 64, &mut ids, &mut sc).unwrap();
    }
}

#[test]
fn a_client_killed_mid_request_is_reaped_and_others_keep_being_served() {
    use std::io::BufRead;
    let d = Daemon::start(&[]);
    let client = Client::connect(&d.base).unwrap();
    let mut mine = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let k = values(2 * 32 * 16, 8);
    mine.append(0, 32, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
        .unwrap();
    let before = stats(&d.base);

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_client_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVDEX_TEST_CHILD_BASE", &d.base)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let child_id = loop {
        let line = lines
            .next()
            .expect("the child exited before it was ready")
            .unwrap();
        // libtest prints "test child_client_process ... " without a newline before it.
        if let Some((_, id)) = line.split_once("child-ready ") {
            break id.trim().to_string();
        }
    };
    // Let it get well into its append/search loop, then kill it mid-request.
    wait_stats(&d.base, "the child's appends", |s| {
        s["per_session"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == child_id.as_str() && p["layers"][1]["tokens"].as_u64() > Some(1024))
    });
    child.kill().unwrap();
    child.wait().unwrap();

    let after = wait_stats(&d.base, "the dead client's session to be reaped", |s| {
        s["sessions"] == 1
    });
    assert_eq!(
        after["per_session"][0]["id"],
        before["per_session"][0]["id"]
    );
    assert_eq!(
        after["budget_used_bytes"], before["budget_used_bytes"],
        "the dead client's memory is freed"
    );
    assert_eq!(after["resident_bytes"], before["resident_bytes"]);
    let (_, text) = http::get(&d.base, "/metrics");
    assert!(
        text.contains("kvdex_sessions_ended_total{reason=\"client_gone\"} 1"),
        "{text}"
    );
    // The surviving client is still served.
    assert_eq!(mine.ping(b"still here").unwrap(), b"still here");
    let rows = mine.gather(0, 0, &[31]).unwrap();
    assert_eq!(
        bytemuck::cast_slice::<u8, f32>(rows.k),
        &k[31 * 16..32 * 16]
    );
    // A new client can still come and go.
    let other = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    other.drop_session().unwrap();
}
