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

/// The README's "Two routes, one repository": a counter whose daemon caches it, incremented by
/// one-shot commands from a cold directory with auto-start. The first commands wait for the
/// daemon they start, so every increment takes the daemon route, and none is lost.
#[test]
fn one_shot_increments_from_a_cold_directory_all_reach_the_daemon_and_none_is_lost() {
    const PROCESSES: usize = 8;
    const INCREMENTS: usize = 25;
    let dir = std::env::temp_dir().join(format!("tld-tally-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let routes: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PROCESSES)
            .map(|_| {
                scope.spawn(|| {
                    (0..INCREMENTS)
                        .map(|_| {
                            let output = Command::new(demo())
                                .args(["increment", "--auto-start"])
                                .arg(&dir)
                                .env_remove("HEDDLE_LOCAL_DAEMON")
                                .output()
                                .unwrap();
                            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
                            let stderr = String::from_utf8_lossy(&output.stderr);
                            assert!(output.status.success(), "{stdout}{stderr}");
                            let route = stdout
                                .lines()
                                .find_map(|l| l.strip_prefix("route:   "))
                                .unwrap_or("none");
                            format!("{route} | {stdout}")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let stop = Command::new(demo()).arg("stop").arg(&dir).output().unwrap();
    assert!(stop.status.success(), "{stop:?}");
    let not_daemon: Vec<&String> = routes.iter().filter(|r| !r.starts_with("daemon")).collect();
    assert!(not_daemon.is_empty(), "{not_daemon:#?}");
    let tally = std::fs::read_to_string(dir.join("tally")).unwrap();
    assert_eq!(tally.trim(), (PROCESSES * INCREMENTS).to_string());
    std::fs::remove_dir_all(&dir).unwrap();
}
