//! Small guest modules written in WAT for the conformance tests, and loopback
//! servers for callouts.

#![allow(dead_code)] // each test uses a different part of the kit

pub mod servers;

use consent_sim::Wasm;

/// Imports every guest gets, with the ABI 0.2.1 signatures.
const IMPORTS: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment_metric (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $record_metric (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue_stream (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_stream" (func $grpc_stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $grpc_send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_close" (func $grpc_close (param i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $grpc_cancel (param i32) (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register_queue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $resolve_queue (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
"#;

/// Helpers every guest gets. Out-parameters land at 512 (ptr), 516 (size),
/// 520 (cas / token), 528 (u64).
const HELPERS: &str = r#"
  (memory (export "memory") 8)
  (global $heap (mut i32) (i32.const 262144))
  (global $mallocs (mut i32) (i32.const 0))
  (func $say (param $p i32) (param $l i32) (param $v i32)
    (local $i i32) (local $n i32) (local $t i32)
    (memory.copy (i32.const 4096) (local.get $p) (local.get $l))
    (i32.store8 (i32.add (i32.const 4096) (local.get $l)) (i32.const 61))
    (local.set $t (local.get $v))
    (loop $digits
      (i32.store8 (i32.add (i32.const 8000) (local.get $n))
        (i32.add (i32.const 48) (i32.rem_u (local.get $t) (i32.const 10))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $digits (i32.ne (local.get $t) (i32.const 0))))
    (loop $rev
      (i32.store8 (i32.add (i32.add (i32.const 4097) (local.get $l)) (local.get $i))
        (i32.load8_u (i32.add (i32.const 8000) (i32.sub (i32.sub (local.get $n) (local.get $i)) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $rev (i32.lt_u (local.get $i) (local.get $n))))
    (drop (call $log (i32.const 2) (i32.const 4096) (i32.add (i32.add (local.get $l) (i32.const 1)) (local.get $n)))))
  (func $print (param $p i32) (param $l i32)
    (drop (call $log (i32.const 2) (local.get $p) (local.get $l))))
  ;; Reads header `key` of map `t`; the value is at (load 512, load 516).
  (func $header (param $t i32) (param $kp i32) (param $kl i32) (result i32)
    (call $get_header (local.get $t) (local.get $kp) (local.get $kl) (i32.const 512) (i32.const 516)))
  ;; First byte of request header `key`, or 0.
  (func $header_byte (param $kp i32) (param $kl i32) (result i32)
    (if (result i32) (i32.eqz (call $header (i32.const 0) (local.get $kp) (local.get $kl)))
      (then (if (result i32) (i32.load (i32.const 516))
        (then (i32.load8_u (i32.load (i32.const 512)))) (else (i32.const 0))))
      (else (i32.const 0))))
  ;; Copies property `path` into filter state `key`, or says the status under `key`.
  (func $copy_prop (param $pp i32) (param $pl i32) (param $kp i32) (param $kl i32)
    (local $s i32)
    (local.set $s (call $get_property (local.get $pp) (local.get $pl) (i32.const 512) (i32.const 516)))
    (if (i32.eqz (local.get $s))
      (then (drop (call $set_property (local.get $kp) (local.get $kl) (i32.load (i32.const 512)) (i32.load (i32.const 516)))))
      (else (call $say (local.get $kp) (local.get $kl) (local.get $s)))))
  (func (export "proxy_on_context_create") (param i32 i32))
"#;

const MALLOC: &str = r#"
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (global.set $mallocs (i32.add (global.get $mallocs) (i32.const 1)))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $n) (i32.const 7)) (i32.const -8))))
    (local.get $p))
"#;

/// Builds a WAT guest: standard imports and helpers, static strings, and the
/// functions a test adds.
pub struct Guest {
    data: Vec<(u32, Vec<u8>)>,
    next: u32,
    funcs: String,
    imports: String,
    abi_version: bool,
    malloc: bool,
    context_create: bool,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    pub fn new() -> Self {
        Self {
            data: Vec::new(),
            next: 16384,
            funcs: String::new(),
            imports: String::new(),
            abi_version: true,
            malloc: true,
            context_create: true,
        }
    }

    /// Places `bytes` in static memory; returns `(i32.const ptr) (i32.const len)`.
    pub fn s(&mut self, bytes: impl AsRef<[u8]>) -> String {
        let bytes = bytes.as_ref().to_vec();
        let ptr = self.next;
        self.next += (bytes.len() as u32 + 8) & !7;
        let len = bytes.len();
        self.data.push((ptr, bytes));
        format!("(i32.const {ptr}) (i32.const {len})")
    }

    /// Adds functions (WAT text).
    pub fn func(mut self, wat: &str) -> Self {
        self.funcs.push_str(wat);
        self
    }

    pub fn add(&mut self, wat: &str) {
        self.funcs.push_str(wat);
    }

    pub fn import(mut self, wat: &str) -> Self {
        self.imports.push_str(wat);
        self
    }

    pub fn without_abi_version(mut self) -> Self {
        self.abi_version = false;
        self
    }

    /// Leaves `malloc` out (the test provides `proxy_on_memory_allocate`).
    pub fn without_malloc(mut self) -> Self {
        self.malloc = false;
        self
    }

    /// Leaves `proxy_on_context_create` out (the test provides its own).
    pub fn without_context_create(mut self) -> Self {
        self.context_create = false;
        self
    }

    pub fn wat(&self) -> String {
        let mut out = String::from("(module\n");
        out.push_str(&self.imports);
        out.push_str(IMPORTS);
        let helpers = if self.context_create {
            HELPERS.to_string()
        } else {
            HELPERS.replace(
                r#"(func (export "proxy_on_context_create") (param i32 i32))"#,
                "",
            )
        };
        out.push_str(&helpers);
        if self.malloc {
            out.push_str(MALLOC);
        }
        if self.abi_version {
            out.push_str("  (func (export \"proxy_abi_version_0_2_1\"))\n");
        }
        out.push_str(&self.funcs);
        for (ptr, bytes) in &self.data {
            let escaped: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
            out.push_str(&format!("  (data (i32.const {ptr}) \"{escaped}\")\n"));
        }
        out.push(')');
        out
    }

    pub fn build(&self) -> Wasm {
        Wasm::Wat(self.wat())
    }
}

/// proxy-wasm's header-pairs encoding, for maps a guest passes to the host.
pub fn pairs(items: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (items.len() as u32).to_le_bytes().to_vec();
    for (k, v) in items {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in items {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

/// Log messages in order, optionally only those starting with `prefix`.
pub fn said(sidecar: &consent_sim::Sidecar, prefix: &str) -> Vec<String> {
    sidecar
        .logs()
        .into_iter()
        .map(|l| l.message)
        .filter(|m| m.starts_with(prefix))
        .collect()
}

/// `(vm, message)` pairs of log lines starting with `prefix`.
pub fn said_by(sidecar: &consent_sim::Sidecar, prefix: &str) -> Vec<(String, String)> {
    sidecar
        .logs()
        .into_iter()
        .filter(|l| l.message.starts_with(prefix))
        .map(|l| (l.vm, l.message))
        .collect()
}
