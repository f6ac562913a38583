//! The pidfile: the one place that knows its on-disk format.
//!
//! A daemon announces itself in `<dir>/sockets/grpc.pid` with exactly three lines:
//!
//! ```text
//! <pid>\nheddle-agent\n<unix start seconds>\n
//! ```
//!
//! Both numbers are decimal with no sign and no leading zeros; the pid is in `1..=i32::MAX`. This
//! is heddle's format, kept byte-compatible so that a daemon of either implementation is found by
//! a client of the other. Both the client's probe and the daemon side use this module.
//!
//! Reading is defensive: the file is opened without following symlinks and without blocking (a
//! FIFO would otherwise block forever), must be a regular file, and at most
//! [`MAX_PIDFILE_LEN`] + 1 bytes are read (one more than the longest pidfile says too long).

use std::fmt;
use std::{
    fs::OpenOptions,
    io::{self, Read},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use crate::protocol::PIDFILE_MARKER;

/// The most bytes a pidfile is read for. A canonical pidfile is at most 44 bytes long.
pub const MAX_PIDFILE_LEN: usize = 256;

/// The parsed contents of a pidfile.
///
/// ```
/// use tower_local_daemon::Pidfile;
///
/// let pidfile = Pidfile::parse(b"4242\nheddle-agent\n1700000000\n")?;
/// assert_eq!(pidfile.pid, 4242);
/// assert_eq!(pidfile.started_at, 1_700_000_000);
/// assert_eq!(pidfile.render(), "4242\nheddle-agent\n1700000000\n");
/// # Ok::<(), tower_local_daemon::PidfileError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Pidfile {
    /// The daemon's process id.
    pub pid: u32,
    /// When the daemon started, in seconds since the Unix epoch.
    pub started_at: u64,
}

/// Why the bytes of a pidfile are not a daemon pidfile.
///
/// ```
/// use tower_local_daemon::{Pidfile, PidfileError};
///
/// assert_eq!(Pidfile::parse(b"042\nheddle-agent\n1\n"), Err(PidfileError::InvalidPid));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PidfileError {
    /// The file has more than [`MAX_PIDFILE_LEN`] bytes.
    TooLong,
    /// The file does not end with a newline (this includes the empty file).
    MissingFinalNewline,
    /// The file has a number of lines other than three.
    LineCount {
        /// How many newline-terminated lines the file has.
        found: usize,
    },
    /// The first line is not a decimal pid in `1..=i32::MAX` without sign or leading zeros.
    InvalidPid,
    /// The second line is not `heddle-agent`.
    InvalidMarker,
    /// The third line is not decimal seconds without sign or leading zeros.
    InvalidStartTime,
}

impl fmt::Display for PidfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong => write!(f, "longer than {MAX_PIDFILE_LEN} bytes"),
            Self::MissingFinalNewline => f.write_str("does not end with a newline"),
            Self::LineCount { found } => write!(f, "has {found} lines, not 3"),
            Self::InvalidPid => f.write_str("first line is not a pid in 1..=2147483647"),
            Self::InvalidMarker => f.write_str("second line is not the expected marker"),
            Self::InvalidStartTime => f.write_str("third line is not decimal Unix seconds"),
        }
    }
}

impl std::error::Error for PidfileError {}

/// Why a pidfile (or another small file of the sockets directory) could not be read at all.
#[cfg_attr(not(feature = "client"), allow(dead_code))]
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Nothing at the path.
    Missing,
    /// Something at the path that is not a regular file (a symlink, FIFO, directory, device).
    NotRegularFile,
    /// Any other I/O error, for example permission denied.
    Io(io::ErrorKind),
    /// The file has more than one hard link: it may be another directory's pidfile.
    Linked {
        /// Its link count.
        links: u64,
    },
    /// The bytes are not a pidfile.
    Malformed(PidfileError),
    /// A pidfile in the format, whose marker (second line) is another: of another tool, or of
    /// a daemon or client configured with another marker.
    WrongMarker {
        /// The marker found, lossily as UTF-8.
        found: String,
    },
}

impl Pidfile {
    /// A pidfile naming `pid`, started at `started_at` (Unix seconds).
    ///
    /// ```
    /// let pidfile = tower_local_daemon::Pidfile::new(7, 1_700_000_000);
    /// assert_eq!(pidfile.render(), "7\nheddle-agent\n1700000000\n");
    /// ```
    pub fn new(pid: u32, started_at: u64) -> Self {
        Self { pid, started_at }
    }

    /// Parses the exact canonical format; anything else is an error, never a panic.
    pub fn parse(bytes: &[u8]) -> Result<Self, PidfileError> {
        Self::parse_with_marker(bytes, PIDFILE_MARKER)
    }

    /// [`parse`](Self::parse) for a tool whose pidfiles carry `marker` on their second line.
    ///
    /// ```
    /// use tower_local_daemon::{Pidfile, PidfileError};
    ///
    /// let bytes = b"7\nmytool-daemon\n1\n";
    /// assert_eq!(Pidfile::parse_with_marker(bytes, "mytool-daemon"), Ok(Pidfile::new(7, 1)));
    /// assert_eq!(Pidfile::parse(bytes), Err(PidfileError::InvalidMarker));
    /// ```
    pub fn parse_with_marker(bytes: &[u8], marker: &str) -> Result<Self, PidfileError> {
        if bytes.len() > MAX_PIDFILE_LEN {
            return Err(PidfileError::TooLong);
        }
        let Some(body) = bytes.strip_suffix(b"\n") else {
            return Err(PidfileError::MissingFinalNewline);
        };
        let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        let [pid, line, started_at] = lines[..] else {
            return Err(PidfileError::LineCount { found: lines.len() });
        };
        let pid = parse_canonical_decimal(pid)
            .filter(|pid| (1..=i32::MAX as u64).contains(pid))
            .ok_or(PidfileError::InvalidPid)? as u32;
        if line != marker.as_bytes() {
            return Err(PidfileError::InvalidMarker);
        }
        let started_at =
            parse_canonical_decimal(started_at).ok_or(PidfileError::InvalidStartTime)?;
        Ok(Self { pid, started_at })
    }

    /// The canonical bytes of this pidfile.
    pub fn render(&self) -> String {
        self.render_with_marker(PIDFILE_MARKER)
    }

    /// The canonical bytes of this pidfile with `marker` on its second line.
    pub fn render_with_marker(&self, marker: &str) -> String {
        format!("{}\n{marker}\n{}\n", self.pid, self.started_at)
    }

    /// Reads and parses the pidfile at `path`: no symlinks, no blocking, bounded, one link.
    #[cfg(feature = "client")]
    pub(crate) fn read(path: &Path, marker: &str) -> Result<Self, ReadError> {
        use std::os::unix::fs::MetadataExt;
        let (bytes, metadata) = read_bounded(path, MAX_PIDFILE_LEN)?;
        let links = metadata.nlink();
        if links != 1 {
            return Err(ReadError::Linked { links });
        }
        Self::parse_with_marker(&bytes, marker).map_err(|e| {
            let line = bytes.split(|&b| b == b'\n').nth(1).unwrap_or_default();
            let found = String::from_utf8_lossy(line);
            // Another marker only when the file is a whole pidfile with it: a corrupt one is
            // malformed, not a configuration error.
            match e {
                PidfileError::InvalidMarker if Self::parse_with_marker(&bytes, &found).is_ok() => {
                    ReadError::WrongMarker {
                        found: found.into_owned(),
                    }
                }
                e => ReadError::Malformed(e),
            }
        })
    }
}

/// Reads at most `max` + 1 bytes of the regular file at `path`, without following a symlink
/// or blocking on a FIFO; returns them with the file's metadata (its link count, owner and
/// identity). One byte past `max` says the file is too long.
pub(crate) fn read_bounded(
    path: &Path,
    max: usize,
) -> Result<(Vec<u8>, std::fs::Metadata), ReadError> {
    let (file, metadata) = open_regular(path)?;
    // The reads stop at the size `stat` gave, past the bound at one byte more (too long): a
    // `take` that reaches its limit answers without asking the file again. A file written while
    // it is read is torn either way (it fails to parse, and the next probe reads it again).
    let wanted = metadata.len().min(max as u64 + 1);
    let mut bytes = Vec::with_capacity(wanted as usize);
    (&file)
        .take(wanted)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Io(e.kind()))?;
    Ok((bytes, metadata))
}

/// Opens the regular file at `path` for reading, without following a symlink or blocking on a
/// FIFO (the directory may be anyone's), with its metadata.
pub(crate) fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), ReadError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(NO_FOLLOW_NO_BLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ReadError::Missing,
            // ELOOP: the final component is a symlink.
            _ if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
                ReadError::NotRegularFile
            }
            kind => ReadError::Io(kind),
        })?;
    let metadata = file.metadata().map_err(|e| ReadError::Io(e.kind()))?;
    if !metadata.file_type().is_file() {
        return Err(ReadError::NotRegularFile);
    }
    Ok((file, metadata))
}

/// Decimal digits with no sign and no leading zero (a lone `0` is allowed), fitting a `u64`:
/// the one rule for every number the crate's files and metadata carry.
pub(crate) fn parse_canonical_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Open flags for pidfiles: never follow a symlink, never block on a FIFO.
const NO_FOLLOW_NO_BLOCK: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits()
    | nix::fcntl::OFlag::O_NONBLOCK.bits()
    | nix::fcntl::OFlag::O_CLOEXEC.bits();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_round_trip() {
        let pidfile = Pidfile {
            pid: 7,
            started_at: 0,
        };
        assert_eq!(Pidfile::parse(pidfile.render().as_bytes()), Ok(pidfile));
    }

    #[test]
    fn rejects_each_malformation_with_its_reason() {
        use PidfileError::*;
        let cases: &[(&[u8], PidfileError)] = &[
            (b"", MissingFinalNewline),
            (b"\n\n\n", InvalidPid),
            (b"1\r\nheddle-agent\r\n1\r\n", InvalidPid),
            (b" 1\nheddle-agent\n1\n", InvalidPid),
            (b"0\nheddle-agent\n1\n", InvalidPid),
            (b"-1\nheddle-agent\n1\n", InvalidPid),
            (b"+1\nheddle-agent\n1\n", InvalidPid),
            (b"01\nheddle-agent\n1\n", InvalidPid),
            (b"2147483648\nheddle-agent\n1\n", InvalidPid),
            (b"1\nheddle\n1\n", InvalidMarker),
            (b"1\nheddle-agent\n1\n\n", LineCount { found: 4 }),
            (b"1\nheddle-agent\n1", MissingFinalNewline),
            (b"1\nheddle-agent\n01\n", InvalidStartTime),
            (b"1\0\nheddle-agent\n1\n", InvalidPid),
            (b"\xff\nheddle-agent\n1\n", InvalidPid),
            (b"4242\n", LineCount { found: 1 }),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Pidfile::parse(bytes), Err(*expected), "{bytes:?}");
        }
        assert_eq!(Pidfile::parse(&[b'1'; 300]), Err(TooLong));
    }

    #[test]
    fn accepts_pid_one_and_the_largest_pid() {
        assert!(Pidfile::parse(b"1\nheddle-agent\n0\n").is_ok());
        assert!(Pidfile::parse(b"2147483647\nheddle-agent\n1\n").is_ok());
    }
}
