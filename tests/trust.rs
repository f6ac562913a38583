//! A daemon is used only for the directory it serves: every way another directory's daemon can
//! be reached is refused with its own reason, against a real daemon process.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use support::*;
use tower_local_daemon::{
    DaemonPaths, FallbackReason, LocalDaemonLayer, LocalDaemonStatus, Route, probe,
};

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

/// One call through a layer for `dir`: who served it, and the entry's reason if in-process.
async fn call_through(layer: LocalDaemonLayer) -> (Option<Route>, Option<FallbackReason>) {
    let svc = layered(layer);
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    let route = response.extensions().get::<Route>().copied();
    (route, svc.stats().unwrap().route.and_then(Result::err))
}

/// `dev:ino` of a directory, as a daemon reports it.
fn identity(dir: &Path) -> String {
    let m = std::fs::metadata(dir).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// Repository A with a running daemon, and an empty repository B beside it.
struct TwoRepositories {
    a: TestDir,
    b: TestDir,
    daemon: DaemonProcess,
}

impl TwoRepositories {
    fn new(name: &str) -> Self {
        let a = TestDir::new(&format!("{name}-a"));
        let b = TestDir::new(&format!("{name}-b"));
        let daemon = DaemonProcess::start(a.path());
        Self { a, b, daemon }
    }

    /// B's sockets directory, private and ours, holding hard links to A's `files`.
    fn link_into_b(&self, files: &[fn(&DaemonPaths) -> &Path]) {
        std::fs::create_dir(self.b.paths().sockets_dir).unwrap();
        std::fs::set_permissions(
            self.b.paths().sockets_dir,
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        for file in files {
            std::fs::hard_link(file(&self.a.paths()), file(&self.b.paths())).unwrap();
        }
    }

    /// A call through B: the route, and the reason it ran in-process.
    async fn call_b(&self) -> (Option<Route>, Option<FallbackReason>) {
        call_through(test_layer(self.b.path())).await
    }
}

#[tokio::test]
async fn daemon_of_another_directory_through_a_symlinked_sockets_directory_is_refused() {
    let repos = TwoRepositories::new("t-symlink");
    std::os::unix::fs::symlink(repos.a.paths().sockets_dir, repos.b.paths().sockets_dir).unwrap();
    assert_eq!(
        repos.call_b().await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::SymlinkedSocketsDir)
        )
    );
    assert_eq!(
        probe(repos.b.path()).status,
        LocalDaemonStatus::Absent {
            reason: FallbackReason::SymlinkedSocketsDir
        }
    );
    let report = test_layer(repos.b.path()).diagnose().await;
    assert_eq!(report.checks[1].name, "directory");
    assert_eq!(report.reason(), Some(&FallbackReason::SymlinkedSocketsDir));
    assert!(!report.usable());
    // A's own clients still use it.
    let (route, _) = call_through(test_layer(repos.a.path())).await;
    assert_eq!(
        route,
        Some(Route::Daemon {
            pid: repos.daemon.pid()
        })
    );
}

#[tokio::test]
async fn daemon_of_another_directory_through_hard_links_is_refused() {
    let repos = TwoRepositories::new("t-hardlink");
    repos.link_into_b(&[|p| &p.pidfile, |p| &p.socket]);
    assert_eq!(
        repos.call_b().await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::LinkedPidfile { links: 2 })
        )
    );
}

#[tokio::test]
async fn hard_linked_socket_beside_a_copied_pidfile_is_refused() {
    let repos = TwoRepositories::new("t-hardlink-socket");
    repos.link_into_b(&[|p| &p.socket]);
    std::fs::copy(repos.a.paths().pidfile, repos.b.paths().pidfile).unwrap();
    assert_eq!(
        repos.call_b().await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::LinkedSocket { links: 2 })
        )
    );
}

#[tokio::test]
async fn daemon_of_another_directory_through_a_sockets_directory_of_another_user_is_refused() {
    if !root_or_skip(
        "daemon_of_another_directory_through_a_sockets_directory_of_another_user_is_refused",
    ) {
        return;
    }
    let repos = TwoRepositories::new("t-foreign-dir");
    repos.link_into_b(&[|p| &p.pidfile, |p| &p.socket]);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&repos.b.paths().sockets_dir, Some(nobody.uid), None).unwrap();
    assert_eq!(
        repos.call_b().await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::ForeignSocketsDir {
                uid: nobody.uid.as_raw()
            })
        )
    );
}

#[tokio::test]
async fn daemon_of_another_directory_through_a_sockets_directory_others_can_write_is_refused() {
    let repos = TwoRepositories::new("t-open-dir");
    repos.link_into_b(&[|p| &p.pidfile, |p| &p.socket]);
    std::fs::set_permissions(
        repos.b.paths().sockets_dir,
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    assert_eq!(
        repos.call_b().await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::OpenSocketsDir { mode: 0o777 })
        )
    );
}

#[tokio::test]
async fn daemon_whose_sockets_directory_was_moved_to_another_directory_is_refused() {
    let repos = TwoRepositories::new("t-moved");
    // The daemon still serves A; its files now sit in B.
    std::fs::rename(repos.a.paths().sockets_dir, repos.b.paths().sockets_dir).unwrap();
    assert_eq!(
        repos.call_b().await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::DirectoryMismatch {
                pid: repos.daemon.pid(),
                expected: identity(repos.b.path()),
                served: identity(repos.a.path()),
            })
        )
    );
    // `stop` refuses that daemon by design: the remedy names the pid to signal instead.
    let (_, Some(reason)) = repos.call_b().await else {
        panic!("no reason");
    };
    let remedy = reason.remedy();
    let pid = repos.daemon.pid();
    assert!(remedy.contains(&format!("`kill {pid}`")), "{remedy}");
    assert!(
        reason.to_string().contains(&format!("(pid {pid})")),
        "{reason}"
    );
}

#[tokio::test]
async fn overrides_pointing_at_another_directorys_files_are_refused() {
    let repos = TwoRepositories::new("t-overrides");
    let a = repos.a.paths();
    let layer = test_layer(repos.b.path())
        .socket_path(a.socket)
        .pidfile_path(a.pidfile);
    assert_eq!(
        call_through(layer).await,
        (
            Some(Route::InProcess),
            Some(FallbackReason::DirectoryMismatch {
                pid: repos.daemon.pid(),
                expected: identity(repos.b.path()),
                served: identity(repos.a.path()),
            })
        )
    );
}

#[tokio::test]
async fn renamed_directory_keeps_its_identity_and_its_daemon() {
    let repos = TwoRepositories::new("t-renamed");
    let renamed = repos.b.path().join("renamed");
    std::fs::rename(repos.a.path(), &renamed).unwrap();
    let (route, reason) = call_through(test_layer(&renamed)).await;
    assert_eq!(
        (route, reason),
        (
            Some(Route::Daemon {
                pid: repos.daemon.pid()
            }),
            None
        )
    );
    // Put it back for the daemon's cleanup and TestDir's.
    std::fs::rename(&renamed, repos.a.path()).unwrap();
}
