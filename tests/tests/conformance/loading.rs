//! Loading and start-up: ABI export, start functions, restricted calls,
//! allocator, WASI subset.

use consent_sim::{LogLevel, Sidecar, SidecarConfig, SimClock, SimError, WASI_FUNCTIONS};

use crate::support::{Guest, said_by};

async fn start(guest: &Guest) -> Result<Sidecar, SimError> {
    Sidecar::start(SidecarConfig {
        workers: 1,
        ..SidecarConfig::new(guest.build())
    })
    .await
}

/// Envoy: a module that does not export `proxy_abi_version_0_2_1` fails to load.
#[tokio::test(flavor = "multi_thread")]
async fn module_without_abi_version_export_is_refused() {
    let err = start(&Guest::new().without_abi_version())
        .await
        .err()
        .expect("must not load");
    assert!(matches!(err, SimError::MissingAbiVersion), "{err}");
    assert!(
        start(&Guest::new()).await.is_ok(),
        "the same module with the export loads"
    );
}

/// Older Envoy refuses a module that imports a WASI function outside its set
/// (here `poll_oneoff`) or an unknown host function.
#[tokio::test(flavor = "multi_thread")]
async fn imports_outside_envoys_set_are_refused() {
    let poll = Guest::new().import(
        r#"(import "wasi_snapshot_preview1" "poll_oneoff" (func (param i32 i32 i32 i32) (result i32)))"#,
    );
    match start(&poll).await.err().expect("must not load") {
        SimError::UnsupportedImport { module, name } => {
            assert_eq!(
                (module.as_str(), name.as_str()),
                ("wasi_snapshot_preview1", "poll_oneoff")
            );
        }
        other => panic!("unexpected error: {other}"),
    }
    let made_up = Guest::new().import(r#"(import "env" "proxy_made_up" (func (result i32)))"#);
    assert!(matches!(
        start(&made_up).await,
        Err(SimError::UnsupportedImport { .. })
    ));
}

/// The whole Envoy WASI set, with preview1 signatures, is importable.
#[tokio::test(flavor = "multi_thread")]
async fn every_envoy_wasi_function_is_importable() {
    let sigs = [
        ("fd_write", "(param i32 i32 i32 i32) (result i32)"),
        ("fd_read", "(param i32 i32 i32 i32) (result i32)"),
        ("fd_seek", "(param i32 i64 i32 i32) (result i32)"),
        ("fd_close", "(param i32) (result i32)"),
        ("fd_fdstat_get", "(param i32 i32) (result i32)"),
        ("environ_get", "(param i32 i32) (result i32)"),
        ("environ_sizes_get", "(param i32 i32) (result i32)"),
        ("args_get", "(param i32 i32) (result i32)"),
        ("args_sizes_get", "(param i32 i32) (result i32)"),
        ("clock_time_get", "(param i32 i64 i32) (result i32)"),
        ("random_get", "(param i32 i32) (result i32)"),
        ("proc_exit", "(param i32)"),
        (
            "path_open",
            "(param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)",
        ),
        ("fd_prestat_get", "(param i32 i32) (result i32)"),
        ("fd_prestat_dir_name", "(param i32 i32 i32) (result i32)"),
    ];
    assert_eq!(sigs.len(), WASI_FUNCTIONS.len());
    let mut guest = Guest::new();
    for (name, sig) in sigs {
        guest = guest.import(&format!(
            r#"(import "wasi_snapshot_preview1" "{name}" (func {sig}))"#
        ));
    }
    start(&guest).await.expect("Envoy's WASI set loads");
}

/// `_initialize` then `main` run when exported, and `_start` is then skipped;
/// without them `_start` runs.
#[tokio::test(flavor = "multi_thread")]
async fn start_up_runs_initialize_then_main_else_start() {
    let mut g = Guest::new();
    let (init, main, st) = (g.s("su:init"), g.s("su:main"), g.s("su:start"));
    let with_main = g.func(&format!(
        r#"(func (export "_initialize") (call $print {init}))
           (func (export "main") (param i32 i32) (result i32) (call $print {main}) (i32.const 0))
           (func (export "_start") (call $print {st}))"#
    ));
    let sidecar = start(&with_main).await.expect("loads");
    let on_main: Vec<String> = said_by(&sidecar, "su:")
        .into_iter()
        .filter(|(vm, _)| vm == "main")
        .map(|(_, m)| m)
        .collect();
    assert_eq!(on_main, ["su:init", "su:main"]);

    let mut g = Guest::new();
    let st = g.s("su:start");
    let only_start = g.func(&format!(r#"(func (export "_start") (call $print {st}))"#));
    let sidecar = start(&only_start).await.expect("loads");
    assert!(said_by(&sidecar, "su:").contains(&("main".into(), "su:start".into())));
}

/// During start-up only logging and WASI are allowed: any other proxy call traps
/// and the VM fails to start.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_calls_other_than_logging_trap_during_start_up() {
    let tick =
        Guest::new().func(r#"(func (export "_start") (drop (call $set_tick (i32.const 10))))"#);
    let err = start(&tick).await.err().expect("must fail");
    assert!(matches!(err, SimError::StartFailed { .. }), "{err}");
    let mut g = Guest::new();
    let hello = g.s("hello");
    let log = g.func(&format!(
        r#"(func (export "_start") (call $print {hello}))"#
    ));
    start(&log).await.expect("logging is allowed");
}

fn allocator_probe(g: &mut Guest) {
    let (x, e) = (g.s("x"), g.s("e"));
    let names = [
        "al:x_status",
        "al:x_size",
        "al:x_first",
        "al:mallocs",
        "al:others",
        "al:e_status",
        "al:e_ptr",
        "al:e_size",
        "al:mallocs_after",
    ];
    let n: Vec<String> = names.iter().map(|s| g.s(s)).collect();
    g.add(&format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (call $say {n0} (call $header (i32.const 0) {x}))
             (call $say {n1} (i32.load (i32.const 516)))
             (call $say {n2} (i32.load8_u (i32.load (i32.const 512))))
             (call $say {n3} (global.get $mallocs))
             (call $say {n4} (global.get $others))
             (i32.store (i32.const 512) (i32.const 77))
             (i32.store (i32.const 516) (i32.const 77))
             (call $say {n5} (call $header (i32.const 0) {e}))
             (call $say {n6} (i32.load (i32.const 512)))
             (call $say {n7} (i32.load (i32.const 516)))
             (call $say {n8} (i32.add (global.get $mallocs) (global.get $others)))
             (i32.const 0))
           (global $others (mut i32) (i32.const 0))
           (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
             (local $p i32)
             (global.set $others (i32.add (global.get $others) (i32.const 1)))
             (local.set $p (global.get $heap))
             (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $n) (i32.const 7)) (i32.const -8))))
             (local.get $p))"#,
        n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3], n4 = n[4], n5 = n[5], n6 = n[6], n7 = n[7], n8 = n[8]
    ));
}

/// Returned data is written into memory from the guest allocator, `malloc`
/// first, then `proxy_on_memory_allocate`; an empty value is ptr 0 / size 0
/// and allocates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn allocator_prefers_malloc_and_empty_values_allocate_nothing() {
    let mut g = Guest::new();
    allocator_probe(&mut g);
    let sidecar = start(&g).await.expect("loads");
    let req = consent_sim::HttpRequest::get("/")
        .header("x", "abc")
        .header("e", "");
    sidecar.send(req.clone()).await.expect("served");
    let said: Vec<String> = said_by(&sidecar, "al:")
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(
        said,
        [
            "al:x_status=0",
            "al:x_size=3",
            "al:x_first=97",
            "al:mallocs=1",
            "al:others=0",
            "al:e_status=0",
            "al:e_ptr=0",
            "al:e_size=0",
            "al:mallocs_after=1"
        ]
    );

    let mut g = Guest::new().without_malloc();
    allocator_probe(&mut g);
    // Without malloc the counter of malloc calls cannot move; proxy_on_memory_allocate serves.
    let sidecar = start(&g).await.expect("loads");
    sidecar.send(req).await.expect("served");
    let said: Vec<String> = said_by(&sidecar, "al:")
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert!(
        said.contains(&"al:x_size=3".to_string()) && said.contains(&"al:others=1".to_string()),
        "{said:?}"
    );
}

/// Envoy's WASI: fd 1 logs at info and fd 2 at error, other fds BADF; fd_read
/// ENOSYS; fd_seek/fd_close 0; fdstat only for 1/2; environ from the VM
/// config; no args; clocks from the host clock; random_get at most 64 KiB;
/// path_open NOENT; fd_prestat_get BADF; fd_prestat_dir_name ENOSYS.
#[tokio::test(flavor = "multi_thread")]
async fn wasi_subset_behaves_like_envoy() {
    const FROZEN: u64 = 1_700_000_000_000_000_000;
    let mut g = Guest::new()
        .import(r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "fd_seek" (func $fd_seek (param i32 i64 i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $dirname (param i32 i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))"#)
        .import(r#"(import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))"#);
    let (out, err, path) = (g.s("to stdout\n"), g.s("to stderr"), g.s("/etc/passwd"));
    let out_ptr: Vec<&str> = out.split(' ').collect();
    let err_ptr: Vec<&str> = err.split(' ').collect();
    let n = |g: &mut Guest, s: &str| g.s(format!("wasi:{s}"));
    let t: Vec<String> = [
        "w1", "n1", "w2", "w3", "read", "seek", "close", "stat1", "stat5", "prestat", "dirname",
        "open", "envs", "envc", "envsz", "env0", "args", "argc", "rand_big", "rand", "clock",
        "clock_ok", "mono",
    ]
    .iter()
    .map(|s| n(&mut g, s))
    .collect();
    let g = g.func(&format!(
        r#"(func (export "_start")
             (i32.store (i32.const 600) {op}) (i32.store (i32.const 604) {ol})
             (call $say {w1} (call $fd_write (i32.const 1) (i32.const 600) (i32.const 1) (i32.const 620)))
             (call $say {n1} (i32.load (i32.const 620)))
             (i32.store (i32.const 600) {ep}) (i32.store (i32.const 604) {el})
             (call $say {w2} (call $fd_write (i32.const 2) (i32.const 600) (i32.const 1) (i32.const 620)))
             (call $say {w3} (call $fd_write (i32.const 3) (i32.const 600) (i32.const 1) (i32.const 620)))
             (call $say {read} (call $fd_read (i32.const 0) (i32.const 600) (i32.const 1) (i32.const 620)))
             (call $say {seek} (call $fd_seek (i32.const 1) (i64.const 0) (i32.const 0) (i32.const 620)))
             (call $say {close} (call $fd_close (i32.const 1)))
             (call $say {stat1} (call $fdstat (i32.const 1) (i32.const 640)))
             (call $say {stat5} (call $fdstat (i32.const 5) (i32.const 640)))
             (call $say {prestat} (call $prestat (i32.const 3) (i32.const 640)))
             (call $say {dirname} (call $dirname (i32.const 3) (i32.const 640) (i32.const 8)))
             (call $say {open} (call $path_open (i32.const 3) (i32.const 0) {path} (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 640)))
             (call $say {envs} (call $env_sizes (i32.const 640) (i32.const 644)))
             (call $say {envc} (i32.load (i32.const 640)))
             (call $say {envsz} (i32.load (i32.const 644)))
             (drop (call $env_get (i32.const 660) (i32.const 700)))
             (call $say {env0} (i32.load8_u (i32.load (i32.const 660))))
             (call $say {args} (call $args_sizes (i32.const 640) (i32.const 644)))
             (call $say {argc} (i32.load (i32.const 640)))
             (call $say {rand_big} (call $random (i32.const 1024) (i32.const 65537)))
             (call $say {rand} (call $random (i32.const 1024) (i32.const 16)))
             (call $say {clock} (call $clock (i32.const 0) (i64.const 1) (i32.const 680)))
             (call $say {clock_ok} (i64.eq (i64.load (i32.const 680)) (i64.const {FROZEN})))
             (call $say {mono} (call $clock (i32.const 1) (i64.const 1) (i32.const 680))))"#,
        op = out_ptr[..2].join(" "),
        ol = out_ptr[2..].join(" "),
        ep = err_ptr[..2].join(" "),
        el = err_ptr[2..].join(" "),
        w1 = t[0], n1 = t[1], w2 = t[2], w3 = t[3], read = t[4], seek = t[5], close = t[6], stat1 = t[7],
        stat5 = t[8], prestat = t[9], dirname = t[10], open = t[11], envs = t[12], envc = t[13], envsz = t[14],
        env0 = t[15], args = t[16], argc = t[17], rand_big = t[18], rand = t[19], clock = t[20], clock_ok = t[21],
        mono = t[22],
    ));
    let sidecar = Sidecar::start(SidecarConfig {
        workers: 1,
        env: vec![("GREETING".into(), "hi".into())],
        clock: SimClock::frozen_at(FROZEN),
        ..SidecarConfig::new(g.build())
    })
    .await
    .expect("loads");
    let on_main: Vec<String> = said_by(&sidecar, "wasi:")
        .into_iter()
        .filter(|(vm, _)| vm == "main")
        .map(|(_, m)| m)
        .collect();
    let expected = [
        "w1=0",
        "n1=10",
        "w2=0",
        "w3=8",
        "read=52",
        "seek=0",
        "close=0",
        "stat1=0",
        "stat5=8",
        "prestat=8",
        "dirname=52",
        "open=44",
        "envs=0",
        "envc=1",
        "envsz=12",
        "env0=71",
        "args=0",
        "argc=0",
        "rand_big=28",
        "rand=0",
        "clock=0",
        "clock_ok=1",
        "mono=0",
    ];
    let expected: Vec<String> = expected.iter().map(|s| format!("wasi:{s}")).collect();
    assert_eq!(on_main, expected);
    let logs = sidecar.logs();
    let level_of = |text: &str| {
        logs.iter()
            .find(|l| l.vm == "main" && l.message == text)
            .map(|l| l.level)
    };
    assert_eq!(level_of("to stdout"), Some(LogLevel::Info));
    assert_eq!(level_of("to stderr"), Some(LogLevel::Error));
}
