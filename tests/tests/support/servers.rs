//! Loopback servers for callout tests: a raw-bytes gRPC service and a tiny
//! HTTP/1.1 server.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use consent_sim::RawCodec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::Stream;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

/// What the gRPC server saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub paths: Vec<String>,
    pub authorities: Vec<String>,
    pub metadata: Vec<(String, String)>,
    pub messages: Vec<Vec<u8>>,
    pub half_closed: bool,
    pub cancelled: bool,
}

/// `test.Echo`: `Echo` answers each message with `echo:` + message, sets
/// `x-init` initial metadata and ends OK when the client half-closes; `Fail`
/// answers PERMISSION_DENIED after the first message; `Drip` sends a message
/// every 20 ms until the client goes away.
#[derive(Clone, Default)]
pub struct EchoGrpc {
    pub seen: Arc<Mutex<Seen>>,
}

impl EchoGrpc {
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl NamedService for EchoGrpc {
    const NAME: &'static str = "test.Echo";
}

type Outbound = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct Handler {
    seen: Arc<Mutex<Seen>>,
    method: String,
}

impl StreamingService<Bytes> for Handler {
    type Response = Bytes;
    type ResponseStream = Outbound;
    type Future = BoxFuture<Response<Outbound>, Status>;

    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let seen = self.seen.clone();
        let method = self.method.clone();
        {
            let mut s = seen.lock().unwrap();
            for kv in req.metadata().iter() {
                if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                    s.metadata
                        .push((k.to_string(), v.to_str().unwrap_or("").to_string()));
                }
            }
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            if method == "Drip" {
                let mut n = 0u32;
                loop {
                    n += 1;
                    if tx.send(Ok(Bytes::from(format!("drip{n}")))).is_err() {
                        seen.lock().unwrap().cancelled = true;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.is_closed() {
                        seen.lock().unwrap().cancelled = true;
                        return;
                    }
                }
            }
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        seen.lock().unwrap().messages.push(m.to_vec());
                        if method == "Fail" {
                            let _ = tx.send(Err(Status::permission_denied("nope")));
                            return;
                        }
                        let _ = tx.send(Ok(Bytes::from([b"echo:".as_slice(), &m].concat())));
                    }
                    Ok(None) => {
                        seen.lock().unwrap().half_closed = true;
                        return;
                    }
                    Err(_) => {
                        seen.lock().unwrap().cancelled = true;
                        return;
                    }
                }
            }
        });
        let stream: Outbound = Box::pin(UnboundedReceiverStream::new(rx));
        let mut response = Response::new(stream);
        response
            .metadata_mut()
            .insert("x-init", "yes".parse().expect("ascii"));
        Box::pin(async move { Ok(response) })
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoGrpc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let seen = self.seen.clone();
        let path = req.uri().path().to_string();
        {
            let mut s = seen.lock().unwrap();
            s.paths.push(path.clone());
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            s.authorities.push(authority);
        }
        let method = path.rsplit('/').next().unwrap_or("").to_string();
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec);
            Ok(grpc.streaming(Handler { seen, method }, req).await)
        })
    }
}

/// Serves `svc` on a loopback port; returns its `http://127.0.0.1:port`.
pub async fn serve_grpc(svc: EchoGrpc) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// An HTTP/1.1 server answering every request with 200, header `x-up: 1` and
/// `body`; returns its URL and the request heads it received.
pub async fn serve_http(body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-up: 1\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), heads)
}
