//! The demo: one binary that is both the CLI and its daemon, so the default identity check
//! (the daemon runs our own executable) holds between them.
//!
//! ```text
//! cargo run --example demo                 # the tour: in-process, daemon, in-process, payoff
//! cargo run --example demo -- serve DIR    # run a daemon for DIR until SIGTERM or Ctrl-C
//! cargo run --example demo -- call DIR     # one call through the layer, then exit
//! cargo run --example demo -- call --auto-start DIR   # the same, starting `demo serve DIR` on a miss
//! cargo run --example demo -- increment [--auto-start] DIR   # add one to DIR/tally, on either route
//! cargo run --example demo -- status DIR   # every check, its outcome and what to do
//! cargo run --example demo -- stop DIR     # stop DIR's daemon, once verified as DIR's
//! ```
//!
//! `RUST_LOG=tower_local_daemon=debug` shows each routing decision with its reason and timings.
//! `DEMO_FALLBACK_BUILD_MS=20` makes building the in-process service take that long, like
//! opening a large repository.

#[allow(clippy::all)]
mod echo;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use echo::echo_client::EchoClient;
use echo::echo_server::EchoServer;
use echo::{EchoRequest, EchoService, INCREMENT, Tally};
use tower::ServiceBuilder;
use tower_local_daemon::{
    AutoStart, Daemon, LazyFallback, LocalDaemonLayer, LocalDaemonStatus, Route, StopOutcome, probe,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => tour(),
        ["serve", dir] => runtime.block_on(serve(Path::new(dir))),
        ["call", dir] => runtime.block_on(call(Path::new(dir), false, "hello")),
        ["call", "--auto-start", dir] => runtime.block_on(call(Path::new(dir), true, "hello")),
        ["increment", dir] => runtime.block_on(call(Path::new(dir), false, INCREMENT)),
        ["increment", "--auto-start", dir] => {
            runtime.block_on(call(Path::new(dir), true, INCREMENT))
        }
        ["status", dir] => runtime.block_on(status(Path::new(dir))),
        ["stop", dir] => runtime.block_on(stop(Path::new(dir))),
        _ => {
            eprintln!(
                "usage: demo [serve DIR | call [--auto-start] DIR | increment [--auto-start] DIR \
                 | status DIR | stop DIR]"
            );
            ExitCode::from(2)
        }
    }
}

/// Runs a daemon for `dir` until SIGTERM, SIGINT or Ctrl-C.
async fn serve(dir: &Path) -> ExitCode {
    eprintln!("serving {} as pid {}", dir.display(), std::process::id());
    let result = Daemon::new(dir)
        .version(env!("CARGO_PKG_VERSION"))
        .add_service(EchoServer::new(
            EchoService::new("daemon").with_tally(Tally::new(dir.join("tally"))),
        ))
        .serve(std::future::pending())
        .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message, then its causes: each is said once.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// One call through the layer, the way a CLI verb makes it: a fresh process, a fresh layer.
/// `message` is echoed, or, when it is [`INCREMENT`], adds one to the tally in `dir`.
async fn call(dir: &Path, auto_start: bool, message: &str) -> ExitCode {
    let build_cost = std::env::var("DEMO_FALLBACK_BUILD_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default();
    let mut layer = LocalDaemonLayer::new(dir).mark_route(true);
    if auto_start {
        // This same binary is the daemon. Forced on: the tour runs under CI too.
        let serve = AutoStart::current_exe(["serve".as_ref(), dir.as_os_str()]);
        layer = layer.auto_start(serve).force_auto_start(true);
    }
    let tally = dir.join("tally");
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(LazyFallback::new(move || {
            let tally = tally.clone();
            async move {
                // Stands for opening the repository: paid only when a call runs in-process.
                if !build_cost.is_zero() {
                    tokio::time::sleep(build_cost).await;
                }
                let service = EchoService::new("in-process").with_tally(Tally::new(tally));
                Ok::<_, std::convert::Infallible>(EchoServer::new(service))
            }
        }));
    let mut client = EchoClient::new(svc.clone());

    let start = Instant::now();
    let result = client
        .echo(EchoRequest {
            message: message.into(),
            id: 1,
            delay_ms: 0,
            status_code: 0,
        })
        .await;
    let latency = start.elapsed();
    let response = match result {
        Ok(response) => response,
        Err(status) => {
            // The message, not the status's `Display`, which escapes its line breaks.
            println!("call failed ({:?}):", status.code());
            for line in status.message().lines() {
                println!("   {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    let route = match response.extensions().get::<Route>() {
        Some(route) => route.to_string(),
        None => "unknown".to_owned(),
    };
    let reason = match svc.stats().and_then(|s| s.route) {
        Some(Ok(_)) => "every check passed".to_owned(),
        Some(Err(reason)) => reason.to_string(),
        None => format!("mode {}", svc.mode()),
    };
    // A second call in the same process: what every later call of a long-lived client pays.
    let start = Instant::now();
    let warm = client.echo(EchoRequest::default()).await;
    let warm_latency = start.elapsed();
    println!("route:   {route}");
    println!("latency: {latency:.2?} (the whole first call, checks included)");
    if warm.is_ok() {
        println!("warm:    {warm_latency:.2?} (a second call in the same process)");
    }
    println!("reason:  {reason}");
    println!(
        "reply:   {:?} from {}",
        response.get_ref().message,
        response.get_ref().served_by
    );
    ExitCode::SUCCESS
}

/// Stops DIR's daemon, once verified over a live connection; says what it did.
async fn stop(dir: &Path) -> ExitCode {
    let outcome = tower_local_daemon::stop(dir, Duration::from_secs(10)).await;
    println!("{outcome}");
    if matches!(
        outcome,
        StopOutcome::Refused { .. } | StopOutcome::TimedOut { .. }
    ) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The doctor report: exit 0 when a client would use the daemon.
async fn status(dir: &Path) -> ExitCode {
    let report = LocalDaemonLayer::new(dir).diagnose().await;
    println!("{report}");
    if report.usable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// No arguments: a throwaway repository, a call without a daemon, with one, and after it.
fn tour() -> ExitCode {
    let dir = std::env::temp_dir()
        .join(format!("tower-local-daemon-demo-{}", std::process::id()))
        .join(".heddle");
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    println!("A throwaway repository directory: {}\n", dir.display());
    let code = run_tour(&dir);
    let _ = std::fs::remove_dir_all(dir.parent().expect("the directory has a parent"));
    code
}

/// What building the in-process service costs in the tour: it stands for opening a repository.
const TOUR_BUILD_MS: u64 = 150;

fn run_tour(dir: &Path) -> ExitCode {
    let exe = std::env::current_exe().expect("our own executable");
    println!(
        "Each call runs as its own process, as a CLI verb does. Building the in-process service \
         takes {TOUR_BUILD_MS} ms here, as opening a large repository would.\n"
    );
    println!("1. No daemon is running. A call runs in-process:");
    let in_process = demo_call(&exe, dir, &[]);

    println!("2. Start a daemon for it (this same binary, `demo serve DIR`), then call again:");
    let mut daemon = DaemonChild(
        Command::new(&exe)
            .arg("serve")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the daemon starts"),
    );
    if !serves_within(dir, Duration::from_secs(10)) {
        eprintln!("the daemon did not start within 10 s");
        return ExitCode::FAILURE;
    }
    println!("   (daemon pid {})", daemon.0.id());
    let on_daemon = demo_call(&exe, dir, &[]);

    println!(
        "3. Stop the daemon (`demo stop DIR`: verified over a live connection, then SIGTERM; \
         it removes its files), then call again:"
    );
    let stopped = Command::new(&exe)
        .arg("stop")
        .arg(dir)
        .output()
        .expect("the stop runs");
    for line in String::from_utf8_lossy(&stopped.stdout).lines() {
        println!("   {line}");
    }
    daemon.stop();
    demo_call(&exe, dir, &[]);

    println!(
        "4. With auto-start (`demo call --auto-start DIR`): the call starts the daemon, waits"
    );
    println!("   for it to serve, and goes to it; so does the next command:");
    let started = demo_call(&exe, dir, &["--auto-start"]);
    if !serves_within(dir, Duration::from_secs(10)) {
        eprintln!("the started daemon did not serve within 10 s");
        return ExitCode::FAILURE;
    }
    demo_call(&exe, dir, &["--auto-start"]);
    let stopped = Command::new(&exe).arg("stop").arg(dir).output();
    if !stopped.is_ok_and(|output| output.status.success()) {
        eprintln!(
            "the started daemon could not be stopped: `demo stop {}`",
            dir.display()
        );
        return ExitCode::FAILURE;
    }

    println!("The payoff, one command (a whole process) on each route:");
    println!(
        "   {:<44} {:>12}",
        "in-process, opening the repository",
        fmt(in_process.process)
    );
    println!(
        "   {:<44} {:>12}",
        "daemon, first call (checks included)",
        fmt(on_daemon.process)
    );
    if let Some(warm) = on_daemon.warm {
        println!(
            "   {:<44} {:>12}",
            "daemon, a warm call in a long-lived client",
            fmt(warm)
        );
    }
    println!(
        "   {:<44} {:>12}",
        "in-process, starting the daemon as well",
        fmt(started.process)
    );
    println!(
        "A daemon pays off when opening the repository ({TOUR_BUILD_MS} ms here) costs more than \
         its checks and one round trip ({} here): for every command, once a daemon runs.",
        fmt(on_daemon.first.unwrap_or(on_daemon.process))
    );
    println!("`cargo run --example demo -- status DIR` explains a decision check by check.");
    ExitCode::SUCCESS
}

/// What one `demo call` process took: the whole process, and the call latencies it printed.
struct Timed {
    process: Duration,
    first: Option<Duration>,
    warm: Option<Duration>,
}

/// Runs `demo call DIR` as its own process, as a CLI verb would run, and indents its output.
/// Whether the probe finds `dir`'s daemon running within `limit`.
fn serves_within(dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !matches!(probe(dir).status, LocalDaemonStatus::Running { .. }) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn demo_call(exe: &PathBuf, dir: &Path, flags: &[&str]) -> Timed {
    let start = Instant::now();
    let output = Command::new(exe)
        .arg("call")
        .args(flags)
        .arg(dir)
        .env("DEMO_FALLBACK_BUILD_MS", TOUR_BUILD_MS.to_string())
        .output()
        .expect("the call runs");
    let process = start.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        println!("   {line}");
    }
    println!();
    let latency = |prefix: &str| {
        let line = stdout.lines().find_map(|l| l.strip_prefix(prefix))?;
        let text = line.split_whitespace().next()?;
        parse_duration(text)
    };
    Timed {
        process,
        first: latency("latency: "),
        warm: latency("warm:    "),
    }
}

/// Reads back a duration printed with `{:.2?}`.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_alphabetic() || c == 'µ')?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

fn fmt(duration: Duration) -> String {
    format!("{duration:.2?}")
}

/// The tour's daemon: stopped with SIGTERM, and killed if the tour ends early.
struct DaemonChild(std::process::Child);

impl DaemonChild {
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
