//! Both routes measured against their baselines, each comparison in one group with an A/A
//! control (the layered side measured a second time, after the baseline) so the noise floor is
//! visible. Each group names its baseline where it is defined ([`group`]); `scripts/bench`
//! runs these quickly and prints one table of medians and ratios, and draws the chart.
//!
//! The daemon is this bench binary re-executed (so the same-executable check passes); the
//! whole-process group runs the `demo` example's `call` subcommand, built by `scripts/bench`.

#[path = "../examples/demo/echo/mod.rs"]
#[allow(clippy::all)]
mod echo;

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use echo::echo_client::EchoClient;
use echo::echo_server::EchoServer;
use echo::{EchoRequest, EchoService};
use tokio::runtime::Runtime;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_local_daemon::{
    Daemon, IdentityPolicy, LocalDaemonLayer, LocalDaemonStatus, Mode,
    connect_local_daemon_channel, probe, reset,
};

const DAEMON_DIR_ENV: &str = "TLD_BENCH_DAEMON_DIR";
/// `layer:N` or `bare:N`: make N warm calls on the trivial service and exit, for callgrind;
/// `daemon:N`, `daemon-nokeep:N`, `daemon-idempotent:N`: N warm daemon calls, client side (see
/// [`count_daemon_calls`]).
const CALLS_ENV: &str = "TLD_BENCH_CALLS";
const TCP_PORT_FILE: &str = "tcp-port";
const RAW_ECHO_SOCKET: &str = "raw-echo.sock";
/// About the bytes one unary echo call moves each way over HTTP/2 once HPACK is warm.
const RAW_ECHO_BYTES: usize = 100;

fn main() {
    if let Ok(dir) = std::env::var(DAEMON_DIR_ENV) {
        return serve(Path::new(&dir));
    }
    if let Ok(spec) = std::env::var(CALLS_ENV) {
        return count_calls(&spec);
    }
    let fixture = Fixture::start();
    let mut c = Criterion::default().configure_from_args();
    warm_in_process(&mut c);
    warm_daemon(&mut c, &fixture);
    floors(&mut c, &fixture);
    first_call_without_daemon(&mut c);
    first_call_with_daemon(&mut c, &fixture);
    concurrent(&mut c, &fixture);
    whole_process(&mut c, &fixture);
    runtime_lookup(&mut c);
    c.final_summary();
}

// ---- The daemon process ----

/// The daemon: the echo service on the repository socket, the same service on TCP loopback,
/// and a raw Unix-socket echo.
fn serve(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService::new("tcp")))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp)),
        );
        let raw = tokio::net::UnixListener::bind(dir.join(RAW_ECHO_SOCKET)).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = raw.accept().await.unwrap();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; RAW_ECHO_BYTES];
                    while stream.read_exact(&mut buf).await.is_ok() {
                        if stream.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        std::fs::write(dir.join(TCP_PORT_FILE), port.to_string()).unwrap();
        Daemon::new(dir)
            .add_service(EchoServer::new(EchoService::new("daemon")))
            .serve(std::future::pending())
            .await
            .unwrap();
    });
}

struct Fixture {
    dir: PathBuf,
    daemon: Child,
    demo_daemon_dir: PathBuf,
    demo_daemon: Option<Child>,
    tcp_port: u16,
}

impl Fixture {
    fn start() -> Self {
        let root = std::env::temp_dir().join(format!("tld-bench-{}", std::process::id()));
        let dir = root.join("repo");
        std::fs::create_dir_all(&dir).unwrap();
        let daemon = Command::new(std::env::current_exe().unwrap())
            .env(DAEMON_DIR_ENV, &dir)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_running(&dir);
        let port_file = dir.join(TCP_PORT_FILE);
        let tcp_port = std::fs::read_to_string(port_file).unwrap().parse().unwrap();

        let demo_daemon_dir = root.join("demo-repo");
        std::fs::create_dir_all(&demo_daemon_dir).unwrap();
        let demo_daemon = demo_binary().map(|demo| {
            let child = demo_serve(&demo, &demo_daemon_dir);
            // The demo daemon is another executable than this bench: wait for its pidfile.
            let pidfile = demo_daemon_dir.join("sockets/grpc.pid");
            wait_for("the demo daemon", || pidfile.exists());
            child
        });
        Self {
            dir,
            daemon,
            demo_daemon_dir,
            demo_daemon,
            tcp_port,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.daemon).chain(self.demo_daemon.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(root) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn wait_running(dir: &Path) {
    wait_for("the bench daemon", || {
        matches!(probe(dir).status, LocalDaemonStatus::Running { .. })
    });
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The release build of the demo example, which `scripts/bench` builds first.
fn demo_binary() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/examples/demo");
    path.exists().then_some(path)
}

// ---- Helpers ----

/// A criterion group whose baseline is the function `baseline`: recorded beside criterion's
/// results, for `scripts/bench`.
fn baseline_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    baseline: &str,
) -> BenchmarkGroup<'a, WallTime> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/criterion")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("baseline.txt"), baseline).unwrap();
    c.benchmark_group(name)
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn request() -> EchoRequest {
    EchoRequest {
        message: "hello".into(),
        id: 1,
        delay_ms: 0,
        status_code: 0,
    }
}

fn in_process() -> EchoServer<EchoService> {
    EchoServer::new(EchoService::new("in-process"))
}

fn layer(dir: &Path) -> LocalDaemonLayer {
    LocalDaemonLayer::new(dir).mode_env_value(None)
}

/// Times `iters` sequential calls on `client` inside one `block_on`.
fn bench_calls<T>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    rt: &Runtime,
    client: EchoClient<T>,
) where
    T: tonic::client::GrpcService<Body> + Clone,
    T::Error: Into<tower::BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower::BoxError> + Send,
{
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut client = client.clone();
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(client.echo(request()).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
}

/// A layered service over the bench daemon, called until it serves on the daemon route.
fn layered_on_daemon(
    rt: &Runtime,
    dir: &Path,
) -> tower_local_daemon::LocalDaemon<EchoServer<EchoService>> {
    rt.block_on(async {
        let layered = ServiceBuilder::new()
            .layer(layer(dir))
            .service(in_process());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut client = EchoClient::new(layered.clone());
        while client.echo(request()).await.unwrap().get_ref().served_by != "daemon" {
            assert!(
                Instant::now() < deadline,
                "the layer never took the daemon route"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        layered
    })
}

/// A warm channel to the bench daemon, with the checks done.
fn daemon_channel(rt: &Runtime, dir: &Path) -> Channel {
    rt.block_on(connect_local_daemon_channel(dir, Duration::from_secs(5)))
        .expect("the bench daemon passes every check")
        .channel
}

// ---- 1. Warm call, in-process ----

fn warm_in_process(c: &mut Criterion) {
    let rt = current_thread();
    let empty = std::env::temp_dir().join("tld-bench-no-daemon");
    let layered = ServiceBuilder::new()
        .layer(layer(&empty))
        .service(in_process());
    let mut group = baseline_group(c, "1 warm in-process call", "bare");
    bench_calls(&mut group, "layer", &rt, EchoClient::new(layered.clone()));
    bench_calls(&mut group, "bare", &rt, EchoClient::new(in_process()));
    bench_calls(&mut group, "layer (A/A)", &rt, EchoClient::new(layered));
    group.finish();

    // The layer's own floor: poll_ready and call over a service that does nothing.
    let mut layered = layer(&empty).layer(trivial());
    rt.block_on(async {
        layered
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(Body::empty()))
            .await
            .unwrap()
    });
    let mut group = baseline_group(c, "1 layer floor, trivial service", "bare");
    for (name, use_layer) in [("layer", true), ("bare", false), ("layer (A/A)", true)] {
        let mut layered = layered.clone();
        let mut bare = trivial();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        if use_layer {
                            black_box(poll_call(&mut layered).await);
                        } else {
                            black_box(poll_call(&mut bare).await);
                        }
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Makes N calls on the trivial service, with or without the layer, for an instruction count.
fn count_calls(spec: &str) {
    let (side, n) = spec.split_once(':').expect("layer:N or bare:N");
    let n: u64 = n.parse().unwrap();
    if side.starts_with("daemon") {
        return count_daemon_calls(side, n);
    }
    let rt = current_thread();
    let empty = std::env::temp_dir().join("tld-bench-no-daemon");
    let mut bare = trivial();
    let mut layered = layer(&empty).layer(trivial());
    rt.block_on(async {
        for _ in 0..n {
            match side {
                "layer" => drop(black_box(poll_call(&mut layered).await)),
                _ => drop(black_box(poll_call(&mut bare).await)),
            }
        }
    });
}

/// N warm echo calls on the daemon route, for callgrind's count of the client's instructions:
/// `daemon` as a layer in mode `auto` makes them (each request kept until its response head),
/// `daemon-nokeep` in mode `require` (nothing kept: no in-process route), `daemon-idempotent` in
/// mode `auto` with an idempotent predicate. The daemon is this binary, started natively: under
/// valgrind `/proc/self/exe` names valgrind's tool, so the layer names the daemon's executable.
fn count_daemon_calls(side: &str, n: u64) {
    let program = PathBuf::from(std::env::args_os().next().unwrap());
    let program = std::fs::canonicalize(program).unwrap();
    let dir = std::env::temp_dir().join(format!("tld-bench-count-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut daemon = Command::new(&program)
        .env(DAEMON_DIR_ENV, &dir)
        .env_remove(CALLS_ENV)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = dir.join("sockets/grpc.pid");
    wait_for("the bench daemon", || pidfile.exists());
    let mut layer = layer(&dir).identity(IdentityPolicy::Executable(program));
    layer = match side {
        "daemon-nokeep" => layer.mode(Mode::Require),
        "daemon-idempotent" => layer.idempotent(|method| method == "/echo.v1.Echo/Echo"),
        _ => layer,
    };
    let svc = layer.layer(EchoServer::new(EchoService::new("in-process")));
    let rt = current_thread();
    rt.block_on(async {
        let mut client = EchoClient::new(svc.clone());
        for _ in 0..n {
            black_box(client.echo(request()).await.unwrap());
        }
    });
    let daemon_calls = svc.stats().unwrap().daemon_calls;
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(daemon_calls, n, "every call on the daemon route");
}

type Trivial = tower::util::ServiceFn<
    fn(http::Request<Body>) -> std::future::Ready<Result<http::Response<Body>, Infallible>>,
>;

/// A service that does nothing: what is left of a call is the layer's own cost.
fn trivial() -> Trivial {
    fn respond(
        _: http::Request<Body>,
    ) -> std::future::Ready<Result<http::Response<Body>, Infallible>> {
        std::future::ready(Ok(http::Response::new(Body::empty())))
    }
    tower::service_fn(respond as fn(_) -> _)
}

async fn poll_call<S>(svc: &mut S) -> S::Response
where
    S: Service<http::Request<Body>>,
    S::Error: std::fmt::Debug,
{
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    svc.call(http::Request::new(Body::empty())).await.unwrap()
}

// ---- 2. Warm call, daemon route ----

fn warm_daemon(c: &mut Criterion, fixture: &Fixture) {
    for (name, rt) in [
        ("2 warm daemon call", current_thread()),
        ("2 warm daemon call, multi_thread", multi_thread()),
    ] {
        let layered = layered_on_daemon(&rt, &fixture.dir);
        let channel = daemon_channel(&rt, &fixture.dir);
        let mut group = baseline_group(c, name, "bare channel");
        bench_calls(&mut group, "layer", &rt, EchoClient::new(layered.clone()));
        bench_calls(&mut group, "bare channel", &rt, EchoClient::new(channel));
        bench_calls(&mut group, "layer (A/A)", &rt, EchoClient::new(layered));
        group.finish();
    }
}

// ---- 3. Floors and alternatives, per runtime flavour ----

fn floors(c: &mut Criterion, fixture: &Fixture) {
    for (flavour, rt) in [
        ("current_thread", current_thread()),
        ("multi_thread", multi_thread()),
    ] {
        let layered = layered_on_daemon(&rt, &fixture.dir);
        let tcp = rt.block_on(async {
            Endpoint::from_shared(format!("http://127.0.0.1:{}", fixture.tcp_port))
                .unwrap()
                .connect()
                .await
                .unwrap()
        });
        let mut group = baseline_group(c, &format!("3 floors, {flavour} client"), "raw unix echo");
        bench_calls(&mut group, "daemon route", &rt, EchoClient::new(layered));
        bench_calls(
            &mut group,
            "tcp loopback channel",
            &rt,
            EchoClient::new(tcp),
        );
        let socket = fixture.dir.join(RAW_ECHO_SOCKET);
        group.bench_function("raw unix echo", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
                    let start = Instant::now();
                    raw_round_trips(&mut stream, iters).await;
                    start.elapsed()
                })
            })
        });
        group.finish();
    }
}

/// `n` round trips of [`RAW_ECHO_BYTES`] raw bytes to the daemon's raw echo.
async fn raw_round_trips(stream: &mut tokio::net::UnixStream, n: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [7u8; RAW_ECHO_BYTES];
    for _ in 0..n {
        stream.write_all(&buf).await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
    }
}

// ---- 4. First call, no daemon ----

fn first_call_without_daemon(c: &mut Criterion) {
    let rt = current_thread();
    // A deep path, as repositories have.
    let empty = std::env::temp_dir().join("tld-bench/a/b/c/d/e/f/g/h/.heddle");
    std::fs::create_dir_all(&empty).unwrap();
    let mut group = baseline_group(c, "4 first call, no daemon", "bare");
    group.bench_function("fresh layer", |b| {
        b.iter_custom(|iters| {
            time_each(
                &rt,
                iters,
                || reset(&empty),
                || async {
                    let svc = ServiceBuilder::new()
                        .layer(layer(&empty).linger(Duration::ZERO))
                        .service(in_process());
                    EchoClient::new(svc).echo(request()).await.unwrap();
                },
            )
        })
    });
    group.bench_function("bare", |b| {
        b.iter_custom(|iters| {
            time_each(
                &rt,
                iters,
                || (),
                || async {
                    EchoClient::new(in_process()).echo(request()).await.unwrap();
                },
            )
        })
    });
    group.finish();
}

/// Times `iters` runs of `run`, each after an untimed `setup` and a settle: the runtime drops
/// what the last run left (an aborted connection's task) and the daemon, on the other core,
/// finishes with it, so that a run pays for its own first call only, as a fresh process does.
fn time_each<Fut>(
    rt: &Runtime,
    iters: u64,
    mut setup: impl FnMut(),
    mut run: impl FnMut() -> Fut,
) -> Duration
where
    Fut: Future<Output = ()>,
{
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            setup();
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            std::thread::sleep(Duration::from_micros(300));
            let start = Instant::now();
            run().await;
            total += start.elapsed();
        }
        total
    })
}

// ---- 5. First call, daemon ----

fn first_call_with_daemon(c: &mut Criterion, fixture: &Fixture) {
    let rt = current_thread();
    let dir = &fixture.dir;
    let mut group = baseline_group(c, "5 first call, daemon", "warm call");
    // The daemon attests itself: the first call trusts its attestation and waits only for its
    // HTTP/2 SETTINGS; asked, it pays a `Health/Check` round trip too. The attested side runs
    // twice, the second time as the A/A control.
    let sides = [
        ("fresh layer, attested (checks + call)", false),
        ("fresh layer, Health/Check asked", true),
        ("fresh layer, attested, A/A", false),
    ];
    for (name, ask) in sides {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_each(
                    &rt,
                    iters,
                    || reset(dir),
                    || async {
                        // No linger: the entry goes with the service, and each run makes its
                        // own, as a one-shot process does.
                        let layer = layer(dir).linger(Duration::ZERO).require_health_check(ask);
                        let svc = ServiceBuilder::new().layer(layer).service(in_process());
                        let reply = EchoClient::new(svc).echo(request()).await.unwrap();
                        assert_eq!(reply.get_ref().served_by, "daemon");
                    },
                )
            })
        });
    }
    // What this machine allows a first call: a new Unix-socket connection to the daemon
    // process and two round trips of raw bytes (the check, then the call), no HTTP/2 and no
    // gRPC on either side.
    let socket = fixture.dir.join(RAW_ECHO_SOCKET);
    group.bench_function("raw floor (connect + 2 round trips)", |b| {
        b.iter_custom(|iters| {
            time_each(
                &rt,
                iters,
                || (),
                || async {
                    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
                    raw_round_trips(&mut stream, 2).await;
                },
            )
        })
    });
    let warm = layered_on_daemon(&rt, dir);
    bench_calls(&mut group, "warm call", &rt, EchoClient::new(warm));
    group.finish();
}

// ---- 6. 64 concurrent callers ----

fn concurrent(c: &mut Criterion, fixture: &Fixture) {
    const CALLERS: u64 = 64;
    let rt = multi_thread();
    let layered = layered_on_daemon(&rt, &fixture.dir);
    let channel = daemon_channel(&rt, &fixture.dir);
    let mut group = baseline_group(c, "6 64 concurrent callers, time per call", "bare channel");
    for (name, use_layer) in [
        ("layer", true),
        ("bare channel", false),
        ("layer (A/A)", true),
    ] {
        let layered = layered.clone();
        let channel = channel.clone();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let per_caller = iters.div_ceil(CALLERS);
                rt.block_on(async {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..CALLERS)
                        .map(|_| {
                            let layered = layered.clone();
                            let channel = channel.clone();
                            tokio::spawn(async move {
                                if use_layer {
                                    let mut client = EchoClient::new(layered);
                                    for _ in 0..per_caller {
                                        client.echo(request()).await.unwrap();
                                    }
                                } else {
                                    let mut client = EchoClient::new(channel);
                                    for _ in 0..per_caller {
                                        client.echo(request()).await.unwrap();
                                    }
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_caller * CALLERS) as f64)
                })
            })
        });
    }
    group.finish();
}

// ---- 7. The whole process ----

fn whole_process(c: &mut Criterion, fixture: &Fixture) {
    let Some(demo) = demo_binary() else {
        panic!("build the demo first: cargo build --release --example demo (scripts/bench does)");
    };
    let empty = fixture.dir.parent().unwrap().join("demo-no-daemon");
    std::fs::create_dir_all(&empty).unwrap();
    let mut group = baseline_group(
        c,
        "7 whole process, demo call",
        "in-process, cheap fallback",
    );
    group.sample_size(20);
    // The daemon route runs twice, the second time as the A/A control.
    let cases = [
        ("daemon route", &fixture.demo_daemon_dir, "0"),
        ("in-process, cheap fallback", &empty, "0"),
        ("in-process, 20 ms fallback", &empty, "20"),
        ("daemon route (A/A)", &fixture.demo_daemon_dir, "0"),
    ];
    for (name, dir, build_ms) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                let output = Command::new(&demo)
                    .arg("call")
                    .arg(dir)
                    .env("DEMO_FALLBACK_BUILD_MS", build_ms)
                    .env_remove("HEDDLE_LOCAL_DAEMON")
                    .stderr(Stdio::null())
                    .output()
                    .unwrap();
                assert!(output.status.success());
                let mut stdout = String::new();
                output
                    .stdout
                    .as_slice()
                    .read_to_string(&mut stdout)
                    .unwrap();
                assert_eq!(
                    stdout.contains("route:   daemon"),
                    name.starts_with("daemon route"),
                    "{stdout}"
                );
            })
        });
    }
    // The first command where no daemon ever ran, with auto-start: the call starts `demo serve`,
    // waits for it (the hand-off) and goes to it: the whole start, the daemon's included. Between samples, untimed, the daemon the last one started must serve
    // (so each sample did start one), is stopped, and its sockets directory goes with its spawn
    // record: each sample is a first miss, never one the backoff holds.
    let restarted = fixture.dir.parent().unwrap().join("demo-auto-start");
    std::fs::create_dir_all(&restarted).unwrap();
    let sockets = restarted.join(tower_local_daemon::SOCKETS_DIR);
    let stop_started = || {
        if sockets.exists() {
            // Another executable than this bench: its pidfile says it serves.
            let pidfile = sockets.join(tower_local_daemon::PIDFILE_FILE);
            wait_for("the auto-started daemon", || pidfile.exists());
            let stopped = Command::new(&demo).arg("stop").arg(&restarted).output();
            assert!(stopped.unwrap().status.success());
            std::fs::remove_dir_all(&sockets).unwrap();
        }
    };
    group.bench_function("auto-start, waits for its daemon", |b| {
        b.iter_batched(
            &stop_started,
            |()| {
                let output = Command::new(&demo)
                    .args(["call", "--auto-start"])
                    .arg(&restarted)
                    .env_remove("HEDDLE_LOCAL_DAEMON")
                    .stderr(Stdio::null())
                    .output()
                    .unwrap();
                assert!(output.status.success());
                let stdout = String::from_utf8_lossy(&output.stdout);
                assert!(stdout.contains("route:   daemon (pid "), "{stdout}");
            },
            criterion::BatchSize::PerIteration,
        )
    });
    stop_started();
    // What the auto-start row waits for that is the daemon's own: `demo serve` from its exec to
    // its pidfile (it serves before it writes it), in a directory of its own each time, seen by
    // polling every 20 µs. Stopped, untimed, when the sample is dropped.
    let alone = fixture.dir.parent().unwrap().join("demo-alone");
    let mut sample = 0;
    group.bench_function("the daemon alone, exec to serving", |b| {
        b.iter_batched(
            || {
                sample += 1;
                alone.join(sample.to_string())
            },
            |dir| {
                let child = demo_serve(&demo, &dir);
                let pidfile = dir.join("sockets").join(tower_local_daemon::PIDFILE_FILE);
                while !pidfile.exists() {
                    std::thread::sleep(Duration::from_micros(20));
                }
                StartedAlone { child, dir }
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
    let _ = std::io::stdout().flush();
}

/// `demo serve DIR`, quiet, not waited for.
fn demo_serve(demo: &Path, dir: &Path) -> Child {
    Command::new(demo)
        .arg("serve")
        .arg(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A daemon the bench started by hand: stopped (SIGTERM, then waited for) and its directory
/// removed when dropped.
struct StartedAlone {
    child: Child,
    dir: PathBuf,
}

impl Drop for StartedAlone {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- 8. The daemon route's runtime check, alone ----

/// What the daemon route's warm path adds to know which runtime calls: a thread-local read of
/// the task id inside a task, or the runtime's handle inside `block_on` (where there is none).
fn runtime_lookup(c: &mut Criterion) {
    let rt = current_thread();
    let mut group = baseline_group(c, "8 runtime lookup, per call", "nothing");
    group.bench_function("nothing", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    black_box(i);
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("task id, in a task", |b| {
        b.iter_custom(|iters| {
            rt.block_on(rt.spawn(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(tokio::task::try_id());
                }
                start.elapsed()
            }))
            .unwrap()
        })
    });
    group.bench_function("runtime handle, in block_on", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(tokio::runtime::Handle::try_current().map(|h| h.id()).ok());
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}
