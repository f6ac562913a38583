//! The kv example end to end, as a user runs it: the client-only `kv` CLI starts `kvd` (built
//! beside it: `cargo build -p kvd` first) on its first `put`, reads on the daemon route, reports
//! its status and stops it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn kv(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg(dir)
        .args(args)
        .env_remove("KV_LOCAL_DAEMON")
        .env_remove("KV_LOCAL_DAEMON_AUTO_START")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("kv-example-{}", std::process::id()))
        .join(".kv");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_put_starts_the_daemon_a_get_reads_it_there_and_stop_stops_it() {
    let kvd = Path::new(env!("CARGO_BIN_EXE_kv")).with_file_name("kvd");
    assert!(
        kvd.exists(),
        "{} is built first: cargo build -p kvd",
        kvd.display()
    );
    let dir = scratch();

    // The first put starts `kvd` and waits for it: it runs on the daemon route.
    let (ok, out) = kv(&dir, &["put", "greeting", "hello"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok (route: daemon (pid "), "{out}");
    let pid = out
        .trim_start_matches("ok (route: daemon (pid ")
        .split(')')
        .next()
        .unwrap()
        .to_owned();

    let (ok, out) = kv(&dir, &["get", "greeting"]);
    assert!(ok, "{out}");
    assert_eq!(out, format!("hello (route: daemon (pid {pid}))\n"));

    let (ok, out) = kv(&dir, &["status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("a client with these options uses the daemon"),
        "{out}"
    );
    assert!(out.contains("auto-start: 1 started"), "{out}");

    let (ok, out) = kv(&dir, &["stop"]);
    assert!(ok, "{out}");
    assert_eq!(out, format!("stopped the daemon (pid {pid})\n"));

    // In mode off the same store answers in-process: the disk is the truth on both routes.
    let output = Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg(&dir)
        .args(["get", "greeting"])
        .env("KV_LOCAL_DAEMON", "off")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(out, "hello (route: in-process)\n");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
