//! The first check: what the files on disk and the kernel say, with syscalls only.
//!
//! The stages, in order: the sockets directory is ours and private; the pidfile parses and has
//! one link; the process it names is alive, ours, runs the expected executable and is the one
//! that took the lifetime lock; the socket is a socket of ours with one link. Every stage is a
//! handful of `stat`s, `open`s and `/proc` reads, all synchronous: they run inside the first
//! call's `poll_ready`. A sockets directory on a hung network mount therefore blocks that call;
//! the reads themselves are bounded (no symlinks, no FIFOs, at most a few hundred bytes).

mod stages;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use self::stages::{check_process, check_socket};
pub(crate) use self::stages::{check_sockets_dir, read_pidfile};
use crate::config::Settings;
use crate::paths::{DaemonPaths, DirIdentity};
use crate::pidfile::Pidfile;
use crate::reason::FallbackReason;
use crate::sync::lock;
use crate::tool::Tool;

/// Where a daemon that passed the probe listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct UdsTarget {
    /// The Unix socket to connect to.
    pub socket_path: PathBuf,
    /// The daemon's pid, from its pidfile; the socket's peer must be this process.
    pub pid: u32,
}

impl UdsTarget {
    /// A target: the daemon `pid` listens on `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>, pid: u32) -> Self {
        Self {
            socket_path: socket_path.into(),
            pid,
        }
    }
}

/// What the probe concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalDaemonStatus {
    /// The pidfile names a live process of ours, and its socket is in place.
    Running {
        /// The daemon's pid.
        pid: u32,
    },
    /// The pidfile names a process, and it is not usable.
    Stale {
        /// The pid the pidfile names.
        pid: u32,
        /// Why it is not usable.
        reason: FallbackReason,
    },
    /// Nothing usable on disk: no pidfile, or one that is not a pidfile.
    Absent {
        /// Why.
        reason: FallbackReason,
    },
}

impl LocalDaemonStatus {
    /// The reason the daemon is not usable, or `None` when it is running.
    ///
    /// ```
    /// use tower_local_daemon::{FallbackReason, LocalDaemonStatus};
    ///
    /// let stale = LocalDaemonStatus::Stale { pid: 7, reason: FallbackReason::ProcessGone };
    /// assert_eq!(stale.reason(), Some(&FallbackReason::ProcessGone));
    /// assert_eq!(LocalDaemonStatus::Running { pid: 7 }.reason(), None);
    /// ```
    pub fn reason(&self) -> Option<&FallbackReason> {
        match self {
            Self::Running { .. } => None,
            Self::Stale { reason, .. } | Self::Absent { reason } => Some(reason),
        }
    }
}

/// The result of [`probe`]: the paths it looked at and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalDaemonProbe {
    /// The socket path checked.
    pub socket_path: PathBuf,
    /// The pidfile path read.
    pub pid_path: PathBuf,
    /// What the probe concluded.
    pub status: LocalDaemonStatus,
}

impl LocalDaemonProbe {
    /// A probe's result, for one built by hand (a test, a mock).
    pub fn new(
        socket_path: impl Into<PathBuf>,
        pid_path: impl Into<PathBuf>,
        status: LocalDaemonStatus,
    ) -> Self {
        Self {
            socket_path: socket_path.into(),
            pid_path: pid_path.into(),
            status,
        }
    }

    /// The target to connect to, or the reason there is none.
    pub(crate) fn into_target(self) -> Result<UdsTarget, FallbackReason> {
        match self.status {
            LocalDaemonStatus::Running { pid } => Ok(UdsTarget {
                socket_path: self.socket_path,
                pid,
            }),
            LocalDaemonStatus::Stale { reason, .. } | LocalDaemonStatus::Absent { reason } => {
                Err(reason)
            }
        }
    }

    /// The target to connect to, when the daemon is running.
    ///
    /// ```
    /// let found = tower_local_daemon::probe("/no/such/repo/.heddle");
    /// assert_eq!(found.target(), None);
    /// assert!(found.socket_path.ends_with("sockets/grpc.sock"));
    /// ```
    pub fn target(&self) -> Option<UdsTarget> {
        self.clone().into_target().ok()
    }
}

/// Probes a repository directory's daemon files: synchronous, syscalls only, never cached.
///
/// The checks, in order: the sockets directory is a real directory (not a symlink) of our
/// effective uid that group and others cannot write; the pidfile parses and has one link; the
/// process it names is alive (ESRCH and zombies are gone; EPERM is alive and someone else's),
/// runs as our effective uid and runs our own executable (device and inode); when the lock file
/// records the daemon's start (ticks since boot and boot id) for that pid, the process has that
/// start, else its pid was reused; the socket path is a socket (not a symlink) of our effective
/// uid with one link. [`FallbackReason`] has the table of which reason gives which status.
///
/// ```
/// use tower_local_daemon::{probe, FallbackReason, LocalDaemonStatus};
///
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-probe-nothing-here");
/// let found = probe(&dir);
/// assert_eq!(found.status, LocalDaemonStatus::Absent { reason: FallbackReason::NoPidfile });
/// ```
pub fn probe(state_dir: impl AsRef<Path>) -> LocalDaemonProbe {
    Tool::heddle().probe(state_dir)
}

/// [`probe`], cached per directory for [`DETECT_CACHE_TTL`]: the target when the daemon is
/// running, `None` otherwise.
///
/// The cache is keyed by the directory's identity (device and inode), so two spellings of one
/// directory share it. Use [`probe`] to know why a daemon was not found.
///
/// ```
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-detect");
/// assert_eq!(tower_local_daemon::detect_local_daemon(&dir), None);
/// ```
pub fn detect_local_daemon(state_dir: impl AsRef<Path>) -> Option<UdsTarget> {
    Tool::heddle().detect(state_dir)
}

/// The tool-aware forms of [`probe`] and [`detect_local_daemon`]: with the tool's pidfile
/// marker, never heddle's.
impl Tool {
    /// [`probe`] for this tool's daemon of `state_dir`.
    ///
    /// ```
    /// let kv = tower_local_daemon::Tool::new("kv")?;
    /// assert_eq!(kv.probe("/no/such/repo/.kv").target(), None);
    /// # Ok::<(), tower_local_daemon::InvalidTool>(())
    /// ```
    pub fn probe(&self, state_dir: impl AsRef<Path>) -> LocalDaemonProbe {
        probe_paths(&DaemonPaths::new(state_dir), &Settings::for_tool(self))
    }

    /// [`detect_local_daemon`] for this tool's daemon of `state_dir`.
    pub fn detect(&self, state_dir: impl AsRef<Path>) -> Option<UdsTarget> {
        detect_cached(self, state_dir.as_ref())
    }
}

fn detect_cached(tool: &Tool, state_dir: &Path) -> Option<UdsTarget> {
    type Cache = HashMap<(DirIdentity, String), (Instant, Option<UdsTarget>)>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let dir = &crate::paths::absolute(state_dir);
    let key = (DirIdentity::of(dir), tool.marker().to_owned());
    let cache = CACHE.get_or_init(Default::default);
    if let Some((at, target)) = lock(cache).get(&key)
        && at.elapsed() < DETECT_CACHE_TTL
    {
        return target.clone();
    }
    // Probed outside the lock: a slow filesystem holds up this lookup only.
    let target = tool.probe(dir).target();
    let mut cache = lock(cache);
    // Bounded: a process that walks many repositories keeps only the fresh results.
    if cache.len() >= DETECT_CACHE_CAPACITY {
        cache.retain(|_, (at, _)| at.elapsed() < DETECT_CACHE_TTL);
        if cache.len() >= DETECT_CACHE_CAPACITY {
            cache.clear();
        }
    }
    cache.insert(key, (Instant::now(), target.clone()));
    target
}

/// How long [`detect_local_daemon`] keeps a result.
pub const DETECT_CACHE_TTL: Duration = Duration::from_secs(1);

/// How many directories [`detect_local_daemon`] keeps results for.
const DETECT_CACHE_CAPACITY: usize = 256;

/// What passed at one stage of the probe, for [`probe_observed`]'s observer.
#[derive(Debug)]
pub(crate) enum Passed<'a> {
    Directory,
    Pidfile(&'a Pidfile),
    Process(u32),
    Socket,
}

/// [`probe`] with resolved paths and an identity policy.
pub(crate) fn probe_paths(paths: &DaemonPaths, settings: &Settings) -> LocalDaemonProbe {
    probe_observed(paths, settings, |_| {})
}

/// [`probe_paths`], telling `observe` how each stage went, as it ends: the one definition of
/// the stages' order, which `diagnose` reports.
pub(crate) fn probe_observed(
    paths: &DaemonPaths,
    settings: &Settings,
    mut observe: impl FnMut(Result<Passed<'_>, &FallbackReason>),
) -> LocalDaemonProbe {
    let mut stage = |result: Result<Passed<'_>, FallbackReason>| match result {
        Ok(passed) => {
            observe(Ok(passed));
            Ok(())
        }
        Err(reason) => {
            observe(Err(&reason));
            Err(reason)
        }
    };
    let status = (|| {
        let absent = |reason| LocalDaemonStatus::Absent { reason };
        stage(check_sockets_dir(&paths.sockets_dir).map(|()| Passed::Directory)).map_err(absent)?;
        let pidfile = read_pidfile(&paths.pidfile, &settings.marker);
        stage(pidfile.as_ref().map(Passed::Pidfile).map_err(Clone::clone)).map_err(absent)?;
        let pid = pidfile.expect("checked by the stage").pid;
        let stale = |reason| LocalDaemonStatus::Stale { pid, reason };
        stage(check_process(pid, &paths.lock, &settings.identity).map(|()| Passed::Process(pid)))
            .map_err(stale)?;
        stage(check_socket(&paths.socket).map(|()| Passed::Socket)).map_err(
            |reason| match reason {
                FallbackReason::LinkedSocket { .. } => absent(reason),
                reason => stale(reason),
            },
        )?;
        Ok(LocalDaemonStatus::Running { pid })
    })()
    .unwrap_or_else(|status| status);
    LocalDaemonProbe {
        socket_path: paths.socket.clone(),
        pid_path: paths.pidfile.clone(),
        status,
    }
}
