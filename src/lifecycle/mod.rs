//! The daemon's lifecycle, seen from a client: starting it on a miss (`spawn`, by the
//! [`AutoStart`](crate::AutoStart) option), what those starts left behind (`status`), and
//! stopping it ([`stop`]) only once verified over a live connection.

mod record;
mod spawn;
mod status;
mod stop;
mod trusted_path;

pub(crate) use self::spawn::{
    SpawnOutcome, SpawnedChild, maybe_spawn, record_served, stop_own_stalled,
};
pub(crate) use self::status::status_of as auto_start_status_of;
pub use self::status::{AutoStartStatus, auto_start_status};
pub(crate) use self::stop::stop_with;
pub use self::stop::{StopOutcome, stop};
