//! Finding 4: memory held for a client outside the budget (data-socket arenas, regions), and
//! no per-session quota.

use kvdex_index::KeyDtype;

use crate::common::{http, Daemon};
use crate::{encode, session, shape, values};

const MIB: u64 = 1 << 20;

/// 8 data-socket connections took 704 MiB with `budget_used_bytes` at 0. Now each
/// connection's arena and each region is charged (`budget_parts`), a connection past the
/// budget is refused with a budget error, and everything returns when they end.
#[test]
fn regions_and_socket_arenas_are_charged_to_the_budget() {
    let sock = std::env::temp_dir().join(format!("kvdex-rel-budget-{}.sock", std::process::id()));
    let d = Daemon::start(&[
        ("KVDEX_SESSIONS__DATA_SOCKET", sock.to_str().unwrap()),
        ("KVDEX_MEMORY__BUDGET_BYTES", &(4 * MIB).to_string()),
        ("KVDEX_SESSIONS__DEFAULT_PAYLOAD_BYTES", &MIB.to_string()),
    ]);
    let client = kvdex_client::Client::connect(&d.base).unwrap();
    let s = session(&client, shape(KeyDtype::F32));
    let parts = || http::get_json(&d.base, "/stats").1["budget_parts"].clone();
    let region = parts()["regions"].as_u64().unwrap();
    assert!(region > MIB, "{}", parts());
    let mut conns = Vec::new();
    let refused = loop {
        match s.open_socket() {
            Ok(c) => conns.push(c),
            Err(e) => break e,
        }
        assert!(conns.len() < 8, "connections past the budget were accepted");
    };
    assert!(
        refused.to_string().contains("memory budget exceeded"),
        "{refused}"
    );
    assert_eq!(
        parts()["socket_arenas"].as_u64(),
        Some(conns.len() as u64 * MIB)
    );
    let used = http::get_json(&d.base, "/stats").1["budget_used_bytes"]
        .as_u64()
        .unwrap();
    assert!(used >= region + conns.len() as u64 * MIB);
    drop(conns);
    s.drop_session().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while http::get_json(&d.base, "/stats").1["budget_used_bytes"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "budget not returned: {}",
            parts()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// One session could take the whole budget. With `memory.session_quota_bytes` an append past
/// the quota fails for that session alone, naming the quota; another session still grows.
#[test]
fn a_session_quota_bounds_one_session() {
    let d = Daemon::start(&[
        ("KVDEX_MEMORY__SESSION_QUOTA_BYTES", "65536"),
        ("KVDEX_MEMORY__INITIAL_TOKENS", "16"),
    ]);
    let client = kvdex_client::Client::connect(&d.base).unwrap();
    let mut a = session(&client, shape(KeyDtype::F32));
    let mut b = session(&client, shape(KeyDtype::F32));
    // 1 KV head x (K+V) x 64 B per token: 512 tokens = 64 KiB fit, 1024 do not.
    let kv = encode(&values(512 * 16, 1), KeyDtype::F32);
    a.append(0, 512, &kv, &kv).unwrap();
    let e = a.append(0, 512, &kv, &kv).unwrap_err().to_string();
    assert!(e.contains("session quota"), "{e}");
    assert_eq!(b.append(0, 512, &kv, &kv).unwrap(), 512);
}
