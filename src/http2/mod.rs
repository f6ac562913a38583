//! The daemon route's HTTP/2 client, over `h2` on the one checked connection: what hyper's
//! client would do for tonic's `Channel`, written for one connection that never redials.
//!
//! - [`client`]: a request sent from the caller's task, with the origin, user-agent and
//!   deadline tonic's `Channel` adds; a request the connection did not take comes back whole.
//! - [`upload`]: a request body on its way, within the stream's flow-control window.
//! - [`response`]: the daemon's answer as the caller sees it, and the codes of what broke.
//! - [`call`]: a call's claim on its connection, and what the end of its response does.
//! - [`connection`]: HTTP/2 opened over a socket ([`open`]), the connection's task, the signal of its end and who caused it, and its
//!   close once the calls in flight on it are done.
//! - [`keepalive`]: pings, also while idle; one unanswered in time ends the connection.
//! - [`io`]: the socket under h2, read to the end of what the daemon sent even after a write
//!   found it gone.

mod call;
mod client;
mod connection;
mod io;
mod keepalive;
mod response;
mod upload;

pub(crate) use self::client::{
    DaemonClient, DaemonFuture, KeptRequest, NotSent, SendError, Unsent, grpc_timeout,
    timeout_status,
};
pub(crate) use self::connection::{ConnectionEnd, ConnectionTask, EndCause, open};
pub(crate) use self::response::{ConnectionBroke, Fate, what_broke};

#[cfg(test)]
mod tests;
