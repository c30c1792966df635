//! `env.proxy_*` host calls for logging, time, timers, properties, shared data,
//! shared queues, metrics and context switching. Each is one `func_wrap`.

use wasmtime::{Caller, Linker};

use crate::abi::{self, Fault, HostResult, Status, check_running, finish};
use crate::properties;
use crate::shared::{LogLevel, MetricKind, MetricValue};
use crate::state::{HostState, Timer};

/// Defines `env.<name>` returning a status word. The body may use `?` on
/// `HostResult`; a trap unwinds the guest, any other fault becomes the status.
/// Calls not in `$startup_ok` trap while the module is starting.
macro_rules! host {
    ($linker:expr, $name:literal, |$c:ident $(, $arg:ident : $ty:ty)*| $body:block) => {
        $linker.func_wrap(
            "env",
            $name,
            |mut $c: Caller<'_, HostState> $(, $arg: $ty)*| -> wasmtime::Result<i32> {
                $c.data_mut().host_calls += 1;
                let r: HostResult = (|| {
                    check_running(&$c, $name)?;
                    $body
                })();
                finish(r)
            },
        )?;
    };
}
pub(crate) use host;

fn log(c: &mut Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> HostResult {
    let level = LogLevel::from_u32(level as u32).ok_or(Status::BadArgument)?;
    let message = abi::read_string(c, ptr, len)?;
    c.data().log(level, message);
    Ok(())
}

fn metric_kind(id: u32) -> Option<MetricKind> {
    match id & 3 {
        0 => Some(MetricKind::Counter),
        1 => Some(MetricKind::Gauge),
        2 => Some(MetricKind::Histogram),
        _ => None,
    }
}

fn metric_name(c: &Caller<'_, HostState>, id: u32) -> HostResult<String> {
    c.data()
        .metric_ids
        .get(&id)
        .map(|(_, name)| name.clone())
        .ok_or(Fault::Status(Status::NotFound))
}

fn increment_metric(c: &mut Caller<'_, HostState>, id: u32, offset: i64) -> HostResult {
    let kind = metric_kind(id).ok_or(Status::BadArgument)?;
    if kind == MetricKind::Histogram {
        return Err(Status::BadArgument.into());
    }
    let name = metric_name(c, id)?;
    if kind == MetricKind::Counter && offset <= 0 {
        return Err(Status::BadArgument.into());
    }
    c.data().env.metrics.update(&name, |m| match m {
        MetricValue::Counter(v) => *v = v.saturating_add(offset as u64),
        MetricValue::Gauge(v) if offset >= 0 => *v = v.saturating_add(offset as u64),
        MetricValue::Gauge(v) => *v = v.saturating_sub(offset.unsigned_abs()),
        MetricValue::Histogram(_) => {}
    });
    Ok(())
}

fn record_metric(c: &mut Caller<'_, HostState>, id: u32, value: u64) -> HostResult {
    metric_kind(id).ok_or(Status::NotFound)?;
    let name = metric_name(c, id)?;
    // Envoy adds to a counter, sets a gauge and records a histogram sample.
    c.data().env.metrics.update(&name, |m| match m {
        MetricValue::Counter(v) => *v = v.saturating_add(value),
        MetricValue::Gauge(v) => *v = value,
        MetricValue::Histogram(s) => s.push(value),
    });
    Ok(())
}

fn get_metric(c: &mut Caller<'_, HostState>, id: u32, out: i32) -> HostResult {
    let kind = metric_kind(id).ok_or(Status::BadArgument)?;
    if kind == MetricKind::Histogram {
        return Err(Status::BadArgument.into());
    }
    let name = metric_name(c, id)?;
    let value = c
        .data()
        .env
        .metrics
        .get(&name)
        .map(|m| m.value())
        .ok_or(Status::NotFound)?;
    abi::write_u64(c, out, value)
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // Logging is the one proxy-wasm family allowed during start-up.
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            c.data_mut().host_calls += 1;
            finish(log(&mut c, level, ptr, len))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Caller<'_, HostState>, out: i32| {
            c.data_mut().host_calls += 1;
            let level = c.data().env.log_level as u32;
            finish(abi::write_u32(&mut c, out, level))
        },
    )?;

    host!(
        linker,
        "proxy_get_current_time_nanoseconds",
        |c, out: i32| {
            let now = c.data().env.clock.now_ns();
            abi::write_u64(&mut c, out, now)
        }
    );
    host!(
        linker,
        "proxy_set_tick_period_milliseconds",
        |c, period: i32| {
            let period_ns = u64::from(period as u32) * 1_000_000;
            let state = c.data_mut();
            state.timer = (period_ns > 0).then(|| Timer {
                period_ns,
                next_ns: state.env.clock.monotonic_ns() + period_ns,
            });
            Ok(())
        }
    );

    host!(
        linker,
        "proxy_get_property",
        |c, path_ptr: i32, path_len: i32, out_ptr: i32, out_len: i32| {
            let path = abi::read(&mut c, path_ptr, path_len)?;
            let value = properties::get(c.data(), &path)?;
            abi::copy_out(&mut c, &value, out_ptr, out_len)
        }
    );
    host!(
        linker,
        "proxy_set_property",
        |c, path_ptr: i32, path_len: i32, val_ptr: i32, val_len: i32| {
            let path = abi::read(&mut c, path_ptr, path_len)?;
            let value = abi::read(&mut c, val_ptr, val_len)?;
            Ok(properties::set(c.data_mut(), &path, value)?)
        }
    );

    host!(
        linker,
        "proxy_get_shared_data",
        |c, key_ptr: i32, key_len: i32, out_ptr: i32, out_len: i32, cas_ptr: i32| {
            let key = abi::read_string(&mut c, key_ptr, key_len)?;
            let env = c.data().env.clone();
            let (value, cas) = env
                .shared_data
                .get(&env.vm_id, &key)
                .ok_or(Status::NotFound)?;
            abi::copy_out(&mut c, &value, out_ptr, out_len)?;
            abi::write_u32(&mut c, cas_ptr, cas)
        }
    );
    host!(
        linker,
        "proxy_set_shared_data",
        |c, key_ptr: i32, key_len: i32, val_ptr: i32, val_len: i32, cas: i32| {
            let key = abi::read_string(&mut c, key_ptr, key_len)?;
            let value = abi::read(&mut c, val_ptr, val_len)?;
            let env = c.data().env.clone();
            Ok(env.shared_data.set(&env.vm_id, &key, value, cas as u32)?)
        }
    );

    host!(
        linker,
        "proxy_register_shared_queue",
        |c, name_ptr: i32, name_len: i32, token_ptr: i32| {
            let name = abi::read_string(&mut c, name_ptr, name_len)?;
            let state = c.data();
            // on_queue_ready goes to the root context, even if a stream registered.
            let token = state.env.queues.register(
                &state.env.vm_id,
                &name,
                state.root_context_id,
                state.jobs.clone(),
            );
            abi::write_u32(&mut c, token_ptr, token)
        }
    );
    host!(
        linker,
        "proxy_resolve_shared_queue",
        |c, vm_ptr: i32, vm_len: i32, name_ptr: i32, name_len: i32, token_ptr: i32| {
            let vm_id = abi::read_string(&mut c, vm_ptr, vm_len)?;
            let name = abi::read_string(&mut c, name_ptr, name_len)?;
            let token = c
                .data()
                .env
                .queues
                .resolve(&vm_id, &name)
                .ok_or(Status::NotFound)?;
            abi::write_u32(&mut c, token_ptr, token)
        }
    );
    host!(
        linker,
        "proxy_enqueue_shared_queue",
        |c, token: i32, ptr: i32, len: i32| {
            let value = abi::read(&mut c, ptr, len)?;
            Ok(c.data().env.queues.enqueue(token as u32, value)?)
        }
    );
    host!(
        linker,
        "proxy_dequeue_shared_queue",
        |c, token: i32, out_ptr: i32, out_len: i32| {
            let value = c.data().env.queues.dequeue(token as u32)?;
            abi::copy_out(&mut c, &value, out_ptr, out_len)
        }
    );

    host!(
        linker,
        "proxy_define_metric",
        |c, kind: i32, name_ptr: i32, name_len: i32, id_ptr: i32| {
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Err(Status::BadArgument.into()),
            };
            let name = abi::read_string(&mut c, name_ptr, name_len)?;
            let state = c.data_mut();
            state.env.metrics.define(kind, &name);
            // Envoy's ids step by 4 so the low two bits keep the type.
            let slot = &mut state.next_metric[kind as usize];
            *slot += 4;
            let id = *slot;
            state.metric_ids.insert(id, (kind, name));
            abi::write_u32(&mut c, id_ptr, id)
        }
    );
    host!(
        linker,
        "proxy_increment_metric",
        |c, id: i32, offset: i64| { increment_metric(&mut c, id as u32, offset) }
    );
    host!(linker, "proxy_record_metric", |c, id: i32, value: i64| {
        record_metric(&mut c, id as u32, value as u64)
    });
    host!(linker, "proxy_get_metric", |c, id: i32, out: i32| {
        get_metric(&mut c, id as u32, out)
    });

    host!(linker, "proxy_set_effective_context", |c, id: i32| {
        let id = id as u32;
        let state = c.data_mut();
        if !state.is_root(id) && !state.streams.contains_key(&id) {
            return Err(Status::BadArgument.into());
        }
        state.effective_context = id;
        Ok(())
    });
    host!(linker, "proxy_done", |c| {
        let _ = &mut c;
        Ok(())
    });
    host!(
        linker,
        "proxy_call_foreign_function",
        |c, _a: i32, _b: i32, _d: i32, _e: i32, _f: i32, _g: i32| {
            let _ = &mut c;
            Err(Status::NotFound.into())
        }
    );
    host!(
        linker,
        "proxy_get_status",
        |c, code_ptr: i32, msg_ptr: i32, msg_len: i32| {
            let (code, message) = c.data().callback.status.clone();
            abi::write_u32(&mut c, code_ptr, code)?;
            abi::copy_out(&mut c, message.as_bytes(), msg_ptr, msg_len)
        }
    );
    Ok(())
}
