//! gRPC streams and calls and HTTP calls, bridged to loopback servers.

use std::time::Duration;

use consent_sim::{EnvoyGrpc, GrpcService, Sidecar, SidecarConfig, SimClock};
use prost::Message;

use crate::support::servers::{EchoGrpc, serve_grpc, serve_http};
use crate::support::{Guest, pairs, said};

/// Waits (real time) until a log line starting with `prefix` appears.
async fn wait_for(sidecar: &Sidecar, prefix: &str) {
    for _ in 0..250 {
        if !said(sidecar, prefix).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no log line starting with {prefix:?}; logs: {:?}",
        said(sidecar, "")
    );
}

fn service(cluster: &str, authority: &str) -> Vec<u8> {
    GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.into(),
            authority: authority.into(),
        }),
    }
    .encode_to_vec()
}

/// A guest that opens a stream to `upstream` on its first tick and reports
/// every gRPC callback. With `cancel_on_message` it cancels on the first
/// message; otherwise it sends "ping" and "pong" and half-closes.
fn grpc_guest(upstream: &[u8], method: &str, cancel_on_message: bool) -> Guest {
    let mut g = Guest::new();
    let (up, svc, m, md) = (
        g.s(upstream),
        g.s("test.Echo"),
        g.s(method),
        g.s(pairs(&[("x-md", "m1")])),
    );
    let (ping, pong, nope, unknown, x_init) = (
        g.s("ping"),
        g.s("pong"),
        g.s("nope"),
        g.s(service("missing", "")),
        g.s("x-init"),
    );
    let n: Vec<String> = [
        "gs:open",
        "gs:open_nope",
        "gs:open_unknown",
        "gs:send_unknown",
        "gs:send",
        "gs:close",
        "g:init",
        "g:init_x",
        "g:msg",
        "g:trailers",
        "g:close",
        "g:status",
        "g:ctx",
        "g:cancel",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    let on_message = if cancel_on_message {
        format!(
            "(call $say {} (call $grpc_cancel (global.get $token)))",
            n[13]
        )
    } else {
        String::new()
    };
    g.func(&format!(
        r#"(global $token (mut i32) (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 100))) (i32.const 1))
           (func (export "proxy_on_tick") (param i32)
             (if (global.get $token) (then (return)))
             (call $say {n1} (call $grpc_stream {nope} {svc} {m} {md} (i32.const 520)))
             (call $say {n2} (call $grpc_stream {unknown} {svc} {m} {md} (i32.const 520)))
             (call $say {n3} (call $grpc_send (i32.const 1000) {ping} (i32.const 0)))
             (call $say {n0} (call $grpc_stream {up} {svc} {m} {md} (i32.const 520)))
             (global.set $token (i32.load (i32.const 520)))
             (call $say {n4} (call $grpc_send (global.get $token) {ping} (i32.const 0)))
             (if (i32.eqz (i32.const {cancel})) (then
               (drop (call $grpc_send (global.get $token) {pong} (i32.const 0)))
               (call $say {n5} (call $grpc_close (global.get $token))))))
           (func (export "proxy_on_grpc_receive_initial_metadata") (param $c i32) (param $t i32) (param $n i32)
             (call $say {n6} (i32.ne (local.get $n) (i32.const 0)))
             (call $say {n7} (call $header (i32.const 4) {x_init})))
           (func (export "proxy_on_grpc_receive") (param $c i32) (param $t i32) (param $size i32)
             (call $say {n8} (local.get $size))
             (drop (call $get_buffer (i32.const 5) (i32.const 0) (local.get $size) (i32.const 512) (i32.const 516)))
             (call $print (i32.load (i32.const 512)) (i32.load (i32.const 516)))
             {on_message})
           (func (export "proxy_on_grpc_receive_trailing_metadata") (param $c i32) (param $t i32) (param $n i32)
             (call $print {n9}))
           (func (export "proxy_on_grpc_close") (param $c i32) (param $t i32) (param $s i32)
             (call $say {n12} (local.get $c))
             (call $say {n10} (local.get $s))
             (drop (call $get_status (i32.const 600) (i32.const 512) (i32.const 516)))
             (call $say {n11} (i32.load (i32.const 600)))
             (if (i32.load (i32.const 516)) (then (call $print (i32.load (i32.const 512)) (i32.load (i32.const 516))))))"#,
        n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3], n4 = n[4], n5 = n[5], n6 = n[6], n7 = n[7], n8 = n[8],
        n9 = n[9], n10 = n[10], n11 = n[11], n12 = n[12],
        cancel = i32::from(cancel_on_message),
    ))
}

async fn grpc_sidecar(guest: Guest, url: String) -> Sidecar {
    Sidecar::start(SidecarConfig {
        workers: 1,
        clusters: vec![("echo".into(), url)],
        clock: SimClock::frozen_at(0),
        ..SidecarConfig::new(guest.build())
    })
    .await
    .expect("starts")
}

/// proxy_grpc_stream with a serialized GrpcService reaches the cluster with its
/// authority and metadata; callbacks come to the root context in Envoy's
/// order (initial metadata, one receive per message, trailing metadata,
/// close) and get_status works in close. A cluster name that does not parse
/// and does not exist is PARSE_FAILURE; a parsed service naming an unknown
/// cluster is BAD_ARGUMENT; sending on an unknown stream is NOT_FOUND.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_stream_is_bridged_to_a_loopback_server() {
    let server = EchoGrpc::default();
    let url = serve_grpc(server.clone()).await;
    let sidecar = grpc_sidecar(
        grpc_guest(&service("echo", "echo.local"), "Echo", false),
        url,
    )
    .await;
    sidecar
        .advance(Duration::from_millis(100))
        .await
        .expect("tick");
    wait_for(&sidecar, "g:close").await;
    assert_eq!(
        said(&sidecar, "gs:"),
        [
            "gs:open_nope=4",
            "gs:open_unknown=2",
            "gs:send_unknown=1",
            "gs:open=0",
            "gs:send=0",
            "gs:close=0"
        ]
    );
    let callbacks: Vec<String> = said(&sidecar, "")
        .into_iter()
        .filter(|m| m.starts_with("g:") || m.starts_with("echo:"))
        .collect();
    assert_eq!(
        callbacks,
        [
            "g:init=1",
            "g:init_x=0",
            "g:msg=9",
            "echo:ping",
            "g:msg=9",
            "echo:pong",
            "g:trailers",
            "g:ctx=1",
            "g:close=0",
            "g:status=0"
        ]
    );
    let seen = server.seen();
    assert_eq!(seen.paths, ["/test.Echo/Echo"]);
    assert_eq!(seen.authorities, ["echo.local"]);
    assert!(seen.metadata.contains(&("x-md".into(), "m1".into())));
    assert_eq!(seen.messages, [b"ping".to_vec(), b"pong".to_vec()]);
    assert!(seen.half_closed, "grpc_close half-closes");
}

/// A plain cluster name is accepted when the cluster exists; a server error
/// arrives as on_grpc_close with its status and message.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_stream_by_cluster_name_reports_server_status() {
    let server = EchoGrpc::default();
    let url = serve_grpc(server.clone()).await;
    let sidecar = grpc_sidecar(grpc_guest(b"echo", "Fail", false), url).await;
    sidecar
        .advance(Duration::from_millis(100))
        .await
        .expect("tick");
    wait_for(&sidecar, "g:status").await;
    assert!(said(&sidecar, "gs:open=").contains(&"gs:open=0".to_string()));
    assert_eq!(
        said(&sidecar, "g:close"),
        ["g:close=7"],
        "PERMISSION_DENIED"
    );
    assert_eq!(said(&sidecar, "g:status"), ["g:status=7"]);
    assert_eq!(
        said(&sidecar, "nope"),
        ["nope"],
        "the status message is readable in close"
    );
    assert_eq!(
        server.seen().authorities,
        ["echo"],
        "a cluster name is its own authority"
    );
}

/// grpc_cancel resets the stream: no more callbacks, and the server sees the
/// stream go away.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_cancel_resets_and_stops_callbacks() {
    let server = EchoGrpc::default();
    let url = serve_grpc(server.clone()).await;
    let sidecar = grpc_sidecar(grpc_guest(b"echo", "Drip", true), url).await;
    sidecar
        .advance(Duration::from_millis(100))
        .await
        .expect("tick");
    wait_for(&sidecar, "g:cancel").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(said(&sidecar, "g:cancel"), ["g:cancel=0"]);
    assert_eq!(said(&sidecar, "g:msg").len(), 1, "no messages after cancel");
    assert!(
        said(&sidecar, "g:close").is_empty(),
        "no close after cancel"
    );
    for _ in 0..50 {
        if server.seen().cancelled {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the server never saw the stream reset");
}

/// A stream opened by the canary dies with it: the server sees it reset.
#[tokio::test(flavor = "multi_thread")]
async fn streams_opened_by_the_canary_die_with_it() {
    let server = EchoGrpc::default();
    let url = serve_grpc(server.clone()).await;
    let mut g = Guest::new();
    let (up, svc, m, md) = (g.s("echo"), g.s("test.Echo"), g.s("Drip"), g.s(pairs(&[])));
    let g = g.func(&format!(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32)
             (drop (call $grpc_stream {up} {svc} {m} {md} (i32.const 520)))
             (i32.const 1))"#
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        clusters: vec![("echo".into(), url)],
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    // The canary's stream is reset when the canary goes, or never gets as far
    // as the server; either way only the worker's stream stays open.
    for _ in 0..250 {
        if !server.seen().paths.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = server.seen();
    let survived = seen.paths.len() - usize::from(seen.cancelled);
    assert_eq!(survived, 1, "only the worker's stream is alive: {seen:?}");
    drop(sidecar);
}

/// proxy_http_call reaches the cluster; on_http_call_response brings the
/// headers (with :status) and the body. An unknown cluster or a request
/// without :path is BAD_ARGUMENT.
#[tokio::test(flavor = "multi_thread")]
async fn http_call_is_bridged_to_a_loopback_server() {
    let (url, heads) = serve_http("hello").await;
    let mut g = Guest::new();
    let (web, nope) = (g.s("web"), g.s("nope"));
    let good = g.s(pairs(&[
        (":method", "GET"),
        (":path", "/hello"),
        (":authority", "web.local"),
        ("x-c", "1"),
    ]));
    let no_path = g.s(pairs(&[(":method", "GET"), (":authority", "web.local")]));
    let (empty, status) = (g.s(""), g.s(":status"));
    let n: Vec<String> = [
        "hc:call",
        "hc:unknown",
        "hc:no_path",
        "hc:headers",
        "hc:body",
        "hc:ctx",
    ]
    .iter()
    .map(|s| g.s(s))
    .collect();
    let g = g.func(&format!(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 100))) (i32.const 1))
           (global $done (mut i32) (i32.const 0))
           (func (export "proxy_on_tick") (param i32)
             (if (global.get $done) (then (return)))
             (global.set $done (i32.const 1))
             (call $say {n1} (call $http_call {nope} {good} {empty} {empty} (i32.const 5000) (i32.const 520)))
             (call $say {n2} (call $http_call {web} {no_path} {empty} {empty} (i32.const 5000) (i32.const 520)))
             (call $say {n0} (call $http_call {web} {good} {empty} {empty} (i32.const 5000) (i32.const 520))))
           (func (export "proxy_on_http_call_response") (param $c i32) (param $t i32) (param $h i32) (param $b i32) (param $tr i32)
             (call $say {n5} (local.get $c))
             (call $say {n3} (i32.ne (local.get $h) (i32.const 0)))
             (call $say {n4} (local.get $b))
             (drop (call $get_buffer (i32.const 4) (i32.const 0) (local.get $b) (i32.const 512) (i32.const 516)))
             (call $print (i32.load (i32.const 512)) (i32.load (i32.const 516)))
             (drop (call $header (i32.const 6) {status}))
             (call $print (i32.load (i32.const 512)) (i32.load (i32.const 516))))"#,
        n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3], n4 = n[4], n5 = n[5]
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        clusters: vec![("web".into(), url)],
        clock: SimClock::frozen_at(0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    sidecar
        .advance(Duration::from_millis(100))
        .await
        .expect("tick");
    wait_for(&sidecar, "hello").await;
    let said_all = said(&sidecar, "");
    let tail: Vec<&String> = said_all
        .iter()
        .filter(|m| m.starts_with("hc:") || *m == "hello" || *m == "200")
        .collect();
    assert_eq!(
        tail,
        [
            "hc:unknown=2",
            "hc:no_path=2",
            "hc:call=0",
            "hc:ctx=1",
            "hc:headers=1",
            "hc:body=5",
            "hello",
            "200"
        ]
    );
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.starts_with("get /hello http/1.1"), "{head}");
    assert!(
        head.contains("host: web.local") && head.contains("x-c: 1"),
        "{head}"
    );
}

/// proxy_grpc_call: one request, then on_grpc_receive with the response on the
/// root context; call tokens are odd (stream tokens even) and a successful
/// call gets no on_grpc_close.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_call_delivers_one_response_to_the_root_context() {
    let server = EchoGrpc::default();
    let url = serve_grpc(server.clone()).await;
    let mut g = Guest::new();
    let (up, svc, m, md, msg) = (
        g.s("echo"),
        g.s("test.Echo"),
        g.s("Echo"),
        g.s(pairs(&[])),
        g.s("hi"),
    );
    let n: Vec<String> = ["gc:call", "gc:odd", "gc:ctx", "gc:size", "gc:close"]
        .iter()
        .map(|s| g.s(s))
        .collect();
    let g = g.func(&format!(
        r#"(global $done (mut i32) (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 100))) (i32.const 1))
           (func (export "proxy_on_tick") (param i32)
             (if (global.get $done) (then (return)))
             (global.set $done (i32.const 1))
             (call $say {n0} (call $grpc_call {up} {svc} {m} {md} {msg} (i32.const 5000) (i32.const 520)))
             (call $say {n1} (i32.and (i32.load (i32.const 520)) (i32.const 1))))
           (func (export "proxy_on_grpc_receive") (param $c i32) (param $t i32) (param $size i32)
             (call $say {n2} (local.get $c))
             (call $say {n3} (local.get $size))
             (drop (call $get_buffer (i32.const 5) (i32.const 0) (local.get $size) (i32.const 512) (i32.const 516)))
             (call $print (i32.load (i32.const 512)) (i32.load (i32.const 516))))
           (func (export "proxy_on_grpc_close") (param i32 i32 i32) (call $say {n4} (local.get 2)))"#,
        n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3], n4 = n[4]
    ));
    let sidecar = grpc_sidecar(g, url).await;
    sidecar
        .advance(Duration::from_millis(100))
        .await
        .expect("tick");
    wait_for(&sidecar, "echo:hi").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines: Vec<String> = said(&sidecar, "")
        .into_iter()
        .filter(|m| m.starts_with("gc:") || m.starts_with("echo:"))
        .collect();
    assert_eq!(
        lines,
        ["gc:call=0", "gc:odd=1", "gc:ctx=1", "gc:size=7", "echo:hi"]
    );
    assert_eq!(server.seen().messages, [b"hi".to_vec()]);
}

/// An HTTP call that fails (nothing listens) still calls
/// on_http_call_response, with no headers, body or trailers, and get_status
/// says BROKEN_CONNECTION ("reset").
#[tokio::test(flavor = "multi_thread")]
async fn failed_http_call_reports_an_empty_response() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let mut g = Guest::new();
    let (web, empty) = (g.s("web"), g.s(""));
    let headers = g.s(pairs(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "web"),
    ]));
    let n: Vec<String> = ["hf:call", "hf:counts", "hf:status"]
        .iter()
        .map(|s| g.s(s))
        .collect();
    let g = g.func(&format!(
        r#"(global $done (mut i32) (i32.const 0))
           (func (export "proxy_on_configure") (param i32 i32) (result i32) (drop (call $set_tick (i32.const 100))) (i32.const 1))
           (func (export "proxy_on_tick") (param i32)
             (if (global.get $done) (then (return)))
             (global.set $done (i32.const 1))
             (call $say {n0} (call $http_call {web} {headers} {empty} {empty} (i32.const 2000) (i32.const 520))))
           (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
             (call $say {n1} (i32.add (i32.add (local.get 2) (local.get 3)) (local.get 4)))
             (drop (call $get_status (i32.const 600) (i32.const 512) (i32.const 516)))
             (call $say {n2} (i32.load (i32.const 600)))
             (call $print (i32.load (i32.const 512)) (i32.load (i32.const 516))))"#,
        n0 = n[0], n1 = n[1], n2 = n[2]
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        clusters: vec![("web".into(), dead)],
        clock: SimClock::frozen_at(0),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("starts");
    sidecar
        .advance(Duration::from_millis(100))
        .await
        .expect("tick");
    wait_for(&sidecar, "reset").await;
    let lines: Vec<String> = said(&sidecar, "")
        .into_iter()
        .filter(|m| m.starts_with("hf:") || m == "reset")
        .collect();
    assert_eq!(lines, ["hf:call=0", "hf:counts=0", "hf:status=11", "reset"]);
}
