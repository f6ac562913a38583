//! The README's first command: the demo's tour, run as a reader runs it.

use std::path::PathBuf;
use std::process::Command;

/// The demo example, which `cargo test` builds beside the tests.
fn demo() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let demo = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/demo");
    assert!(demo.exists(), "{} is built by `cargo test`", demo.display());
    demo
}

#[test]
fn the_tour_shows_both_routes_auto_start_and_the_payoff() {
    let output = Command::new(demo())
        .env_remove("HEDDLE_LOCAL_DAEMON")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let routes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("route:   "))
        .collect();
    // No daemon, a daemon, stopped, auto-started by a call that waits for it, used by the next.
    assert_eq!(routes.len(), 5, "{stdout}");
    assert_eq!(routes[0], "in-process");
    assert!(routes[1].starts_with("daemon (pid "), "{stdout}");
    assert_eq!(routes[2], "in-process");
    assert!(routes[3].starts_with("daemon (pid "), "{stdout}");
    assert!(routes[4].starts_with("daemon (pid "), "{stdout}");
    assert!(stdout.contains("stopped the daemon"), "{stdout}");
    assert!(stdout.contains("The payoff"), "{stdout}");
    assert!(stdout.contains("A daemon pays off when"), "{stdout}");
}
