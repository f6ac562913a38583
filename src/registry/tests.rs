//! The entry's state machine, driven by hand under tokio's paused time: single flight, the
//! generation, re-probing after the interval, a runtime that ends mid-detection, a reset
//! mid-detection. The files and the socket are real; nothing sleeps for real.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready};

use super::{Decision, Entry, Lease};
use crate::config::{Mode, Settings};
use crate::paths::DaemonPaths;
use crate::pidfile::Pidfile;
use crate::reason::FallbackReason;

/// A directory that is removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tld-unit-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// A pidfile naming this process and a socket that accepts connections but never answers:
    /// every check up to the handshake passes, and the handshake hangs.
    fn silent_daemon(&self) -> std::os::unix::net::UnixListener {
        let paths = DaemonPaths::new(&self.0);
        std::fs::create_dir(&paths.sockets_dir).unwrap();
        let pidfile = Pidfile {
            pid: std::process::id(),
            started_at: 0,
        };
        std::fs::write(&paths.pidfile, pidfile.render()).unwrap();
        std::os::unix::net::UnixListener::bind(&paths.socket).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entry(dir: &Path, settings: Settings) -> (Lease, Arc<Entry>) {
    let lease = Lease::take(dir, &settings);
    let entry = lease.entry().clone();
    (lease, entry)
}

fn settings() -> Settings {
    Settings {
        deadline: Duration::from_secs(1),
        reprobe_interval: Duration::from_secs(10),
        ..Settings::default()
    }
}

/// The reason of a negative decision.
fn reason(entry: &Entry) -> Option<FallbackReason> {
    entry.stats().route.and_then(Result::err)
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_calls_share_one_detection() {
    let dir = TempDir::new("single-flight");
    let _listener = dir.silent_daemon();
    let (_lease, entry) = entry(&dir.0, settings());
    let mut calls: Vec<_> = (0..8)
        .map(|_| {
            let entry = entry.clone();
            spawn(async move { std::future::poll_fn(|cx| entry.poll_decision(cx)).await })
        })
        .collect();
    for call in &mut calls {
        assert_pending!(call.poll());
    }
    assert_eq!(entry.stats().probes, 1);
    // The one detection hangs in the handshake until the deadline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for call in &mut calls {
        assert!(call.is_woken());
        let (_, decision) = assert_ready!(call.poll());
        assert!(matches!(decision, Decision::InProcess));
    }
    assert_eq!(entry.stats().probes, 1);
    assert_eq!(reason(&entry), Some(FallbackReason::DeadlineExceeded));
}

#[tokio::test(start_paused = true)]
async fn a_negative_decision_is_probed_again_only_after_the_interval() {
    let dir = TempDir::new("reprobe");
    let (_lease, entry) = entry(&dir.0, settings());
    let mut first = spawn(std::future::poll_fn(|cx| entry.poll_decision(cx)));
    let (generation, _) = assert_ready!(first.poll());
    assert_eq!(reason(&entry), Some(FallbackReason::NoPidfile));
    assert!(!entry.reprobe_due());

    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(!entry.reprobe_due());
    assert_eq!(entry.generation(), generation);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(entry.reprobe_due(), "the interval has passed");

    // The next call starts the re-probe in the background and goes on in-process.
    let mut next = spawn(std::future::poll_fn(|cx| entry.poll_decision(cx)));
    assert!(matches!(
        assert_ready!(next.poll()),
        (_, Decision::InProcess)
    ));
    tokio::task::yield_now().await;
    assert_eq!(entry.stats().probes, 2);
    assert!(
        entry.generation() > generation,
        "the re-probe's decision is new"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reset_during_detection_wakes_the_waiting_calls_and_starts_afresh() {
    let dir = TempDir::new("reset");
    let _listener = dir.silent_daemon();
    let (_lease, entry) = entry(&dir.0, settings());
    let mut call = spawn(std::future::poll_fn(|cx| entry.poll_decision(cx)));
    assert_pending!(call.poll());
    entry.reset();
    assert!(call.is_woken());
    // It waits for a detection of its own now, which the counters (reset) show.
    assert_pending!(call.poll());
    assert_eq!(entry.stats().probes, 1);
}

#[test]
fn a_detection_whose_runtime_ends_is_started_again_by_the_next_runtime() {
    let dir = TempDir::new("runtime-ends");
    let _listener = dir.silent_daemon();
    let (_lease, entry) = entry(&dir.0, settings());
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let waiting = entry.clone();
    let mut call = spawn(async move { std::future::poll_fn(|cx| waiting.poll_decision(cx)).await });
    first.block_on(async { assert_pending!(call.poll()) });
    // The runtime goes away with the detection's task: not the daemon's fault.
    drop(first);
    assert!(call.is_woken());
    assert_eq!(reason(&entry), None);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    second.block_on(async {
        assert_pending!(call.poll());
        assert_eq!(entry.stats().probes, 2);
    });
}

#[tokio::test(start_paused = true)]
async fn require_mode_refuses_and_auto_runs_in_process_for_the_same_reason() {
    let dir = TempDir::new("modes");
    for (mode, refused) in [(Mode::Auto, false), (Mode::Require, true)] {
        let settings = Settings {
            mode,
            deadline: Duration::from_millis(100),
            ..settings()
        };
        let (_lease, entry) = entry(&dir.0, settings);
        let mut call = spawn(std::future::poll_fn(|cx| entry.poll_decision(cx)));
        let decision = loop {
            match call.poll() {
                std::task::Poll::Ready((_, decision)) => break decision,
                std::task::Poll::Pending => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        match decision {
            Decision::Unavailable(FallbackReason::NoPidfile) => assert!(refused),
            Decision::InProcess => assert!(!refused),
            other => panic!("{other:?}"),
        }
        // The same verdict, whichever way the mode routes it.
        assert_eq!(reason(&entry), Some(FallbackReason::NoPidfile));
    }
}

/// A subscriber under which the checks' own trace event panics: a check that panics.
struct PanicInTheChecks;

impl tracing::Subscriber for PanicInTheChecks {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target().ends_with("connect::handshake") {
            panic!("a check panicked");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_panic_in_the_checks_ends_the_detection_and_wakes_its_calls() {
    let dir = TempDir::new("panic");
    // Every check up to the connect passes; the connect is refused at once.
    let paths = DaemonPaths::new(&dir.0);
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    let pidfile = Pidfile::new(std::process::id(), 0);
    std::fs::write(&paths.pidfile, pidfile.render()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&paths.socket).unwrap());
    let (_lease, entry) = entry(&dir.0, settings());
    let _subscriber = tracing::subscriber::set_default(PanicInTheChecks);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut call = spawn(std::future::poll_fn(|cx| entry.poll_decision(cx)));
        assert_pending!(call.poll());
        for _ in 0..1_000 {
            if call.is_woken() {
                break;
            }
            tokio::task::yield_now().await;
        }
        // The guard ended the run: the waiting call is woken, and routes in-process.
        assert!(call.is_woken());
        assert!(matches!(
            assert_ready!(call.poll()),
            (_, Decision::InProcess)
        ));
    });
    assert!(matches!(
        reason(&entry),
        Some(FallbackReason::RuntimeUnusable { .. })
    ));
}
