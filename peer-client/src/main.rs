//! `natcall`: the command-line peer. Flags and the config file are parsed here; the call
//! session lives in [`session`], rooms in [`room`], the terminal view in [`view`], what is
//! printed and the exit codes in [`output`], the demo in [`demo`].

mod config;
mod contacts;
mod demo;
mod output;
mod room;
mod session;
mod srv;
mod stream;
mod view;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use natcall::Policy;
use tracing_subscriber::EnvFilter;

use crate::output::Exit;

/// Call someone behind a NAT: LAN when you share a router, else UDP hole punching, else the
/// rendezvous server's TCP relay. Chat lines typed on stdin go to the other side.
#[derive(Debug, Parser)]
#[command(name = "natcall", version, about, after_help = output::EXIT_CODES)]
pub struct Args {
    /// Rendezvous server, HOST[:PORT][#SHA256:KEY] (default: the config file's, else
    /// 127.0.0.1:3478). With #SHA256:KEY only a server with that key is accepted; without, the
    /// key met first is remembered in known_servers and required from then on. Give it again
    /// for other servers of the same cluster: the first that answers is your home, and when it
    /// is lost you register with the next (keeping your name; relayed calls resume there). A
    /// DNS name given without a port is first looked up as _natcall._tcp.NAME SRV records
    /// (RFC 2782 order); otherwise, a name with several addresses is that many servers, tried
    /// in the resolver's order. Either way they share the name's key, or its CA certificate.
    #[arg(long, global = true, env = "NATCALL_SERVER", value_delimiter = ',')]
    server: Vec<String>,
    /// Your name on the server (default: the config file's, else $USER).
    #[arg(long, global = true, env = "NATCALL_NAME")]
    name: Option<String>,
    /// Directory with your identity and config.toml (default: $NATCALL_HOME, else ~/.config/natcall).
    #[arg(long, global = true, env = "NATCALL_HOME")]
    home: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line on stdout, the last one the report.
    #[arg(long, global = true)]
    json: bool,
    /// Do not ask the router to map natcall's UDP port (UPnP-IGD, NAT-PMP, PCP).
    #[arg(long, global = true)]
    no_portmap: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Register and wait for calls. On a terminal each call is announced (caller, and whether
    /// its key is a known contact) and taken with y or declined with n; otherwise --accept
    /// decides. A call that comes during a call is told "busy".
    #[command(after_help = "Examples:
  natcall listen                           wait for calls; answer each with y or n
  natcall listen --accept contacts         take calls only from keys met before
  natcall listen --once --duration 60      take one call, end it after a minute
  natcall listen --policy relay-only       never reveal your address to callers
  natcall listen --recv-video out.ts       write the video that arrives to out.ts")]
    Listen {
        /// Exit after the first call.
        #[arg(long)]
        once: bool,
        /// Which calls to take without asking: all, contacts (keys met before), or a list of
        /// names (NAME,NAME…); callers a rule does not allow are declined without asking.
        /// Default: ask on a terminal (not with --json), else all.
        #[arg(long, value_name = "all|contacts|NAMES")]
        accept: Option<session::Accept>,
        /// Which paths calls may use: auto, direct-only, relay-only, lan-only (combined with the
        /// caller's: the stricter wins; calls that cannot agree are declined).
        #[arg(long, default_value = "auto")]
        policy: Policy,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Call NAME: chat by typing lines, media from the built-in test source or --send-*.
    #[command(after_help = "Examples:
  natcall call bob                         call bob; type lines to chat, Ctrl-D or Ctrl-C hangs up
  natcall call bob --policy relay-only     go through the server only (your address stays hidden)
  natcall call bob --duration 30 --json    a 30 s call, JSON events and a report on stdout
  ffmpeg -re -i in.mp4 -c:v libx264 -f mpegts - | natcall call bob --send-video -
                                           send a live stream; the call ends after both sides'
                                           inputs ended")]
    Call {
        /// Who to call.
        #[arg(value_parser = parse_name)]
        peer: String,
        /// Which paths the call may use: auto, direct-only, relay-only, lan-only.
        #[arg(long, default_value = "auto")]
        policy: Policy,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Create or join ROOM, a group call: a session with every other member (chat to each, keys,
    /// and media in mesh), members listed as they come and go; media goes to each member on its
    /// session (mesh) or as one copy through the server (fan-out, sealed with your own key).
    /// Creates it with --create or --invite (you get a join code to hand out); otherwise joins
    /// it, invited or with --code.
    #[command(after_help = "Examples:
  natcall room team --invite bob,carol     create room team; bob and carol may join
  natcall room team                        join team (you were invited)
  natcall room team --code k3x9m2pq7wdn    join team with the code its creator gave you
  natcall room team --duration 60 --json   leave after a minute; JSON events and a report
  natcall room team --topology fan-out     send one copy of your media through the server")]
    Room {
        /// The room's name (like a peer's: a-z 0-9 . _ -).
        #[arg(value_parser = parse_name)]
        room: String,
        /// Create the room (implied by --invite).
        #[arg(long)]
        create: bool,
        /// Names that may join (comma-separated); creates the room.
        #[arg(long, value_name = "NAMES")]
        invite: Vec<String>,
        /// Join with this code (from the room's creator) instead of an invitation.
        #[arg(long, conflicts_with_all = ["create", "invite"])]
        code: Option<String>,
        /// How this member's media travels: to each member on its own session (mesh), one
        /// copy through the server (fan-out), or chosen by the room's size and the uplink.
        #[arg(long, value_enum, default_value_t = room::TopologyArg::Auto)]
        topology: room::TopologyArg,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Start a local rendezvous server and two peers on loopback, call, chat, report, exit.
    /// Takes no --server, --name or --home: it runs its own.
    #[command(after_help = "Examples:
  natcall demo                             the call, chat and both reports as text
  natcall demo --json                      the same as JSON lines")]
    Demo,
    /// The keys of the peers you met (trust on first use): a call where the server vouches for
    /// another key than the one met before is refused (exit code 9) until you accept it.
    #[command(after_help = "Examples:
  natcall contacts                         list names, keys, first and last seen
  natcall contacts accept bob SHA256:…     trust bob's new key (after comparing safety numbers)
  natcall contacts forget bob              the next call with bob is a first contact again")]
    Contacts {
        #[command(subcommand)]
        action: Option<contacts::ContactsCmd>,
    },
    /// Print the safety number of you and NAME; read it to each other in person or by phone:
    /// equal numbers mean each of you has the other's real key.
    #[command(after_help = "Examples:
  natcall verify bob                       the safety number of you and bob's key in your contacts
  natcall verify bob --key SHA256:…        the number for a changed key, before accepting it")]
    Verify {
        /// The peer's name.
        peer: String,
        /// Use this key for NAME instead of the one in your contacts (to check a changed key
        /// before accepting it).
        #[arg(long, value_name = "FINGERPRINT")]
        key: Option<natcall::Fingerprint>,
    },
    /// Trust KEY for a server from now on (after its key was replaced): HOST:PORT#SHA256:KEY.
    #[command(after_help = "Example:
  natcall trust-server 'rendezvous.example.net:3478#SHA256:…'")]
    TrustServer {
        /// The server and its new key, as the key-change error prints them.
        server: String,
    },
    /// What your NAT does, in RFC 4787 / RFC 5780 terms, measured against the server's STUN:
    /// UDP reachability and latency, public address, mapping and filtering behaviour, port
    /// allocation, hairpinning, and what that means for calls. Every RFC 5780 test runs
    /// against a server with an alternate address (natcall-rendezvous --alternate-ip, or any
    /// RFC 5780 STUN server); without one the second STUN port still shows whether the NAT
    /// maps and filters per port. Exit 0 when UDP works, 3 when the server does not answer.
    #[command(after_help = "Examples:
  natcall netcheck                         against the configured server
  natcall netcheck --server stun.example.net:3478 --json")]
    Netcheck {
        /// The server's second STUN port, when it is not the main port + 1 (used only when the
        /// server has no alternate address).
        #[arg(long)]
        second_port: Option<u16>,
    },
    /// Free your name on the server (anyone may register it afterwards), then exit.
    #[command(after_help = "Example:
  natcall --name alice release-name")]
    ReleaseName,
    /// Print a shell completion script for natcall.
    #[command(after_help = "Examples:
  natcall completions bash > ~/.local/share/bash-completion/completions/natcall
  natcall completions zsh > ~/.zfunc/_natcall     (with fpath+=(~/.zfunc) in ~/.zshrc)
  natcall completions fish > ~/.config/fish/completions/natcall.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print natcall's man page (roff).
    #[command(after_help = "Example:
  natcall man > ~/.local/share/man/man1/natcall.1 && man natcall")]
    Man,
}

/// A peer's or room's name as an argument: checked here, so a bad one is a usage error.
fn parse_name(s: &str) -> Result<String, String> {
    natcall::validate_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// Seconds as an argument: a finite number, not negative.
fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds (e.g. 30 or 2.5)")),
    }
}

/// How a call runs, for `listen` and `call` alike.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// End a call after this many seconds.
    #[arg(long, value_parser = parse_secs)]
    duration: Option<f64>,
    #[command(flatten)]
    test: TestHooks,
    #[command(flatten)]
    media: MediaOpts,
}

impl SessionArgs {
    /// Checks the media flags and makes the session's options.
    fn into_opts(self, json: bool) -> anyhow::Result<session::Opts> {
        self.media.check(json)?;
        view::init(json, output::MEDIA_ON_STDOUT.load(std::sync::atomic::Ordering::Relaxed));
        Ok(session::Opts {
            json,
            duration: secs(self.duration),
            test: self.test,
            media: self.media,
        })
    }
}

/// What media a call sends and where received media goes.
#[derive(Debug, Clone, clap::Args)]
pub struct MediaOpts {
    /// Send no test media (by default a built-in test source sends audio: 20 ms frames at about
    /// 32 kbit/s, and video: 30 frames/s with a key frame every 2 s).
    #[arg(long)]
    pub no_media: bool,
    /// Bitrate of the test video, in kbit/s.
    #[arg(long, default_value_t = 1000)]
    pub video_kbps: u32,
    /// Send this byte stream as the audio track (a file, or - for stdin), instead of the test
    /// source; the call ends once every --send-* input has ended and been delivered.
    #[arg(long, value_name = "PATH|-")]
    pub send_audio: Option<String>,
    /// Send this byte stream (e.g. MPEG-TS from ffmpeg) as the video track; see --send-audio.
    #[arg(long, value_name = "PATH|-")]
    pub send_video: Option<String>,
    /// Write the audio track that arrives to this file (emptied first), or - for stdout.
    #[arg(long, value_name = "PATH|-")]
    pub recv_audio: Option<String>,
    /// Write the video track that arrives to this file (emptied first), or - for stdout.
    #[arg(long, value_name = "PATH|-")]
    pub recv_video: Option<String>,
    /// Ceiling of the media sending rate, in kbit/s (congestion feedback keeps it lower when the
    /// path carries less).
    #[arg(long, default_value_t = 2000)]
    pub media_kbps: u64,
}

impl MediaOpts {
    /// Checks the combination, and empties the --recv-* files (so an unwritable path fails
    /// before anything is called).
    fn check(&self, json: bool) -> anyhow::Result<()> {
        use anyhow::Context;
        use output::usage;
        let stdin = |o: &Option<String>| o.as_deref() == Some("-");
        if stdin(&self.send_audio) && stdin(&self.send_video) {
            return Err(usage("only one of --send-audio and --send-video can read stdin"));
        }
        if stdin(&self.recv_audio) && stdin(&self.recv_video) {
            return Err(usage("only one of --recv-audio and --recv-video can write to stdout"));
        }
        if stdin(&self.recv_audio) || stdin(&self.recv_video) {
            if json {
                return Err(usage(
                    "--json prints its events on stdout: write received media to a file, not -",
                ));
            }
            output::MEDIA_ON_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if self.media_kbps == 0 {
            return Err(usage("--media-kbps must be at least 1"));
        }
        for path in [&self.send_audio, &self.send_video].into_iter().flatten() {
            if path != "-" {
                std::fs::File::open(path).with_context(|| format!("cannot read {path}"))?;
            }
        }
        for path in [&self.recv_audio, &self.recv_video].into_iter().flatten() {
            if path != "-" {
                std::fs::File::create(path).with_context(|| format!("cannot write {path}"))?;
            }
        }
        Ok(())
    }

    /// Whether a --send-* input replaces the test source.
    pub fn has_inputs(&self) -> bool {
        self.send_audio.is_some() || self.send_video.is_some()
    }

    /// Whether stdin carries media (so not chat).
    pub fn reads_stdin(&self) -> bool {
        [&self.send_audio, &self.send_video]
            .iter()
            .any(|o| o.as_deref() == Some("-"))
    }
}

/// Hooks for end-to-end tests.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct TestHooks {
    /// Test hook: after this many seconds of a call, drop all UDP to and from the peer.
    #[arg(long, hide = true)]
    pub test_kill_udp_after: Option<f64>,
}

fn secs(s: Option<f64>) -> Option<Duration> {
    s.filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64)
}

/// `natcall release-name`: registers, releases, says so in one line.
async fn release_name(settings: config::Settings, json: bool) -> anyhow::Result<Exit> {
    let mut config = natcall::EndpointConfig::new(settings.server, &settings.name, settings.identity);
    config.server_trust = settings.trust.clone();
    config.fallback_servers = settings.fallbacks.clone();
    natcall::Endpoint::release_name(&config).await?;
    let (name, server) = (&settings.name, settings.server);
    if json {
        output::line(&serde_json::json!({"event": "name_released", "name": name, "server": server.to_string()}));
    } else {
        println!("released the name {name} on {server}: anyone may register it now");
    }
    Ok(Exit::Ok)
}

fn init_logging(json: bool) {
    // Logs go to stderr (above the status line in the terminal view); quiet by default so chat,
    // notices and the status line stay readable: errors only in the terminal view, whose
    // notices say what a warning would; warnings otherwise. RUST_LOG=natcall=debug shows the
    // traversal and path decisions.
    let viewed = !json && std::io::stdout().is_terminal();
    let default = if viewed { "error" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(view::LogWriter::default)
        .with_ansi(!viewed && std::io::stderr().is_terminal())
        .init();
}

/// The settings for a command that registers, with `--no-portmap` applied.
async fn resolve(
    server: Vec<String>,
    name: Option<String>,
    home: Option<PathBuf>,
    no_portmap: bool,
) -> anyhow::Result<config::Settings> {
    let mut settings = config::Settings::resolve(server, name, home).await?;
    settings.portmap = !no_portmap;
    Ok(settings)
}

/// `natcall netcheck`: the report as text or one JSON object; exit 3 when UDP gets no answer.
async fn netcheck(server: std::net::SocketAddr, second_port: Option<u16>, json: bool) -> anyhow::Result<Exit> {
    let report = natcall::netcheck::run(server, second_port)
        .await
        .map_err(|e| anyhow::anyhow!("netcheck against {server}: {e}"))?;
    if json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("event".into(), serde_json::json!("netcheck"));
        }
        output::line(&v);
    } else {
        print!("{}", natcall::netcheck::text(&report));
    }
    Ok(if report.udp { Exit::Ok } else { Exit::Server })
}

/// `natcall --version`: the binary, its version and the protocol it speaks.
fn version() -> &'static str {
    let text = format!("{} (protocol {})", env!("CARGO_PKG_VERSION"), natcall::PROTOCOL_VERSION);
    Box::leak(text.into_boxed_str())
}

fn main() -> ExitCode {
    let matches = Args::command().version(version()).get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    init_logging(args.json);
    if let Cmd::Demo = args.cmd {
        // The demo runs its own server and peers: flags naming others would be ignored.
        let given: Vec<String> = ["server", "name", "home"]
            .into_iter()
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(|id| format!("--{id}"))
            .collect();
        if !given.is_empty() {
            let e = output::usage(format!(
                "demo runs its own server and peers on loopback: it takes no {} (use `natcall listen` and `natcall call` for yours)",
                given.join(", ")
            ));
            return output::fail(args.json, Exit::Usage, &e);
        }
    }
    match args.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "natcall", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Man => {
            let page = clap_mangen::Man::new(Args::command().version(version()));
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => output::fail(false, Exit::Internal, &anyhow::anyhow!("writing the man page: {e}")),
            };
        }
        _ => {}
    }
    // Birthday traversal behind a symmetric NAT opens a few hundred sockets per call: take the
    // open-file limit the system allows (best effort: fewer sockets still work).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(error = %e, "cannot raise the open-file limit");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return output::fail(
                args.json,
                Exit::Internal,
                &anyhow::anyhow!("cannot start the runtime: {e}"),
            );
        }
    };
    let json = args.json;
    // The session runs as a task on the runtime's workers, not on this thread: media frames
    // then pass between tasks on the same workers instead of waking this thread per frame.
    // SIGTERM and SIGHUP do what Ctrl-C does (a call hangs up and the peer is told, the
    // terminal is given back), instead of killing the process mid-call.
    rt.spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            view::interrupt();
        }
    });
    let session = rt.spawn(async move {
        match args.cmd {
            Cmd::Demo => demo::run(json).await,
            Cmd::Completions { .. } | Cmd::Man => Ok(Exit::Ok),
            Cmd::Contacts {
                action: None | Some(contacts::ContactsCmd::List),
            } => contacts::list(args.home, json),
            Cmd::Contacts { action: Some(action) } => {
                let settings = resolve(args.server, args.name, args.home, args.no_portmap).await?;
                contacts::change(&settings, action, json)
            }
            Cmd::Verify { peer, key } => {
                let settings = resolve(args.server, args.name, args.home, args.no_portmap).await?;
                contacts::verify(&settings, &peer, key, json)
            }
            Cmd::TrustServer { server } => {
                let done = config::trust_server(args.home, &server)?;
                output::notice(json, serde_json::json!({"event": "trusted", "text": done}), &done);
                Ok(Exit::Ok)
            }
            Cmd::Netcheck { second_port } => {
                let server = config::server_addr(args.server, args.home).await?;
                netcheck(server, second_port, json).await
            }
            Cmd::ReleaseName => {
                let settings = resolve(args.server, args.name, args.home, args.no_portmap).await?;
                release_name(settings, json).await
            }
            Cmd::Listen {
                once,
                accept,
                policy,
                session: how,
            } => {
                let opts = how.into_opts(json)?;
                let settings = resolve(args.server, args.name, args.home, args.no_portmap).await?;
                session::listen(settings, opts, once, accept, policy).await
            }
            Cmd::Room {
                room,
                create,
                invite,
                code,
                topology,
                session: how,
            } => {
                let invite = room::parse_invite(&invite)?;
                let entry = if create || !invite.is_empty() {
                    room::Entry::Create { invite }
                } else {
                    room::Entry::Join { code }
                };
                let opts = how.into_opts(json)?;
                let settings = resolve(args.server, args.name, args.home, args.no_portmap).await?;
                room::run(settings, opts, &room, entry, topology).await
            }
            Cmd::Call {
                peer,
                policy,
                session: how,
            } => {
                let opts = how.into_opts(json)?;
                let settings = resolve(args.server, args.name, args.home, args.no_portmap).await?;
                session::call(settings, opts, &peer, policy).await
            }
        }
    });
    let result = rt
        .block_on(session)
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the session stopped: {e}")));
    // Do not wait for the thread blocked reading stdin: the session is over.
    rt.shutdown_background();
    view::finish();
    match result {
        Ok(code) => code.into(),
        Err(e) => {
            let exit = output::classify(&e);
            output::fail(json, exit, &e)
        }
    }
}
