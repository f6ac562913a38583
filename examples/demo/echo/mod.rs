//! The demo's gRPC service, `echo.v1.Echo`: a unary `Echo` and a server-streaming `Count`.
//!
//! Shared by the `demo` example, the tests and the benches. This file is written by hand: the
//! messages (with `prost`'s derive) and the service. `generated.rs` beside it holds the client
//! and server that `tonic_build::manual` generated once from them (no `.proto` file, no
//! protoc); regenerate it the same way if the service changes, and do not edit it by hand.
#![allow(dead_code)]

mod generated;
mod tally;

pub use generated::{echo_client, echo_server};
pub use tally::Tally;

use std::fs::File;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// A request: `id` is logged by a server that keeps a log; `delay_ms` makes it slow; a
/// non-zero `status_code` makes the server answer with that gRPC status instead of a reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint64, tag = "2")]
    pub id: u64,
    #[prost(uint32, tag = "3")]
    pub delay_ms: u32,
    #[prost(int32, tag = "4")]
    pub status_code: i32,
}

/// Asks for `count` replies, `interval_ms` apart.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountRequest {
    #[prost(uint32, tag = "1")]
    pub count: u32,
    #[prost(uint32, tag = "2")]
    pub interval_ms: u32,
}

/// A reply, saying which side served it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub served_by: String,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
}

/// The service: `served_by` is `label`; every executed request id is appended to `log`,
/// before the reply, so that the record survives a SIGKILL. With a tally, the message
/// `increment` adds one to it and is answered with the new value.
#[derive(Debug, Clone)]
pub struct EchoService {
    label: &'static str,
    log: Option<Arc<Mutex<File>>>,
    tally: Option<Arc<Tally>>,
}

/// The message that increments the tally.
pub const INCREMENT: &str = "increment";

impl EchoService {
    pub fn new(label: &'static str) -> Self {
        Self {
            label,
            log: None,
            tally: None,
        }
    }

    /// Answers [`INCREMENT`] by adding one to `tally`.
    pub fn with_tally(mut self, tally: Tally) -> Self {
        self.tally = Some(Arc::new(tally));
        self
    }

    /// Appends each executed request id to `file`, one per line.
    pub fn with_log(mut self, file: File) -> Self {
        self.log = Some(Arc::new(Mutex::new(file)));
        self
    }

    fn reply(&self, message: String) -> EchoReply {
        EchoReply {
            message,
            served_by: self.label.to_owned(),
            pid: std::process::id(),
        }
    }
}

#[tonic::async_trait]
impl echo_server::Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(request.delay_ms.into())).await;
        }
        if let Some(log) = &self.log {
            // One write per line: several daemon processes append to the same file.
            let line = format!("{}\n", request.id);
            let mut log = log.lock().unwrap();
            log.write_all(line.as_bytes())
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        if request.status_code != 0 {
            let code = tonic::Code::from(request.status_code);
            return Err(Status::new(code, "the request asked for this status"));
        }
        if let (Some(tally), INCREMENT) = (&self.tally, request.message.as_str()) {
            let value = tally
                .increment()
                .map_err(|e| Status::internal(format!("the tally: {e}")))?;
            return Ok(Response::new(self.reply(value.to_string())));
        }
        Ok(Response::new(self.reply(request.message)))
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let CountRequest { count, interval_ms } = request.into_inner();
        let this = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..count {
                if tx.send(Ok(this.reply(i.to_string()))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(interval_ms.into())).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
