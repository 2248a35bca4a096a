//! The `switchyard` binary: serve, check, demo, ctl, healthcheck.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use switchyard::config::{self, StateBackend};
use switchyard::{errln, out, outln, Options, StateStore};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// `--version`: the crate version and the git commit it was built from (build.rs; "unknown"
/// outside a git checkout, e.g. in a Docker build without `--build-arg SWITCHYARD_GIT_COMMIT`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SWITCHYARD_GIT_COMMIT"),
    ")"
);

/// mimalloc, not glibc's malloc: a request's future (6 KB) and a connection's (1.6 KB) are too
/// large for glibc's per-thread cache, so each took its slow path (bins, coalescing) on every
/// request and connection. Measured (BENCHMARKS.md, tuning log rows 22 and 31): 21.5k -> 20.4k
/// instructions per keep-alive request, 30.8k -> 26.3k per connection-per-request, for ~10 MiB
/// more resident at rest.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version = VERSION,
    about = "Blue-green traffic-switching reverse proxy with automatic rollback"
)]
struct Cli {
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the proxy.
    Serve {
        #[arg(
            long,
            env = "SWITCHYARD_CONFIG",
            default_value = "config/switchyard.toml"
        )]
        config: PathBuf,
        /// Move an unreadable state file aside and start from the config's colors.
        #[arg(long)]
        reset_state: bool,
        /// Take the listening sockets over from the Switchyard running with this config (its
        /// `proxy.upgrade_socket`); it stops accepting and drains once this one serves.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file and print a summary, or every error with its key.
    Check {
        #[arg(
            long,
            env = "SWITCHYARD_CONFIG",
            default_value = "config/switchyard.toml"
        )]
        config: PathBuf,
        /// Validate this release plan (TOML) instead, against the config's services when
        /// --config is given or the config is at its default path.
        #[arg(long)]
        release: Option<PathBuf>,
    },
    /// A self-contained demo: the proxy plus built-in blue and green upstreams.
    Demo(switchyard::DemoArgs),
    /// The admin API from a terminal.
    Ctl(switchyard::Ctl),
    /// Exit 0 when the Switchyard running with this config answers on its admin listener's
    /// /healthz (address, scheme and certificate from the config), else 1: a container health
    /// check.
    Healthcheck(switchyard::HealthcheckArgs),
}

/// The command line as given. An environment variable that backs an argument and is set but
/// empty counts as unset, for every subcommand (`SWITCHYARD_CONFIG` for serve, check and
/// healthcheck; `SWITCHYARD_ADMIN_URL`, `SWITCHYARD_ADMIN_TOKEN`, `SWITCHYARD_ADMIN_CA_FILE` for
/// ctl), as `check --release` treats `SWITCHYARD_CONFIG`: clap would take it for an empty value
/// (a usage error, or an empty token sent as `Bearer `). The argument's default applies, or the
/// flag given on the command line.
fn parse_cli() -> Cli {
    let cmd = drop_empty_env(Cli::command());
    Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
}

/// `cmd` and its subcommands without the env binding of every argument whose variable is set
/// and empty.
fn drop_empty_env(mut cmd: clap::Command) -> clap::Command {
    let empty: Vec<clap::Id> = cmd
        .get_arguments()
        .filter(|a| {
            a.get_env()
                .is_some_and(|var| std::env::var_os(var).is_some_and(|v| v.is_empty()))
        })
        .map(|a| a.get_id().clone())
        .collect();
    for id in empty {
        cmd = cmd.mut_arg(id, |a| a.env(None));
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for sub in subs {
        cmd = cmd.mut_subcommand(sub, drop_empty_env);
    }
    cmd
}

fn main() -> ExitCode {
    let cli = parse_cli();
    // Dropped when `main` returns, after every exit path below: the queued lines are written.
    // `check` says what it finds itself (`warning:` lines): the resolver's runtime WARNs ("keeping
    // its last good addresses") would only repeat it, wrongly, offline.
    let quiet = matches!(cli.cmd, Cmd::Check { .. });
    let _log = init_logging(cli.log_format, if quiet { "error" } else { "info" });
    match cli.cmd {
        Cmd::Check {
            config,
            release: Some(plan),
        } => check_release(&plan, &config),
        Cmd::Check {
            config,
            release: None,
        } => check(&config),
        Cmd::Serve {
            config,
            reset_state,
            upgrade,
        } => serve(&config, reset_state, upgrade, cli.log_format),
        Cmd::Demo(args) => match runtime(None) {
            Ok(rt) => match rt.block_on(switchyard::run_demo(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    errln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                errln!("error: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Healthcheck(args) => healthcheck(&args),
        Cmd::Ctl(args) => match runtime(Some(1)) {
            Ok(rt) => exit(rt.block_on(switchyard::run_ctl(args))),
            Err(e) => {
                errln!("error: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The flush of the log queue, to hold until `main` returns.
fn init_logging(format: LogFormat, level: &str) -> Option<switchyard::log_writer::Flush> {
    // Without RUST_LOG, the `h2` and `rustls` crates log at error only: they warn on what a
    // client sends (a PING ACK nobody asked for, one 17-byte frame per line; a TLS 1.2 warning
    // alert), which would let any client fill the log and push operational and audit lines out
    // of a slow collector's queue. RUST_LOG (e.g. `info,h2=debug`) shows them again.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},h2=error,rustls=error"))
    });
    // Colors only for a person at a terminal who did not ask for none (NO_COLOR, no-color.org):
    // a file, a pipe or a log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // Startup failures of `serve` are logged under their own target, kept at any RUST_LOG
    // (`off` included): exiting 1 without saying why is never what was asked for.
    let filter = match format!("{STARTUP}=info").parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    // So is a panic's report (below), as std's own is.
    let filter = match "switchyard::panic=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    // A failed write to stderr (its reader gone: a restarted log collector, `serve 2>&1 |
    // head`) loses that line and nothing else. tracing's default reports it with `eprintln!`,
    // which panics on EPIPE inside whichever task logged: an admin flip answered 500 after it
    // was applied, the health checker and the rollback watcher gone.
    // Through a queue and a thread of its own (`log_writer`): a reader that stops reading costs
    // log lines, never the workers that log.
    let (writer, flush) = match switchyard::log_writer::start(std::io::stderr()) {
        Ok((w, f)) => (BoxMakeWriter::new(w), Some(f)),
        Err(_) => (BoxMakeWriter::new(std::io::stderr), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if flush.is_some() {
        // A panic said through the same queue (one log line, JSON with `--log-format json`):
        // std's own report writes to stderr directly, and would block on a full pipe.
        std::panic::set_hook(Box::new(|info| {
            let message = switchyard::panic_text(info.payload());
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            let thread = std::thread::current();
            let backtrace = std::backtrace::Backtrace::capture();
            let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
                .then(|| backtrace.to_string());
            tracing::error!(
                target: "switchyard::panic",
                thread = thread.name().unwrap_or("unnamed"),
                location,
                backtrace,
                "panicked: {message}"
            );
        }));
    } else {
        tracing::warn!("cannot start the log writer thread: logging straight to stderr, which blocks while its reader does not read");
    }
    flush
}

/// The tracing target of `serve`'s startup reports (see [`Startup`]).
const STARTUP: &str = "switchyard::startup";

/// How `serve` reports what stops it from starting: with `--log-format json` as JSON log lines
/// (a log pipeline that parses every line must not meet plain text), with `text` as plain
/// lines on stderr, unchanged.
#[derive(Clone, Copy)]
struct Startup(LogFormat);

impl Startup {
    /// A failure, `error: ...` in text.
    fn error(self, text: &str) {
        match self.0 {
            LogFormat::Text => errln!("error: {text}"),
            LogFormat::Json => tracing::error!(target: STARTUP, error = %text, "cannot start"),
        }
    }

    /// Something done on the way that an operator must know (not a failure).
    fn note(self, text: &str) {
        match self.0 {
            LogFormat::Text => errln!("{text}"),
            LogFormat::Json => tracing::warn!(target: STARTUP, "{text}"),
        }
    }

    /// Every problem of a config file, each with its key: one line per problem.
    fn config_errors(self, path: &std::path::Path, errs: &config::ConfigErrors) {
        match self.0 {
            LogFormat::Text => print_errors(path, errs),
            LogFormat::Json => {
                for e in &errs.0 {
                    tracing::error!(
                        target: STARTUP,
                        config = %path.display(),
                        key = (!e.key.is_empty()).then_some(e.key.as_str()),
                        error = %e,
                        "invalid configuration"
                    );
                }
            }
        }
    }
}

/// One worker runs on a current-thread runtime: no work-stealing queues, no cross-thread
/// wake-ups (BENCHMARKS.md, "runtime flavor"). More workers share one multi-thread runtime.
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().thread_name("switchyard").build()
}

/// A command's exit code (`out::exit_code`: a success whose output could not be written is 1).
fn exit(code: i32) -> ExitCode {
    ExitCode::from(out::exit_code(code) as u8)
}

fn print_errors(path: &std::path::Path, errs: &config::ConfigErrors) {
    errln!(
        "{}: {} problem{}:",
        path.display(),
        errs.0.len(),
        if errs.0.len() == 1 { "" } else { "s" }
    );
    for e in &errs.0 {
        errln!("  {e}");
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    // The files it names are read as `serve` reads them at startup, their problems listed
    // with the rest.
    match config::load_with(path, |c| switchyard::config_file_problems(path, c)) {
        Ok(cfg) => {
            // Names are looked up once: a failure is a warning (it may resolve once deployed).
            let (cfg, notes) = if switchyard::has_names(&cfg) {
                match runtime(Some(1)) {
                    Ok(rt) => rt.block_on(async {
                        let notes = switchyard::name_warnings(&cfg).await;
                        (switchyard::resolve_names(cfg, None).await, notes)
                    }),
                    Err(_) => (cfg, Vec::new()),
                }
            } else {
                (cfg, Vec::new())
            };
            outln!("{}: ok", path.display());
            for n in notes.iter().chain(&switchyard::file_warnings(&cfg)) {
                outln!("{n}");
            }
            out!("{}", cfg.summary());
            exit(0)
        }
        Err(errs) => {
            print_errors(path, &errs);
            ExitCode::FAILURE
        }
    }
}

/// `healthcheck`: one probe of the admin listener the config describes, bounded by `--timeout`
/// (a health check that hangs is no answer); a line on stdout when healthy, on stderr when not.
fn healthcheck(args: &switchyard::HealthcheckArgs) -> ExitCode {
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(errs) => {
            print_errors(&args.config, &errs);
            return ExitCode::FAILURE;
        }
    };
    let target = match switchyard::HealthcheckTarget::from_config(&cfg.admin) {
        Ok(t) => t,
        Err(e) => {
            errln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match runtime(Some(1)) {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async { tokio::time::timeout(args.timeout, target.probe()).await });
    match result {
        Ok(Ok(())) => {
            outln!("ok: {}", target.url);
            exit(0)
        }
        Ok(Err(e)) => {
            errln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            errln!(
                "unhealthy: no answer from {} within {}",
                target.url,
                humantime::format_duration(args.timeout)
            );
            ExitCode::FAILURE
        }
    }
}

/// `check --release FILE [--config FILE]`: the plan's problems, each with its key. The config
/// is read only when given explicitly or present at the default path.
fn check_release(plan: &std::path::Path, config_path: &std::path::Path) -> ExitCode {
    let explicit = std::env::args().any(|a| a == "--config" || a.starts_with("--config="))
        || std::env::var_os("SWITCHYARD_CONFIG").is_some_and(|v| !v.is_empty());
    let cfg = if explicit || config_path.exists() {
        match config::load(config_path) {
            Ok(c) => Some(c),
            Err(errs) => {
                print_errors(config_path, &errs);
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    match switchyard::load_release_plan(plan, cfg.as_ref()) {
        Ok(p) => {
            outln!("{}: ok", plan.display());
            out!("{}", p.summary());
            let unwatched = cfg.as_ref().map(|c| p.unwatched(c)).unwrap_or_default();
            if let Some(note) = switchyard::unwatched_note(&unwatched) {
                outln!("warning: {note}");
            }
            exit(0)
        }
        Err(errs) => {
            print_errors(plan, &errs);
            ExitCode::FAILURE
        }
    }
}

fn serve(
    path: &std::path::Path,
    reset_state: bool,
    upgrade: bool,
    log_format: LogFormat,
) -> ExitCode {
    let report = Startup(log_format);
    let cfg = match config::load_with(path, |c| switchyard::config_file_problems(path, c)) {
        Ok(c) => c,
        Err(errs) => {
            report.config_errors(path, &errs);
            return ExitCode::FAILURE;
        }
    };
    let store = StateStore::from_config(&cfg.state);
    if reset_state && cfg.state.backend == StateBackend::File {
        // Never the state of a process that is serving it: start_with would refuse to start
        // beside it, after the file was moved from under it.
        if let Some(pid) = switchyard::state_held_by(&cfg.state.path) {
            report.error(&format!(
                "--reset-state: the state file {} is in use by another Switchyard{}; stop it first (nothing was moved)",
                cfg.state.path.display(),
                if pid.is_empty() { String::new() } else { format!(" (pid {pid})") }
            ));
            return ExitCode::FAILURE;
        }
        // A release file that cannot be read goes aside too: its release is not resumed.
        match switchyard::move_release_file_aside_if_unreadable(&cfg.state.path) {
            Ok(Some(aside)) => report.note(&format!(
                "--reset-state: moved the unreadable release file {} to {}; the release it held is not resumed",
                cfg.state.path.with_extension("release.json").display(),
                aside.display()
            )),
            Ok(None) => {}
            Err(e) => {
                report.error(&format!(
                    "--reset-state: cannot move {} aside: {e}",
                    cfg.state.path.with_extension("release.json").display()
                ));
                return ExitCode::FAILURE;
            }
        }
        match switchyard::move_state_aside(&cfg.state.path) {
            Ok(Some(aside)) => {
                report.note(&format!(
                    "--reset-state: moved {} to {}",
                    cfg.state.path.display(),
                    aside.display()
                ));
                // A release it ran is not resumed against the config's colors.
                match switchyard::end_release_on_state_reset(&cfg.state.path) {
                    Ok(Some((id, name))) => report.note(&format!(
                        "--reset-state: release {name:?} ({id}) was running; it is ended (aborted), not resumed: every service is at the config's colors"
                    )),
                    Ok(None) => {}
                    Err(e) => {
                        report.error(&format!(
                            "--reset-state: cannot end the release that was running in {}: {e}",
                            cfg.state.path.with_extension("release.json").display()
                        ));
                        return ExitCode::FAILURE;
                    }
                }
            }
            Ok(None) if cfg.state.path.exists() => report.note(&format!(
                "--reset-state: the state file {} is readable: kept, not moved aside (only an unreadable one is); its colors are served",
                cfg.state.path.display()
            )),
            Ok(None) => {}
            Err(e) => {
                report.error(&format!(
                    "--reset-state: cannot move {} aside: {e}",
                    cfg.state.path.display()
                ));
                return ExitCode::FAILURE;
            }
        }
    }
    // No state file (deleted, or `[state] path` changed; after a reset too when there was none
    // to move aside): every service starts at the config's colors, so a release that flipped
    // one elsewhere is ended, not resumed against them. Not in an upgrade: the running process
    // drives its release and writes these files until it hands over.
    if cfg.state.backend == StateBackend::File && !upgrade {
        match switchyard::end_release_on_missing_state(&cfg.state.path, &cfg) {
            Ok(Some((id, name))) => report.note(&format!(
                "the state file {} is missing: release {name:?} ({id}) was running; it is ended (aborted), not resumed: every service is at the config's colors",
                cfg.state.path.display()
            )),
            Ok(None) => {}
            Err(e) => {
                report.error(&format!(
                    "the state file {} is missing: cannot end the release that was running in {}: {e}",
                    cfg.state.path.display(),
                    cfg.state.path.with_extension("release.json").display()
                ));
                return ExitCode::FAILURE;
            }
        }
    }
    // One trailing line end off (a secret made from a file keeps it); a token no client could
    // send in a header would refuse every mutating call with 401: a config error instead,
    // found before `--upgrade` asks the running process for its sockets.
    let token = match std::env::var(&cfg.admin.token_env) {
        Ok(t) => switchyard::bearer_token(&t).map(|t| Some(t.to_string())),
        Err(std::env::VarError::NotUnicode(_)) => Err("it is not UTF-8"),
        Err(std::env::VarError::NotPresent) => Ok(None),
    };
    let token = match token {
        Ok(t) => t,
        Err(why) => {
            report.error(&format!(
                "admin.token_env: the admin token in {} cannot be sent in an Authorization header: {why}",
                cfg.admin.token_env
            ));
            return ExitCode::FAILURE;
        }
    };
    if token.as_deref().unwrap_or("").is_empty() {
        tracing::warn!(
            env = %cfg.admin.token_env,
            "no admin token set: every mutating admin call will be refused"
        );
    }
    // The running process's sockets, before anything else can fail: without them, stop here
    // and leave it serving.
    let inherited = if upgrade {
        match switchyard::request_upgrade(&cfg.proxy.upgrade_socket) {
            Ok(i) => i,
            Err(e) => {
                report.error(&format!("--upgrade: {e:#}"));
                return ExitCode::FAILURE;
            }
        }
    } else {
        switchyard::Inherited::default()
    };
    let mut cfg = cfg;
    inherited.settle_runtime(&mut cfg.proxy);
    // per_worker: the main thread is worker 0 (and runs admin and background tasks).
    let main_workers = match cfg.proxy.runtime {
        switchyard::config::RuntimeFlavor::PerWorker => Some(1),
        switchyard::config::RuntimeFlavor::Shared => cfg.proxy.workers,
    };
    let rt = match runtime(main_workers) {
        Ok(rt) => rt,
        Err(e) => {
            report.error(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let (code, access) = rt.block_on(async move {
        // Taken over before startup (which may wait on name resolution for seconds): a SIGHUP
        // from logrotate or `systemctl reload` then, or a SIGTERM, is acted on once the proxy
        // runs instead of killing it with the default action.
        let caught = Caught::new();
        let running = match switchyard::start_with(
            cfg,
            Options {
                config_path: Some(path.to_path_buf()),
                store,
                admin_token: token,
            },
            inherited,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                report.error(&format!("{e:#}"));
                return (ExitCode::FAILURE, None);
            }
        };
        let app = running.app.clone();
        let app_for_log = app.clone();
        if let Some(old) = running.upgrade_refused {
            // The old process gave up waiting for this one and serves on (it said so after
            // this one's last check): drain what was accepted meanwhile, and exit 1.
            running.wait().await;
            report.error(&format!(
                "--upgrade: the running process (pid {old}) stopped waiting for this one (its proxy.upgrade_timeout passed) and keeps serving; this one exits (raise proxy.upgrade_timeout there, reload it, and upgrade again)"
            ));
            // The requests it drained are logged all the same.
            return (ExitCode::FAILURE, app_for_log.access_log.get().cloned());
        }
        switchyard::sd_notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        let handed_over = signals(
            app,
            path.to_path_buf(),
            matches!(log_format, LogFormat::Json),
            caught,
        )
        .await;
        if !handed_over {
            // After an upgrade the successor is the service: it must not look like it stops.
            switchyard::sd_notify("STOPPING=1");
        }
        running.wait().await;
        (ExitCode::SUCCESS, app_for_log.access_log.get().cloned())
    });
    // A blocking call that never returns (a name lookup stuck on a hung resolver or a FIFO)
    // does not keep a stopped proxy alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    // After the runtime, which dropped the connections the grace cut: their requests' lines
    // (a download cut mid-body) are queued by then, and written now.
    if let Some(log) = access {
        log.flush(std::time::Duration::from_secs(2));
    }
    if code == ExitCode::SUCCESS {
        tracing::info!("stopped");
    }
    code
}

/// The signals `serve` acts on, caught from before startup on; None where they could not be
/// (not Unix, or the runtime refused).
struct Caught {
    #[cfg(unix)]
    streams: Option<[tokio::signal::unix::Signal; 5]>,
}

impl Caught {
    fn new() -> Caught {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
                signal(SignalKind::user_defined1()),
                signal(SignalKind::user_defined2()),
            ) {
                (Ok(term), Ok(int), Ok(hup), Ok(usr1), Ok(usr2)) => {
                    Some([term, int, hup, usr1, usr2])
                }
                _ => None,
            };
            Caught { streams }
        }
        #[cfg(not(unix))]
        Caught {}
    }
}

/// SIGTERM / SIGINT: graceful shutdown. SIGHUP: reload the config.
/// Returns true when an upgrade handed the sockets to a new process.
async fn signals(
    app: std::sync::Arc<switchyard::App>,
    config: PathBuf,
    json_logs: bool,
    caught: Caught,
) -> bool {
    #[cfg(unix)]
    {
        let Some([mut term, mut int, mut hup, mut usr1, mut usr2]) = caught.streams else {
            let _ = tokio::signal::ctrl_c().await;
            app.shutdown.cancel();
            return false;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                // An upgrade handed the sockets to a new process: drain and exit.
                () = app.shutdown.cancelled() => return true,
                // Upgrade: start the binary again with --upgrade; it takes the sockets over.
                _ = usr2.recv() => switchyard::spawn_successor(&config, json_logs),
                _ = usr1.recv() => {
                    // logrotate: the access log file is reopened at its configured path.
                    if let Some(log) = app.access_log.get() {
                        log.reopen();
                    }
                }
                _ = hup.recv() => {
                    match app.reload("SIGHUP").await {
                        Ok(o) => {
                            switchyard::ensure_health_checks(&app);
                            tracing::info!("{}", o.message);
                        }
                        // A refused config is logged once, with every problem, by the reload.
                        Err(switchyard::ReloadError::Invalid(_)) => {}
                        Err(e) => tracing::error!(error = %e, "reload on SIGHUP refused"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    app.shutdown.cancel();
    false
}
