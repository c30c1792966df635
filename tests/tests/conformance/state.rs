//! Properties, shared data, shared queues, timers, metrics and the clock.

use std::time::Duration;

use consent_sim::{HttpRequest, MetricValue, Sidecar, SidecarConfig, SimClock};

use crate::support::{Guest, said, said_by};

const T0: u64 = 1_700_000_000_000_000_000;

/// Properties as Envoy serializes them: strings raw, bools one byte, times
/// int64 ns, maps in the pairs format, `xds.node` a serialized message;
/// missing ones NOT_FOUND; `request.*` from a root context NOT_FOUND;
/// `proxy_set_property` writes filter state readable back and by the access log.
#[tokio::test(flavor = "multi_thread")]
async fn properties_follow_envoys_encoding() {
    let mut g = Guest::new();
    let props = [
        (&b"connection\0uri_san_peer_certificate"[..], "san"),
        (b"connection\0mtls", "mtls"),
        (b"source\0address", "src"),
        (b"request\0path", "path"),
        (b"request\0method", "method"),
        (b"request\0host", "host"),
        (b"request\0id", "id"),
        (b"request\0time", "time"),
        (b"request\0headers", "headers"),
        (b"plugin_name", "plugin_name"),
        (b"plugin_root_id", "root_id"),
        (b"plugin_vm_id", "vm_id"),
        (b"xds\0node", "node"),
        (b"request\0nope", "pp:nope"),
        (b"san", "san_again"),
    ];
    let mut body = String::new();
    for (path, key) in props {
        body.push_str(&format!("(call $copy_prop {} {})\n", g.s(path), g.s(key)));
    }
    let (root_path, root_plugin, rp, pn) = (
        g.s("pp:root_path"),
        g.s("pp:root_plugin"),
        g.s(b"request\0path"),
        g.s("plugin_name"),
    );
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body} (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (call $say {root_path} (call $get_property {rp} (i32.const 512) (i32.const 516)))
             (call $say {root_plugin} (call $get_property {pn} (i32.const 512) (i32.const 516)))
             (i32.const 1))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        root_id: "consent".into(),
        clock: SimClock::frozen_at(T0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    let resp = sidecar
        .send(
            HttpRequest::get("/records?x=1")
                .authority("svc.local")
                .header("x-request-id", "rid-1")
                .peer_identity("spiffe://cluster.local/ns/app/sa/client")
                .source_address("10.1.2.3:5555"),
        )
        .await
        .expect("served");
    let fs = |k: &str| resp.filter_state.get(&format!("wasm.{k}")).cloned();
    assert_eq!(
        fs("san").as_deref(),
        Some(&b"spiffe://cluster.local/ns/app/sa/client"[..])
    );
    assert_eq!(
        fs("san_again"),
        fs("san"),
        "filter state reads back as a property"
    );
    assert_eq!(fs("mtls"), Some(vec![1]));
    assert_eq!(fs("src").as_deref(), Some(&b"10.1.2.3:5555"[..]));
    assert_eq!(fs("path").as_deref(), Some(&b"/records?x=1"[..]));
    assert_eq!(fs("method").as_deref(), Some(&b"GET"[..]));
    assert_eq!(fs("host").as_deref(), Some(&b"svc.local"[..]));
    assert_eq!(fs("id").as_deref(), Some(&b"rid-1"[..]));
    assert_eq!(fs("time"), Some((T0 as i64).to_le_bytes().to_vec()));
    let headers = fs("headers").expect("headers map");
    assert_eq!(
        &headers[..4],
        &5u32.to_le_bytes(),
        "five request headers, pairs-encoded"
    );
    assert!(headers.windows(13).any(|w| w == b"/records?x=1\0"));
    assert_eq!(fs("plugin_name").as_deref(), Some(&b"consent-sim"[..]));
    assert_eq!(fs("root_id").as_deref(), Some(&b"consent"[..]));
    assert_eq!(fs("vm_id"), Some(Vec::new()), "Istio leaves vm_id empty");
    assert!(fs("node").is_some_and(|n| !n.is_empty()));
    assert_eq!(said(&sidecar, "pp:nope"), ["pp:nope=1"]);
    let root: Vec<String> = said(&sidecar, "pp:root");
    assert!(
        root.contains(&"pp:root_path=1".into()) && root.contains(&"pp:root_plugin=0".into()),
        "{root:?}"
    );

    let plain = sidecar.send(HttpRequest::get("/")).await.expect("served");
    assert_eq!(plain.filter_state.get("wasm.mtls"), Some(&vec![0]));
    assert!(
        !plain.filter_state.contains_key("wasm.san"),
        "no peer certificate: NOT_FOUND"
    );
}

fn shared_data_guest() -> Guest {
    let mut g = Guest::new();
    let (op, k, k2, a, b, z) = (g.s("op"), g.s("k"), g.s("k2"), g.s("a"), g.s("b"), g.s("z"));
    let n: Vec<String> = [
        "sd:get_missing",
        "sd:set_new",
        "sd:cas1",
        "sd:set_bad",
        "sd:set_good",
        "sd:cas2",
        "sd:set_missing_cas",
        "sd:read",
        "sd:read_first",
        "sd:read_cas",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (local $op i32)
             (local.set $op (call $header_byte {op}))
             (if (i32.eq (local.get $op) (i32.const 119)) (then
               (call $say {n0} (call $get_shared {k} (i32.const 512) (i32.const 516) (i32.const 520)))
               (call $say {n1} (call $set_shared {k} {a} (i32.const 0)))
               (drop (call $get_shared {k} (i32.const 512) (i32.const 516) (i32.const 520)))
               (call $say {n2} (i32.load (i32.const 520)))
               (call $say {n3} (call $set_shared {k} {b} (i32.add (i32.load (i32.const 520)) (i32.const 5))))
               (call $say {n4} (call $set_shared {k} {b} (i32.load (i32.const 520))))
               (drop (call $get_shared {k} (i32.const 512) (i32.const 516) (i32.const 520)))
               (call $say {n5} (i32.load (i32.const 520)))
               (call $say {n6} (call $set_shared {k2} {z} (i32.const 42)))))
             (if (i32.eq (local.get $op) (i32.const 114)) (then
               (call $say {n7} (call $get_shared {k} (i32.const 512) (i32.const 516) (i32.const 520)))
               (call $say {n8} (i32.load8_u (i32.load (i32.const 512))))
               (call $say {n9} (i32.load (i32.const 520)))))
             (i32.const 0))"#,
        n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3], n4 = n[4], n5 = n[5], n6 = n[6], n7 = n[7], n8 = n[8], n9 = n[9]
    ))
}

/// Shared data is one process-wide map across VMs; CAS values come from one
/// counter starting at 1; a set with a stale CAS is CAS_MISMATCH; a set on a
/// missing key succeeds whatever its CAS; a missing key is NOT_FOUND.
#[tokio::test(flavor = "multi_thread")]
async fn shared_data_is_process_wide_with_cas() {
    let sidecar = Sidecar::start(SidecarConfig::new(shared_data_guest().build()))
        .await
        .expect("starts");
    sidecar
        .send(HttpRequest::get("/").header("op", "w").worker(0))
        .await
        .expect("served");
    sidecar
        .send(HttpRequest::get("/").header("op", "r").worker(1))
        .await
        .expect("served");
    assert_eq!(
        said(&sidecar, "sd:"),
        [
            "sd:get_missing=1",
            "sd:set_new=0",
            "sd:cas1=1",
            "sd:set_bad=8",
            "sd:set_good=0",
            "sd:cas2=2",
            "sd:set_missing_cas=0",
            "sd:read=0",
            "sd:read_first=98",
            "sd:read_cas=2"
        ]
    );
    assert_eq!(sidecar.shared_data_get("k"), Some((b"b".to_vec(), 2)));
    assert_eq!(sidecar.shared_data_get("k2"), Some((b"z".to_vec(), 3)));
    let usage = sidecar.shared_data_usage();
    assert_eq!(
        (usage.entries, usage.key_bytes, usage.value_bytes),
        (2, 3, 2),
        "k=b and k2=z"
    );
}

/// Shared queues: the last root context to register a queue gets
/// on_queue_ready on its own worker; enqueue works from any worker; an
/// empty queue is EMPTY; an unknown queue is NOT_FOUND.
#[tokio::test(flavor = "multi_thread")]
async fn shared_queue_notifies_the_last_registrant_on_its_worker() {
    let mut g = Guest::new();
    let (op, q, missing, empty, item) = (g.s("op"), g.s("q"), g.s("missing"), g.s(""), g.s("item"));
    let n: Vec<String> = [
        "sq:token",
        "sq:resolve",
        "sq:enqueue",
        "sq:resolve_missing",
        "sq:ready_ctx",
        "sq:dequeue",
        "sq:size",
        "sq:dequeue_again",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (local $op i32)
             (local.set $op (call $header_byte {op}))
             (if (i32.eq (local.get $op) (i32.const 103)) (then
               (drop (call $register_queue {q} (i32.const 520)))
               (call $say {n0} (i32.load (i32.const 520)))))
             (if (i32.eq (local.get $op) (i32.const 101)) (then
               (call $say {n1} (call $resolve_queue {empty} {q} (i32.const 520)))
               (call $say {n2} (call $enqueue (i32.load (i32.const 520)) {item}))
               (call $say {n3} (call $resolve_queue {empty} {missing} (i32.const 520)))))
             (i32.const 0))
           (func (export "proxy_on_queue_ready") (param $c i32) (param $t i32)
             (call $say {n4} (local.get $c))
             (call $say {n5} (call $dequeue (local.get $t) (i32.const 512) (i32.const 516)))
             (call $say {n6} (i32.load (i32.const 516)))
             (call $say {n7} (call $dequeue (local.get $t) (i32.const 512) (i32.const 516))))"#,
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
        .send(HttpRequest::get("/").header("op", "g").worker(1))
        .await
        .expect("served");
    sidecar
        .send(HttpRequest::get("/").header("op", "e").worker(0))
        .await
        .expect("served");
    sidecar.sync().await.expect("synced");
    let ready: Vec<(String, String)> = said_by(&sidecar, "sq:ready_ctx");
    assert_eq!(
        ready,
        [("worker 1".to_string(), "sq:ready_ctx=1".to_string())]
    );
    // Workers run in parallel: compare each worker's own sequence.
    let of = |vm: &str| -> Vec<String> {
        said_by(&sidecar, "sq:")
            .into_iter()
            .filter(|(v, _)| v == vm)
            .map(|(_, m)| m)
            .collect()
    };
    assert_eq!(
        of("worker 1"),
        [
            "sq:token=1",
            "sq:ready_ctx=1",
            "sq:dequeue=0",
            "sq:size=4",
            "sq:dequeue_again=7"
        ]
    );
    assert_eq!(
        of("worker 0"),
        ["sq:resolve=0", "sq:enqueue=0", "sq:resolve_missing=1"]
    );
    // Worker 0 registers last: it now gets the notifications.
    sidecar
        .send(HttpRequest::get("/").header("op", "g").worker(0))
        .await
        .expect("served");
    assert!(sidecar.enqueue("", "q", b"from-test"));
    sidecar.sync().await.expect("synced");
    let ready: Vec<String> = said_by(&sidecar, "sq:ready_ctx")
        .into_iter()
        .map(|(vm, _)| vm)
        .collect();
    assert_eq!(ready, ["worker 1", "worker 0"]);
}

/// One timer per root context: the first tick comes one period after it is
/// set, the next one period after the previous; a period of 0 disables it.
#[tokio::test(flavor = "multi_thread")]
async fn timer_ticks_one_period_apart_and_zero_disables() {
    let mut g = Guest::new();
    let tick = g.s("tm:tick");
    let g = g.func(&format!(
        r#"(global $n (mut i32) (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 1000))) (i32.const 1))
           (func (export "proxy_on_tick") (param i32)
             (global.set $n (i32.add (global.get $n) (i32.const 1)))
             (call $say {tick} (global.get $n))
             (if (i32.eq (global.get $n) (i32.const 3)) (then (drop (call $set_tick (i32.const 0))))))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        clock: SimClock::frozen_at(T0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    let ticks = |s: &Sidecar| said(s, "tm:tick").len();
    for (advance_ms, expected) in [(999, 0), (1, 1), (1000, 2), (500, 2), (500, 3), (5000, 3)] {
        sidecar
            .advance(Duration::from_millis(advance_ms))
            .await
            .expect("advanced");
        assert_eq!(ticks(&sidecar), expected, "after advancing {advance_ms} ms");
    }
}

/// Metric ids carry the type in their low 2 bits; a counter increment <= 0 is
/// BAD_ARGUMENT; record sets a gauge; get on a histogram is BAD_ARGUMENT; an
/// unknown type is BAD_ARGUMENT.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_envoys_rules() {
    let mut g = Guest::new();
    let (c, ga, h) = (g.s("c"), g.s("g"), g.s("h"));
    let n: Vec<String> = [
        "mt:cid",
        "mt:gid",
        "mt:hid",
        "mt:bad_type",
        "mt:inc_neg",
        "mt:inc_zero",
        "mt:inc",
        "mt:record_gauge",
        "mt:get_gauge",
        "mt:gauge",
        "mt:get_hist",
        "mt:record_hist",
        "mt:get_counter",
        "mt:counter",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    let g = g.func(&format!(
        r#"(global $c (mut i32) (i32.const 0)) (global $g (mut i32) (i32.const 0)) (global $h (mut i32) (i32.const 0))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $define_metric (i32.const 0) {c} (i32.const 520))) (global.set $c (i32.load (i32.const 520)))
             (drop (call $define_metric (i32.const 1) {ga} (i32.const 520))) (global.set $g (i32.load (i32.const 520)))
             (drop (call $define_metric (i32.const 2) {h} (i32.const 520))) (global.set $h (i32.load (i32.const 520)))
             (call $say {n0} (global.get $c)) (call $say {n1} (global.get $g)) (call $say {n2} (global.get $h))
             (call $say {n3} (call $define_metric (i32.const 3) {c} (i32.const 520)))
             (call $say {n4} (call $increment_metric (global.get $c) (i64.const -1)))
             (call $say {n5} (call $increment_metric (global.get $c) (i64.const 0)))
             (call $say {n6} (call $increment_metric (global.get $c) (i64.const 5)))
             (call $say {n7} (call $record_metric (global.get $g) (i64.const 42)))
             (call $say {n8} (call $get_metric (global.get $g) (i32.const 528)))
             (call $say {n9} (i32.wrap_i64 (i64.load (i32.const 528))))
             (call $say {n10} (call $get_metric (global.get $h) (i32.const 528)))
             (call $say {n11} (call $record_metric (global.get $h) (i64.const 7)))
             (call $say {n12} (call $get_metric (global.get $c) (i32.const 528)))
             (call $say {n13} (i32.wrap_i64 (i64.load (i32.const 528))))
             (i32.const 0))"#,
        n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3], n4 = n[4], n5 = n[5], n6 = n[6], n7 = n[7], n8 = n[8],
        n9 = n[9], n10 = n[10], n11 = n[11], n12 = n[12], n13 = n[13]
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    sidecar.send(HttpRequest::get("/")).await.expect("served");
    let said = said(&sidecar, "mt:");
    let id = |name: &str| -> u32 {
        said.iter()
            .find_map(|m| m.strip_prefix(&format!("mt:{name}=")))
            .and_then(|v| v.parse().ok())
            .expect("id")
    };
    assert_eq!((id("cid") & 3, id("gid") & 3, id("hid") & 3), (0, 1, 2));
    assert_eq!(
        said[3..],
        [
            "mt:bad_type=2",
            "mt:inc_neg=2",
            "mt:inc_zero=2",
            "mt:inc=0",
            "mt:record_gauge=0",
            "mt:get_gauge=0",
            "mt:gauge=42",
            "mt:get_hist=2",
            "mt:record_hist=0",
            "mt:get_counter=0",
            "mt:counter=5"
        ]
    );
    assert_eq!(sidecar.metrics().get("c"), Some(&5));
    assert_eq!(sidecar.metrics().get("g"), Some(&42));
    assert_eq!(sidecar.metric("h"), Some(MetricValue::Histogram(vec![7])));
}

/// proxy_get_current_time_nanoseconds reads the sidecar clock, so tests can
/// jump ahead (token and grant expiry).
#[tokio::test(flavor = "multi_thread")]
async fn current_time_follows_the_sim_clock() {
    let mut g = Guest::new();
    let now = g.s("now");
    let g = g.func(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $now (i32.const 528)))
             (drop (call $set_property {now} (i32.const 528) (i32.const 8)))
             (i32.const 0))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        clock: SimClock::frozen_at(T0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    let read = |r: &consent_sim::HttpResponse| r.filter_state.get("wasm.now").cloned();
    let first = sidecar.send(HttpRequest::get("/")).await.expect("served");
    assert_eq!(read(&first), Some(T0.to_le_bytes().to_vec()));
    sidecar
        .advance(Duration::from_secs(3600))
        .await
        .expect("advanced");
    let later = sidecar.send(HttpRequest::get("/")).await.expect("served");
    assert_eq!(
        read(&later),
        Some((T0 + 3_600_000_000_000).to_le_bytes().to_vec())
    );
}
