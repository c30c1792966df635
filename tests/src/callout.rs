//! gRPC calls and streams and HTTP calls, bridged to real servers over
//! loopback. The host calls run on the worker; the network side runs on the
//! sidecar's tokio runtime and posts events back to the worker that owns the
//! calling VM, where they are delivered to the root context.

use std::sync::mpsc::Sender;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::sync::mpsc::unbounded_channel;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use wasmtime::{Caller, Linker};

use crate::abi::{self, HostResult, Status, check_running, finish};
use crate::exchange::Headers;
use crate::hostcalls::host;
use crate::state::{Env, GrpcHandle, HostState, HttpCallHandle, HttpCallResponse};
use crate::worker::Job;

/// Something that happened on a gRPC call or stream.
#[derive(Debug, Clone)]
pub enum GrpcEvent {
    InitialMetadata(Headers),
    Message(Vec<u8>),
    TrailingMetadata(Headers),
    Close(u32, String),
}

/// `envoy.config.core.v3.GrpcService`, only the `envoy_grpc` target.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GrpcService {
    #[prost(message, optional, tag = "1")]
    pub envoy_grpc: Option<EnvoyGrpc>,
}

/// `envoy.config.core.v3.GrpcService.EnvoyGrpc`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    pub cluster_name: String,
    #[prost(string, tag = "2")]
    pub authority: String,
}

/// Where a callout goes: a cluster's URL and the `:authority` to send.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    authority: String,
}

/// Envoy's rule: parse as a serialized GrpcService; failing that, the bytes
/// are a cluster name that must exist (PARSE_FAILURE otherwise). A parsed
/// service whose cluster is unknown is a BAD_ARGUMENT.
fn grpc_target(env: &Env, upstream: &[u8]) -> Result<Target, Status> {
    match GrpcService::decode(upstream) {
        Ok(service) => {
            let target = service.envoy_grpc.ok_or(Status::BadArgument)?;
            let url = env
                .clusters
                .get(&target.cluster_name)
                .ok_or(Status::BadArgument)?;
            let authority = if target.authority.is_empty() {
                target.cluster_name.clone()
            } else {
                target.authority
            };
            Ok(Target {
                url: url.clone(),
                authority,
            })
        }
        Err(_) => {
            let name = String::from_utf8_lossy(upstream).into_owned();
            let url = env.clusters.get(&name).ok_or(Status::ParseFailure)?;
            Ok(Target {
                url: url.clone(),
                authority: name,
            })
        }
    }
}

/// Passes gRPC messages through as raw protobuf bytes; tonic adds and strips
/// the 5-byte frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

fn to_metadata(pairs: &Headers) -> MetadataMap {
    let mut md = MetadataMap::new();
    for (k, v) in pairs {
        if k.starts_with(':') {
            continue;
        }
        if k.ends_with("-bin") {
            if let Ok(key) = MetadataKey::from_bytes(k.as_bytes()) {
                md.append_bin(key, MetadataValue::from_bytes(v.as_bytes()));
            }
        } else if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(k.as_bytes()), v.parse()) {
            md.append(key, value);
        }
    }
    md
}

fn from_headers(h: &http::HeaderMap) -> Headers {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn connect(
    target: &Target,
) -> Result<tonic::client::Grpc<tonic::transport::Channel>, tonic::Status> {
    let origin: http::Uri = format!("http://{}", target.authority)
        .parse()
        .map_err(|e| tonic::Status::unavailable(format!("bad authority: {e}")))?;
    let endpoint = tonic::transport::Endpoint::from_shared(target.url.clone())
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?
        .origin(origin);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(tonic::client::Grpc::new(channel))
}

fn path(service: &str, method: &str) -> Result<http::uri::PathAndQuery, Status> {
    format!("/{service}/{method}")
        .parse()
        .map_err(|_| Status::BadArgument)
}

/// Delivers the end of a call that got an HTTP response with a gRPC error.
fn send_failure(send: &impl Fn(GrpcEvent), status: &tonic::Status) {
    send(GrpcEvent::TrailingMetadata(from_headers(
        &status.metadata().clone().into_headers(),
    )));
    send(GrpcEvent::Close(
        status.code() as u32,
        status.message().to_string(),
    ));
}

async fn run_stream(
    target: Target,
    path: http::uri::PathAndQuery,
    metadata: Headers,
    outbound: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    send: impl Fn(GrpcEvent),
) {
    let mut client = match connect(&target).await {
        Ok(c) => c,
        Err(s) => return send(GrpcEvent::Close(s.code() as u32, s.message().to_string())),
    };
    if let Err(e) = client.ready().await {
        return send(GrpcEvent::Close(14, e.to_string()));
    }
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(outbound));
    *request.metadata_mut() = to_metadata(&metadata);
    let response = match client.streaming(request, path, RawCodec).await {
        Ok(r) => r,
        Err(status) => {
            // A trailers-only answer: Envoy still reports (empty) initial metadata.
            send(GrpcEvent::InitialMetadata(Vec::new()));
            return send_failure(&send, &status);
        }
    };
    let (md, mut messages, _) = response.into_parts();
    let mut initial = vec![(":status".to_string(), "200".to_string())];
    initial.extend(from_headers(&md.into_headers()));
    send(GrpcEvent::InitialMetadata(initial));
    loop {
        match messages.message().await {
            Ok(Some(m)) => send(GrpcEvent::Message(m.to_vec())),
            Ok(None) => break,
            Err(status) => return send_failure(&send, &status),
        }
    }
    let trailers = messages
        .trailers()
        .await
        .ok()
        .flatten()
        .map(|t| from_headers(&t.into_headers()));
    send(GrpcEvent::TrailingMetadata(trailers.unwrap_or_default()));
    send(GrpcEvent::Close(0, String::new()));
}

async fn run_call(
    target: Target,
    path: http::uri::PathAndQuery,
    metadata: Headers,
    message: Vec<u8>,
    timeout: Option<Duration>,
    send: impl Fn(GrpcEvent),
) {
    let call = async {
        let mut client = connect(&target).await?;
        client
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(Bytes::from(message));
        *request.metadata_mut() = to_metadata(&metadata);
        client.unary(request, path, RawCodec).await
    };
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, call)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("timeout"))),
        None => call.await,
    };
    match result {
        Ok(r) => send(GrpcEvent::Message(r.into_inner().to_vec())),
        Err(s) => send(GrpcEvent::Close(s.code() as u32, s.message().to_string())),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run_http_call(
    url: String,
    headers: Headers,
    body: Vec<u8>,
) -> Result<HttpCallResponse, BoxError> {
    let uri: http::Uri = url.parse()?;
    let addr = uri
        .authority()
        .ok_or("cluster URL has no authority")?
        .to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut builder = http::Request::builder()
        .method(get(":method").as_str())
        .uri(get(":path"))
        .header("host", get(":authority"));
    for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        builder = builder.header(k, v);
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body)))?)
        .await?;
    let mut out = vec![(
        ":status".to_string(),
        response.status().as_u16().to_string(),
    )];
    out.extend(from_headers(response.headers()));
    let collected = response.into_body().collect().await?;
    let trailers = collected.trailers().map(from_headers).unwrap_or_default();
    Ok(HttpCallResponse {
        headers: out,
        body: collected.to_bytes().to_vec(),
        trailers,
    })
}

fn grpc_sender(jobs: Sender<Job>, token: u32) -> impl Fn(GrpcEvent) + Send + 'static {
    move |event| {
        // The worker may be gone (sidecar stopped); the event then has nowhere to go.
        let _ = jobs.send(Job::Grpc { token, event });
    }
}

struct GrpcArgs {
    upstream: Vec<u8>,
    service: String,
    method: String,
    metadata: Headers,
}

#[allow(clippy::too_many_arguments)] // the ABI's own signature
fn read_grpc_args(
    c: &mut Caller<'_, HostState>,
    up: (i32, i32),
    service: (i32, i32),
    method: (i32, i32),
    md: (i32, i32),
) -> HostResult<GrpcArgs> {
    let upstream = abi::read(c, up.0, up.1)?;
    let service = abi::read_string(c, service.0, service.1)?;
    let method = abi::read_string(c, method.0, method.1)?;
    let raw = abi::read(c, md.0, md.1)?;
    let metadata = abi::decode_pairs(&raw)?;
    Ok(GrpcArgs {
        upstream,
        service,
        method,
        metadata,
    })
}

fn start_grpc(
    c: &mut Caller<'_, HostState>,
    args: GrpcArgs,
    call: Option<(Vec<u8>, u32)>,
    token_ptr: i32,
) -> HostResult {
    let env = c.data().env.clone();
    let target = grpc_target(&env, &args.upstream)?;
    let path = path(&args.service, &args.method)?;
    let state = c.data_mut();
    let token = if call.is_some() {
        let t = state.next_grpc_call;
        state.next_grpc_call += 2;
        t
    } else {
        let t = state.next_grpc_stream;
        state.next_grpc_stream += 2;
        t
    };
    let send = grpc_sender(state.jobs.clone(), token);
    let (sender, task) = match call {
        Some((message, timeout_ms)) => {
            let timeout = (timeout_ms > 0).then(|| Duration::from_millis(u64::from(timeout_ms)));
            let task = env.runtime.spawn(run_call(
                target,
                path,
                args.metadata,
                message,
                timeout,
                send,
            ));
            (None, task)
        }
        None => {
            let (tx, rx) = unbounded_channel();
            (
                Some(tx),
                env.runtime
                    .spawn(run_stream(target, path, args.metadata, rx, send)),
            )
        }
    };
    let context_id = state.root_context_id;
    state.grpc.insert(
        token,
        GrpcHandle {
            context_id,
            sender,
            task: Some(task.abort_handle()),
            local_closed: false,
            remote_closed: false,
        },
    );
    abi::write_u32(c, token_ptr, token)
}

fn grpc_send(
    c: &mut Caller<'_, HostState>,
    token: u32,
    ptr: i32,
    len: i32,
    end: bool,
) -> HostResult {
    let message = abi::read(c, ptr, len)?;
    if token & 1 == 1 {
        return Err(Status::BadArgument.into());
    }
    let handle = c.data_mut().grpc.get_mut(&token).ok_or(Status::NotFound)?;
    if let Some(tx) = &handle.sender {
        let _ = tx.send(Bytes::from(message));
    }
    if end {
        handle.sender = None;
        handle.local_closed = true;
    }
    Ok(())
}

fn grpc_close(c: &mut Caller<'_, HostState>, token: u32, cancel: bool) -> HostResult {
    let grpc = &mut c.data_mut().grpc;
    let handle = grpc.get_mut(&token).ok_or(Status::NotFound)?;
    // Closing a unary call cancels it; closing a stream half-closes it.
    if cancel || token & 1 == 1 || handle.remote_closed {
        if let Some(h) = grpc.remove(&token)
            && let Some(t) = &h.task
            && (cancel || token & 1 == 1)
        {
            t.abort();
        }
        return Ok(());
    }
    handle.sender = None;
    handle.local_closed = true;
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the ABI's own signature
fn http_call(
    c: &mut Caller<'_, HostState>,
    up: (i32, i32),
    headers: (i32, i32),
    body: (i32, i32),
    _trailers: (i32, i32),
    timeout_ms: i32,
    token_ptr: i32,
) -> HostResult {
    let cluster = abi::read_string(c, up.0, up.1)?;
    let raw = abi::read(c, headers.0, headers.1)?;
    let headers: Headers = abi::decode_pairs(&raw)?
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let body = abi::read(c, body.0, body.1)?;
    if timeout_ms < 0 {
        return Err(Status::BadArgument.into());
    }
    let env = c.data().env.clone();
    let url = env
        .clusters
        .get(&cluster)
        .cloned()
        .ok_or(Status::BadArgument)?;
    for required in [":path", ":method", ":authority"] {
        if !headers.iter().any(|(k, _)| k == required) {
            return Err(Status::BadArgument.into());
        }
    }
    let state = c.data_mut();
    let token = state.next_http_call;
    state.next_http_call += 1;
    let jobs = state.jobs.clone();
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64));
    let task = env.runtime.spawn(async move {
        let call = run_http_call(url, headers, body);
        let response = match timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .ok()
                .and_then(Result::ok),
            None => call.await.ok(),
        };
        let _ = jobs.send(Job::HttpCall { token, response });
    });
    let context_id = state.root_context_id;
    state.http_calls.insert(
        token,
        HttpCallHandle {
            context_id,
            task: Some(task.abort_handle()),
        },
    );
    abi::write_u32(c, token_ptr, token)
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    host!(
        linker,
        "proxy_grpc_call",
        |c,
         up_ptr: i32,
         up_len: i32,
         svc_ptr: i32,
         svc_len: i32,
         m_ptr: i32,
         m_len: i32,
         md_ptr: i32,
         md_len: i32,
         msg_ptr: i32,
         msg_len: i32,
         timeout: i32,
         token_ptr: i32| {
            let args = read_grpc_args(
                &mut c,
                (up_ptr, up_len),
                (svc_ptr, svc_len),
                (m_ptr, m_len),
                (md_ptr, md_len),
            )?;
            let message = abi::read(&mut c, msg_ptr, msg_len)?;
            start_grpc(&mut c, args, Some((message, timeout as u32)), token_ptr)
        }
    );
    host!(
        linker,
        "proxy_grpc_stream",
        |c,
         up_ptr: i32,
         up_len: i32,
         svc_ptr: i32,
         svc_len: i32,
         m_ptr: i32,
         m_len: i32,
         md_ptr: i32,
         md_len: i32,
         token_ptr: i32| {
            let args = read_grpc_args(
                &mut c,
                (up_ptr, up_len),
                (svc_ptr, svc_len),
                (m_ptr, m_len),
                (md_ptr, md_len),
            )?;
            start_grpc(&mut c, args, None, token_ptr)
        }
    );
    host!(
        linker,
        "proxy_grpc_send",
        |c, token: i32, ptr: i32, len: i32, end: i32| {
            grpc_send(&mut c, token as u32, ptr, len, end != 0)
        }
    );
    host!(linker, "proxy_grpc_close", |c, token: i32| {
        grpc_close(&mut c, token as u32, false)
    });
    host!(linker, "proxy_grpc_cancel", |c, token: i32| {
        grpc_close(&mut c, token as u32, true)
    });
    host!(
        linker,
        "proxy_http_call",
        |c,
         up_ptr: i32,
         up_len: i32,
         h_ptr: i32,
         h_len: i32,
         b_ptr: i32,
         b_len: i32,
         t_ptr: i32,
         t_len: i32,
         timeout: i32,
         token_ptr: i32| {
            http_call(
                &mut c,
                (up_ptr, up_len),
                (h_ptr, h_len),
                (b_ptr, b_len),
                (t_ptr, t_len),
                timeout,
                token_ptr,
            )
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_cluster_name_does_not_parse_as_grpc_service() {
        assert!(GrpcService::decode(&b"consentd"[..]).is_err());
        assert!(GrpcService::decode(&b"outbound|9090||consentd.svc"[..]).is_err());
        let svc = GrpcService {
            envoy_grpc: Some(EnvoyGrpc {
                cluster_name: "c".into(),
                authority: "a".into(),
            }),
        };
        assert_eq!(
            GrpcService::decode(&svc.encode_to_vec()[..]).ok(),
            Some(svc)
        );
    }
}
