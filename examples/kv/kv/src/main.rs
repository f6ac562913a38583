//! `kv DIR get KEY | put KEY VALUE | status | stop`: the kv example's CLI, built client-only.
//!
//! Each verb is one call through the layer: to the daemon of DIR when one serves (`kvd`,
//! started on a miss from beside this executable), in-process otherwise, with the same store.
//! The tool is configured in one place, `Tool::new("kv")`, which `kvd` is given too.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kv_core::kv_client::KvClient;
use kv_core::kv_server::KvServer;
use kv_core::{GetRequest, PutRequest, Store};
use tower::ServiceBuilder;
use tower_local_daemon::{AutoStart, BoxLocalDaemon, LazyFallback, Route, StopOutcome, Tool};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, verb)) = args.split_first() else {
        return usage();
    };
    // Absolute, so that the daemon started on a miss is given the same directory.
    let dir = match std::path::absolute(dir) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {dir}: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    let tool = Tool::new("kv")
        .expect("a valid tool name")
        .with_sibling_daemon("kvd");
    let verb: Vec<&str> = verb.iter().map(String::as_str).collect();
    runtime.block_on(async {
        match verb[..] {
            ["get", key] => get(&tool, &dir, key).await,
            ["put", key, value] => put(&tool, &dir, key, value).await,
            ["status"] => {
                let report = tool.diagnose(&dir).await;
                println!("{report}");
                match report.usable() {
                    true => ExitCode::SUCCESS,
                    false => ExitCode::FAILURE,
                }
            }
            ["stop"] => {
                let outcome = tool.stop(&dir, Duration::from_secs(10)).await;
                println!("{outcome}");
                match outcome {
                    StopOutcome::Refused { .. } | StopOutcome::TimedOut { .. } => ExitCode::FAILURE,
                    _ => ExitCode::SUCCESS,
                }
            }
            _ => usage(),
        }
    })
}

fn usage() -> ExitCode {
    eprintln!("usage: kv DIR (get KEY | put KEY VALUE | status | stop)");
    ExitCode::from(2)
}

/// A client of DIR's store: the daemon's, or the same store in-process. The tool's settings say
/// which daemon is acceptable (`kvd`); `kvd serve DIR` is started on a miss, under `CI` too, so
/// that this example's test shows it.
fn client(tool: &Tool, dir: &Path) -> KvClient<BoxLocalDaemon> {
    let store_dir: PathBuf = dir.to_owned();
    let layer = tool
        .layer(dir)
        .auto_start(AutoStart::sibling("kvd").arg("serve").arg(dir))
        .force_auto_start(true)
        .mark_route(true);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(LazyFallback::new(move || {
            let store = Store::new(&store_dir);
            async move { Ok::<_, std::convert::Infallible>(KvServer::new(store)) }
        }));
    KvClient::new(svc.boxed())
}

fn route<T>(response: &tonic::Response<T>) -> String {
    match response.extensions().get::<Route>() {
        Some(route) => route.to_string(),
        None => "unknown".to_owned(),
    }
}

async fn get(tool: &Tool, dir: &Path, key: &str) -> ExitCode {
    let request = GetRequest { key: key.into() };
    match client(tool, dir).get(request).await {
        Ok(response) => {
            let route = route(&response);
            match &response.get_ref().value {
                Some(value) => println!("{value} (route: {route})"),
                None => println!("{key} is not set (route: {route})"),
            }
            ExitCode::SUCCESS
        }
        Err(status) => failed(&status),
    }
}

async fn put(tool: &Tool, dir: &Path, key: &str, value: &str) -> ExitCode {
    let request = PutRequest {
        key: key.into(),
        value: value.into(),
    };
    match client(tool, dir).put(request).await {
        Ok(response) => {
            println!("ok (route: {})", route(&response));
            ExitCode::SUCCESS
        }
        Err(status) => failed(&status),
    }
}

fn failed(status: &tonic::Status) -> ExitCode {
    println!("failed ({:?}):", status.code());
    for line in status.message().lines() {
        println!("   {line}");
    }
    ExitCode::FAILURE
}
