//! Unit tests of the configuration layers and their error messages.
use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write(text: &str) -> tempfile_path::TempToml {
    tempfile_path::TempToml::new(text)
}

/// A TOML file under the system temp dir, removed on drop.
mod tempfile_path {
    pub struct TempToml(pub std::path::PathBuf);
    impl TempToml {
        pub fn new(text: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("kvdex-cfg-{}-{n}.toml", std::process::id()));
            std::fs::write(&p, text).unwrap();
            Self(p)
        }
    }
    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn err(r: Result<Config>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn embedded_default_is_valid_and_loopback() {
    let c = Config::embedded().unwrap();
    assert!(c.listen_addr().unwrap().ip().is_loopback());
    assert!(c.memory.budget_bytes > 0);
    assert_eq!(c.unix_socket(), None);
}

#[test]
fn layers_apply_in_order_default_file_env_flag() {
    let f = write(
        "[memory]\nbudget_bytes = 1000\ninitial_tokens = 7\n[http]\nlisten = \"127.0.0.1:1\"\n",
    );
    let c = Config::load(Some(&f.0), env(&[]), None).unwrap();
    assert_eq!((c.memory.budget_bytes, c.memory.initial_tokens), (1000, 7));
    assert_eq!(c.http.listen, "127.0.0.1:1");
    let e = env(&[
        ("KVDEX_MEMORY__BUDGET_BYTES", "2000"),
        ("KVDEX_HTTP__LISTEN", "127.0.0.1:2"),
        ("KVDEX_LOG", "debug"),
    ]);
    let c = Config::load(Some(&f.0), e.clone(), None).unwrap();
    assert_eq!((c.memory.budget_bytes, c.memory.initial_tokens), (2000, 7));
    assert_eq!(c.http.listen, "127.0.0.1:2");
    let c = Config::load(Some(&f.0), e, Some("127.0.0.1:3")).unwrap();
    assert_eq!(c.http.listen, "127.0.0.1:3");
    assert_eq!(c.sessions, Config::embedded().unwrap().sessions);
}

#[test]
fn unknown_keys_are_refused_with_their_name() {
    let f = write("[http]\nlisen = \"127.0.0.1:1\"\n");
    assert!(err(Config::load(Some(&f.0), env(&[]), None)).contains("unknown key `http.lisen`"));
    let f = write("[cache]\nx = 1\n");
    assert!(err(Config::load(Some(&f.0), env(&[]), None)).contains("unknown key `cache`"));
    let e = err(Config::load(
        None,
        env(&[("KVDEX_MEMORY__BUDGET", "1")]),
        None,
    ));
    assert!(
        e.contains("KVDEX_MEMORY__BUDGET") && e.contains("unknown key `memory.budget`"),
        "{e}"
    );
}

#[test]
fn wrong_types_are_refused_with_key_and_reason() {
    let f = write("[memory]\nbudget_bytes = \"lots\"\n");
    let e = err(Config::load(Some(&f.0), env(&[]), None));
    assert!(
        e.contains("`memory.budget_bytes`: expected an integer, got a string"),
        "{e}"
    );
    let e = err(Config::load(
        None,
        env(&[("KVDEX_MEMORY__BUDGET_BYTES", "12x")]),
        None,
    ));
    assert!(
        e.contains("`memory.budget_bytes`: expected an integer, got \"12x\""),
        "{e}"
    );
    let e = err(Config::load(
        None,
        env(&[("KVDEX_HTTP__ALLOW_NON_LOOPBACK", "yes")]),
        None,
    ));
    assert!(
        e.contains("`http.allow_non_loopback`: expected true or false"),
        "{e}"
    );
    let f = write("not toml [");
    assert!(err(Config::load(Some(&f.0), env(&[]), None)).contains("not valid TOML"));
    let e = err(Config::load(
        Some(Path::new("/nonexistent/kvdex.toml")),
        env(&[]),
        None,
    ));
    assert!(e.contains("cannot read /nonexistent/kvdex.toml"), "{e}");
}

#[test]
fn bad_values_are_refused_with_key_and_reason() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "KVDEX_MEMORY__BUDGET_BYTES",
            "0",
            "`memory.budget_bytes`: must be greater than 0",
        ),
        (
            "KVDEX_MEMORY__BUDGET_BYTES",
            "-5",
            "`memory.budget_bytes`: -5 is negative",
        ),
        (
            "KVDEX_HTTP__LISTEN",
            "localhost-ish",
            "`http.listen`: \"localhost-ish\" is not an address",
        ),
        (
            "KVDEX_SESSIONS__MAX_SESSIONS",
            "0",
            "`sessions.max_sessions`",
        ),
        (
            "KVDEX_SESSIONS__DEFAULT_PAYLOAD_BYTES",
            "10",
            "`sessions.default_payload_bytes`",
        ),
        (
            "KVDEX_SESSIONS__SHM_DIR",
            "/no/such/dir",
            "`sessions.shm_dir`",
        ),
        (
            "KVDEX_MEMORY__INITIAL_TOKENS",
            "0",
            "`memory.initial_tokens`",
        ),
        (
            "KVDEX_SESSIONS__WORKER_CPUS",
            "1-x",
            "`sessions.worker_cpus`: CPU list \"1-x\": \"x\" is not a CPU id",
        ),
        (
            "KVDEX_SESSIONS__WORKER_SPIN_US",
            "2000000",
            "`sessions.worker_spin_us`: 2000000 is above 1000000",
        ),
        (
            "KVDEX_SESSIONS__WORKER_CPUS",
            "1023",
            "`sessions.worker_cpus`: none of CPUs [1023] is available",
        ),
        (
            "KVDEX_DECODE__GRAPH_DEGREE",
            "1000",
            "`decode.graph_degree`: 1000 is not in 1..=255",
        ),
        (
            "KVDEX_DECODE__GRAPH_SEARCH_LIST",
            "0",
            "`decode.graph_search_list`: 0 is not in 1..=65536",
        ),
        (
            "KVDEX_DECODE__INSERT_BATCH",
            "0",
            "`decode.insert_batch`: 0 is not in 1..=1048576",
        ),
        (
            "KVDEX_DECODE__BUILD_THREADS",
            "100000",
            "`decode.build_threads`: 100000 is not in 0..=1024",
        ),
        (
            "KVDEX_DECODE__GRAPH_MAX_TRAIN_QUERIES",
            "0",
            "`decode.graph_max_train_queries`",
        ),
        ("KVDEX_DECODE__WINDOW", "99999999999", "`decode.window`"),
        (
            "KVDEX_DECODE__SEAL_MAX_STAGED_QUERIES",
            "99999999",
            "`decode.seal_max_staged_queries`: 99999999 is not in 0..=16777216",
        ),
        (
            "KVDEX_DECODE__TAIL_SAMPLE",
            "1000000",
            "`decode.tail_sample`",
        ),
    ];
    for (var, val, want) in cases {
        let e = err(Config::load(None, env(&[(var, val)]), None));
        assert!(e.contains(want), "{var}={val}: {e}");
    }
}

#[test]
fn worker_cpus_parse_to_a_mask_of_allowed_cpus() {
    let c = Config::embedded().unwrap();
    assert_eq!(c.worker_cpus().unwrap(), None, "no pinning by default");
    let first = crate::affinity::CpuMask::of_current_thread()
        .unwrap()
        .cpus()
        .next()
        .unwrap();
    let c = Config::load(
        None,
        env(&[("KVDEX_SESSIONS__WORKER_CPUS", &first.to_string())]),
        None,
    )
    .unwrap();
    let mask = c.worker_cpus().unwrap().unwrap();
    assert_eq!(mask.cpus().collect::<Vec<_>>(), vec![first]);
}

#[test]
fn non_loopback_needs_explicit_permission() {
    let e = err(Config::load(None, env(&[]), Some("0.0.0.0:7070")));
    assert!(
        e.contains("`http.listen`") && e.contains("not a loopback"),
        "{e}"
    );
    let c = Config::load(
        None,
        env(&[("KVDEX_HTTP__ALLOW_NON_LOOPBACK", "true")]),
        Some("0.0.0.0:7070"),
    );
    assert_eq!(c.unwrap().listen_addr().unwrap().port(), 7070);
    assert!(Config::load(None, env(&[]), Some("[::1]:0")).is_ok());
}
