//! Starting a daemon on a miss: one spawner under any race, detached and clean, with a
//! backoff across processes while started daemons do not serve.
//!
//! The decision goes by the lifetime lock, not by the reason a probe gave: a daemon that holds
//! `grpc.lock` (starting, serving, or stopping) never gets a second one. `/proc/locks` tells who
//! holds it without touching it. Under `sockets/spawn.lock` (`flock`, non-blocking) the spawner
//! decides again, reads the attempt record, starts the daemon, and writes the record.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg, OFlag};

use super::status::log_tail;
use super::trusted_path::trusted_directory;
use crate::config::AutoStart;
use crate::lockfile::lock_held;
use crate::paths::{DaemonPaths, FileIdentity};
use crate::peer::own_uid;
use crate::probe::check_sockets_dir;
use crate::protocol::{
    AUTO_STARTED_ENV, DAEMON_DIR_ENV, DAEMON_LOG_CAP, DAEMON_LOG_FILE, DAEMON_LOG_OLD_FILE,
    INHERITED_FDS_ENV, SPAWN_LOCK_FILE,
};
use crate::spawn_record::SpawnRecord;

/// What a spawn attempt did.
#[derive(Debug)]
pub(crate) enum SpawnOutcome {
    /// A daemon was started.
    Spawned(SpawnedChild),
    /// No daemon was started, and a start is provably under way: another process is deciding
    /// (it holds the spawn lock), or the daemon it started is alive and has not served yet. A
    /// call may wait for it.
    Pending(&'static str),
    /// No daemon was started: one holds the lifetime lock. It is loading, serving or
    /// stopping; a probe that found no pidfile yet means it is loading, and a call may wait
    /// for it.
    Locked,
    /// No daemon was started, and that is fine: a start the record cannot prove pending may
    /// be under way. The reason is for logs.
    NotNow(&'static str),
    /// Starting is not allowed here (the directory is not ours, or not private).
    CannotStart(&'static str),
    /// The command could not be started.
    Failed(String),
}

/// A started daemon, reaped by a thread of its own should it exit while this process runs.
#[derive(Debug, Clone)]
pub(crate) struct SpawnedChild {
    pub(crate) pid: u32,
    pub(crate) exit: Arc<OnceLock<ExitStatus>>,
    pub(crate) log: PathBuf,
}

impl SpawnedChild {
    /// Why the daemon is not coming, if it already exited: its status and its log's last lines.
    pub(crate) fn failure(&self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.exit.get()?;
        let tail = log_tail(&self.log, 5).join("\n");
        // A command that never took the lock is stopped with these (`stop_stalled`).
        let ended = match status.signal() {
            Some(15 | 9) => "was stopped",
            _ => "exited",
        };
        Some(format!(
            "the started daemon (pid {}) {ended} ({status}) before serving; its log {} ends:\n{tail}",
            self.pid,
            self.log.display()
        ))
    }
}

impl SpawnedChild {
    /// Why the daemon is not coming: [`failure`](Self::failure), unless a daemon holds the
    /// directory's lifetime lock. One that exited because another holds it lost a race
    /// (`AlreadyRunning`): that one is coming. Reads the log and `/proc/locks`: not under a
    /// lock others wait on, and only once the child exited.
    pub(crate) fn failed_start(&self, paths: &DaemonPaths) -> Option<String> {
        let failure = self.failure()?;
        (!lock_held(&paths.lock)).then_some(failure)
    }
}

/// Starts `auto`'s daemon for `paths`, unless a daemon holds the lock, one is pending, another
/// process decides, or the backoff holds. Never creates the repository directory itself, and
/// never starts anything when it is not ours: under `sudo`, a root-owned sockets directory
/// would lock the user out of their own daemon.
///
/// A command started earlier that has not taken the lifetime lock within the start timeout is
/// stopped first ([`stop_stalled`]); `on_stopped` gets its pid.
pub(crate) fn maybe_spawn(
    paths: &DaemonPaths,
    auto: &AutoStart,
    on_stopped: impl FnOnce(u32),
) -> SpawnOutcome {
    let Some(dir) = paths.sockets_dir.parent() else {
        return SpawnOutcome::CannotStart("the sockets directory has no parent");
    };
    let walked = match trusted_directory(dir) {
        Ok(walked) => walked,
        Err(why) => {
            return SpawnOutcome::Failed(format!(
                "{why}: another user could have put it there to send the daemon elsewhere, so nothing was started; start the daemon by hand or use the directory's real path"
            ));
        }
    };
    // The directory checked is the one `sockets/` is made in: both through one descriptor.
    let private = nix::sys::stat::Mode::from_bits_truncate(0o700);
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let Ok(state_dir) = nix::fcntl::open(dir, flags, nix::sys::stat::Mode::empty()) else {
        return SpawnOutcome::CannotStart("the directory does not exist");
    };
    match nix::sys::stat::fstat(&state_dir) {
        Ok(stat) if walked != Some(FileIdentity::of_stat(&stat)) => {
            return SpawnOutcome::CannotStart("the directory changed while it was checked");
        }
        Ok(stat) if stat.st_uid == own_uid() => {}
        _ => return SpawnOutcome::CannotStart("the directory belongs to another user"),
    }
    let Some(sockets) = paths.sockets_dir.file_name() else {
        return SpawnOutcome::CannotStart("the sockets directory has no name");
    };
    match nix::sys::stat::mkdirat(&state_dir, sockets, private) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(_) => return SpawnOutcome::CannotStart("the sockets directory cannot be made"),
    }
    if check_sockets_dir(&paths.sockets_dir).is_err() {
        return SpawnOutcome::CannotStart(
            "the sockets directory is not a private directory of ours",
        );
    }
    if lock_held(&paths.lock) {
        return SpawnOutcome::Locked;
    }
    let Ok(lock) = open_private(&paths.sockets_dir.join(SPAWN_LOCK_FILE), false) else {
        return SpawnOutcome::CannotStart("the spawn lock cannot be opened");
    };
    let Ok(_lock) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
        return SpawnOutcome::Pending("another process is starting the daemon");
    };
    // Decide again, now that no other process decides.
    if lock_held(&paths.lock) {
        return SpawnOutcome::Locked;
    }
    let mut record = SpawnRecord::read(&paths.sockets_dir).unwrap_or_default();
    if record.proves_pending(auto.start_timeout) {
        return SpawnOutcome::Pending("a daemon started moments ago has not served yet");
    }
    let now = SystemTime::now();
    if record.pending(now, auto.start_timeout) {
        return SpawnOutcome::NotNow("a daemon started moments ago may not have served yet");
    }
    // At most one started command is alive: one that never took the lock is stopped first.
    let stopped = match stop_stalled(&mut record, paths, auto.start_timeout) {
        Some(Ok(pid)) => {
            on_stopped(pid);
            format!(
                "the daemon command started earlier (pid {pid}) did not take the directory's lock within the start timeout, so it was stopped; "
            )
        }
        Some(Err(message)) => return SpawnOutcome::Failed(message),
        None => String::new(),
    };
    let log = paths.sockets_dir.join(DAEMON_LOG_FILE);
    if let Some(until) = record.backoff_until().filter(|until| now < *until) {
        let wait = until.duration_since(now).unwrap_or_default();
        return SpawnOutcome::Failed(format!(
            "{stopped}backing off for {:.1} s more after {} started daemons that did not serve; their log {} ends:\n{}",
            wait.as_secs_f64(),
            record.failures,
            log.display(),
            log_tail(&log, 5).join("\n")
        ));
    }
    // The log first: one that is not a regular file of ours starts nothing and counts nothing.
    rotate(&log);
    let out = match open_private(&log, true) {
        Ok(out) => out,
        Err(e) => {
            return SpawnOutcome::Failed(format!(
                "the daemons' log {} cannot be used ({e}): it must be a regular file, not a symlink, FIFO or directory; nothing was started",
                log.display()
            ));
        }
    };
    // The record before the start: a start it cannot count would escape the backoff.
    let mut next = SpawnRecord {
        last_spawn_ms: now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        failures: record.failures.saturating_add(1),
        spawns: record.spawns + 1,
        pid: 0,
        start: None,
        stopped: record.stopped,
    };
    if let Err(e) = next.write(&paths.sockets_dir) {
        return SpawnOutcome::Failed(format!(
            "the spawn record in {} cannot be written ({e}), so the backoff could not hold; nothing was started",
            paths.sockets_dir.display()
        ));
    }
    match spawn(auto, dir, &log, out) {
        Ok(child) => {
            tracing::info!(pid = child.pid, log = %log.display(), "started the local daemon");
            next.pid = child.pid;
            next.start = crate::process::check_alive(child.pid)
                .and_then(|info| info.start())
                .ok();
            if let Err(e) = next.write(&paths.sockets_dir) {
                tracing::warn!(error = %e, "could not write the started daemon's pid to the spawn record");
            }
            SpawnOutcome::Spawned(child)
        }
        Err(e) => SpawnOutcome::Failed(format!("starting {} failed: {e}", auto.program.display())),
    }
}

/// Stops the command a record names when it never took the lifetime lock (the caller holds the
/// spawn lock and found the lock free) and is at least `min_age` old: only once it is verified
/// as the command started (the record's pid, with the recorded start ticks and boot id, alive)
/// and as the leader of its own process group, as the spawner made it. SIGTERM to the group,
/// then SIGKILL; counted in the record. `None` when there is nothing to stop; `Err` with the
/// message for a command that outlived both signals.
///
/// The lifetime lock is taken here for the whole stop: a command that would take it between
/// the caller's check and a signal then cannot, and one that has it is never signalled.
fn stop_stalled(
    record: &mut SpawnRecord,
    paths: &DaemonPaths,
    min_age: std::time::Duration,
) -> Option<Result<u32, String>> {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::{Pid, getpgid};

    let pid = record.pid;
    let started = || record.started_alive();
    let old = (record.start.as_ref()).and_then(crate::process::age) >= Some(min_age);
    let group = Pid::from_raw(i32::try_from(pid).ok()?);
    if pid == 0 || !old || !started() || getpgid(Some(group)) != Ok(group) {
        return None;
    }
    let lifetime = open_private(&paths.lock, false).ok()?;
    let _lifetime = Flock::lock(lifetime, FlockArg::LockExclusiveNonblock).ok()?;
    let sockets_dir = &paths.sockets_dir;
    // It holds nothing to clean up: 100 ms for SIGTERM, then SIGKILL, which ends it at once
    // (short of an uninterruptible sleep). So the caller's thread waits 200 ms at most.
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let _ = killpg(group, signal);
        for _ in 0..10 {
            if !started() {
                tracing::warn!(
                    pid,
                    "stopped a started daemon command that never took the lifetime lock"
                );
                record.stopped += 1;
                if let Err(e) = record.write(sockets_dir) {
                    tracing::warn!(error = %e, "could not count the stopped command in the spawn record");
                }
                return Some(Ok(pid));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    Some(Err(format!(
        "the daemon command started earlier (pid {pid}) never took the directory's lock and outlived SIGTERM and SIGKILL; nothing was started"
    )))
}

/// In mode `require`, the call that started `child` waited its start timeout in vain: the
/// command is stopped if it still has not taken the lifetime lock, and the message says so.
/// `None` when it took the lock, exited, or another process is deciding a start.
pub(crate) fn stop_own_stalled(
    paths: &DaemonPaths,
    child: &SpawnedChild,
    start_timeout: std::time::Duration,
    on_stopped: impl FnOnce(u32),
) -> Option<String> {
    let lock = open_private(&paths.sockets_dir.join(SPAWN_LOCK_FILE), false).ok()?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).ok()?;
    if lock_held(&paths.lock) {
        return None;
    }
    if child.exit.get().is_some() {
        return None;
    }
    let mut record = SpawnRecord::read(&paths.sockets_dir).filter(|r| r.pid == child.pid)?;
    // Its own start timeout, near enough: the wait that ends here began just before the start.
    let min_age = start_timeout.saturating_sub(start_timeout / 10);
    let outcome = stop_stalled(&mut record, paths, min_age)?;
    let tail = log_tail(&child.log, 5).join("\n");
    Some(match outcome {
        Ok(pid) => {
            on_stopped(pid);
            format!(
                "the started daemon command (pid {pid}) did not take the directory's lock within the start timeout ({:.1} s), so it was stopped; its log {} ends:\n{tail}",
                start_timeout.as_secs_f64(),
                child.log.display()
            )
        }
        Err(message) => message,
    })
}

/// For `stop`, which found no daemon serving: a command auto-start started that has not taken
/// the lifetime lock (hung, or not yet bound) is stopped too, whatever its age, once verified as
/// [`stop_stalled`] verifies it. `None` when there is none, or another process is deciding a
/// start. Blocks up to 200 ms while it waits for the command to exit.
pub(crate) fn stop_started(paths: &DaemonPaths) -> Option<Result<u32, String>> {
    // Nothing is written (not even the spawn lock) unless a started command is alive.
    if !SpawnRecord::read(&paths.sockets_dir).is_some_and(|r| r.pid != 0 && r.started_alive()) {
        return None;
    }
    let lock = open_private(&paths.sockets_dir.join(SPAWN_LOCK_FILE), false).ok()?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).ok()?;
    if lock_held(&paths.lock) {
        return None;
    }
    let mut record = SpawnRecord::read(&paths.sockets_dir)?;
    stop_stalled(&mut record, paths, std::time::Duration::ZERO)
}

/// The daemon is detached: its own process group (a Ctrl-C to the command's terminal does not
/// reach it), stdin null, stdout and stderr to the log (never the command's, whose `$(...)`
/// capture would then never end). Descriptors this crate opens are close-on-exec; those the
/// command itself inherited without it (an old make's jobserver pipe) are named to the daemon,
/// which closes them as it binds.
fn spawn(auto: &AutoStart, dir: &Path, log: &Path, out: File) -> io::Result<SpawnedChild> {
    if !auto.program.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program must be an absolute path",
        ));
    }
    let err = out.try_clone()?;
    let mut command = Command::new(&auto.program);
    command
        .args(&auto.args)
        .current_dir(&auto.current_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .env(AUTO_STARTED_ENV, "1")
        .env(DAEMON_DIR_ENV, dir);
    // Each as `fd:device:inode`, so that the daemon closes only what the number still names.
    let inherited: Vec<String> = inherited_descriptors()
        .into_iter()
        .filter_map(|fd| {
            let m = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?;
            Some(format!("{fd}:{}:{}", m.dev(), m.ino()))
        })
        .collect();
    if !inherited.is_empty() {
        command.env(INHERITED_FDS_ENV, inherited.join(","));
    }
    // A verbose command must not make a verbose daemon for hours: a tool sets the daemon's
    // own level with `AutoStart::env`, which applies after this.
    command.env_remove("RUST_LOG");
    for name in &auto.env_remove {
        command.env_remove(name);
    }
    for (key, value) in &auto.env {
        command.env(key, value);
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    let exit = Arc::new(OnceLock::new());
    let reaped = exit.clone();
    // No zombie: should the daemon exit while this process runs, this thread reaps it.
    let reaper = std::thread::Builder::new()
        .name("local-daemon-reaper".into())
        .spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = reaped.set(status);
            }
        });
    if let Err(e) = reaper {
        tracing::warn!(error = %e, "could not start a thread to reap the daemon");
    }
    Ok(SpawnedChild {
        pid,
        exit,
        log: log.to_owned(),
    })
}

/// Opens (creating `0600`) a regular file of the sockets directory, never through a symlink
/// and never blocking: a FIFO planted there would otherwise hold the command in `open` (with
/// the spawn lock held, where no deadline reaches).
fn open_private(path: &Path, append: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(!append)
        .write(true)
        .append(append)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Moves a log over the cap aside, keeping one older log (the daemon does the same while it
/// runs).
fn rotate(log: &Path) {
    if std::fs::symlink_metadata(log).is_ok_and(|m| m.len() > DAEMON_LOG_CAP) {
        let _ = std::fs::rename(log, log.with_file_name(DAEMON_LOG_OLD_FILE));
    }
}

/// This process's descriptors above 2 without close-on-exec, from `/proc/self/fdinfo`: the
/// ones a child inherits.
fn inherited_descriptors() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fdinfo") else {
        return Vec::new();
    };
    let mut found: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .filter(|fd| {
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
                return false;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
            flags.is_some_and(|f| f & OFlag::O_CLOEXEC.bits() as u32 == 0)
        })
        .collect();
    found.sort_unstable();
    found
}

/// A daemon a layer with auto-start sees serve served: the backoff starts again from nothing
/// (skipped while a spawner holds the spawn lock: the daemon marks it too). For daemons not
/// built with this crate, which do not mark it themselves.
pub(crate) fn record_served(paths: &DaemonPaths) {
    if let Ok(lock) = open_private(&paths.sockets_dir.join(SPAWN_LOCK_FILE), false) {
        let _ = SpawnRecord::mark_served(lock, &paths.sockets_dir);
    }
}
