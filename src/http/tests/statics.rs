//! Per-session static tokens over the control plane: `sinks` and `window` in the body of
//! `POST /v1/sessions`, reported by `GET /v1/sessions/{id}` and `/stats`, bad values refused
//! by name.

use serde_json::{json, Value};

use super::{call, server, shape};
use crate::config::MAX_STATIC_TOKENS;

#[test]
fn sessions_take_their_own_static_tokens_or_the_daemons() {
    let s = server(4);
    let url = format!("{}/v1/sessions", s.base);
    let create = |body: Value| {
        let (st, created) = call(ureq::post(&url), Some(body));
        assert_eq!(st, 201, "{created}");
        let (id, token) = (
            created["id"].as_str().unwrap().to_string(),
            created["token"].as_str().unwrap().to_string(),
        );
        let (st, info) = call(
            ureq::get(&format!("{url}/{id}")).set("Authorization", &format!("Bearer {token}")),
            None,
        );
        assert_eq!(st, 200, "{info}");
        (id, info)
    };
    // The test server's store keeps the decode defaults: 128 sinks, 512 window.
    let (plain, info) = create(shape());
    assert_eq!(
        (&info["sinks"], &info["window"]),
        (&json!(128), &json!(512))
    );
    let mut own = shape();
    own["sinks"] = json!(4);
    own["window"] = json!(16);
    let (streaming, info) = create(own);
    assert_eq!((&info["sinks"], &info["window"]), (&json!(4), &json!(16)));
    // One value alone: the other is the daemon's; 0 and the bound are accepted.
    let mut half = shape();
    half["window"] = json!(0);
    half["sinks"] = json!(MAX_STATIC_TOKENS);
    let (_, info) = create(half);
    assert_eq!(
        (&info["sinks"], &info["window"]),
        (&json!(MAX_STATIC_TOKENS), &json!(0))
    );
    let (_, stats) = call(ureq::get(&format!("{}/stats", s.base)), None);
    let listed = |id: &str| {
        stats["per_session"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == json!(id))
            .map(|p| (p["sinks"].clone(), p["window"].clone()))
            .unwrap()
    };
    assert_eq!(listed(&plain), (json!(128), json!(512)));
    assert_eq!(listed(&streaming), (json!(4), json!(16)));
}

#[test]
fn bad_static_tokens_get_a_400_naming_the_field() {
    let s = server(4);
    let url = format!("{}/v1/sessions", s.base);
    for (field, value) in [
        ("sinks", json!(MAX_STATIC_TOKENS + 1)),
        ("window", json!(u64::MAX)),
        ("sinks", json!(-1)),
        ("window", json!(2.5)),
        ("window", json!("16")),
        ("sinks", json!(null)),
    ] {
        let mut body = shape();
        body[field] = value.clone();
        let (st, e) = call(ureq::post(&url), Some(body));
        if value.is_null() {
            // JSON null is the same as absent: the daemon's value.
            assert_eq!(st, 201, "{e}");
            continue;
        }
        assert_eq!(st, 400, "{field} = {value}: {e}");
        let why = e["error"].as_str().unwrap_or_default();
        assert!(why.contains(field), "{field} = {value}: {why}");
    }
    // Nothing was created by the refused requests.
    assert_eq!(s.registry.len(), 1);
}
