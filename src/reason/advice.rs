//! What each reason means to a person and to a program: [`FallbackReason::remedy`] and the
//! stable [`FallbackReason::code`].

use std::borrow::Cow;

use super::FallbackReason;

impl FallbackReason {
    /// A stable, snake_case name for the reason, for logs and metrics: it never changes for an
    /// existing reason, and a new reason gets a new name.
    ///
    /// ```
    /// use tower_local_daemon::FallbackReason;
    ///
    /// assert_eq!(FallbackReason::NoPidfile.code(), "no_pidfile");
    /// assert_eq!(FallbackReason::ForeignSocket { uid: 0 }.code(), "foreign_socket");
    /// ```
    pub fn code(&self) -> &'static str {
        use FallbackReason::*;
        match self {
            UnsearchableDirectory { .. } => "unsearchable_directory",
            SymlinkedSocketsDir => "symlinked_sockets_dir",
            SocketsDirNotADirectory => "sockets_dir_not_a_directory",
            ForeignSocketsDir { .. } => "foreign_sockets_dir",
            OpenSocketsDir { .. } => "open_sockets_dir",
            NoPidfile => "no_pidfile",
            MalformedPidfile(_) => "malformed_pidfile",
            MarkerMismatch { .. } => "marker_mismatch",
            UnreadablePidfile { .. } => "unreadable_pidfile",
            LinkedPidfile { .. } => "linked_pidfile",
            ProcessGone => "process_gone",
            ProcessUnreadable { .. } => "process_unreadable",
            ForeignProcess { .. } => "foreign_process",
            ExecutableMismatch => "executable_mismatch",
            ExecutableReplaced => "executable_replaced",
            PidReused { .. } => "pid_reused",
            NoSocket => "no_socket",
            NotASocket => "not_a_socket",
            ForeignSocket { .. } => "foreign_socket",
            LinkedSocket { .. } => "linked_socket",
            ConnectionRefused => "connection_refused",
            LockNotHeld { .. } => "lock_not_held",
            Busy => "busy",
            ConnectFailed { .. } => "connect_failed",
            PeerUidMismatch { .. } => "peer_uid_mismatch",
            PeerPidMismatch { .. } => "peer_pid_mismatch",
            HandshakeFailed { .. } => "handshake_failed",
            DeadlineExceeded => "deadline_exceeded",
            NotServing { .. } => "not_serving",
            ServiceNotHosted { .. } => "service_not_hosted",
            HealthUnimplemented => "health_unimplemented",
            VersionMismatch { .. } => "version_mismatch",
            DirectoryMismatch { .. } => "directory_mismatch",
            DirectoryUnreported => "directory_unreported",
            ConnectionLost => "connection_lost",
            AutoStartFailed { .. } => "auto_start_failed",
            Disabled => "disabled",
            Unsupported => "unsupported",
            RuntimeUnusable { .. } => "runtime_unusable",
        }
    }

    /// Whether another attempt would only repeat this answer: a rejection of what is there (the
    /// files, the process, what the daemon says about itself) rather than a daemon that may be
    /// starting, stopping or busy. In mode `require` a definitive reason ends the wait for a
    /// daemon at once, and is the reason reported.
    ///
    /// ```
    /// use tower_local_daemon::FallbackReason;
    ///
    /// assert!(FallbackReason::HealthUnimplemented.is_definitive());
    /// assert!(!FallbackReason::NoPidfile.is_definitive());
    /// ```
    pub fn is_definitive(&self) -> bool {
        use FallbackReason::*;
        match self {
            UnsearchableDirectory { .. }
            | SymlinkedSocketsDir
            | SocketsDirNotADirectory
            | ForeignSocketsDir { .. }
            | OpenSocketsDir { .. }
            | UnreadablePidfile { .. }
            | MarkerMismatch { .. }
            | LinkedPidfile { .. }
            | ProcessUnreadable { .. }
            | ForeignProcess { .. }
            | ExecutableMismatch
            | NotASocket
            | ForeignSocket { .. }
            | LinkedSocket { .. }
            | PeerUidMismatch { .. }
            | HandshakeFailed { .. }
            | ServiceNotHosted { .. }
            | HealthUnimplemented
            | VersionMismatch { .. }
            | DirectoryMismatch { .. }
            | DirectoryUnreported
            | AutoStartFailed { .. }
            | Disabled
            | Unsupported
            | RuntimeUnusable { .. } => true,
            // A daemon may be coming (no files yet, a pidfile half written, nobody listening
            // yet, a copy about to be replaced), going (its process gone, its pid reused, an
            // upgrade restarting it) or busy.
            NoPidfile
            | MalformedPidfile(_)
            | ProcessGone
            | ExecutableReplaced
            | PidReused { .. }
            | NoSocket
            | ConnectionRefused
            | LockNotHeld { .. }
            | Busy
            | ConnectFailed { .. }
            | PeerPidMismatch { .. }
            | DeadlineExceeded
            | NotServing { .. }
            | ConnectionLost => false,
        }
    }

    /// Whether the reason is a configuration error of the daemon or its clients, rather than a
    /// state of the daemon: a pidfile marker that is not the one expected. Logged once per
    /// process as a warning, so that it is not mistaken for a daemon that is not there.
    ///
    /// ```
    /// use tower_local_daemon::FallbackReason;
    ///
    /// let mismatch = FallbackReason::MarkerMismatch { expected: "kv".into(), found: "heddle-agent".into() };
    /// assert!(mismatch.is_misconfiguration());
    /// assert!(!FallbackReason::NoPidfile.is_misconfiguration());
    /// ```
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, FallbackReason::MarkerMismatch { .. })
    }

    /// Whether the probe missed only the files a daemon writes once it is ready (its pidfile
    /// and socket, or an older daemon's left behind): with the lifetime lock held, the daemon
    /// that holds it is still loading.
    pub(crate) fn is_loading(&self) -> bool {
        use FallbackReason::*;
        matches!(self, NoPidfile | NoSocket | ProcessGone | PidReused { .. })
    }

    /// What to do about it, in one sentence for a person.
    pub fn remedy(&self) -> Cow<'static, str> {
        use FallbackReason::*;
        Cow::Borrowed(match self {
            UnsearchableDirectory { .. } => {
                "run the command as the user the directory belongs to, or give this user search permission on it (`chmod o+x`, or a group)"
            }
            SymlinkedSocketsDir => {
                "a symlinked sockets directory shares another directory's daemon; remove the link, and give each worktree its own state directory (or point the layer at the shared directory itself)"
            }
            SocketsDirNotADirectory => {
                "remove whatever is at the sockets path; the daemon creates the directory"
            }
            ForeignSocketsDir { .. } => {
                "the sockets directory belongs to another user; remove it and start the daemon as yourself"
            }
            OpenSocketsDir { .. } => {
                "others can replace files in the sockets directory; `chmod 700` it, or remove it and start the daemon again"
            }
            LinkedPidfile { .. } | LinkedSocket { .. } => {
                "a hard-linked daemon file may belong to another directory; remove the sockets directory's files and start the daemon again"
            }
            NoPidfile => "start the daemon if you want calls to use it",
            UnreadablePidfile {
                error: Some(std::io::ErrorKind::PermissionDenied),
            } => {
                "this user may not read the pidfile; run the command as the daemon's user, or fix the file's permissions"
            }
            MarkerMismatch { .. } => {
                "if the daemon is this tool's, give it and its clients the same `Tool` (or pidfile marker); if it belongs to another tool, give each tool its own state directory"
            }
            MalformedPidfile(_) | UnreadablePidfile { .. } => {
                "the pidfile was not written by a daemon of this format; stop whatever wrote it and start the daemon again"
            }
            ProcessGone | PidReused { .. } => {
                "a stale pidfile: the daemon exited without cleaning up; start the daemon again"
            }
            ProcessUnreadable { .. } => {
                "the process's /proc entry cannot be read (hidepid?); run the client as the daemon's user"
            }
            ForeignProcess { .. } | ForeignSocket { .. } | PeerUidMismatch { .. } => {
                "the daemon belongs to another user; run it as yourself, or run the client as its user"
            }
            ExecutableMismatch => {
                "the pidfile names a process of another executable: a stale pidfile, or a daemon of another tool; start the daemon again, or configure the identity policy"
            }
            ExecutableReplaced => {
                "the daemon runs an older build of this executable, replaced on disk; stop it and start it again"
            }
            NoSocket | NotASocket => {
                "the socket is missing or not a socket; stop the daemon and start it again"
            }
            ConnectionRefused => "nobody listens on the socket; start the daemon again",
            LockNotHeld { .. } => {
                "the sockets directory was copied from another directory; start this directory's own daemon"
            }
            Busy => "the daemon is overloaded (its listen backlog is full); retry later",
            ConnectFailed { .. } => "check the socket's permissions, then start the daemon again",
            PeerPidMismatch { .. } => {
                "another process owns the socket than the pidfile names; stop both and start the daemon again"
            }
            HandshakeFailed { .. } => {
                "the socket does not speak gRPC; stop whatever listens on it and start the daemon again"
            }
            DeadlineExceeded => {
                "the daemon is hung or overloaded; check it, or stop it and start it again"
            }
            NotServing { .. } => "the daemon is starting or stopping; retry in a moment",
            ServiceNotHosted { .. } | HealthUnimplemented | VersionMismatch { .. } => {
                "the daemon is an older or other build; stop it and start it from this build"
            }
            DirectoryUnreported => {
                "the daemon does not say which directory it serves (an older or other implementation); upgrade it, or accept it with `accept_unverified_directory`"
            }
            ConnectionLost => "the daemon went away; the next re-probe picks up a new one",
            AutoStartFailed { .. } => {
                "read the daemon's log (`status` shows its last lines), fix the daemon command, and retry; starts back off while they fail"
            }
            Disabled => {
                "set the mode to auto (for example HEDDLE_LOCAL_DAEMON=auto) to use a daemon"
            }
            Unsupported => "this platform is not supported yet; calls run in-process",
            RuntimeUnusable { .. } => {
                "call from a Tokio runtime built with `enable_all()` (I/O and time drivers)"
            }
            DirectoryMismatch { pid, .. } => {
                return Cow::Owned(format!(
                    "the daemon (pid {pid}) serves another directory through a shared, linked or moved sockets directory, so `stop` here refuses it: stop it from the directory it serves, or `kill {pid}`; then remove this directory's `sockets` directory and start a daemon for this directory"
                ));
            }
        })
    }
}
