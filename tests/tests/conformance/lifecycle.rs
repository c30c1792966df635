//! VMs, contexts and the HTTP stream lifecycle: canary, configuration,
//! context ids, callback order, header phases, edits, local replies,
//! pause/resume and failed VMs.

use std::time::Duration;

use consent_sim::{HttpRequest, Sidecar, SidecarConfig, SimClock, SimError};

use crate::support::{Guest, pairs, said, said_by};

/// A canary VM runs on_vm_start + on_configure and is discarded without
/// on_done; its timer dies with it. Each worker VM then configures its own
/// root context (id 1). The main-thread VM is started but not configured.
#[tokio::test(flavor = "multi_thread")]
async fn canary_configures_then_is_discarded_without_on_done() {
    let mut g = Guest::new();
    let (vs, cf, tick, done, st) = (
        g.s("lc:vm_start"),
        g.s("lc:configure_ctx"),
        g.s("lc:tick"),
        g.s("lc:done"),
        g.s("lc:start"),
    );
    let g = g.func(&format!(
        r#"(func (export "_start") (call $print {st}))
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (call $print {vs}) (i32.const 1))
           (func (export "proxy_on_configure") (param $c i32) (param i32) (result i32)
             (call $say {cf} (local.get $c))
             (drop (call $set_tick (i32.const 1000)))
             (i32.const 1))
           (func (export "proxy_on_tick") (param i32) (call $print {tick}))
           (func (export "proxy_on_done") (param i32) (result i32) (call $print {done}) (i32.const 1))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        clock: SimClock::frozen_at(0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    let mut configured = said_by(&sidecar, "lc:configure_ctx");
    configured.sort();
    assert_eq!(
        configured,
        [
            ("canary".to_string(), "lc:configure_ctx=1".to_string()),
            ("worker 0".into(), "lc:configure_ctx=1".into()),
            ("worker 1".into(), "lc:configure_ctx=1".into()),
        ]
    );
    assert!(
        said_by(&sidecar, "lc:start")
            .iter()
            .any(|(vm, _)| vm == "main")
    );
    sidecar
        .advance(Duration::from_millis(1000))
        .await
        .expect("ticks");
    let mut ticks: Vec<String> = said_by(&sidecar, "lc:tick")
        .into_iter()
        .map(|(vm, _)| vm)
        .collect();
    ticks.sort();
    assert_eq!(
        ticks,
        ["worker 0", "worker 1"],
        "the canary's timer died with it"
    );
    assert!(
        said(&sidecar, "lc:done").is_empty(),
        "the canary is discarded without on_done"
    );
}

fn config_guest() -> Guest {
    // on_configure accepts only a configuration starting with '{'.
    Guest::new().func(
        r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (drop (call $get_buffer (i32.const 7) (i32.const 0) (local.get 1) (i32.const 512) (i32.const 516)))
             (i32.and (i32.ne (i32.load (i32.const 516)) (i32.const 0))
                      (i32.eq (i32.load8_u (i32.load (i32.const 512))) (i32.const 123))))"#,
    )
}

/// on_configure returning false rejects the configuration: the sidecar does
/// not start, and the error names the callback (first seen by the canary).
#[tokio::test(flavor = "multi_thread")]
async fn on_configure_false_rejects_the_configuration() {
    let ok = SidecarConfig {
        plugin_config: r#"{"a":1}"#.into(),
        ..SidecarConfig::new(config_guest().build())
    };
    assert!(Sidecar::start(ok).await.is_ok());
    let bad = SidecarConfig {
        plugin_config: "nope".into(),
        ..SidecarConfig::new(config_guest().build())
    };
    match Sidecar::start(bad).await.err().expect("rejected") {
        SimError::ConfigurationRejected { vm, callback } => {
            assert_eq!((vm.as_str(), callback), ("canary", "on_configure"))
        }
        other => panic!("unexpected error: {other}"),
    }
    let vm_start = Guest::new()
        .func(r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 0))"#);
    let err = Sidecar::start(SidecarConfig::new(vm_start.build()))
        .await
        .err()
        .expect("rejected");
    assert!(
        matches!(
            err,
            SimError::ConfigurationRejected {
                callback: "on_vm_start",
                ..
            }
        ),
        "{err}"
    );
}

/// Context ids are per VM: the root context is 1 (its parent is the VM, 0),
/// HTTP contexts count on from 2 with the root as parent.
#[tokio::test(flavor = "multi_thread")]
async fn context_ids_are_per_vm_and_start_at_one() {
    let mut g = Guest::new().without_context_create();
    let (c, p) = (g.s("id:ctx"), g.s("id:parent"));
    let g = g.func(&format!(
        r#"(func (export "proxy_on_context_create") (param $c i32) (param $p i32)
             (call $say {c} (local.get $c)) (call $say {p} (local.get $p)))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig::new(g.build()))
        .await
        .expect("starts");
    for w in [0, 0, 1] {
        sidecar
            .send(HttpRequest::get("/").worker(w))
            .await
            .expect("served");
    }
    let of = |vm: &str| -> Vec<String> {
        said_by(&sidecar, "id:")
            .into_iter()
            .filter(|(v, _)| v == vm)
            .map(|(_, m)| m)
            .collect()
    };
    assert_eq!(
        of("worker 0"),
        [
            "id:ctx=1",
            "id:parent=0",
            "id:ctx=2",
            "id:parent=1",
            "id:ctx=3",
            "id:parent=1"
        ]
    );
    assert_eq!(
        of("worker 1"),
        ["id:ctx=1", "id:parent=0", "id:ctx=2", "id:parent=1"]
    );
}

/// Envoy's order on a stream: request headers (end_of_stream false when a
/// body follows), body, trailers, response headers, body, then on_log,
/// on_done, on_delete.
#[tokio::test(flavor = "multi_thread")]
async fn http_callbacks_run_in_envoys_order() {
    let mut g = Guest::new();
    let n: Vec<String> = [
        "cb:req_headers_eos",
        "cb:req_body_eos",
        "cb:req_trailers",
        "cb:resp_headers_eos",
        "cb:resp_body_eos",
        "cb:log",
        "cb:done",
        "cb:delete",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $say {0} (local.get 2)) (i32.const 0))
           (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (call $say {1} (local.get 2)) (i32.const 0))
           (func (export "proxy_on_request_trailers") (param i32 i32) (result i32) (call $print {2}) (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $say {3} (local.get 2)) (i32.const 0))
           (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (call $say {4} (local.get 2)) (i32.const 0))
           (func (export "proxy_on_log") (param i32) (call $print {5}))
           (func (export "proxy_on_done") (param i32) (result i32) (call $print {6}) (i32.const 1))
           (func (export "proxy_on_delete") (param i32) (call $print {7}))"#,
        n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]
    ));
    let sidecar = Sidecar::start(SidecarConfig::new(g.build()))
        .await
        .expect("starts");
    let resp = sidecar
        .send(HttpRequest::post("/upload", "payload").trailer("x-t", "1"))
        .await
        .expect("served");
    assert_eq!(resp.status, 200);
    assert_eq!(
        said(&sidecar, "cb:"),
        [
            "cb:req_headers_eos=0",
            "cb:req_body_eos=0",
            "cb:req_trailers",
            "cb:resp_headers_eos=0",
            "cb:resp_body_eos=1",
            "cb:log",
            "cb:done",
            "cb:delete"
        ]
    );
    // Time in the guest is measured per stream (benchmarks read it): the
    // request-headers share is part of the stream's total.
    let t = resp.guest_time;
    assert!(t.request_headers > std::time::Duration::ZERO, "{t:?}");
    assert!(t.total > t.request_headers, "{t:?}");
    // Each callback said one thing through proxy_log: eight calls, one of them
    // from request headers.
    assert_eq!(
        (t.request_headers_host_calls, t.host_calls),
        (1, 8),
        "{t:?}"
    );
}

/// A header map is readable only in its own callback: request headers read
/// during the response phase are BAD_ARGUMENT, while the pairs call reads
/// empty. Keys are matched lower-case. on_log sees the access-log maps.
#[tokio::test(flavor = "multi_thread")]
async fn header_maps_are_readable_only_in_their_own_phase() {
    let mut g = Guest::new();
    let (path, status, mixed, x) = (g.s(":path"), g.s(":status"), g.s("X-Test"), g.s("x"));
    let n: Vec<String> = [
        "hp:req_in_req",
        "hp:mixed_case",
        "hp:req_in_resp",
        "hp:resp_in_resp",
        "hp:pairs_in_resp",
        "hp:pairs_size",
        "hp:req_in_log",
        "hp:trailers_in_log",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (call $say {n0} (call $header (i32.const 0) {path}))
             (call $say {n1} (call $header (i32.const 0) {mixed}))
             (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (call $say {n2} (call $header (i32.const 0) {path}))
             (call $say {n3} (call $header (i32.const 2) {status}))
             (call $say {n4} (call $get_pairs (i32.const 0) (i32.const 512) (i32.const 516)))
             (call $say {n5} (i32.load (i32.const 516)))
             (i32.const 0))
           (func (export "proxy_on_log") (param i32)
             (call $say {n6} (call $header (i32.const 0) {path}))
             (call $say {n7} (call $header (i32.const 1) {x})))"#,
        n0 = n[0],
        n1 = n[1],
        n2 = n[2],
        n3 = n[3],
        n4 = n[4],
        n5 = n[5],
        n6 = n[6],
        n7 = n[7]
    ));
    let sidecar = Sidecar::start(SidecarConfig::new(g.build()))
        .await
        .expect("starts");
    sidecar
        .send(HttpRequest::get("/a").header("X-Test", "v"))
        .await
        .expect("served");
    assert_eq!(
        said(&sidecar, "hp:"),
        [
            "hp:req_in_req=0",
            "hp:mixed_case=0",
            "hp:req_in_resp=2",
            "hp:resp_in_resp=0",
            "hp:pairs_in_resp=0",
            "hp:pairs_size=0",
            "hp:req_in_log=0",
            "hp:trailers_in_log=1"
        ]
    );
}

/// Headers the filter adds, replaces or removes on the request are what the
/// upstream receives (keys lower-cased); response edits reach the client.
#[tokio::test(flavor = "multi_thread")]
async fn header_edits_reach_upstream_and_client() {
    let mut g = Guest::new();
    let (added, yes, repl, new, rm, resp) = (
        g.s("X-Added"),
        g.s("yes"),
        g.s("x-replace"),
        g.s("new"),
        g.s("x-remove"),
        g.s("x-resp"),
    );
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $add_header (i32.const 0) {added} {yes}))
             (drop (call $replace_header (i32.const 0) {repl} {new}))
             (drop (call $remove_header (i32.const 0) {rm}))
             (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (drop (call $add_header (i32.const 2) {resp} {yes}))
             (i32.const 0))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig::new(g.build()))
        .await
        .expect("starts");
    let resp = sidecar
        .send(
            HttpRequest::get("/a")
                .header("x-replace", "old")
                .header("x-remove", "gone"),
        )
        .await
        .expect("served");
    let up = resp.upstream_request.clone().expect("forwarded");
    assert_eq!(up.header("x-added"), Some("yes"));
    assert_eq!(up.header("x-replace"), Some("new"));
    assert_eq!(up.header("x-remove"), None);
    assert_eq!(
        up.headers.iter().filter(|(k, _)| k == "x-replace").count(),
        1
    );
    assert_eq!(resp.header("x-resp"), Some("yes"));
}

/// send_local_response takes effect when the callback returns (the rest of
/// the callback still runs) and stops the request chain: no body callback,
/// no upstream. The reply passes the filter's response callbacks, as Envoy's
/// sendLocalReply runs the encoder chain.
#[tokio::test(flavor = "multi_thread")]
async fn local_response_applies_after_the_callback_and_stops_the_chain() {
    let mut g = Guest::new();
    let (details, body, hdrs) = (
        g.s("denied by test"),
        g.s("no"),
        g.s(pairs(&[("x-why", "test")])),
    );
    let (after, on_body, on_resp) = (g.s("lr:after"), g.s("lr:body"), g.s("lr:resp_headers"));
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $local_response (i32.const 403) {details} {body} {hdrs} (i32.const -1)))
             (call $print {after})
             (i32.const 0))
           (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (call $print {on_body}) (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $print {on_resp}) (i32.const 0))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig::new(g.build()))
        .await
        .expect("starts");
    let resp = sidecar
        .send(HttpRequest::post("/a", "payload"))
        .await
        .expect("served");
    assert_eq!(resp.status, 403);
    assert_eq!(resp.body_text(), "no");
    assert_eq!(resp.header("x-why"), Some("test"));
    assert_eq!(resp.details.as_deref(), Some("denied_by_test"));
    assert!(resp.upstream_request.is_none());
    assert_eq!(said(&sidecar, "lr:"), ["lr:after", "lr:resp_headers"]);
}

/// A stream paused in request headers gets no body callback until a root
/// callback sets the effective context to it and continues it, on the same
/// worker. An unknown context id is BAD_ARGUMENT.
#[tokio::test(flavor = "multi_thread")]
async fn paused_stream_resumes_from_a_root_callback() {
    let mut g = Guest::new();
    let (paused, body, eff, cont, bad) = (
        g.s("pr:paused"),
        g.s("pr:body"),
        g.s("pr:effective"),
        g.s("pr:continue"),
        g.s("pr:bad_effective"),
    );
    let g = g.func(&format!(
        r#"(global $paused (mut i32) (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 1000))) (i32.const 1))
           (func (export "proxy_on_request_headers") (param $c i32) (param i32 i32) (result i32)
             (global.set $paused (local.get $c)) (call $print {paused}) (i32.const 1))
           (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (call $print {body}) (i32.const 0))
           (func (export "proxy_on_tick") (param i32)
             (if (global.get $paused) (then
               (call $say {bad} (call $set_effective (i32.const 999)))
               (call $say {eff} (call $set_effective (global.get $paused)))
               (call $say {cont} (call $continue_stream (i32.const 0)))
               (global.set $paused (i32.const 0)))))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        clock: SimClock::frozen_at(0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    let send = sidecar.send(HttpRequest::post("/a", "payload"));
    tokio::pin!(send);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut send)
            .await
            .is_err(),
        "paused"
    );
    assert_eq!(said(&sidecar, "pr:"), ["pr:paused"]);
    sidecar
        .advance(Duration::from_secs(1))
        .await
        .expect("ticks");
    let resp = send.await.expect("resumed");
    assert_eq!(resp.status, 200);
    assert!(resp.upstream_request.is_some());
    assert_eq!(
        said(&sidecar, "pr:"),
        [
            "pr:paused",
            "pr:bad_effective=2",
            "pr:effective=0",
            "pr:continue=0",
            "pr:body"
        ]
    );
}

fn trap_guest() -> Guest {
    let mut g = Guest::new();
    let (boom, filtered, one) = (g.s("boom"), g.s("x-filtered"), g.s("1"));
    g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (if (i32.eq (call $header_byte {boom}) (i32.const 121)) (then unreachable))
             (drop (call $add_header (i32.const 0) {filtered} {one}))
             (i32.const 0))"#
    ))
}

/// A trap marks that worker's VM failed for good: the stream and every later
/// one on that worker get 503 `wasm_fail_stream`; other workers are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_fails_the_worker_closed() {
    let sidecar = Sidecar::start(SidecarConfig::new(trap_guest().build()))
        .await
        .expect("starts");
    let resp = sidecar
        .send(HttpRequest::get("/").header("boom", "y").worker(0))
        .await
        .expect("answered");
    assert_eq!(
        (resp.status, resp.details.as_deref()),
        (503, Some("wasm_fail_stream"))
    );
    assert!(resp.upstream_request.is_none());
    assert!(sidecar.worker_failed(0) && !sidecar.worker_failed(1));
    let later = sidecar
        .send(HttpRequest::get("/").worker(0))
        .await
        .expect("answered");
    assert_eq!(later.status, 503, "no recovery without a reload");
    let other = sidecar
        .send(HttpRequest::get("/").worker(1))
        .await
        .expect("answered");
    assert_eq!(other.status, 200);
    assert_eq!(
        other
            .upstream_request
            .expect("forwarded")
            .header("x-filtered"),
        Some("1")
    );
    assert!(sidecar.logged("wasm trap in proxy_on_request_headers"));
}

/// With fail_open a failed VM is bypassed: requests reach the upstream
/// without the filter.
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_with_fail_open_bypasses_the_filter() {
    let sidecar = Sidecar::start(SidecarConfig {
        fail_open: true,
        ..SidecarConfig::new(trap_guest().build())
    })
    .await
    .expect("starts");
    let resp = sidecar
        .send(HttpRequest::get("/").header("boom", "y").worker(0))
        .await
        .expect("answered");
    assert_eq!(resp.status, 200);
    assert!(sidecar.worker_failed(0));
    let later = sidecar
        .send(HttpRequest::get("/").worker(0))
        .await
        .expect("answered");
    assert_eq!(later.status, 200);
    assert_eq!(
        later
            .upstream_request
            .expect("forwarded")
            .header("x-filtered"),
        None,
        "filter bypassed"
    );
}

/// A root callback may answer a paused stream: set_effective_context, then
/// send_local_response; the reply goes out once the root callback returns and
/// the request never reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn paused_stream_can_be_answered_from_a_root_callback() {
    let mut g = Guest::new();
    let (details, body, hdrs) = (g.s("denied"), g.s("late no"), g.s(pairs(&[])));
    let g = g.func(&format!(
        r#"(global $paused (mut i32) (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 1000))) (i32.const 1))
           (func (export "proxy_on_request_headers") (param $c i32) (param i32 i32) (result i32)
             (global.set $paused (local.get $c)) (i32.const 1))
           (func (export "proxy_on_tick") (param i32)
             (if (global.get $paused) (then
               (drop (call $set_effective (global.get $paused)))
               (drop (call $local_response (i32.const 451) {details} {body} {hdrs} (i32.const -1)))
               (global.set $paused (i32.const 0)))))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        clock: SimClock::frozen_at(0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    let send = sidecar.send(HttpRequest::get("/a"));
    tokio::pin!(send);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut send)
            .await
            .is_err(),
        "paused"
    );
    sidecar
        .advance(Duration::from_secs(1))
        .await
        .expect("ticks");
    let resp = send.await.expect("answered");
    assert_eq!((resp.status, resp.body_text().as_str()), (451, "late no"));
    assert!(resp.upstream_request.is_none());
}
