//! The kv example's service, `kv.v1.Kv` (`Get` and `Put`), and its store: shared by the daemon
//! (`kvd`) and the CLI (`kv`), which runs the same store in-process when no daemon serves.
//!
//! The store follows the README's rule for two routes, "the disk is the truth": each value is
//! one file under `<state dir>/data/`, replaced whole by a rename, and every `get` reads it.
//! The daemon caches nothing an in-process `put` could change, so a `put` that ran in-process
//! beside it (in mode `off`, or before it served) is never lost or hidden.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kv.v1.Kv.rs"));
}

pub use generated::{kv_client, kv_server};

/// Asks for the value of `key`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetRequest {
    #[prost(string, tag = "1")]
    pub key: String,
}

/// The value, when the key has one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetReply {
    #[prost(string, optional, tag = "1")]
    pub value: Option<String>,
}

/// Sets `key` to `value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// A put that was done.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutReply {}

/// The store of one state directory: a file per key under `data/`.
#[derive(Debug, Clone)]
pub struct Store {
    data: PathBuf,
}

impl Store {
    /// The store of `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            data: state_dir.join("data"),
        }
    }

    /// The file of `key`: letters, digits, `-` and `_` only, so a key never names a path.
    fn file(&self, key: &str) -> Result<PathBuf, Status> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if key.is_empty() || !key.chars().all(allowed) {
            return Err(Status::invalid_argument(format!(
                "key {key:?}: use letters, digits, `-` and `_`"
            )));
        }
        Ok(self.data.join(key))
    }
}

#[tonic::async_trait]
impl kv_server::Kv for Store {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetReply>, Status> {
        let file = self.file(&request.get_ref().key)?;
        let value = match std::fs::read_to_string(&file) {
            Ok(value) => Some(value),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Status::internal(format!("{}: {e}", file.display()))),
        };
        Ok(Response::new(GetReply { value }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutReply>, Status> {
        let PutRequest { key, value } = request.into_inner();
        let file = self.file(&key)?;
        let failed = |e: std::io::Error| Status::internal(format!("{}: {e}", file.display()));
        std::fs::create_dir_all(&self.data).map_err(failed)?;
        // A new file renamed over the old: a reader sees the old value or the new, whole.
        // A name of its own for each put, in the daemon's many tasks as across processes.
        static PUTS: AtomicU64 = AtomicU64::new(0);
        let put = PUTS.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .data
            .join(format!(".{key}.{}.{put}", std::process::id()));
        let mut out = std::fs::File::create(&tmp).map_err(failed)?;
        out.write_all(value.as_bytes()).map_err(failed)?;
        std::fs::rename(&tmp, &file).map_err(failed)?;
        Ok(Response::new(PutReply {}))
    }
}
