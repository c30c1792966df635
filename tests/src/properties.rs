//! Properties (CEL attributes) as Envoy serializes them for `proxy_get_property`:
//! strings raw, ints 8-byte little-endian, bools one byte, times int64 ns,
//! maps in the header-pairs format, messages as serialized protobuf.

use crate::abi::{Status, encode_pairs};
use crate::state::{HostState, Stream};

/// `envoy.config.core.v3.Node`, only the fields the sim fills in.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
}

/// Serialized `xds.node` for a sidecar.
pub fn node_bytes(id: &str, cluster: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&Node {
        id: id.to_string(),
        cluster: cluster.to_string(),
    })
}

/// Splits a property path on NUL, ignoring a trailing terminator.
pub fn split_path(path: &[u8]) -> Vec<String> {
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    path.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn header<'a>(stream: &'a Stream, name: &str) -> Option<&'a str> {
    stream
        .request_headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn string(v: Option<&str>) -> Result<Vec<u8>, Status> {
    v.map(|s| s.as_bytes().to_vec()).ok_or(Status::NotFound)
}

/// Looks a property up for the effective context of `state`.
pub fn get(state: &HostState, path: &[u8]) -> Result<Vec<u8>, Status> {
    let parts = split_path(path);
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let env = &state.env;
    match parts.as_slice() {
        ["plugin_name"] => return Ok(env.plugin_name.as_bytes().to_vec()),
        ["plugin_root_id"] => return Ok(env.root_id.as_bytes().to_vec()),
        ["plugin_vm_id"] => return Ok(env.vm_id.as_bytes().to_vec()),
        ["xds", "node"] => return Ok(env.node.clone()),
        _ => {}
    }
    // Everything else needs a stream: a root context has no connection or request.
    let stream = state
        .streams
        .get(&state.effective_context)
        .ok_or(Status::NotFound)?;
    let meta = &stream.meta;
    match parts.as_slice() {
        ["connection", "mtls"] => Ok(vec![u8::from(meta.peer_identity.is_some())]),
        ["connection", "uri_san_peer_certificate"] => string(meta.peer_identity.as_deref()),
        ["source", "address"] => Ok(meta.source_address.as_bytes().to_vec()),
        ["source", "port"] => {
            let port: i64 = meta
                .source_address
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or(Status::NotFound)?;
            Ok(port.to_le_bytes().to_vec())
        }
        ["request", "path"] => string(header(stream, ":path")),
        ["request", "url_path"] => {
            string(header(stream, ":path").map(|p| p.split('?').next().unwrap_or(p)))
        }
        ["request", "method"] => string(header(stream, ":method")),
        ["request", "host"] => string(header(stream, ":authority")),
        ["request", "scheme"] => string(header(stream, ":scheme")),
        ["request", "id"] => Ok(meta.request_id.as_bytes().to_vec()),
        ["request", "time"] => Ok((meta.start_ns as i64).to_le_bytes().to_vec()),
        ["request", "headers"] => Ok(encode_pairs(&stream.request_headers)),
        ["request", "headers", name] => string(header(stream, name)),
        [top] => stream
            .filter_state
            .get(&format!("wasm.{top}"))
            .cloned()
            .ok_or(Status::NotFound),
        _ => Err(Status::NotFound),
    }
}

/// `proxy_set_property`: filter state of the current stream under `wasm.<path>`.
pub fn set(state: &mut HostState, path: &[u8], value: Vec<u8>) -> Result<(), Status> {
    let stream = state.stream().ok_or(Status::NotFound)?;
    let key = format!(
        "wasm.{}",
        String::from_utf8_lossy(path.strip_suffix(&[0]).unwrap_or(path))
    );
    stream.filter_state.insert(key, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_on_nul() {
        assert_eq!(split_path(b"request\0path"), vec!["request", "path"]);
        assert_eq!(split_path(b"plugin_name\0"), vec!["plugin_name"]);
    }
}
