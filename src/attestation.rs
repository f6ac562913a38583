//! The daemon's attestation: what `grpc.health.v1.Health/Check` tells a client, written down by
//! the daemon once it serves, so that a client's first call needs no round trip of its own.
//!
//! A daemon built with this crate writes `<dir>/sockets/grpc.attest`
//! ([`ATTESTATION_FILE`](crate::protocol::ATTESTATION_FILE)) while it holds the lifetime lock,
//! once it serves and before its pidfile, and removes it first when it begins to stop. Its
//! format is public, in the [daemon's docs](crate::daemon#the-attestation); here is the one
//! place that renders and parses it. A file that breaks a rule of the format, or is longer than
//! [`MAX_ATTESTATION_LEN`], is no attestation: the client asks `Health/Check` instead, as it
//! does of a daemon that writes none (heddle's own, or one of another language).
//!
//! A client uses an attestation only for the process that wrote it: its `pid` is the pidfile's,
//! its `start` (ticks since boot and boot id) is the lock record's, which the probe has just
//! compared with what the kernel says of that pid, and its `socket` is the socket's identity.
//! A file left by a daemon that was killed is then never taken for a later daemon's, even one
//! that reuses its pid.
//!
//! The lock record ([`lockfile`](crate::lockfile)) is unchanged beside it: a client that knows
//! nothing of attestations keeps every check it had.

use crate::paths::FileIdentity;
use crate::process::ProcessStart;

/// The first line of an attestation of the format this crate reads and writes.
const FORMAT_LINE: &str = "tower-local-daemon attestation 1";

/// The longest attestation a client reads; a daemon whose attestation would be longer (a great
/// many services) writes none, and its clients ask `Health/Check`.
pub(crate) const MAX_ATTESTATION_LEN: usize = 16 * 1024;

/// What a serving daemon attests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attestation {
    pub(crate) pid: u32,
    pub(crate) start: ProcessStart,
    /// The identity of the directory the daemon serves.
    pub(crate) directory: FileIdentity,
    /// The identity of the socket the daemon listens on.
    pub(crate) socket: FileIdentity,
    pub(crate) version: Option<String>,
    /// The services the daemon hosts, as their health names them.
    pub(crate) services: Vec<String>,
}

impl Attestation {
    /// The file's contents, or `None` when they would not fit [`MAX_ATTESTATION_LEN`] or a
    /// value would break its line (a version or service name with a line break).
    #[cfg(feature = "daemon")]
    pub(crate) fn render(&self) -> Option<String> {
        use std::fmt::Write;
        let mut text = String::new();
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            writeln!(text, "{key} {value}").expect("writing to a String");
        };
        line("pid", &self.pid);
        line(
            "start",
            &format_args!("{} {}", self.start.ticks, self.start.boot_id),
        );
        line("directory", &self.directory);
        line("socket", &self.socket);
        if let Some(version) = &self.version {
            line("version", version);
        }
        for service in &self.services {
            line("service", service);
        }
        let text = format!("{FORMAT_LINE}\n{text}");
        let lines = 5 + usize::from(self.version.is_some()) + self.services.len();
        (text.len() <= MAX_ATTESTATION_LEN && text.lines().count() == lines).then_some(text)
    }

    /// Parses an attestation; `None` for anything that breaks a rule of the format.
    #[cfg(feature = "client")]
    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        use crate::pidfile::parse_canonical_decimal as number;
        if bytes.len() > MAX_ATTESTATION_LEN {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?.strip_suffix('\n')?;
        let mut lines = text.split('\n');
        if lines.next()? != FORMAT_LINE {
            return None;
        }
        let (mut pid, mut start, mut directory, mut socket, mut version) =
            (None, None, None, None, None);
        let mut services = Vec::new();
        // A key given twice makes the file no attestation: which one the daemon meant is unknown.
        fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
            match slot.replace(value?) {
                None => Some(()),
                Some(_) => None,
            }
        }
        for line in lines {
            let (key, value) = line.split_once(' ')?;
            match key {
                "pid" => once(
                    &mut pid,
                    number(value.as_bytes()).and_then(|p| u32::try_from(p).ok()),
                )?,
                "start" => {
                    let parsed = value.split_once(' ').and_then(|(ticks, boot_id)| {
                        let graphic =
                            !boot_id.is_empty() && boot_id.bytes().all(|b| b.is_ascii_graphic());
                        graphic.then_some(())?;
                        Some(ProcessStart {
                            ticks: number(ticks.as_bytes())?,
                            boot_id: boot_id.to_owned(),
                        })
                    });
                    once(&mut start, parsed)?
                }
                "directory" => once(&mut directory, FileIdentity::parse(value))?,
                "socket" => once(&mut socket, FileIdentity::parse(value))?,
                "version" => once(&mut version, Some(value.to_owned()))?,
                "service" => services.push(value.to_owned()),
                _ => {}
            }
        }
        Some(Self {
            pid: pid?,
            start: start?,
            directory: directory?,
            socket: socket?,
            version,
            services,
        })
    }
}

/// An attestation read for one daemon, and which file it was read from: the daemon removes the
/// file when it begins to stop ([`withdrawn`](Self::withdrawn)).
#[cfg(feature = "client")]
#[derive(Debug)]
pub(crate) struct Attested {
    pub(crate) attestation: Attestation,
    path: std::path::PathBuf,
    /// The identity of the file read.
    read: FileIdentity,
}

#[cfg(feature = "client")]
impl Attested {
    /// The attestation among `paths` of the daemon `pid`, when its pid and start are those of
    /// the lock record beside it (the record that the probe, just before, found to be `pid`'s
    /// own: its start is the one the kernel tells, so no `/proc` read is needed again) and its
    /// socket is the one in place. `None` for no file, a file that is not a regular file of ours
    /// with one link, one that does not parse, or one of another process or socket (a daemon
    /// killed before it could remove it).
    pub(crate) fn read(paths: &crate::paths::DaemonPaths, pid: u32) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = paths.attestation();
        let (bytes, metadata) = crate::pidfile::read_bounded(&path, MAX_ATTESTATION_LEN).ok()?;
        if metadata.nlink() != 1 || metadata.uid() != crate::peer::own_uid() {
            return None;
        }
        let attestation = Attestation::parse(&bytes).filter(|a| a.pid == pid)?;
        let record = crate::lockfile::LockRecord::read(&paths.lock)?;
        if record.pid != pid || record.start != attestation.start {
            return None;
        }
        let socket = std::fs::symlink_metadata(&paths.socket).ok()?;
        (FileIdentity::of(&socket) == attestation.socket).then(|| Self {
            attestation,
            path,
            read: FileIdentity::of(&metadata),
        })
    }

    /// Whether the daemon withdrew its attestation since it was read: its name names no file,
    /// or another one (a rename over it). By name, not by the link count of the file read, which
    /// a filesystem such as NFS keeps above zero for a removed file that is still open.
    pub(crate) fn withdrawn(&self) -> bool {
        std::fs::symlink_metadata(&self.path).map_or(true, |m| FileIdentity::of(&m) != self.read)
    }
}

#[cfg(all(test, feature = "client", feature = "daemon"))]
mod tests {
    use super::*;

    fn attestation() -> Attestation {
        Attestation {
            pid: 42,
            start: ProcessStart {
                ticks: 12345,
                boot_id: "0f1e-aa".into(),
            },
            directory: FileIdentity { dev: 2049, ino: 77 },
            socket: FileIdentity { dev: 2049, ino: 78 },
            version: Some("1.2.3 (abc)".into()),
            services: vec!["echo.Echo".into(), "kv.Kv".into()],
        }
    }

    #[test]
    fn an_attestation_round_trips() {
        let text = attestation().render().unwrap();
        assert_eq!(
            text,
            "tower-local-daemon attestation 1\npid 42\nstart 12345 0f1e-aa\n\
             directory 2049:77\nsocket 2049:78\nversion 1.2.3 (abc)\nservice echo.Echo\nservice kv.Kv\n"
        );
        assert_eq!(Attestation::parse(text.as_bytes()), Some(attestation()));
        let bare = Attestation {
            version: None,
            services: Vec::new(),
            ..attestation()
        };
        assert_eq!(
            Attestation::parse(bare.render().unwrap().as_bytes()),
            Some(bare)
        );
    }

    #[test]
    fn a_value_that_would_break_its_line_or_the_bound_renders_nothing() {
        let broken = Attestation {
            version: Some("1.0\npid 7".into()),
            ..attestation()
        };
        assert_eq!(broken.render(), None);
        let huge = Attestation {
            services: vec!["s".repeat(100); 200],
            ..attestation()
        };
        assert_eq!(huge.render(), None);
    }

    #[test]
    fn unknown_keys_are_skipped_and_every_broken_rule_is_no_attestation() {
        let text = attestation().render().unwrap();
        let newer = format!("{text}listens-also tcp:1234\n");
        assert_eq!(Attestation::parse(newer.as_bytes()), Some(attestation()));
        let broken = [
            String::new(),
            text.replace(" attestation 1\n", " attestation 2\n"),
            text.trim_end().to_owned(),
            text.replace("pid 42\n", ""),
            text.replace("pid 42\n", "pid 042\n"),
            text.replace("pid 42\n", "pid 42\npid 43\n"),
            text.replace("start 12345 0f1e-aa\n", "start 12345\n"),
            text.replace("start 12345 0f1e-aa\n", "start 12345 \n"),
            text.replace("directory 2049:77\n", "directory 2049\n"),
            text.replace("socket 2049:78\n", ""),
            text.replace("version 1.2.3 (abc)\n", "version 1\nversion 2\n"),
            format!("{text}no-space-here\n"),
            format!("{text}{}\n", "x ".repeat(MAX_ATTESTATION_LEN)),
        ];
        for text in broken {
            assert_eq!(Attestation::parse(text.as_bytes()), None, "{text:?}");
        }
        assert_eq!(Attestation::parse(b"\xff\xfe\n"), None);
    }
}

#[cfg(all(test, feature = "client", feature = "daemon", target_os = "linux"))]
mod read_tests {
    use super::*;

    #[test]
    fn an_attestation_is_read_for_its_own_process_and_socket_and_seen_withdrawn() {
        let dir = std::env::temp_dir().join(format!("tld-attested-{}", std::process::id()));
        let paths = crate::paths::DaemonPaths::new(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&paths.sockets_dir).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
        let pid = std::process::id();
        let attestation = Attestation {
            pid,
            start: crate::process::own_start().unwrap(),
            directory: FileIdentity::following(&dir).unwrap(),
            socket: FileIdentity::of(&std::fs::symlink_metadata(&paths.socket).unwrap()),
            version: None,
            services: Vec::new(),
        };
        let path = paths.attestation();
        std::fs::write(&path, attestation.render().unwrap()).unwrap();
        assert!(Attested::read(&paths, pid).is_none(), "no lock record");
        let record = crate::lockfile::LockRecord {
            pid,
            start: attestation.start.clone(),
        };
        std::fs::write(&paths.lock, record.render()).unwrap();
        assert!(Attested::read(&paths, pid + 1).is_none());
        let attested = Attested::read(&paths, pid).unwrap();
        assert_eq!(attested.attestation, attestation);
        assert!(!attested.withdrawn());
        // Another socket in place: no attestation.
        std::fs::remove_file(&paths.socket).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
        assert!(Attested::read(&paths, pid).is_none(), "another socket");
        // A stopping daemon removes it; a restarted one renames a new one over it.
        std::fs::remove_file(&path).unwrap();
        assert!(attested.withdrawn());
        let attestation = Attestation {
            socket: FileIdentity::of(&std::fs::symlink_metadata(&paths.socket).unwrap()),
            ..attestation
        };
        std::fs::write(&path, attestation.render().unwrap()).unwrap();
        let attested = Attested::read(&paths, pid).unwrap();
        std::fs::write(dir.join("next"), "").unwrap();
        std::fs::rename(dir.join("next"), &path).unwrap();
        assert!(attested.withdrawn());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
