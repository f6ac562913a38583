//! [`LocalDaemonLayer`]: the builder of the options, and the tower [`Layer`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use crate::config::{AutoStart, AutoStartSwitch};
use crate::config::{EnvOverride, Idempotent, IdentityPolicy, Mode, Settings};
use crate::diagnose::{self, Report};
use crate::lifecycle::{StopOutcome, stop_with};
use crate::protocol::DEFAULT_MODE_ENV;
use crate::service::{LocalDaemon, Shared};
use crate::tool::Tool;

/// Routes each call to a repository directory's local daemon when one passes every check, and to
/// the wrapped in-process service otherwise.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_local_daemon::{LocalDaemonLayer, Mode};
/// # #[derive(Clone)] struct FooServer;
/// # impl tower::Service<http::Request<tonic::body::Body>> for FooServer {
/// #     type Response = http::Response<tonic::body::Body>;
/// #     type Error = std::convert::Infallible;
/// #     type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
/// #     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> { std::task::Poll::Ready(Ok(())) }
/// #     fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future { unimplemented!() }
/// # }
///
/// let svc = ServiceBuilder::new()
///     .layer(
///         LocalDaemonLayer::new("/repo/.heddle")
///             .deadline(Duration::from_millis(250))
///             .required_services(["foo.v1.Foo"])
///             .mode(Mode::Auto),
///     )
///     .service(FooServer);
/// # let _ = svc;
/// ```
#[derive(Debug, Clone)]
pub struct LocalDaemonLayer {
    dir: PathBuf,
    settings: Settings,
    mode_override: EnvOverride,
    /// Whether [`identity`](Self::identity) was called: if not, a separate daemon program that
    /// auto-start runs is the identity.
    identity_given: bool,
    mark_route: bool,
    idempotent: Option<Idempotent>,
    auto_start: Option<AutoStart>,
    auto_start_switch: AutoStartSwitch,
}

impl LocalDaemonLayer {
    /// A layer for the daemon of `state_dir`, whose files are under `<state_dir>/sockets/`.
    ///
    /// The defaults: mode `auto`, overridden by `HEDDLE_LOCAL_DAEMON`; a daemon running our own
    /// executable as our effective uid; 500 ms for connect plus handshake; `Health/Check` of `""`
    /// must answer SERVING, or the daemon attest itself; a negative decision is re-probed after a second; HTTP/2 keepalive
    /// pings every second, also while idle, with a 2 s timeout.
    pub fn new(state_dir: impl AsRef<Path>) -> Self {
        Self {
            dir: crate::paths::absolute(state_dir.as_ref()),
            settings: Settings::default(),
            mode_override: EnvOverride::Var(DEFAULT_MODE_ENV.to_owned()),
            identity_given: false,
            mark_route: false,
            idempotent: None,
            auto_start: None,
            auto_start_switch: AutoStartSwitch::new(),
        }
    }

    /// Uses this socket path instead of `<dir>/sockets/grpc.sock`.
    pub fn socket_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.socket_path = Some(path.into());
        self
    }

    /// Reads this pidfile instead of `<dir>/sockets/grpc.pid`.
    pub fn pidfile_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.pidfile_path = Some(path.into());
        self
    }

    /// The one deadline for connect, peer check and handshake together (default 500 ms).
    /// In [`Mode::Require`] it is also how long a call waits for a daemon.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.settings.deadline = deadline;
        self
    }

    /// The service names whose `Health/Check` must answer SERVING, or which the daemon's
    /// attestation must list (default: `""`, the whole server; an empty list means the same).
    pub fn required_services<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.settings.required_services = names.into_iter().map(Into::into).collect();
        self
    }

    /// Accepts a daemon that has no health service (`UNIMPLEMENTED`), as real heddle 0.10
    /// daemons have none. Off by default: such a daemon gives
    /// [`FallbackReason::HealthUnimplemented`](crate::FallbackReason::HealthUnimplemented).
    pub fn accept_unimplemented_health(mut self, accept: bool) -> Self {
        self.settings.accept_unimplemented_health = accept;
        self
    }

    /// Accepts a daemon that does not report which directory it serves (in
    /// [`DIRECTORY_METADATA_KEY`](crate::protocol::DIRECTORY_METADATA_KEY)), such as a heddle 0.10 daemon
    /// or one written in another language. Off by default: such a daemon gives
    /// [`FallbackReason::DirectoryUnreported`](crate::FallbackReason::DirectoryUnreported).
    ///
    /// This is the weaker guarantee: the client's own checks still refuse a symlinked, foreign
    /// or open sockets directory and hard-linked files, but a daemon whose sockets directory was
    /// moved from another repository is then used. It is independent of
    /// [`accept_unimplemented_health`](Self::accept_unimplemented_health): a heddle 0.10.4
    /// daemon needs both.
    pub fn accept_unverified_directory(mut self, accept: bool) -> Self {
        self.settings.accept_unverified_directory = accept;
        self
    }

    /// Asks `grpc.health.v1.Health/Check` on every new connection, also of a daemon that
    /// attests itself (off by default).
    ///
    /// A daemon built with this crate writes an attestation
    /// ([`ATTESTATION_FILE`](crate::protocol::ATTESTATION_FILE), see
    /// [the daemon's docs](crate::daemon#the-attestation)) that states what `Health/Check`
    /// answers: its pid and start, the directory it serves, its version and its services. For
    /// the process that wrote it (its pid is the pidfile's and its start the kernel's), the
    /// first call then skips the `Health/Check` round trip: after the peer-checked connect it
    /// waits, within the [deadline](Self::deadline), only for the daemon's HTTP/2 SETTINGS
    /// frame, and sends the call. The directory, version and service checks are the same, with
    /// the same [`FallbackReason`](crate::FallbackReason)s. What it gives up, and what this
    /// option keeps:
    ///
    /// - **Serving now** means: the attestation is there (a daemon removes it first when it
    ///   begins to stop), its process is alive with the attested start, and the daemon sent its
    ///   SETTINGS. A service a daemon switches to NOT_SERVING at run time (through a health
    ///   reporter of its own) is not seen; [`Daemon`](crate::Daemon) switches health only as it
    ///   starts and stops.
    /// - **An overloaded daemon**: one too slow to answer `Health/Check` within the deadline
    ///   gives [`DeadlineExceeded`](crate::FallbackReason::DeadlineExceeded) and the call runs
    ///   in-process. Attested, a daemon that sends its SETTINGS (its accept loop runs) gets the
    ///   first call, which only the call's own deadline bounds. A paused daemon sends no
    ///   SETTINGS: `DeadlineExceeded`, and the call runs in-process, as before.
    /// - **A stopping daemon** removed its attestation first, so a client that probes it asks
    ///   `Health/Check`. One that read the attestation just before sends its call to a daemon
    ///   that then finishes it within its grace period, or refuses it unprocessed (GOAWAY), and
    ///   the call runs in-process.
    /// - **A daemon that dies, or is paused, after its SETTINGS**: asked, that is a failed check,
    ///   and the call runs in-process. Attested, the call has been written by then; the daemon
    ///   may have read it, so a call of a method not declared [idempotent](Self::idempotent) fails
    ///   with `UNAVAILABLE` ("may have run"), as a call on a warm connection does.
    ///
    /// A daemon that writes no attestation (heddle 0.10, another language) is always asked.
    ///
    /// ```
    /// use tower_local_daemon::LocalDaemonLayer;
    ///
    /// let layer = LocalDaemonLayer::new("/repo/.heddle").require_health_check(true);
    /// # let _ = layer;
    /// ```
    pub fn require_health_check(mut self, require: bool) -> Self {
        self.settings.require_health_check = require;
        self
    }

    /// Requires the daemon to report exactly this version in
    /// [`VERSION_METADATA_KEY`](crate::protocol::VERSION_METADATA_KEY) (default: any version).
    pub fn required_version(mut self, version: impl Into<String>) -> Self {
        self.settings.required_version = Some(version.into());
        self
    }

    /// Takes `tool`'s settings: its pidfile marker, its variables for the mode and the
    /// auto-start switch (default [`Tool::heddle`]), and its daemon program as the
    /// [identity](Self::identity) when it has one. Its [`Daemon`](crate::Daemon) is given the
    /// same value ([`Daemon::tool`](crate::Daemon::tool)). Among `tool`,
    /// [`pidfile_marker`](Self::pidfile_marker), [`mode_env_var`](Self::mode_env_var) and
    /// [`auto_start_env_var`](Self::auto_start_env_var), the call made last wins.
    ///
    /// ```
    /// use tower_local_daemon::{LocalDaemonLayer, Tool};
    ///
    /// let kv = Tool::new("kv")?;
    /// let layer = LocalDaemonLayer::new("/repo/.kv").tool(&kv);
    /// # let _ = layer;
    /// # Ok::<(), tower_local_daemon::InvalidTool>(())
    /// ```
    pub fn tool(self, tool: &Tool) -> Self {
        let layer = self
            .pidfile_marker(tool.marker())
            .mode_env_var(tool.mode_env_var())
            .auto_start_env_var(tool.auto_start_env_var());
        match tool.daemon_program() {
            Some(_) => layer.identity(tool.identity()),
            None => layer,
        }
    }

    /// The second line of an acceptable daemon's pidfile (default `heddle-agent`), for a tool
    /// that is not heddle: its [`Daemon`](crate::Daemon) must write the same
    /// ([`Daemon::pidfile_marker`](crate::Daemon::pidfile_marker)). A marker that is not 1 to 64
    /// visible ASCII characters matches no daemon, whose `bind` refuses it; [`Tool`] checks it
    /// where it is made.
    pub fn pidfile_marker(mut self, marker: impl Into<String>) -> Self {
        self.settings.marker = marker.into();
        self
    }

    /// Which executable an acceptable daemon runs (default: our own, or, with
    /// [auto-start](Self::auto_start) of another program such as [`AutoStart::sibling`], that
    /// program, whether or not auto-start is switched off, so that the identity never changes
    /// with the environment).
    pub fn identity(mut self, identity: IdentityPolicy) -> Self {
        self.settings.identity = identity;
        self.identity_given = true;
        self
    }

    /// The mode when the environment does not set one (default [`Mode::Auto`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.settings.mode = mode;
        self
    }

    /// Reads the mode override from this environment variable instead of
    /// [`DEFAULT_MODE_ENV`](crate::protocol::DEFAULT_MODE_ENV). The environment beats
    /// [`mode`](Self::mode); an invalid value is logged and ignored.
    pub fn mode_env_var(mut self, name: impl Into<String>) -> Self {
        self.mode_override = EnvOverride::Var(name.into());
        self
    }

    /// Takes this value as the environment override's, without reading the environment: for
    /// tests, which should not mutate a process environment that other threads read.
    pub fn mode_env_value(mut self, value: Option<&str>) -> Self {
        self.mode_override = EnvOverride::Value(value.map(str::to_owned));
        self
    }

    /// How long a negative decision stands before a call triggers a re-probe (default 1 s). In
    /// [`Mode::Auto`] the re-probe runs in the background: no call waits for it.
    pub fn reprobe_interval(mut self, interval: Duration) -> Self {
        self.settings.reprobe_interval = interval;
        self
    }

    /// The gRPC methods that are safe to run twice: `predicate` gets a method's path, such as
    /// `"/grpc.health.v1.Health/Check"` (none by default).
    ///
    /// A call of such a method whose request body was whole when sent, and whose daemon
    /// connection breaks before the response head arrives (the connection was reset or reached
    /// its end, as when the daemon is killed, or keepalive gave up on it), runs again
    /// in-process, once, within what remains of its own deadline (`grpc-timeout`). Nothing
    /// else is run again: a call that got an answer (any status, including `UNAVAILABLE` from
    /// the daemon's own handler, or a stream reset other than `REFUSED_STREAM`), anything
    /// after the response head arrived (the response belongs to the caller then, which also
    /// covers server streaming), a request body still streaming when sent, and any call in
    /// [`Mode::Require`]. Calls the daemon provably never processed run in-process for every
    /// method, without this option.
    ///
    /// **Idempotent means here: safe to run twice, in any order, even at the same time.** A
    /// daemon that was paused (SIGSTOP) and given up by keepalive can still run the call after
    /// the in-process run has: an "idempotent" write such as `put a 1` can then overwrite a
    /// later write. Read-only methods are the safe use.
    ///
    /// The predicate costs one call per daemon call when it is set, and nothing when it is not.
    ///
    /// ```
    /// use tower_local_daemon::LocalDaemonLayer;
    ///
    /// let layer = LocalDaemonLayer::new("/repo/.heddle")
    ///     .idempotent(|method| method.starts_with("/vcs.v1.Read/"));
    /// # let _ = layer;
    /// ```
    pub fn idempotent(mut self, predicate: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.idempotent = Some(Idempotent::new(predicate));
        self
    }

    /// [`idempotent`](Self::idempotent) for a fixed list of method paths.
    ///
    /// ```
    /// use tower_local_daemon::LocalDaemonLayer;
    ///
    /// let layer = LocalDaemonLayer::new("/repo/.heddle")
    ///     .idempotent_methods(["/vcs.v1.Read/Status", "/vcs.v1.Read/Log"]);
    /// # let _ = layer;
    /// ```
    pub fn idempotent_methods<I, M>(self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        let methods: Vec<String> = methods.into_iter().map(Into::into).collect();
        self.idempotent(move |path| methods.iter().any(|m| m == path))
    }

    /// Marks each response with the [`Route`](crate::Route) that served it, in its extensions
    /// (default off). The mark costs an allocation per response (`http::Extensions` allocates
    /// its map), so it is for tests, demos and `status` verbs, not for every call of a tool.
    pub fn mark_route(mut self, mark: bool) -> Self {
        self.mark_route = mark;
        self
    }

    /// Starts the directory's daemon with this command when a call finds none (off by
    /// default). Never in mode `off`; off while `HEDDLE_LOCAL_DAEMON_AUTO_START` is `0`, `off`,
    /// `false` or `no` ([`auto_start_env_var`](Self::auto_start_env_var) names another
    /// variable); and off under `CI` (set to anything but empty, `0` or `false`) unless
    /// [forced](Self::force_auto_start). The call that starts the daemon, and every call that
    /// finds that start pending, waits for it (in its response future, so its own deadline
    /// still bounds it) and then goes to it; past the hand-off bound
    /// ([`AutoStart::handoff_timeout`], the start timeout by default) calls run in-process
    /// with [`AutoStartFailed`](crate::FallbackReason::AutoStartFailed). In mode `require` the
    /// call waits up to the start timeout. A daemon whose executable was replaced on disk (an
    /// upgrade of this installation) is stopped and started again, and the call that finds it
    /// waits for the new one within the same bound.
    /// [`AutoStart::no_handoff`] keeps calls from waiting: they run in-process until the
    /// daemon serves. See [`AutoStart`] and the README's "Two routes, one repository".
    pub fn auto_start(mut self, auto_start: AutoStart) -> Self {
        self.auto_start = Some(auto_start);
        self
    }

    /// Reads the variable that turns auto-start off from `name` instead.
    pub fn auto_start_env_var(mut self, name: impl Into<String>) -> Self {
        self.auto_start_switch.env = EnvOverride::Var(name.into());
        self
    }

    /// Takes this value as the auto-start variable's, without reading the environment (tests).
    pub fn auto_start_env_value(mut self, value: Option<&str>) -> Self {
        self.auto_start_switch.env = EnvOverride::Value(value.map(str::to_owned));
        self
    }

    /// Starts daemons also under `CI` (a crate's own tests, a demo).
    pub fn force_auto_start(mut self, force: bool) -> Self {
        self.auto_start_switch.forced = force;
        self
    }

    /// How long an entry whose last service was dropped keeps its daemon connection (default
    /// 5 s): a CLI that builds its service per verb keeps a warm connection between verbs.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.settings.linger = linger;
        self
    }

    /// HTTP/2 keepalive on the daemon connection: a ping every `interval`, also while idle, and
    /// the connection is given up when a ping is not answered within `timeout`; calls then go
    /// in-process. The defaults (1 s and 2 s) notice a hung daemon within about three seconds.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.settings.keepalive_interval = interval;
        self.settings.keepalive_timeout = timeout;
        self
    }
}

impl LocalDaemonLayer {
    /// Runs every check a service of this layer runs, in order, without caching anything, and
    /// reports each one: for a tool's `status` verb. See [`Report`].
    pub async fn diagnose(&self) -> Report {
        let (settings, misconfigured) = self.resolved_settings();
        let mut report = diagnose::run(&self.dir, &settings).await;
        report.misconfigured.splice(0..0, misconfigured);
        report
    }

    /// Stops this layer's daemon as [`stop`](crate::stop) does, with the files (pidfile
    /// marker, socket and pidfile paths) and checks this layer is built with: for a tool's
    /// `stop` verb, where the free [`stop`](crate::stop) reads the default files only.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use tower_local_daemon::{LocalDaemonLayer, StopOutcome};
    ///
    /// let dir = std::env::temp_dir().join("tower-local-daemon-doc-layer-stop");
    /// let layer = LocalDaemonLayer::new(&dir).pidfile_marker("my-tool");
    /// assert_eq!(layer.stop(Duration::from_secs(5)).await, StopOutcome::NotRunning);
    /// # }
    /// ```
    pub async fn stop(&self, timeout: Duration) -> StopOutcome {
        let paths = self.settings.paths(&self.dir);
        stop_with(&self.dir, &paths, &self.settings, timeout).await
    }

    /// The settings after the environment's overrides, and the values of the environment that
    /// were not understood.
    fn resolved_settings(&self) -> (Settings, Vec<String>) {
        let mut misconfigured = Vec::new();
        let mut settings = self.settings.clone();
        if let Some(auto) = &self.auto_start
            && !self.identity_given
            && !auto.runs_this_executable()
        {
            settings.identity = IdentityPolicy::Executable(auto.program.clone());
        }
        settings.mode = self.mode_override.apply(settings.mode, &mut misconfigured);
        let enabled =
            settings.mode != Mode::Off && self.auto_start_switch.enabled(&mut misconfigured);
        settings.auto_start = self.auto_start.clone().filter(|_| enabled).map(|mut auto| {
            // The daemon's environment is the command's, less these switches.
            auto.env_remove = [self.mode_override.var(), self.auto_start_switch.env.var()]
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .collect();
            auto
        });
        (settings, misconfigured)
    }
}

impl<S> Layer<S> for LocalDaemonLayer {
    type Service = LocalDaemon<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let (settings, misconfigured) = self.resolved_settings();
        let shared = Shared::new(
            self.dir.clone(),
            settings,
            misconfigured,
            self.mark_route,
            self.idempotent.clone(),
        );
        LocalDaemon::new(inner, Arc::new(shared))
    }
}

/// The tool-aware forms of a `stop` and a `status` verb: with the tool's pidfile marker and
/// environment variables, never heddle's.
impl Tool {
    /// A layer for `state_dir`'s daemon with this tool's settings.
    pub fn layer(&self, state_dir: impl AsRef<Path>) -> LocalDaemonLayer {
        LocalDaemonLayer::new(state_dir).tool(self)
    }

    /// [`stop`](crate::stop) for this tool's daemon of `state_dir`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_local_daemon::InvalidTool> {
    /// use std::time::Duration;
    /// use tower_local_daemon::{StopOutcome, Tool};
    ///
    /// let dir = std::env::temp_dir().join("tower-local-daemon-doc-tool-stop");
    /// let outcome = Tool::new("kv")?.stop(&dir, Duration::from_secs(5)).await;
    /// assert_eq!(outcome, StopOutcome::NotRunning);
    /// # Ok(()) }
    /// ```
    pub async fn stop(&self, state_dir: impl AsRef<Path>, timeout: Duration) -> StopOutcome {
        self.layer(state_dir).stop(timeout).await
    }

    /// [`diagnose`](crate::diagnose) for this tool's daemon of `state_dir`, with the mode its
    /// variable sets.
    pub async fn diagnose(&self, state_dir: impl AsRef<Path>) -> Report {
        self.layer(state_dir).diagnose().await
    }
}
