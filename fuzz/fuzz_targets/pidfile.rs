//! The pidfile parser on arbitrary bytes: it never panics, and what it accepts renders back to
//! exactly the same bytes (the format has one canonical spelling).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_local_daemon::Pidfile;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(pidfile) = Pidfile::parse(bytes) {
        assert_eq!(pidfile.render().as_bytes(), bytes);
        assert!(pidfile.pid >= 1 && pidfile.pid <= i32::MAX as u32);
    }
});
