//! Proxy-wasm ABI 0.2.1 vocabulary and guest-memory plumbing shared by every host call.

use wasmtime::{AsContextMut, Caller, Val};

use crate::state::HostState;

/// Status codes returned by host calls (`WasmResult` in proxy-wasm-cpp-host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

/// Header map types of `proxy_*_header_map_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            4 => Self::GrpcInitialMetadata,
            5 => Self::GrpcTrailingMetadata,
            6 => Self::HttpCallResponseHeaders,
            7 => Self::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Buffer types of `proxy_get_buffer_bytes`.
pub mod buffer {
    pub const REQUEST_BODY: u32 = 0;
    pub const RESPONSE_BODY: u32 = 1;
    pub const DOWNSTREAM_DATA: u32 = 2;
    pub const UPSTREAM_DATA: u32 = 3;
    pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
    pub const GRPC_RECEIVE: u32 = 5;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
}

/// Envoy's limits on a serialized header map (`include/proxy-wasm/limits.h`).
pub const MAX_PAIRS: usize = 1024;
pub const MAX_PAIRS_BYTES: usize = 1 << 20;

/// Why a host call could not complete: a status for the guest, or a trap.
#[derive(Debug)]
pub enum Fault {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for Fault {
    fn from(s: Status) -> Self {
        Fault::Status(s)
    }
}

impl From<wasmtime::Error> for Fault {
    fn from(e: wasmtime::Error) -> Self {
        Fault::Trap(e)
    }
}

pub type HostResult<T = ()> = Result<T, Fault>;

/// Turns the outcome of a host call body into what the guest sees: a status
/// word, or a trap that unwinds the guest.
pub fn finish(r: HostResult) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(Status::Ok as i32),
        Err(Fault::Status(s)) => Ok(s as i32),
        Err(Fault::Trap(e)) => Err(e),
    }
}

/// Serializes header pairs in proxy-wasm's map format: u32 count, then
/// (u32 key_len, u32 value_len) per pair, then each key and value followed by NUL.
pub fn encode_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Parses a serialized map coming from the guest; anything malformed or over
/// Envoy's limits is a bad argument rather than a host panic.
pub fn decode_pairs(data: &[u8]) -> Result<Vec<(String, String)>, Status> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.len() > MAX_PAIRS_BYTES {
        return Err(Status::BadArgument);
    }
    let word = |at: usize| -> Result<usize, Status> {
        let b = data.get(at..at + 4).ok_or(Status::BadArgument)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    if count > MAX_PAIRS {
        return Err(Status::BadArgument);
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut take = |len: usize| -> Result<String, Status> {
        let end = at.checked_add(len).ok_or(Status::BadArgument)?;
        let bytes = data.get(at..end).ok_or(Status::BadArgument)?;
        if data.get(end) != Some(&0) {
            return Err(Status::BadArgument);
        }
        at = end + 1;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    };
    let mut pairs = Vec::with_capacity(count);
    for (kl, vl) in sizes {
        let k = take(kl)?;
        let v = take(vl)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

fn memory(caller: &Caller<'_, HostState>) -> HostResult<wasmtime::Memory> {
    caller
        .data()
        .memory
        .ok_or(Fault::Status(Status::InvalidMemoryAccess))
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    let bytes = mem
        .data(&*caller)
        .get(ptr..end)
        .ok_or(Status::InvalidMemoryAccess)?;
    Ok(bytes.to_vec())
}

/// Reads a guest string; invalid UTF-8 is replaced rather than trusted.
pub fn read_string(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> HostResult<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

pub fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> HostResult {
    let mem = memory(caller)?;
    mem.write(&mut *caller, ptr as u32 as usize, bytes)
        .map_err(|_| Fault::Status(Status::InvalidMemoryAccess))
}

pub fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

pub fn write_u64(caller: &mut Caller<'_, HostState>, ptr: i32, v: u64) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

/// Hands data to the guest the way Envoy does: memory from the guest's own
/// allocator, pointer and size written at `ptr_ptr`/`size_ptr`; an empty value
/// is `0/0` and allocates nothing.
pub fn copy_out(
    caller: &mut Caller<'_, HostState>,
    data: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    if data.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let ptr = allocate(caller, data.len())?;
    write(caller, ptr, data)?;
    write_u32(caller, ptr_ptr, ptr as u32)?;
    write_u32(caller, size_ptr, data.len() as u32)
}

/// Calls the guest allocator (`malloc`, else `proxy_on_memory_allocate`).
pub fn allocate(caller: &mut Caller<'_, HostState>, size: usize) -> HostResult<i32> {
    let alloc = caller.data().allocator.ok_or(Status::InvalidMemoryAccess)?;
    let mut out = [Val::I32(0)];
    alloc.call(caller.as_context_mut(), &[Val::I32(size as i32)], &mut out)?;
    match &out[0] {
        Val::I32(0) => Err(Status::InvalidMemoryAccess.into()),
        Val::I32(p) => Ok(*p),
        _ => Err(Status::InvalidMemoryAccess.into()),
    }
}

/// Proxy-wasm functions other than logging trap while the module starts up,
/// as in proxy-wasm-cpp-host's restricted start-up callback.
pub fn check_running(caller: &Caller<'_, HostState>, name: &str) -> HostResult {
    if caller.data().starting {
        return Err(Fault::Trap(wasmtime::Error::msg(format!(
            "{name} is not allowed while the module starts up"
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs = vec![
            (":path".to_string(), "/a".to_string()),
            ("x".into(), "".into()),
        ];
        let enc = encode_pairs(&pairs);
        assert_eq!(&enc[..4], &2u32.to_le_bytes());
        assert_eq!(decode_pairs(&enc).unwrap(), pairs);
    }

    #[test]
    fn truncated_pairs_are_bad_argument() {
        let enc = encode_pairs(&[("k", "v")]);
        assert_eq!(
            decode_pairs(&enc[..enc.len() - 1]),
            Err(Status::BadArgument)
        );
        let too_many = (MAX_PAIRS as u32 + 1).to_le_bytes();
        assert_eq!(decode_pairs(&too_many), Err(Status::BadArgument));
    }
}
