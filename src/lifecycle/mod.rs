//! The daemon's lifecycle, seen from a client: starting it on a miss ([`AutoStart`], in
//! `spawn`), and stopping it ([`stop`]) only once verified over a live connection.

mod auto_start;
mod record;
mod spawn;
mod stop;

pub(crate) use self::auto_start::AutoStartSwitch;
pub use self::auto_start::{AutoStart, AutoStartStatus, auto_start_status};
pub(crate) use self::spawn::{SpawnOutcome, SpawnedChild, maybe_spawn, record_served};
pub use self::stop::{StopOutcome, stop};
pub(crate) use self::stop::{lock_held, stop_with};
