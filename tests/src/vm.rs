//! One proxy-wasm VM: a wasmtime `Store` + `Instance` with its own linear
//! memory, loaded and started as proxy-wasm-cpp-host does, and the calls into
//! the guest's `proxy_on_*` callbacks.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use wasmtime::{Engine, Func, Instance, Linker, Module, Store, Val, ValType};

use crate::error::SimError;
use crate::shared::LogLevel;
use crate::state::{Env, HostState, VmRole};
use crate::worker::Job;
use crate::{callout, hostcalls, hostcalls_http, wasi};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(Engine::default)
}

/// Compiles a module once per process: tests start many sidecars from the
/// same filter, and compiling it is the slow part.
pub fn compile(bytes: &[u8]) -> Result<Module, SimError> {
    static CACHE: OnceLock<Mutex<HashMap<Vec<u8>, Module>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(m) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(bytes)
    {
        return Ok(m.clone());
    }
    let module = Module::new(engine(), bytes).map_err(|e| SimError::Compile(format!("{e:#}")))?;
    check_exports(&module)?;
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(bytes.to_vec(), module.clone());
    Ok(module)
}

fn check_exports(module: &Module) -> Result<(), SimError> {
    if module.get_export("proxy_abi_version_0_2_1").is_none() {
        return Err(SimError::MissingAbiVersion);
    }
    Ok(())
}

fn linker() -> Result<Linker<HostState>, SimError> {
    let mut linker = Linker::new(engine());
    let add = |r: wasmtime::Result<()>| r.map_err(|e| SimError::Instantiate(format!("{e:#}")));
    add(wasi::add_to_linker(&mut linker))?;
    add(hostcalls::add_to_linker(&mut linker))?;
    add(hostcalls_http::add_to_linker(&mut linker))?;
    add(callout::add_to_linker(&mut linker))?;
    Ok(linker)
}

/// A loaded and started VM.
pub struct Vm {
    pub store: Store<HostState>,
    instance: Instance,
}

impl Vm {
    /// Instantiates `module`, refusing imports Envoy lacks, finds the
    /// allocator and runs the start-up functions with proxy calls restricted.
    pub fn start(
        module: &Module,
        env: Arc<Env>,
        role: VmRole,
        jobs: Sender<Job>,
    ) -> Result<Vm, SimError> {
        let mut store = Store::new(engine(), HostState::new(env, role, jobs));
        let linker = linker()?;
        for import in module.imports() {
            if linker
                .get(&mut store, import.module(), import.name())
                .is_err()
            {
                return Err(SimError::UnsupportedImport {
                    module: import.module().to_string(),
                    name: import.name().to_string(),
                });
            }
        }
        let instance = linker
            .instantiate(&mut store, module)
            .map_err(|e| SimError::Instantiate(format!("{e:#}")))?;
        let memory = instance.get_memory(&mut store, "memory");
        let allocator = instance
            .get_func(&mut store, "malloc")
            .or_else(|| instance.get_func(&mut store, "proxy_on_memory_allocate"))
            .ok_or(SimError::MissingAllocator)?;
        store.data_mut().memory = memory;
        store.data_mut().allocator = Some(allocator);
        let mut vm = Vm { store, instance };
        vm.run_start_up().map_err(|e| SimError::StartFailed {
            vm: role.to_string(),
            message: format!("{e:#}"),
        })?;
        Ok(vm)
    }

    fn func(&mut self, name: &str) -> Option<Func> {
        self.instance.get_func(&mut self.store, name)
    }

    /// `_initialize` then `main`/`__main_void` if exported, else `_start`.
    fn run_start_up(&mut self) -> wasmtime::Result<()> {
        self.store.data_mut().starting = true;
        let initialize = self.func("_initialize");
        let main = self.func("main").or_else(|| self.func("__main_void"));
        let start = self.func("_start");
        let order: Vec<Func> = match (initialize, main) {
            (Some(i), m) => std::iter::once(i).chain(m).collect(),
            (None, Some(m)) => vec![m],
            (None, None) => start.into_iter().collect(),
        };
        let mut result = Ok(());
        for f in order {
            if let Err(e) = self.call_raw(f, &[]) {
                result = Err(e);
                break;
            }
        }
        self.store.data_mut().starting = false;
        result.map(|_| ())
    }

    /// Calls `f`, zero-filling any parameters beyond `args` (`main(argc, argv)`).
    fn call_raw(&mut self, f: Func, args: &[i32]) -> wasmtime::Result<Option<i64>> {
        let ty = f.ty(&self.store);
        let params: Vec<Val> = ty
            .params()
            .enumerate()
            .map(|(i, t)| {
                let v = args.get(i).copied().unwrap_or(0);
                match t {
                    ValType::I64 => Val::I64(i64::from(v as u32)),
                    _ => Val::I32(v),
                }
            })
            .collect();
        let mut results: Vec<Val> = ty.results().map(|_| Val::I32(0)).collect();
        f.call(&mut self.store, &params, &mut results)?;
        Ok(results
            .first()
            .and_then(|v| v.i32().map(i64::from).or_else(|| v.i64())))
    }

    /// Runs the guest callback `name` for `context`. `Ok(None)` when the module
    /// does not export it. A trap marks the VM failed for good.
    pub fn call(
        &mut self,
        context: u32,
        name: &str,
        args: &[i32],
    ) -> Result<Option<i64>, SimError> {
        let role = self.store.data().role.to_string();
        if self.store.data().failed {
            return Err(SimError::Trap {
                vm: role,
                callback: name.to_string(),
                message: "VM failed earlier".into(),
            });
        }
        let Some(f) = self.func(name) else {
            return Ok(None);
        };
        let state = self.store.data_mut();
        let saved = (state.current_context, state.effective_context);
        state.current_context = context;
        state.effective_context = context;
        let calls_before = self.store.data().host_calls;
        let started = Instant::now();
        let r = self.call_raw(f, args);
        let spent = started.elapsed();
        let calls = self.store.data().host_calls - calls_before;
        let state = self.store.data_mut();
        (state.current_context, state.effective_context) = saved;
        if let Some(stream) = state.streams.get_mut(&context) {
            stream.guest_time.total += spent;
            stream.guest_time.host_calls += calls;
            if name == "proxy_on_request_headers" {
                stream.guest_time.request_headers += spent;
                stream.guest_time.request_headers_host_calls += calls;
            }
        }
        r.map_err(|e| {
            let message = format!("{e:#}");
            state.failed = true;
            state.log(
                LogLevel::Critical,
                format!("wasm trap in {name}: {message}"),
            );
            SimError::Trap {
                vm: role,
                callback: name.to_string(),
                message,
            }
        })
    }

    pub fn failed(&self) -> bool {
        self.store.data().failed
    }

    pub fn state(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    /// Creates the root context and runs `on_vm_start` then `on_configure`;
    /// either returning false rejects the configuration.
    pub fn configure_root(&mut self) -> Result<(), SimError> {
        let root = self.alloc_context_id();
        self.state().root_context_id = root;
        self.call(root, "proxy_on_context_create", &[root as i32, 0])?;
        let vm_config_len = self.state().env.vm_config.len() as i32;
        if self.call(root, "proxy_on_vm_start", &[root as i32, vm_config_len])? == Some(0) {
            return Err(SimError::ConfigurationRejected {
                vm: self.role(),
                callback: "on_vm_start",
            });
        }
        let plugin_config_len = self.state().env.plugin_config.len() as i32;
        self.state().callback.configuring = true;
        let r = self.call(
            root,
            "proxy_on_configure",
            &[root as i32, plugin_config_len],
        );
        self.state().callback.configuring = false;
        if r? == Some(0) {
            return Err(SimError::ConfigurationRejected {
                vm: self.role(),
                callback: "on_configure",
            });
        }
        Ok(())
    }

    pub fn role(&self) -> String {
        self.store.data().role.to_string()
    }

    /// Context ids are per VM; 0 is the VM itself.
    pub fn alloc_context_id(&mut self) -> u32 {
        let state = self.state();
        let id = state.next_context_id;
        state.next_context_id += 1;
        id
    }
}
