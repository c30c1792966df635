//! `env.proxy_*` host calls on HTTP streams: header maps, bodies, stream
//! control and local replies, with Envoy's rule that a map or body is
//! reachable only in its own phase.

use wasmtime::{Caller, Linker};

use crate::abi::{self, Fault, HostResult, MapType, Status, buffer, check_running, finish};
use crate::exchange::Headers;
use crate::hostcalls::host;
use crate::state::{HostState, LocalReply, Phase};

/// The map a call may read (`write == false`) or modify, or `None` when it is
/// not available in the current phase.
fn map_mut(state: &mut HostState, t: MapType, write: bool) -> Option<&mut Headers> {
    match t {
        MapType::GrpcInitialMetadata if !write => state.callback.grpc_initial_metadata.as_mut(),
        MapType::GrpcTrailingMetadata if !write => state.callback.grpc_trailing_metadata.as_mut(),
        MapType::HttpCallResponseHeaders if !write => state
            .callback
            .http_call_response
            .as_mut()
            .map(|r| &mut r.headers),
        MapType::HttpCallResponseTrailers if !write => state
            .callback
            .http_call_response
            .as_mut()
            .map(|r| &mut r.trailers),
        MapType::RequestHeaders
        | MapType::RequestTrailers
        | MapType::ResponseHeaders
        | MapType::ResponseTrailers => {
            let s = state.stream()?;
            // In on_log the maps are the access log's, read-only; request trailers are absent.
            let logging = s.phase == Phase::Log && !write;
            match t {
                MapType::RequestHeaders if s.phase == Phase::RequestHeaders || logging => {
                    Some(&mut s.request_headers)
                }
                MapType::RequestTrailers if s.phase == Phase::RequestTrailers => {
                    Some(&mut s.request_trailers)
                }
                MapType::ResponseHeaders if s.phase == Phase::ResponseHeaders || logging => {
                    Some(&mut s.response_headers)
                }
                MapType::ResponseTrailers if s.phase == Phase::ResponseTrailers || logging => {
                    Some(&mut s.response_trailers)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn map_type(t: i32) -> HostResult<MapType> {
    MapType::from_u32(t as u32).ok_or(Fault::Status(Status::BadArgument))
}

fn in_log_phase(state: &mut HostState) -> bool {
    state.stream().is_some_and(|s| s.phase == Phase::Log)
}

fn get_value(
    c: &mut Caller<'_, HostState>,
    t: i32,
    key_ptr: i32,
    key_len: i32,
    out_ptr: i32,
    out_len: i32,
) -> HostResult {
    let t = map_type(t)?;
    let key = abi::read_string(c, key_ptr, key_len)?.to_ascii_lowercase();
    let state = c.data_mut();
    let logging = in_log_phase(state);
    let value = match map_mut(state, t, false) {
        Some(map) => map
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .ok_or(Status::NotFound)?,
        None if logging => return Err(Status::NotFound.into()),
        // Requested map type is not available in this phase.
        None => return Err(Status::BadArgument.into()),
    };
    abi::copy_out(c, value.as_bytes(), out_ptr, out_len)
}

fn edit(c: &mut Caller<'_, HostState>, t: i32, f: impl FnOnce(&mut Headers)) -> HostResult {
    let t = map_type(t)?;
    let map = map_mut(c.data_mut(), t, true).ok_or(Status::BadArgument)?;
    f(map);
    Ok(())
}

/// The body a buffer call sees in this phase.
fn body_mut(state: &mut HostState, t: u32) -> Option<&mut Vec<u8>> {
    let s = state.stream()?;
    match t {
        buffer::REQUEST_BODY if s.phase == Phase::RequestBody => Some(&mut s.request_body),
        buffer::RESPONSE_BODY if s.phase == Phase::ResponseBody => Some(&mut s.response_body),
        _ => None,
    }
}

fn buffer_bytes(state: &mut HostState, t: u32) -> HostResult<Vec<u8>> {
    let found = match t {
        buffer::REQUEST_BODY | buffer::RESPONSE_BODY => body_mut(state, t).cloned(),
        buffer::HTTP_CALL_RESPONSE_BODY => state
            .callback
            .http_call_response
            .as_ref()
            .map(|r| r.body.clone()),
        buffer::GRPC_RECEIVE => state.callback.grpc_message.clone(),
        buffer::VM_CONFIGURATION => Some(state.env.vm_config.clone()),
        buffer::PLUGIN_CONFIGURATION if state.callback.configuring => {
            Some(state.env.plugin_config.clone())
        }
        // No network (TCP) filter streams in this host.
        buffer::DOWNSTREAM_DATA | buffer::UPSTREAM_DATA => None,
        _ => None,
    };
    found.ok_or(Fault::Status(Status::NotFound))
}

fn get_buffer(
    c: &mut Caller<'_, HostState>,
    t: i32,
    start: i32,
    max: i32,
    out_ptr: i32,
    out_len: i32,
) -> HostResult {
    let data = buffer_bytes(c.data_mut(), t as u32)?;
    let (start, max) = (start as u32 as usize, max as u32 as usize);
    if start > data.len() {
        return Err(Status::BadArgument.into());
    }
    let end = start.saturating_add(max).min(data.len());
    abi::copy_out(c, &data[start..end], out_ptr, out_len)
}

/// Envoy's `Buffer::copyFrom`: at 0 drain `len` then prepend; at or past the
/// end append; anything else is a bad argument.
fn set_buffer(
    c: &mut Caller<'_, HostState>,
    t: i32,
    start: i32,
    len: i32,
    ptr: i32,
    size: i32,
) -> HostResult {
    let data = abi::read(c, ptr, size)?;
    let body = body_mut(c.data_mut(), t as u32).ok_or(Status::NotFound)?;
    let (start, len) = (start as u32 as usize, len as u32 as usize);
    if start == 0 {
        let mut replaced = data;
        replaced.extend_from_slice(&body[len.min(body.len())..]);
        *body = replaced;
    } else if start >= body.len() {
        body.extend(data);
    } else {
        return Err(Status::BadArgument.into());
    }
    Ok(())
}

fn continue_stream(state: &mut HostState, stream_type: u32) -> HostResult {
    match stream_type {
        0 | 1 => {
            if let Some(s) = state.stream() {
                let applies = if stream_type == 0 {
                    s.phase.is_request()
                } else {
                    s.phase.is_response()
                };
                if applies {
                    s.resume = true;
                }
            }
            Ok(())
        }
        2 => Ok(()),
        3 => Err(Status::Unimplemented.into()),
        _ => Err(Status::BadArgument.into()),
    }
}

#[allow(clippy::too_many_arguments)] // the ABI's own signature
fn send_local_response(
    c: &mut Caller<'_, HostState>,
    status: i32,
    details_ptr: i32,
    details_len: i32,
    body_ptr: i32,
    body_len: i32,
    headers_ptr: i32,
    headers_len: i32,
) -> HostResult {
    let details = abi::read_string(c, details_ptr, details_len)?.replace(char::is_whitespace, "_");
    let body = abi::read(c, body_ptr, body_len)?;
    let raw = abi::read(c, headers_ptr, headers_len)?;
    let headers = abi::decode_pairs(&raw)?
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    // From a root context there is no stream to answer: Envoy ignores it.
    if let Some(s) = c.data_mut().stream() {
        s.local_reply = Some(LocalReply {
            status: status as u16,
            details,
            body,
            headers,
        });
    }
    Ok(())
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    host!(
        linker,
        "proxy_get_header_map_pairs",
        |c, t: i32, out_ptr: i32, out_len: i32| {
            let t = map_type(t)?;
            // An unavailable map reads as empty here (Envoy's getHeaderMapPairs).
            let data = map_mut(c.data_mut(), t, false)
                .map(|m| abi::encode_pairs(m))
                .unwrap_or_default();
            abi::copy_out(&mut c, &data, out_ptr, out_len)
        }
    );
    host!(
        linker,
        "proxy_set_header_map_pairs",
        |c, t: i32, ptr: i32, len: i32| {
            let raw = abi::read(&mut c, ptr, len)?;
            let pairs: Headers = abi::decode_pairs(&raw)?
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            edit(&mut c, t, |m| *m = pairs)
        }
    );
    host!(
        linker,
        "proxy_get_header_map_value",
        |c, t: i32, key_ptr: i32, key_len: i32, out_ptr: i32, out_len: i32| {
            get_value(&mut c, t, key_ptr, key_len, out_ptr, out_len)
        }
    );
    host!(
        linker,
        "proxy_replace_header_map_value",
        |c, t: i32, key_ptr: i32, key_len: i32, val_ptr: i32, val_len: i32| {
            let key = abi::read_string(&mut c, key_ptr, key_len)?.to_ascii_lowercase();
            let value = abi::read_string(&mut c, val_ptr, val_len)?;
            edit(&mut c, t, |m| {
                m.retain(|(k, _)| *k != key);
                m.push((key, value));
            })
        }
    );
    host!(
        linker,
        "proxy_add_header_map_value",
        |c, t: i32, key_ptr: i32, key_len: i32, val_ptr: i32, val_len: i32| {
            let key = abi::read_string(&mut c, key_ptr, key_len)?.to_ascii_lowercase();
            let value = abi::read_string(&mut c, val_ptr, val_len)?;
            edit(&mut c, t, |m| m.push((key, value)))
        }
    );
    host!(
        linker,
        "proxy_remove_header_map_value",
        |c, t: i32, key_ptr: i32, key_len: i32| {
            let key = abi::read_string(&mut c, key_ptr, key_len)?.to_ascii_lowercase();
            edit(&mut c, t, |m| m.retain(|(k, _)| *k != key))
        }
    );
    host!(
        linker,
        "proxy_get_header_map_size",
        |c, t: i32, out: i32| {
            let t = map_type(t)?;
            let map = map_mut(c.data_mut(), t, true).ok_or(Status::BadArgument)?;
            let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
            abi::write_u32(&mut c, out, size as u32)
        }
    );

    host!(
        linker,
        "proxy_get_buffer_bytes",
        |c, t: i32, start: i32, max: i32, out_ptr: i32, out_len: i32| {
            get_buffer(&mut c, t, start, max, out_ptr, out_len)
        }
    );
    host!(
        linker,
        "proxy_set_buffer_bytes",
        |c, t: i32, start: i32, len: i32, ptr: i32, size: i32| {
            set_buffer(&mut c, t, start, len, ptr, size)
        }
    );
    host!(
        linker,
        "proxy_get_buffer_status",
        |c, t: i32, len_ptr: i32, flags_ptr: i32| {
            let len = buffer_bytes(c.data_mut(), t as u32)?.len();
            abi::write_u32(&mut c, len_ptr, len as u32)?;
            abi::write_u32(&mut c, flags_ptr, 0)
        }
    );

    host!(linker, "proxy_continue_stream", |c, t: i32| {
        continue_stream(c.data_mut(), t as u32)
    });
    host!(linker, "proxy_continue_request", |c| {
        continue_stream(c.data_mut(), 0)
    });
    host!(linker, "proxy_continue_response", |c| {
        continue_stream(c.data_mut(), 1)
    });
    host!(linker, "proxy_close_stream", |c, t: i32| {
        match t {
            0 | 1 => {
                if let Some(s) = c.data_mut().stream() {
                    s.reset = true;
                }
                Ok(())
            }
            2 | 3 => Ok(()),
            _ => Err(Status::BadArgument.into()),
        }
    });
    host!(linker, "proxy_clear_route_cache", |c| {
        let _ = &mut c;
        Ok(())
    });
    host!(
        linker,
        "proxy_send_local_response",
        |c,
         status: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         _grpc_status: i32| {
            send_local_response(
                &mut c,
                status,
                details_ptr,
                details_len,
                body_ptr,
                body_len,
                headers_ptr,
                headers_len,
            )
        }
    );
    Ok(())
}
