//! The HTTP side of the test API: requests sent through the sidecar, what the
//! simulated upstream receives, and what the client gets back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Header pairs in order; keys are lower-case as Envoy stores them.
pub type Headers = Vec<(String, String)>;

fn find<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

/// A downstream request, built fluently:
/// `HttpRequest::get("/p").header("x", "y").peer_identity("spiffe://...")`.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    /// URI SAN of the mTLS peer certificate; `None` means plaintext.
    pub peer_identity: Option<String>,
    pub source_address: String,
    /// Worker to run on; `None` picks one round-robin.
    pub worker: Option<usize>,
}

impl HttpRequest {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.to_string(),
            path: path.to_string(),
            authority: "service.local".to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
            peer_identity: None,
            source_address: "10.0.0.2:45678".to_string(),
            worker: None,
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Self {
        Self::new("POST", path).body(body)
    }

    /// Adds a header; the key is lower-cased as Envoy's header maps do.
    pub fn header(mut self, key: &str, value: &str) -> Self {
        self.headers
            .push((key.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn trailer(mut self, key: &str, value: &str) -> Self {
        self.trailers
            .push((key.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn authority(mut self, host: &str) -> Self {
        self.authority = host.to_string();
        self
    }

    /// Sends the request over mTLS with this URI SAN (a SPIFFE id).
    pub fn peer_identity(mut self, uri_san: &str) -> Self {
        self.peer_identity = Some(uri_san.to_string());
        self
    }

    pub fn source_address(mut self, addr: &str) -> Self {
        self.source_address = addr.to_string();
        self
    }

    pub fn worker(mut self, index: usize) -> Self {
        self.worker = Some(index);
        self
    }
}

/// What the upstream saw when the filter let the request through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// All headers including `:method`, `:path`, `:authority`, after the filter's edits.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

impl UpstreamRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
}

/// An upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

impl UpstreamResponse {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
        }
    }

    pub fn header(mut self, key: &str, value: &str) -> Self {
        self.headers
            .push((key.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

/// A simulated upstream: called on the worker thread for each request that
/// passes the filter.
pub type Upstream = Arc<dyn Fn(&UpstreamRequest) -> UpstreamResponse + Send + Sync>;

/// The default upstream: 200, echoing the request body, with the path it saw.
pub fn echo_upstream() -> Upstream {
    Arc::new(|req: &UpstreamRequest| {
        let mut resp =
            UpstreamResponse::new(200).header("content-type", "application/octet-stream");
        if let Some(path) = req.header(":path") {
            resp = resp.header("x-echo-path", path);
        }
        resp.body(req.body.clone())
    })
}

/// What the client received, plus what the test may inspect about the stream.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Response headers without `:status`.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    /// What the upstream received; `None` when the response is a local reply.
    pub upstream_request: Option<UpstreamRequest>,
    /// Response code details of a local reply (e.g. `wasm_fail_stream`, or
    /// what the filter passed to `send_local_response`).
    pub details: Option<String>,
    /// The stream was reset (`proxy_close_stream`) instead of answered.
    pub reset: bool,
    /// Filter state written with `proxy_set_property`, keyed as Envoy keys it
    /// (`wasm.` + path), as an access log would see it.
    pub filter_state: BTreeMap<String, Vec<u8>>,
    /// The worker that served the request.
    pub worker: usize,
    /// Wall time spent inside the filter's callbacks for this stream.
    pub guest_time: GuestTime,
}

/// Wall time inside the guest for one stream, host calls it made included:
/// what the filter costs per request, without the host's own dispatch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestTime {
    /// `proxy_on_request_headers`, where the filter decides.
    pub request_headers: Duration,
    /// Every callback of the stream, from context create to delete.
    pub total: Duration,
    /// `proxy_*` host calls made from `proxy_on_request_headers`.
    pub request_headers_host_calls: u64,
    /// `proxy_*` host calls made from every callback of the stream.
    pub host_calls: u64,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
