//! The WASI preview1 subset Envoy provides (proxy-wasm-cpp-host `src/exports.cc`),
//! written by hand because wasmtime-wasi's set differs. A module importing any
//! other WASI function fails to load.

use rand::RngCore;
use wasmtime::{Caller, Linker};

use crate::abi::{self, Fault, HostResult};
use crate::shared::LogLevel;
use crate::state::HostState;

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOENT: i32 = 44;
const ERRNO_NOSYS: i32 = 52;
const ERRNO_NOTSUP: i32 = 58;
/// Largest `random_get` Envoy serves (`PROXY_WASM_HOST_MAX_WASM_RANDOM_GET_SIZE_BYTES`).
const MAX_RANDOM_GET: u32 = 64 * 1024;

/// Every WASI function name this host provides; anything else is refused at load.
pub const FUNCTIONS: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_seek",
    "fd_close",
    "fd_fdstat_get",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "random_get",
    "proc_exit",
    "path_open",
    "fd_prestat_get",
    "fd_prestat_dir_name",
];

/// WASI module names Envoy answers to.
pub const MODULES: &[&str] = &["wasi_snapshot_preview1", "wasi_unstable"];

/// A guest fault inside a WASI call is an errno, except a trap which unwinds.
fn errno(r: HostResult) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(ERRNO_SUCCESS),
        Err(Fault::Status(_)) => Ok(ERRNO_INVAL),
        Err(Fault::Trap(e)) => Err(e),
    }
}

fn fd_write(
    caller: &mut Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> HostResult<i32> {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return Ok(ERRNO_BADF),
    };
    let mut text = Vec::new();
    for i in 0..iovs_len.max(0) {
        let iov = abi::read(caller, iovs.wrapping_add(i * 8), 8)?;
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        text.extend(abi::read(caller, ptr, len)?);
    }
    abi::write_u32(caller, nwritten, text.len() as u32)?;
    let mut message = String::from_utf8_lossy(&text).into_owned();
    if message.ends_with('\n') {
        message.pop();
    }
    caller.data().log(level, message);
    Ok(ERRNO_SUCCESS)
}

/// `KEY=VALUE\0` strings from the VM's configured environment.
fn environ(caller: &Caller<'_, HostState>) -> Vec<Vec<u8>> {
    caller
        .data()
        .env
        .env_vars
        .iter()
        .map(|(k, v)| format!("{k}={v}\0").into_bytes())
        .collect()
}

fn environ_get(caller: &mut Caller<'_, HostState>, environ_ptr: i32, buf: i32) -> HostResult {
    let mut at = buf;
    for (i, entry) in environ(caller).iter().enumerate() {
        abi::write_u32(caller, environ_ptr.wrapping_add(i as i32 * 4), at as u32)?;
        abi::write(caller, at, entry)?;
        at = at.wrapping_add(entry.len() as i32);
    }
    Ok(())
}

fn clock_time_get(caller: &mut Caller<'_, HostState>, id: i32, out: i32) -> HostResult<i32> {
    let clock = &caller.data().env.clock;
    let now = match id {
        0 => clock.now_ns(),
        1 => clock.monotonic_ns(),
        _ => return Ok(ERRNO_NOTSUP),
    };
    abi::write_u64(caller, out, now)?;
    Ok(ERRNO_SUCCESS)
}

fn random_get(caller: &mut Caller<'_, HostState>, buf: i32, len: i32) -> HostResult<i32> {
    if len as u32 > MAX_RANDOM_GET {
        return Ok(ERRNO_INVAL);
    }
    let mut bytes = vec![0u8; len as u32 as usize];
    rand::thread_rng().fill_bytes(&mut bytes);
    abi::write(caller, buf, &bytes)?;
    Ok(ERRNO_SUCCESS)
}

fn value(r: HostResult<i32>) -> wasmtime::Result<i32> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => errno(Err(e)),
    }
}

/// Installs Envoy's WASI functions under each WASI module name.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    for &m in MODULES {
        linker.func_wrap(
            m,
            "fd_write",
            |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, n: i32, out: i32| {
                value(fd_write(&mut c, fd, iovs, n, out))
            },
        )?;
        linker.func_wrap(
            m,
            "fd_read",
            |_: Caller<'_, HostState>, _: i32, _: i32, _: i32, _: i32| ERRNO_NOSYS,
        )?;
        linker.func_wrap(
            m,
            "fd_seek",
            |_: Caller<'_, HostState>, _: i32, _: i64, _: i32, _: i32| ERRNO_SUCCESS,
        )?;
        linker.func_wrap(m, "fd_close", |_: Caller<'_, HostState>, _: i32| {
            ERRNO_SUCCESS
        })?;
        linker.func_wrap(
            m,
            "fd_fdstat_get",
            |mut c: Caller<'_, HostState>, fd: i32, out: i32| {
                if fd != 1 && fd != 2 {
                    return Ok(ERRNO_BADF);
                }
                // filetype CHARACTER_DEVICE, flags APPEND, no rights.
                let mut stat = [0u8; 24];
                stat[0] = 2;
                stat[2] = 1;
                errno(abi::write(&mut c, out, &stat))
            },
        )?;
        linker.func_wrap(
            m,
            "environ_sizes_get",
            |mut c: Caller<'_, HostState>, count: i32, size: i32| {
                let env = environ(&c);
                let total: usize = env.iter().map(Vec::len).sum();
                errno(
                    abi::write_u32(&mut c, count, env.len() as u32)
                        .and_then(|()| abi::write_u32(&mut c, size, total as u32)),
                )
            },
        )?;
        linker.func_wrap(
            m,
            "environ_get",
            |mut c: Caller<'_, HostState>, ptrs: i32, buf: i32| {
                errno(environ_get(&mut c, ptrs, buf))
            },
        )?;
        linker.func_wrap(
            m,
            "args_sizes_get",
            |mut c: Caller<'_, HostState>, count: i32, size: i32| {
                errno(
                    abi::write_u32(&mut c, count, 0).and_then(|()| abi::write_u32(&mut c, size, 0)),
                )
            },
        )?;
        linker.func_wrap(m, "args_get", |_: Caller<'_, HostState>, _: i32, _: i32| {
            ERRNO_SUCCESS
        })?;
        linker.func_wrap(
            m,
            "clock_time_get",
            |mut c: Caller<'_, HostState>, id: i32, _precision: i64, out: i32| {
                value(clock_time_get(&mut c, id, out))
            },
        )?;
        linker.func_wrap(
            m,
            "random_get",
            |mut c: Caller<'_, HostState>, buf: i32, len: i32| value(random_get(&mut c, buf, len)),
        )?;
        linker.func_wrap(m, "proc_exit", |c: Caller<'_, HostState>, code: i32| {
            c.data()
                .log(LogLevel::Error, format!("wasi proc_exit({code})"));
        })?;
        linker.func_wrap(
            m,
            "path_open",
            |_: Caller<'_, HostState>,
             _: i32,
             _: i32,
             _: i32,
             _: i32,
             _: i32,
             _: i64,
             _: i64,
             _: i32,
             _: i32| { ERRNO_NOENT },
        )?;
        linker.func_wrap(
            m,
            "fd_prestat_get",
            |_: Caller<'_, HostState>, _: i32, _: i32| ERRNO_BADF,
        )?;
        linker.func_wrap(
            m,
            "fd_prestat_dir_name",
            |_: Caller<'_, HostState>, _: i32, _: i32, _: i32| ERRNO_NOSYS,
        )?;
    }
    Ok(())
}
