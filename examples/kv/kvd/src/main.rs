//! `kvd serve DIR`: the kv example's daemon for the state directory DIR. The `kv` CLI starts it
//! on a miss (it sits beside `kv`), or a person runs it.

use std::process::ExitCode;

use kv_core::Store;
use kv_core::kv_server::KvServer;
use tower_local_daemon::{Daemon, Tool};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [verb, dir] = &args[..] else {
        eprintln!("usage: kvd serve DIR");
        return ExitCode::from(2);
    };
    if verb != "serve" {
        eprintln!("usage: kvd serve DIR");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        let tool = Tool::new("kv").expect("a valid tool name");
        // The lock first, then the store: a second `kvd` fails at once.
        let bound = Daemon::new(dir).tool(&tool).bind()?;
        let store = Store::new(std::path::Path::new(dir));
        bound
            .add_service(KvServer::new(store))
            .serve(std::future::pending())
            .await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
            eprintln!("error: {e}{}", cause.unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}
