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

/// A relative directory, as a user types it: the demo passes it through unchanged, and its
/// auto-start runs the daemon in `/`. The daemon refuses the directory it would resolve there
/// (the command told it the absolute one), so nothing is made outside the repository, and the
/// command's own functions (`call`, `stop`) read the directory it means.
#[test]
fn a_relative_directory_starts_no_daemon_elsewhere_and_means_one_directory_everywhere() {
    let parent = std::env::temp_dir().join(format!("tld-relative-{}", std::process::id()));
    let name = format!(".tld-relative-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(parent.join(&name)).unwrap();
    let elsewhere = std::path::Path::new("/").join(&name);
    let run = |args: &[&str]| {
        let output = Command::new(demo())
            .args(args)
            .current_dir(&parent)
            .env_remove("HEDDLE_LOCAL_DAEMON")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {text}");
        text
    };

    let out = run(&["call", "--auto-start", &name]);
    let made_elsewhere = elsewhere.exists();
    let _ = std::fs::remove_dir_all(&elsewhere);
    assert!(!made_elsewhere, "a daemon made {}", elsewhere.display());
    assert!(out.contains("route:   in-process"), "{out}");
    assert!(out.contains("auto-start failed"), "{out}");
    let log = std::fs::read_to_string(parent.join(&name).join("sockets/daemon.log")).unwrap();
    assert!(
        log.contains(&format!("refusing to serve {}", elsewhere.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("started for {}", parent.join(&name).display())),
        "{log}"
    );

    // A daemon serving the directory by its absolute path is the one a relative `stop` finds.
    let mut daemon = Command::new(demo())
        .arg("serve")
        .arg(parent.join(&name))
        .env_remove("LOCAL_DAEMON_DIR")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = parent.join(&name).join("sockets/grpc.pid");
    for _ in 0..2000 {
        if pidfile.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = run(&["call", &name]);
    assert!(out.contains("route:   daemon (pid "), "{out}");
    let out = run(&["stop", &name]);
    assert!(out.contains("stopped the daemon"), "{out}");
    assert!(daemon.wait().unwrap().success());
    std::fs::remove_dir_all(&parent).unwrap();
}

/// The mode's variable and auto-start's switch are read by one rule in a real process: in any
/// case, and an unknown value is named in one warning. A start that fails in mode `require`
/// prints the daemon's log lines one per line, not as escapes.
#[test]
fn the_environment_is_read_in_any_case_and_a_failed_start_prints_its_log_lines() {
    let parent = std::env::temp_dir().join(format!("tld-env-{}", std::process::id()));
    let name = format!(".tld-env-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(parent.join(&name)).unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(demo())
            .args(args)
            .current_dir(&parent)
            .env_remove("HEDDLE_LOCAL_DAEMON")
            .env_remove("HEDDLE_LOCAL_DAEMON_AUTO_START")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };
    let warnings =
        |stderr: &str, needle: &str| stderr.lines().filter(|l| l.contains(needle)).count();

    // A relative directory: the started daemon refuses it and exits at once.
    let env = [
        ("HEDDLE_LOCAL_DAEMON", "Require"),
        ("HEDDLE_LOCAL_DAEMON_AUTO_START", "maybe"),
    ];
    let (ok, out, err) = run(&["call", "--auto-start", &name], &env);
    assert!(!ok, "{out}");
    assert!(out.starts_with("call failed (Unavailable):\n"), "{out}");
    assert!(!out.contains("\\n"), "{out}");
    let refusal = format!("   error: refusing to serve /{name}: ");
    assert!(out.lines().any(|l| l.starts_with(&refusal)), "{out}");
    let switch = "HEDDLE_LOCAL_DAEMON_AUTO_START=\"maybe\" is not understood";
    assert_eq!(warnings(&err, switch), 1, "{err}");
    assert!(err.contains("auto-start stays on"), "{err}");

    let (ok, out, err) = run(&["call", &name], &[("HEDDLE_LOCAL_DAEMON", "sometimes")]);
    assert!(ok, "{out}");
    let mode = "HEDDLE_LOCAL_DAEMON=\"sometimes\" is not understood";
    assert_eq!(warnings(&err, mode), 1, "{err}");
    assert!(err.contains("the mode stays auto"), "{err}");
    assert!(out.contains("reason:  no pidfile"), "{out}");

    for off in ["OFF", "False", "0"] {
        let (ok, out, err) = run(&["call", &name], &[("HEDDLE_LOCAL_DAEMON", off)]);
        assert!(ok, "{out}");
        assert!(out.contains("reason:  mode off"), "{off}: {out}");
        assert!(err.is_empty(), "{off}: {err}");
    }
    std::fs::remove_dir_all(&parent).unwrap();
}
