//! The binary itself: configuration refused at start-up naming the key, `--help` and
//! `--version`, serving on TCP and a Unix socket, and a clean stop on SIGTERM.

use std::process::Command;

use crate::common::{http, kvdex, Daemon};

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

#[test]
fn cli_errors_print_no_backtrace_even_when_one_is_asked_for() {
    // RUST_BACKTRACE=1 (set on many developer machines) made every CLI error end in a stack
    // trace of `main`, anyhow's `Debug`.
    let out = kvdex()
        .args(["serve", "--config", "/nonexistent-kvdex.toml"])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent-kvdex.toml"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn region_files_of_gone_daemons_are_removed_at_start_up() {
    let dir = std::env::temp_dir().join(format!("kvdex-stale-shm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = dir.join(format!("kvdex-{pid}-0123456789abcdef"));
    let other = dir.join("kvdex-notes.txt");
    std::fs::write(&stale, b"region").unwrap();
    std::fs::write(&other, b"keep").unwrap();
    let d = Daemon::start(&[("KVDEX_SESSIONS__SHM_DIR", dir.to_str().unwrap())]);
    assert_eq!(http::get(&d.base, "/readyz").0, 200);
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(!stale.exists(), "the dead daemon's region file is removed");
    }
    assert!(other.exists(), "other files are left alone");
    assert!(d.terminate().success());
    std::fs::remove_dir_all(&dir).ok();
}
