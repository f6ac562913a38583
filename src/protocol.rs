//! What the client and the daemon side agree on: the files' names in the sockets directory, the
//! pidfile's marker line and the response metadata keys. Both sides import these from here and
//! from nowhere else.

/// The directory, inside a repository directory, that holds the daemon's files.
pub const SOCKETS_DIR: &str = "sockets";
/// The socket's file name inside `<dir>/sockets/`.
pub const SOCKET_FILE: &str = "grpc.sock";
/// The pidfile's file name inside `<dir>/sockets/`.
pub const PIDFILE_FILE: &str = "grpc.pid";
/// The lifetime lock's file name inside `<dir>/sockets/`.
pub const LOCK_FILE: &str = "grpc.lock";
/// The serving daemon's attestation inside `<dir>/sockets/`: its pid and start, the directory it
/// serves, its version and its services, which a client trusts in place of a `Health/Check`
/// round trip. The format is in the [`Daemon`](crate::Daemon)'s docs.
pub const ATTESTATION_FILE: &str = "grpc.attest";

/// The fixed second line of a pidfile.
pub const PIDFILE_MARKER: &str = "heddle-agent";

/// The response metadata key under which a daemon built with this crate reports its version on
/// every response, `grpc.health.v1.Health/Check` included.
pub const VERSION_METADATA_KEY: &str = "local-daemon-version";

/// The response metadata key under which a daemon built with this crate reports the identity
/// of the directory it serves, as decimal `<device>:<inode>`, on every response. A client
/// compares it with the directory it was built for: a correctness check that catches shared,
/// linked and moved sockets directories, not authentication (the uid is the trust boundary).
pub const DIRECTORY_METADATA_KEY: &str = "local-daemon-directory";

/// The default environment variable that overrides the mode (heddle's).
pub const DEFAULT_MODE_ENV: &str = "HEDDLE_LOCAL_DAEMON";
/// The default environment variable that turns auto-start off (heddle's).
pub(crate) const DEFAULT_AUTO_START_ENV: &str = "HEDDLE_LOCAL_DAEMON_AUTO_START";

/// The lock a client holds while it decides to start a daemon, inside `<dir>/sockets/`.
pub const SPAWN_LOCK_FILE: &str = "spawn.lock";
/// The record of the last daemon started on a miss, inside `<dir>/sockets/`.
pub const SPAWN_RECORD_FILE: &str = "spawn.record";
/// An auto-started daemon's standard output and error, inside `<dir>/sockets/`.
pub const DAEMON_LOG_FILE: &str = "daemon.log";
/// The log moved aside when it passes [`DAEMON_LOG_CAP`]: one older log is kept.
pub(crate) const DAEMON_LOG_OLD_FILE: &str = "daemon.log.1";
/// The size past which the log is moved aside: by a start that finds it so, and by the daemon
/// itself while it runs.
pub(crate) const DAEMON_LOG_CAP: u64 = 1024 * 1024;
/// Set in an auto-started daemon's environment: the daemon then exits after an idle timeout
/// unless it sets its own.
pub const AUTO_STARTED_ENV: &str = "LOCAL_DAEMON_AUTO_STARTED";
/// Set in an auto-started daemon's environment: the absolute directory it was started for. A
/// [`Daemon`](crate::Daemon) given any other directory refuses to start
/// ([`DaemonError::WrongDirectory`](crate::daemon::DaemonError::WrongDirectory)).
pub const DAEMON_DIR_ENV: &str = "LOCAL_DAEMON_DIR";
/// Set in an auto-started daemon's environment: the descriptors it inherited from the command
/// without close-on-exec (comma-separated), which [`Daemon`](crate::Daemon) closes as it binds.
pub const INHERITED_FDS_ENV: &str = "LOCAL_DAEMON_INHERITED_FDS";
