//! A counter kept in a file: the README's "Two routes, one repository" rule, in little.
//!
//! In-process calls can run beside a daemon (mode `off`, the env override, a refused daemon,
//! a failed start, a start slower than the hand-off bound), so the daemon treats the file as
//! the truth, and caches only what the file proves unchanged:
//! - every writer, on either route, takes the lock file beside it, and replaces the file
//!   (a new file renamed over it: a new inode);
//! - the daemon keeps the file it wrote open, with the value, so that inode cannot be reused;
//!   under the lock, the same inode at the path means nobody wrote since, and the cached
//!   value is the file's; another inode means another writer, and the file is read.
//!
//! (A stamp of size and modification time would not do: two writes within one tick of the
//! file system's clock can leave the same stamp.)

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

/// The counter in `path`, with the file this process last wrote and its value.
#[derive(Debug)]
pub struct Tally {
    path: PathBuf,
    written: Mutex<Option<(File, u64)>>,
}

impl Tally {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            written: Mutex::new(None),
        }
    }

    /// Adds one under the lock; returns the new value.
    pub fn increment(&self) -> std::io::Result<u64> {
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path.with_extension("lock"))?;
        let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
        let mut written = self.written.lock().unwrap();
        let value = self.read(written.as_ref())? + 1;
        let tmp = self.path.with_extension("tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(format!("{value}\n").as_bytes())?;
        std::fs::rename(&tmp, &self.path)?;
        *written = Some((file, value));
        Ok(value)
    }

    /// The value in the file, from the cache when the file is the one this process wrote.
    fn read(&self, written: Option<&(File, u64)>) -> std::io::Result<u64> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        if let Some((mine, value)) = written {
            let (now, then) = (file.metadata()?, mine.metadata()?);
            if (now.dev(), now.ino()) == (then.dev(), then.ino()) {
                return Ok(*value);
            }
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        text.trim().parse().map_err(|e| {
            let what = format!("{} holds {text:?}, not a count: {e}", self.path.display());
            std::io::Error::new(ErrorKind::InvalidData, what)
        })
    }
}
