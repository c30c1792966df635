//! Both APIs refuse calls without the right bearer token, and change nothing.

use consent_core::wire::v1;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_are_refused_on_both_apis() {
    let server = Server::start().await;
    let url = server.url();
    for token in [None, Some("wrong-token-0123456789"), Some(SIDECAR_TOKEN)] {
        let mut admin = admin_client(&url, token).await;
        let (c, _) = code(admin.create_grant(grant("g-1", &["labs"])).await);
        assert_eq!(c, Code::Unauthenticated, "{token:?}");
        let (c, _) = code(admin.list_grants(v1::ListGrantsRequest::default()).await);
        assert_eq!(c, Code::Unauthenticated);
    }
    for token in ["wrong-token-0123456789", ADMIN_TOKEN] {
        let refused = Sidecar::connect(&url, token, "node-a", &["labs"], 0, None).await;
        assert_eq!(
            refused.err().map(|s| s.code()),
            Some(Code::Unauthenticated),
            "{token}"
        );
    }
    // No header at all on the stream.
    let mut client = consent_control_plane::proto::sidecar_sync_client::SidecarSyncClient::new(
        channel(&url).await,
    );
    let hello = v1::SidecarMessage {
        msg: Some(v1::sidecar_message::Msg::Hello(v1::Hello {
            node_id: "node-x".into(),
            datasets: vec!["labs".into()],
            ..Default::default()
        })),
    };
    let (c, _) = code(client.stream(tokio_stream::iter(vec![hello])).await);
    assert_eq!(c, Code::Unauthenticated);

    let mut admin = server.admin().await;
    assert!(
        admin
            .list_grants(v1::ListGrantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .grants
            .is_empty()
    );
    let sidecars = admin
        .list_sidecars(v1::ListSidecarsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sidecars;
    assert!(sidecars.is_empty(), "{sidecars:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_ops_endpoints_answer() {
    let server = Server::start().await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(&server.url()).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "consent.v1.ConsentAdmin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let get = |path: &str| {
        let addr = server.ops;
        let path = path.to_owned();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let mut admin = server.admin().await;
    create(&mut admin, grant("g-1", &["labs"])).await;
    let mut sidecar = server.sidecar("node-a", &["labs"]).await;
    sidecar.expect_update().await;
    let metrics = get("/metrics").await;
    for needle in [
        "consentd_head_revision 2",
        "consentd_connected_streams 1",
        "consentd_sidecar_ack_lag_revisions{node_id=\"node-a\"}",
        "consentd_admin_requests_total{method=\"CreateGrant\",code=\"Ok\"} 1",
        "consentd_admin_request_duration_seconds_count{method=\"CreateGrant\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_verified_clients_and_refuses_plaintext() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
    let read = |name: &str| std::fs::read(format!("{fixtures}/{name}")).unwrap();
    let tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read("server.pem"), read("server.key")));
    let server = Server::start_tls(test_settings(), Some(tls)).await;

    let url = format!("https://localhost:{}", server.addr.port());
    let client_tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.pem")));
    let channel = Endpoint::from_shared(url)
        .unwrap()
        .tls_config(client_tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(Some(format!("Bearer {ADMIN_TOKEN}").parse().unwrap()));
    let mut admin =
        consent_control_plane::proto::consent_admin_client::ConsentAdminClient::with_interceptor(
            channel, bearer,
        );
    create(&mut admin, grant("g-1", &["labs"])).await;

    // Plaintext to the TLS port fails, and so does TLS to a client that does not trust the CA.
    let refused = |endpoint: Endpoint| async move {
        match endpoint.connect().await {
            Err(_) => true,
            Ok(channel) => {
                consent_control_plane::proto::consent_admin_client::ConsentAdminClient::new(channel)
                    .list_grants(v1::ListGrantsRequest::default())
                    .await
                    .is_err()
            }
        }
    };
    assert!(
        refused(Endpoint::from_shared(server.url()).unwrap()).await,
        "plaintext"
    );
    let untrusting = Endpoint::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new())
        .unwrap();
    assert!(refused(untrusting).await, "a client without the CA");
    server.stop().await;
}
