//! Load over the daemon route: 64 concurrent tasks, no errors, no leaked descriptors, no
//! growing memory. In its own test binary, so that no other test's allocations show in its
//! measurements.

mod support;

use support::*;
use tower_local_daemon::{LocalDaemonStatus, probe};

/// Not a test: the entry point of this binary when it is re-executed as a daemon.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn resident_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_of_64_tasks_over_the_daemon_route_leaks_neither_descriptors_nor_memory() {
    const TASKS: u64 = 64;
    const CALLS: u64 = 10_000;
    const ROUNDS: u64 = 4;
    let dir = TestDir::new("load");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    let mut client = EchoClient::new(svc.clone());
    assert_eq!(
        echo(&mut client, 0).await.unwrap().get_ref().pid,
        daemon.pid()
    );
    assert!(matches!(
        probe(dir.path()).status,
        LocalDaemonStatus::Running { .. }
    ));

    let mut fds = Vec::new();
    let mut rss = Vec::new();
    for _round in 0..ROUNDS {
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let mut client = EchoClient::new(svc.clone());
                tokio::spawn(async move {
                    for i in 0..CALLS / ROUNDS {
                        let id = task * CALLS + i;
                        echo(&mut client, id).await.expect("no errors under load");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        fds.push(open_fds());
        rss.push(resident_kib());
    }
    let stats = svc.stats().unwrap();
    println!(
        "load: {} daemon calls; fds per round {fds:?}; RSS KiB per round {rss:?}",
        stats.daemon_calls
    );
    assert_eq!(stats.in_process_calls, 0);
    assert_eq!(stats.daemon_calls, 1 + TASKS * CALLS);
    assert!(
        fds.windows(2).all(|w| w[0] == w[1]),
        "descriptors after each round: {fds:?}"
    );
    // glibc keeps freed memory: compare later rounds with each other, not with the start.
    let growth = rss[ROUNDS as usize - 1].saturating_sub(rss[1]);
    assert!(
        growth < 8 * 1024,
        "RSS grew {growth} KiB between rounds 2 and 4: {rss:?}"
    );
}
