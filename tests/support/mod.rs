//! What the integration tests share: throwaway directories, a real daemon process (this test
//! binary re-executed), a client over the layer, and bounded waits.
#![allow(dead_code, unused_imports)]

#[path = "../../examples/demo/echo/mod.rs"]
pub mod echo;
pub mod reset;
pub mod sink;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tower::ServiceBuilder;
use tower_local_daemon::{
    Daemon, DaemonPaths, LocalDaemon, LocalDaemonLayer, LocalDaemonStatus, PIDFILE_MARKER, Pidfile,
    probe,
};

pub use echo::echo_client::EchoClient;
pub use echo::echo_server::EchoServer;
pub use echo::{CountRequest, EchoReply, EchoRequest, EchoService};

/// The one environment variable that tells a re-executed test binary which [`Role`] to play.
pub const ROLE_ENV: &str = "TLD_TEST_ROLE";
/// Options of the daemon role.
pub const DAEMON_VERSION_ENV: &str = "TLD_TEST_DAEMON_VERSION";
pub const DAEMON_LOG_ENV: &str = "TLD_TEST_DAEMON_LOG";
pub const DAEMON_GRACE_MS_ENV: &str = "TLD_TEST_DAEMON_GRACE_MS";
pub const DAEMON_IDLE_MS_ENV: &str = "TLD_TEST_DAEMON_IDLE_MS";
pub const DAEMON_SERVER_TIMEOUT_MS_ENV: &str = "TLD_TEST_DAEMON_SERVER_TIMEOUT_MS";
pub const DAEMON_UMASK_ENV: &str = "TLD_TEST_DAEMON_UMASK";
pub const DAEMON_IGNORE_SIGINT_ENV: &str = "TLD_TEST_DAEMON_IGNORE_SIGINT";
pub const DAEMON_MARKER_ENV: &str = "TLD_TEST_DAEMON_MARKER";
pub const PROBE_OUTPUT_PREFIX: &str = "probe status: ";
/// The name of the `#[test]` that each test binary uses as its entry point when re-executed.
pub const DAEMON_ENTRY: &str = "daemon_entry_point";

/// What a re-executed test binary does instead of running tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Serves a daemon for this directory, with the options of the `TLD_TEST_DAEMON_*`
    /// variables, until a signal stops it.
    Daemon(PathBuf),
    /// Prints the probe's status of this directory after [`PROBE_OUTPUT_PREFIX`], and exits.
    Probe(PathBuf),
    /// Connects to this socket, waits for the other end to close, and exits 0 (1 if it could
    /// not connect).
    Connect(PathBuf),
    /// Listens on this socket for a minute, after printing `listening`.
    Listen(PathBuf),
    /// Waits for a line on stdin, makes one call through the layer for this directory, and
    /// prints the route after [`CALL_OUTPUT_PREFIX`].
    Call(PathBuf),
}

pub const CALL_OUTPUT_PREFIX: &str = "route: ";

/// Spawns `command`, again while its program is "busy": a copy of this binary just written can
/// still be open for writing in a child that another test thread forked meanwhile, until that
/// child's `exec`.
pub fn spawn(command: &mut Command) -> Child {
    for _ in 0..100 {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.unwrap(),
        }
    }
    panic!("{command:?} stayed busy for a second")
}

/// A command that runs `program` (a copy of this test binary) at its entry point, in `role`.
pub fn reexec(program: &Path, role: Role) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    // libtest needs a UTF-8 `argv[0]`; the kernel names the process after the file anyway.
    command.arg0("tld-test-binary").args(ENTRY_ARGS);
    command.env(ROLE_ENV, role.env_value());
    command
}

/// The arguments that make this test binary run its entry point alone.
const ENTRY_ARGS: [&str; 5] = [
    "--exact",
    DAEMON_ENTRY,
    "--ignored",
    "--nocapture",
    "--test-threads=1",
];

impl Role {
    /// The value of [`ROLE_ENV`] that gives a re-executed test binary this role.
    fn env_value(&self) -> String {
        let (name, path) = match self {
            Self::Daemon(path) => ("daemon", path),
            Self::Probe(path) => ("probe", path),
            Self::Connect(path) => ("connect", path),
            Self::Listen(path) => ("listen", path),
            Self::Call(path) => ("call", path),
        };
        format!("{name} {}", path.display())
    }

    fn from_env() -> Option<Self> {
        let value = std::env::var(ROLE_ENV).ok()?;
        let (name, path) = value.split_once(' ')?;
        let path = PathBuf::from(path);
        Some(match name {
            "daemon" => Self::Daemon(path),
            "probe" => Self::Probe(path),
            "connect" => Self::Connect(path),
            "listen" => Self::Listen(path),
            "call" => Self::Call(path),
            other => panic!("unknown test role {other:?}"),
        })
    }
}

/// Plays the role this process was re-executed for, and exits; otherwise returns.
///
/// Each test binary that re-executes itself has an ignored `#[test] fn daemon_entry_point()`
/// calling this; the re-executed binary runs it with `--ignored --exact`.
pub fn run_daemon_if_asked() {
    match Role::from_env() {
        None => {}
        Some(Role::Connect(socket)) => connect_and_wait(&socket),
        Some(Role::Probe(dir)) => {
            println!("{PROBE_OUTPUT_PREFIX}{:?}", probe(&dir).status);
            std::process::exit(0);
        }
        Some(Role::Listen(socket)) => {
            let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            println!("listening");
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(0);
        }
        Some(Role::Daemon(dir)) => serve_daemon(&dir),
        Some(Role::Call(dir)) => call_once(&dir),
    }
}

/// Makes the call role wait for a line on stdin before it calls.
pub const CALL_WAIT_ENV: &str = "TLD_TEST_CALL_WAIT";
/// Makes the call role start the daemon on a miss ([`test_auto_start`]).
pub const CALL_AUTO_START_ENV: &str = "TLD_TEST_AUTO_START";

/// Starts this test binary as `dir`'s daemon, as a tool's `agent serve` verb would be started.
pub fn test_auto_start(dir: &Path) -> tower_local_daemon::AutoStart {
    tower_local_daemon::AutoStart::new(std::env::current_exe().unwrap())
        .args(ENTRY_ARGS)
        .env(ROLE_ENV, Role::Daemon(dir.to_owned()).env_value())
}

fn call_once(dir: &Path) -> ! {
    if std::env::var_os(CALL_WAIT_ENV).is_some() {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
    }
    let mut layer = test_layer(dir);
    // A tool with its own marker: the daemons it starts inherit the variable, and use it too.
    if let Ok(marker) = std::env::var(DAEMON_MARKER_ENV) {
        layer = layer.pidfile_marker(marker);
    }
    if std::env::var_os(CALL_AUTO_START_ENV).is_some() {
        layer = layer
            .auto_start(test_auto_start(dir))
            .force_auto_start(true);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let route = runtime.block_on(async {
        let response = echo(&mut EchoClient::new(layered(layer)), 1).await;
        response
            .unwrap()
            .extensions()
            .get::<tower_local_daemon::Route>()
            .copied()
    });
    println!("{CALL_OUTPUT_PREFIX}{route:?}");
    std::process::exit(0)
}

fn serve_daemon(dir: &Path) -> ! {
    eprintln!("daemon starting, pid {}", std::process::id());
    if std::env::var_os(DAEMON_IGNORE_SIGINT_ENV).is_some() {
        // As a shell does for a background job, before the daemon's code runs.
        // SAFETY: no other thread runs yet, and SIG_IGN installs no handler code.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::SigHandler::SigIgn,
            )
        }
        .unwrap();
    }
    if let Ok(mask) = std::env::var(DAEMON_UMASK_ENV) {
        let mask = u32::from_str_radix(&mask, 8).unwrap();
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let mut service = EchoService::new("daemon");
        if let Ok(log) = std::env::var(DAEMON_LOG_ENV) {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            service = service.with_log(file);
        }
        let mut daemon = Daemon::new(dir)
            .add_service(EchoServer::new(service))
            .add_service(reset::StreamResetter)
            .add_service(sink::BodySink);
        if let Ok(version) = std::env::var(DAEMON_VERSION_ENV) {
            daemon = daemon.version(version);
        }
        if let Some(ms) = env_ms(DAEMON_GRACE_MS_ENV) {
            daemon = daemon.grace_period(ms);
        }
        if let Some(ms) = env_ms(DAEMON_IDLE_MS_ENV) {
            daemon = daemon.idle_timeout(ms);
        }
        if let Some(timeout) = env_ms(DAEMON_SERVER_TIMEOUT_MS_ENV) {
            daemon = daemon.server(move |server| server.timeout(timeout));
        }
        if let Ok(marker) = std::env::var(DAEMON_MARKER_ENV) {
            // A tool's daemon is given its `Tool`; the name is the marker.
            daemon = daemon.tool(&tower_local_daemon::Tool::new(&marker).unwrap());
        }
        daemon.serve(std::future::pending()).await
    });
    match result {
        Ok(()) => {
            eprintln!("daemon stopped, pid {}", std::process::id());
            std::process::exit(0)
        }
        Err(e) => {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
            eprintln!("daemon error: {e}{}", cause.unwrap_or_default());
            std::process::exit(3)
        }
    }
}

/// Whether this process may act as another user: true as root. Otherwise a test that needs it
/// fails under `CI` (where it must run) and is skipped elsewhere, with one line saying how to
/// run it.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} acts as another user and needs root; CI runs as root"
    );
    eprintln!("skipped {test}: it acts as another user; run `sudo -E cargo test` to include it");
    false
}

fn connect_and_wait(socket: &Path) -> ! {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        std::process::exit(1)
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut buf = [0u8; 64];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    std::process::exit(0)
}

/// A copy of this test binary that the user `nobody` can run: `nobody` cannot enter root's
/// 0700 directories, so the copy lives in a world-readable temp directory.
pub struct NobodyBinary {
    dir: TestDir,
    path: PathBuf,
}

impl NobodyBinary {
    /// `None`, after [`root_or_skip`]'s line, unless run as root.
    pub fn new(test: &str) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt;
        if !root_or_skip(test) {
            return None;
        }
        let dir = TestDir::new("nobody-bin");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("test-binary");
        copy_of_this_binary(&path);
        Some(Self { dir, path })
    }

    /// Runs `probe(dir)` as `nobody` and returns the status's `Debug` text.
    pub fn probe(&self, dir: &Path) -> String {
        let mut command = self.command(Role::Probe(dir.to_owned()));
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        probe_output(spawn(&mut command).wait_with_output().unwrap())
    }

    /// [`probe`](Self::probe), in a mount namespace whose `/proc` is mounted `hidepid=2`: the
    /// processes of other users are invisible there.
    pub fn probe_with_hidepid(&self, dir: &Path) -> String {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let inner = reexec(&self.path, Role::Probe(dir.to_owned()));
        let script = format!(
            "mount -t proc -o hidepid=2 proc /proc && exec setpriv --reuid={} --regid={} \
             --clear-groups \"$0\" \"$@\"",
            nobody.uid, nobody.gid
        );
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--fork", "sh", "-c", &script])
            .arg(inner.get_program())
            .args(inner.get_args())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        for (key, value) in inner.get_envs() {
            if let Some(value) = value {
                command.env(key, value);
            }
        }
        probe_output(command.output().unwrap())
    }
}

/// A copy of this test binary at `path`, executable: a tool's installed daemon, or its upgrade.
pub fn copy_of_this_binary(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(std::env::current_exe().unwrap(), path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// This process's open file descriptors.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The status a re-executed prober printed.
fn probe_output(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once(PROBE_OUTPUT_PREFIX).map(|(_, status)| status))
        .unwrap_or_else(|| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            panic!("no probe output: {stdout} {stderr}")
        })
        .to_owned()
}

impl NobodyBinary {
    /// The command that runs the copy as `nobody`, at its entry point, in `role`.
    pub fn command(&self, role: Role) -> Command {
        use std::os::unix::process::CommandExt;
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let mut command = reexec(&self.path, role);
        command
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        command
    }
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// A directory under the system temp dir, removed when dropped.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tld-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The daemon's files for this directory.
    pub fn paths(&self) -> DaemonPaths {
        DaemonPaths::new(&self.0)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Options for a daemon process.
#[derive(Default, Clone)]
pub struct DaemonOptions {
    pub version: Option<String>,
    pub log: Option<PathBuf>,
    pub grace: Option<Duration>,
    pub idle: Option<Duration>,
    /// The umask the daemon process sets before it starts, in octal.
    pub umask: Option<u32>,
    /// The executable to run instead of this test binary: a copy of it.
    pub program: Option<PathBuf>,
    /// Starts with SIGINT ignored, as a background job of a shell does.
    pub sigint_ignored: bool,
    /// The pidfile's marker line, for a tool that is not heddle.
    pub marker: Option<String>,
    /// A per-request timeout of tonic's server, set through `Daemon::server`.
    pub server_timeout: Option<Duration>,
}

/// A daemon in another process: this test binary, re-executed. Killed when dropped.
pub struct DaemonProcess {
    pub child: Child,
}

impl DaemonProcess {
    /// Starts a daemon for `dir` and waits until the probe sees it running.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, DaemonOptions::default())
    }

    pub fn start_with(dir: &Path, options: DaemonOptions) -> Self {
        let daemon = Self::spawn(dir, &options);
        let pid = daemon.pid();
        let pidfile = DaemonPaths::new(dir).pidfile;
        let marker = options.marker.as_deref().unwrap_or(PIDFILE_MARKER);
        wait_until("the daemon writes its pidfile", || {
            std::fs::read(&pidfile)
                .ok()
                .and_then(|bytes| Pidfile::parse_with_marker(&bytes, marker).ok())
                .is_some_and(|p| p.pid == pid)
        });
        daemon
    }

    /// Starts a daemon process without waiting for it.
    pub fn spawn(dir: &Path, options: &DaemonOptions) -> Self {
        let program = match &options.program {
            Some(program) => program.clone(),
            None => std::env::current_exe().unwrap(),
        };
        let mut command = reexec(&program, Role::Daemon(dir.to_owned()));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(v) = &options.version {
            command.env(DAEMON_VERSION_ENV, v);
        }
        if let Some(log) = &options.log {
            command.env(DAEMON_LOG_ENV, log);
        }
        if let Some(grace) = options.grace {
            command.env(DAEMON_GRACE_MS_ENV, grace.as_millis().to_string());
        }
        if let Some(mask) = options.umask {
            command.env(DAEMON_UMASK_ENV, format!("{mask:o}"));
        }
        if let Some(marker) = &options.marker {
            command.env(DAEMON_MARKER_ENV, marker);
        }
        if options.sigint_ignored {
            command.env(DAEMON_IGNORE_SIGINT_ENV, "1");
        }
        if let Some(idle) = options.idle {
            command.env(DAEMON_IDLE_MS_ENV, idle.as_millis().to_string());
        }
        if let Some(timeout) = options.server_timeout {
            command.env(
                DAEMON_SERVER_TIMEOUT_MS_ENV,
                timeout.as_millis().to_string(),
            );
        }
        Self {
            child: spawn(&mut command),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Stops the daemon with SIGSTOP, and waits until the kernel says it is stopped: a signal is
    /// delivered when its process next runs, and a busy machine may run it a while first.
    pub async fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        let status = format!("/proc/{}/status", self.pid());
        wait_until_async("the daemon is stopped", || async {
            std::fs::read_to_string(&status).is_ok_and(|s| s.contains("State:\tT"))
        })
        .await;
    }

    /// Waits (bounded) for the process to exit; returns its exit code and stderr.
    pub fn wait_exit(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return (status.code(), stderr);
            }
            assert!(Instant::now() < deadline, "daemon did not exit within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill_now(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The layered service over the in-process echo service.
pub type Layered = LocalDaemon<EchoServer<EchoService>>;

/// A layer for `dir` that ignores the environment and marks each response's route, with short
/// intervals for tests.
pub fn test_layer(dir: &Path) -> LocalDaemonLayer {
    LocalDaemonLayer::new(dir)
        .mode_env_value(None)
        .mark_route(true)
        .deadline(Duration::from_secs(5))
        .reprobe_interval(Duration::from_millis(100))
}

pub fn layered(layer: LocalDaemonLayer) -> Layered {
    ServiceBuilder::new()
        .layer(layer)
        .service(EchoServer::new(EchoService::new("in-process")))
}

/// One unary call, bounded by a generous timeout so that a hang fails the test instead of
/// blocking it.
pub async fn echo(
    client: &mut EchoClient<Layered>,
    id: u64,
) -> Result<tonic::Response<EchoReply>, tonic::Status> {
    let request = EchoRequest {
        message: format!("hello {id}"),
        id,
        delay_ms: 0,
        status_code: 0,
    };
    tokio::time::timeout(Duration::from_secs(20), client.echo(request))
        .await
        .expect("a call hung for 20 s")
}

/// Polls `condition` every 10 ms for up to 20 s; panics naming `what` if it never holds.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`wait_until`] for async conditions.
pub async fn wait_until_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bare tonic `Channel` to `dir`'s daemon socket, with none of the layer's checks: the
/// baseline the layer's behaviour is compared with.
pub async fn bare_channel(dir: &Path) -> tonic::transport::Channel {
    let socket = DaemonPaths::new(dir).socket;
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap()
}
