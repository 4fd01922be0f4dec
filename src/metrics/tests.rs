//! Tests of the registry: names, per-op children, the dashboard's queries.

use super::*;

#[test]
fn requests_are_counted_by_op_and_status_with_bytes() {
    let m = Metrics::new().unwrap();
    m.record_request("append", true, 3.0, 4096, 0);
    m.record_request("append", false, 1.0, 999, 0);
    m.record_request("gather", true, 7.5, 64, 2048);
    assert_eq!(m.requests.with_label_values(&["append", "ok"]).get(), 1);
    assert_eq!(m.requests.with_label_values(&["append", "error"]).get(), 1);
    assert_eq!(
        (m.appended_bytes.get(), m.gathered_bytes.get()),
        (4096, 2048)
    );
    assert_eq!(
        m.latency_us
            .with_label_values(&["gather"])
            .get_sample_count(),
        1
    );
    let text = m.encode().unwrap();
    assert!(
        text.contains("kvdex_request_duration_microseconds_bucket{op=\"append\",le=\"5\"} 2"),
        "{text}"
    );
    assert!(text.contains("kvdex_requests_total{op=\"gather\",status=\"ok\"} 1"));
}

/// Every `kvdex_*` series a dashboard query names, without histogram series suffixes.
pub(crate) fn dashboard_metric_names(dashboard: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(dashboard).unwrap();
    let mut names = Vec::new();
    for panel in json["panels"].as_array().unwrap() {
        // Rows (the "Decode" row) group panels and query nothing.
        if panel["type"] == "row" {
            continue;
        }
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("kvdex_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|sfx| name.strip_suffix(sfx))
                    .unwrap_or(name);
                names.push(base.to_string());
                rest = &tail[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn a_fresh_registry_exports_every_op_and_end_reason_at_zero() {
    let text = Metrics::new().unwrap().encode().unwrap();
    for line in [
        "kvdex_requests_total{op=\"retrieve\",status=\"ok\"} 0",
        "kvdex_requests_total{op=\"append\",status=\"error\"} 0",
        "kvdex_request_duration_microseconds_count{op=\"search\"} 0",
        "kvdex_sessions_ended_total{reason=\"client_gone\"} 0",
        "kvdex_sessions_ended_total{reason=\"protocol_error\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[test]
fn the_decode_path_is_exported_at_zero_then_recorded() {
    use crate::store::retrieve::RetrieveStats;
    use crate::store::DecodeGauges;
    let m = Metrics::new().unwrap();
    let text = m.encode().unwrap();
    for line in [
        "kvdex_index_builds_started_total 0",
        "kvdex_index_builds_ended_total{outcome=\"ready\"} 0",
        "kvdex_index_builds_ended_total{outcome=\"failed\"} 0",
        "kvdex_index_builds_ended_total{outcome=\"abandoned\"} 0",
        "kvdex_index_build_duration_seconds_count 0",
        "kvdex_index_layers_building 0",
        "kvdex_index_inserted_keys_total 0",
        "kvdex_index_bytes 0",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"search\"} 0",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"attend\"} 0",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"copy\"} 0",
        "kvdex_retrieve_chosen_tokens_count 0",
        "kvdex_retrieve_scored_keys_total 0",
        "kvdex_retrieve_exact_fallback_total 0",
        "kvdex_engine_dests 0",
        "kvdex_staged_training_positions 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // Two retrieves through one connection's recorder, the first with an exact head.
    let mut r = m.decode.recorder();
    let st = RetrieveStats {
        stride: 8,
        scored: 100,
        search_us: 30.0,
        attend_us: 4.0,
        copy_us: 1.0,
        slowest_head_us: 20.0,
        exact_heads: 1,
    };
    r.on_retrieve(&st, &[1, 8, 8, 3]);
    let st = RetrieveStats {
        exact_heads: 0,
        ..st
    };
    r.on_retrieve(&st, &[2, 2, 2, 2]);
    m.build_started();
    m.build_started();
    m.build_ended(BuildOutcome::Ready, 2.5);
    m.build_ended(BuildOutcome::Abandoned, 0.5);
    m.keys_inserted(16);
    m.decode.set_gauges(DecodeGauges {
        layers_building: 1,
        index_bytes: 4096,
        staged_positions: 50,
        engine_dests: 2,
    });
    let text = m.encode().unwrap();
    for line in [
        "kvdex_retrieve_chosen_tokens_bucket{le=\"1\"} 1",
        "kvdex_retrieve_chosen_tokens_bucket{le=\"4\"} 6",
        "kvdex_retrieve_chosen_tokens_bucket{le=\"8\"} 8",
        "kvdex_retrieve_chosen_tokens_sum 28",
        "kvdex_retrieve_chosen_tokens_count 8",
        "kvdex_retrieve_stage_duration_microseconds_bucket{stage=\"search\",le=\"50\"} 2",
        "kvdex_retrieve_stage_duration_microseconds_sum{stage=\"attend\"} 8",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"copy\"} 2",
        "kvdex_retrieve_scored_keys_total 200",
        "kvdex_retrieve_exact_fallback_total 1",
        "kvdex_index_builds_started_total 2",
        "kvdex_index_builds_ended_total{outcome=\"ready\"} 1",
        "kvdex_index_builds_ended_total{outcome=\"abandoned\"} 1",
        "kvdex_index_build_duration_seconds_bucket{le=\"2.5\"} 1",
        "kvdex_index_build_duration_seconds_count 1",
        "kvdex_index_inserted_keys_total 16",
        "kvdex_index_layers_building 1",
        "kvdex_index_bytes 4096",
        "kvdex_staged_training_positions 50",
        "kvdex_engine_dests 2",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[test]
fn every_dashboard_metric_is_exported() {
    let m = Metrics::new().unwrap();
    // The HTTP label vector has no fixed label set: touch it.
    m.http_requests
        .with_label_values(&["/healthz", "200"])
        .inc();
    let exported = m.family_names();
    let queried = dashboard_metric_names(include_str!("../../config/grafana/kvdex-dashboard.json"));
    assert!(queried.len() >= 8, "the dashboard queries {queried:?}");
    for name in &queried {
        assert!(
            exported.contains(name),
            "dashboard queries {name}, which the daemon does not export ({exported:?})"
        );
    }
}
