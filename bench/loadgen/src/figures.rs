//! One function per figure. Each runs against one target for a bounded time
//! and returns its [`Record`]s; none asserts anything about speed.
//!
//! CPU figures come from `/proc`: the proxy's CPU time over the measured
//! window (after a warm-up), and the "client core" (this process plus the
//! backend) so a reader can tell when the load generator was the bottleneck.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use crate::client::{self, Lines, Mode, Protocol};
use crate::procstat;
use crate::record::{Labels, Record};

/// What every figure needs besides its own parameters.
#[derive(Clone)]
pub struct Context {
    pub connector: TlsConnector,
    pub labels: Labels,
    /// The proxy under test (CPU time, RSS). `None` for direct runs.
    pub proxy_pid: Option<u32>,
    /// The backend, which shares the load generator's core.
    pub backend_pid: Option<u32>,
    /// More processes whose CPU time counts as the proxy's: the other
    /// replicas of a fleet (figure 7).
    pub replica_pids: Vec<u32>,
}

/// Warm-up, then the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// CPU counters at one instant.
struct Snapshot {
    at: Instant,
    proxy: Option<Duration>,
    client: Duration,
}

impl Context {
    fn snapshot(&self) -> Snapshot {
        let backend: Vec<u32> = self.backend_pid.into_iter().collect();
        Snapshot {
            at: Instant::now(),
            proxy: self
                .proxy_pid
                .and_then(|pid| procstat::cpu_time(pid).ok())
                .map(|own| own + procstat::cpu_time_of(&self.replica_pids)),
            client: procstat::own_cpu_time() + procstat::cpu_time_of(&backend),
        }
    }

    fn record(&self, figure: &str, variant: &str, metric: &str, value: f64) -> Record {
        Record::new(&self.labels, figure, variant, metric, value)
    }

    /// The proxy's CPU records of a sessions run (µs per session, CPU %),
    /// added to `records`, and the same as text for the progress line.
    fn proxy_cpu_per_session(
        &self,
        figure: &str,
        variant: &str,
        (seconds, pct): (Option<f64>, Option<f64>),
        sessions: u64,
        records: &mut Vec<Record>,
    ) -> String {
        let (Some(seconds), Some(pct)) = (seconds, pct) else {
            return "n/a".into();
        };
        let per_session = (sessions > 0).then(|| seconds * 1e6 / sessions as f64);
        if let Some(per_session) = per_session {
            records.push(self.record(figure, variant, "cpu_us_per_session", per_session));
        }
        records.push(self.record(figure, variant, "proxy_cpu_pct", pct));
        per_session.map_or("n/a".into(), |per_session| {
            format!("{per_session:.0} µs/session ({pct:.0}%)")
        })
    }
}

/// CPU used between two snapshots: (proxy seconds, proxy %, client core %).
fn cpu_between(start: &Snapshot, end: &Snapshot) -> (Option<f64>, Option<f64>, f64) {
    let wall = end.at.duration_since(start.at).as_secs_f64();
    let proxy = match (start.proxy, end.proxy) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
        _ => None,
    };
    let client = end.client.saturating_sub(start.client).as_secs_f64();
    (
        proxy,
        proxy.map(|seconds| 100.0 * seconds / wall),
        100.0 * client / wall,
    )
}

/// Keeps the first few error messages for the log.
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Errors {
    fn add(&self, error: &anyhow::Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().expect("errors lock");
        if first.len() < 5 {
            first.push(format!("{error:#}"));
        }
    }

    fn report(&self, what: &str) {
        let count = self.count.load(Ordering::Relaxed);
        if count > 0 {
            eprintln!("  {what}: {count} errors, first:");
            for message in self.first.lock().expect("errors lock").iter() {
                eprintln!("    {message}");
            }
        }
    }
}

/// Figures 1 and 2: full-handshake sessions per second and the proxy's CPU
/// time per session. `concurrency` sessions run at once, each: connect, TLS
/// (implicit or STARTTLS), greeting, the capability command, close.
pub async fn sessions(
    context: &Context,
    target: SocketAddr,
    mode: Mode,
    protocol: Protocol,
    concurrency: usize,
    window: Window,
    session_timeout: Duration,
) -> Result<Vec<Record>> {
    if mode == Mode::Plain {
        bail!("the session figures need TLS");
    }
    let completed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (completed, errors, stop) = (completed.clone(), errors.clone(), stop.clone());
        let connector = context.connector.clone();
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let session = client::one_session(&connector, target, mode, protocol);
                match tokio::time::timeout(session_timeout, session).await {
                    Ok(Ok(())) => {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(error)) => {
                        errors.add(&error);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => errors.add(&anyhow::anyhow!("session timed out")),
                }
            }
        });
    }
    tokio::time::sleep(window.warmup).await;
    let (start, done_before, errors_before) = (
        context.snapshot(),
        completed.load(Ordering::Relaxed),
        errors.count.load(Ordering::Relaxed),
    );
    tokio::time::sleep(window.measure).await;
    let (end, done_after, errors_after) = (
        context.snapshot(),
        completed.load(Ordering::Relaxed),
        errors.count.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    drain(workers, session_timeout + Duration::from_secs(1)).await;

    let wall = end.at.duration_since(start.at).as_secs_f64();
    let done = done_after - done_before;
    let (proxy_seconds, proxy_pct, client_pct) = cpu_between(&start, &end);
    let figure = match mode {
        Mode::Implicit => "implicit",
        _ => "starttls",
    };
    let variant = protocol.name();
    let rate = done as f64 / wall;
    let mut records = vec![
        context.record(figure, variant, "sessions_per_s", rate),
        context.record(figure, variant, "client_cpu_pct", client_pct),
        context.record(
            figure,
            variant,
            "errors",
            (errors_after - errors_before) as f64,
        ),
    ];
    let proxy_cpu = context.proxy_cpu_per_session(
        figure,
        variant,
        (proxy_seconds, proxy_pct),
        done,
        &mut records,
    );
    eprintln!(
        "  {figure} {variant} via {}: {rate:.0} sessions/s, proxy CPU {}, client core {client_pct:.0}%",
        context.labels.proxy,
        proxy_cpu
    );
    errors.report("sessions");
    Ok(records)
}

/// Which handshakes the resumption figure makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Handshakes {
    /// Every connection offers a session ticket from the slot's previous
    /// connection.
    Resumed,
    /// Every connection makes a full handshake (no ticket offered): the
    /// same session shape, for comparison.
    Full,
}

impl Handshakes {
    pub fn name(self) -> &'static str {
        match self {
            Handshakes::Resumed => "resumed",
            Handshakes::Full => "full",
        }
    }
}

/// Below this share of resumed handshakes a resumed run does not measure
/// resumption: the report calls it invalid.
pub const MIN_RESUMED_PCT: f64 = 99.0;

/// What a resumption run is labelled with and how it is judged.
#[derive(Debug, Clone)]
pub struct ResumptionRun {
    pub handshakes: Handshakes,
    pub protocol: Protocol,
    pub concurrency: usize,
    /// The certificate every full handshake must present (as
    /// [`client::connector`]).
    pub expect_cert: Option<std::path::PathBuf>,
    /// Figure and variant of the records (`resumption` and the handshake
    /// kind unless a caller such as the fleet figure names its own).
    pub figure: String,
    pub variant: String,
    /// A resumed run below this share of resumed handshakes says it is
    /// invalid (the records are kept; the report marks them).
    pub min_resumed_pct: f64,
    /// Sessions per second the ticket pools are sized for when the server
    /// issues no new ticket on a resumed session (see [`resumption`]).
    pub pool_rate: f64,
}

/// Sessions per second a slot's ticket pool is sized for by default: above
/// what any proxy here resumes on one core.
pub const POOL_RATE: f64 = 6000.0;

/// How long filling the ticket pools may take.
const POOL_LIMIT: Duration = Duration::from_secs(90);

/// Figure 6 (and 7): short implicit-TLS sessions, each connect, handshake,
/// the greeting, close (close_notify, FIN, wait for the server's close),
/// `concurrency` at once. With [`Handshakes::Resumed`] every slot first
/// makes one full handshake and reads the greeting (so the TLS 1.3
/// NewSessionTicket messages, sent before it, have arrived), then every
/// connection of that slot offers the newest ticket the slot holds, once;
/// each handshake is counted as resumed or full (rustls' `handshake_kind`).
///
/// A server that sends new tickets on a resumed session keeps every slot
/// supplied. One that sends none (HAProxy with `tls-ticket-keys`) would see
/// every third connection of a client that uses a ticket once make a full
/// handshake; for it each slot first collects, from full handshakes made
/// before anything is measured, enough tickets for `pool_rate` sessions per
/// second over the whole run. Either way every measured connection offers
/// a ticket the server issued.
///
/// Records sessions/s, proxy CPU µs per session, the resumed share and the
/// tickets the server sent per session.
pub async fn resumption(
    context: &Context,
    target: SocketAddr,
    run: &ResumptionRun,
    window: Window,
    session_timeout: Duration,
) -> Result<Vec<Record>> {
    let completed = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let stop = Arc::new(AtomicBool::new(false));
    let protocol = run.protocol;
    let concurrency = run.concurrency.max(1);
    let run_seconds = (window.warmup + window.measure).as_secs_f64() + 2.0;
    let pool_size = (run.pool_rate * run_seconds / concurrency as f64).ceil() as usize + 4;
    let mut pools = Vec::with_capacity(concurrency);
    let mut connectors = Vec::with_capacity(concurrency);
    let mut fillers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let pool = client::TicketPool::new(pool_size + 64);
        let expected = run.expect_cert.as_deref();
        match run.handshakes {
            Handshakes::Resumed => {
                let (resuming, filling) = client::resuming_connectors(expected, pool.clone())?;
                connectors.push(resuming);
                fillers.push(filling);
            }
            Handshakes::Full => connectors.push(context.connector.clone()),
        }
        pools.push(pool);
    }
    if run.handshakes == Handshakes::Resumed {
        // Every slot holds a ticket before anything is measured.
        let fill = |size| {
            fill_pools(
                &fillers,
                &pools,
                size,
                target,
                protocol,
                session_timeout,
                &errors,
            )
        };
        fill(1).await?;
        // Does the server send a new ticket on a resumed session?
        let before = pools[0].received();
        let probe = short_session(&connectors[0], target, protocol);
        let probed = tokio::time::timeout(session_timeout, probe).await;
        let renews = pools[0].received() > before;
        match probed {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => eprintln!("  the first resumption attempt made a full handshake"),
            Ok(Err(error)) => errors.add(&error.context("first resumption")),
            Err(_) => errors.add(&anyhow::anyhow!("first resumption timed out")),
        }
        if !renews {
            eprintln!(
                "  {} sends no new ticket on a resumed session: {pool_size} tickets per slot first, from full handshakes",
                context.labels.proxy
            );
            fill(pool_size).await?;
        }
        fill(1).await?;
    }
    let received = |pools: &[Arc<client::TicketPool>]| -> u64 {
        pools.iter().map(|pool| pool.received()).sum()
    };
    let mut workers = JoinSet::new();
    for connector in connectors {
        let (completed, resumed, errors, stop) = (
            completed.clone(),
            resumed.clone(),
            errors.clone(),
            stop.clone(),
        );
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let session = short_session(&connector, target, protocol);
                match tokio::time::timeout(session_timeout, session).await {
                    Ok(Ok(was_resumed)) => {
                        // Resumed first: a reader never sees more resumed
                        // sessions than completed ones.
                        if was_resumed {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(error)) => {
                        errors.add(&error);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => errors.add(&anyhow::anyhow!("session timed out")),
                }
            }
        });
    }
    tokio::time::sleep(window.warmup).await;
    let (start, done_before, resumed_before, errors_before, tickets_before) = (
        context.snapshot(),
        completed.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
        errors.count.load(Ordering::Relaxed),
        received(&pools),
    );
    tokio::time::sleep(window.measure).await;
    let (end, done_after, resumed_after, errors_after, tickets_after) = (
        context.snapshot(),
        completed.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
        errors.count.load(Ordering::Relaxed),
        received(&pools),
    );
    stop.store(true, Ordering::Relaxed);
    drain(workers, session_timeout + Duration::from_secs(1)).await;

    let wall = end.at.duration_since(start.at).as_secs_f64();
    let done = done_after - done_before;
    let resumed_pct = if done > 0 {
        100.0 * (resumed_after - resumed_before) as f64 / done as f64
    } else {
        0.0
    };
    let (proxy_seconds, proxy_pct, client_pct) = cpu_between(&start, &end);
    let (figure, variant) = (run.figure.as_str(), run.variant.as_str());
    let rate = done as f64 / wall;
    let mut records = vec![
        context.record(figure, variant, "sessions_per_s", rate),
        context.record(figure, variant, "resumed_pct", resumed_pct),
        context.record(figure, variant, "client_cpu_pct", client_pct),
        context.record(
            figure,
            variant,
            "errors",
            (errors_after - errors_before) as f64,
        ),
    ];
    if run.handshakes == Handshakes::Resumed && done > 0 {
        records.push(context.record(
            figure,
            variant,
            "tickets_per_session",
            (tickets_after - tickets_before) as f64 / done as f64,
        ));
    }
    let proxy_cpu = context.proxy_cpu_per_session(
        figure,
        variant,
        (proxy_seconds, proxy_pct),
        done,
        &mut records,
    );
    eprintln!(
        "  {figure} {variant} via {}: {rate:.0} sessions/s, {resumed_pct:.1}% resumed, proxy CPU {}, client core {client_pct:.0}%",
        context.labels.proxy,
        proxy_cpu
    );
    if run.handshakes == Handshakes::Resumed && resumed_pct < run.min_resumed_pct {
        eprintln!(
            "  INVALID: only {resumed_pct:.1}% of the handshakes resumed (at least {:.0}% needed): this run does not measure resumption",
            run.min_resumed_pct
        );
    }
    errors.report("resumption");
    Ok(records)
}

/// Full handshakes on every slot until its pool holds `size` tickets (or
/// [`POOL_LIMIT`] has passed: the run then shows fewer resumed handshakes).
async fn fill_pools(
    connectors: &[TlsConnector],
    pools: &[Arc<client::TicketPool>],
    size: usize,
    target: SocketAddr,
    protocol: Protocol,
    session_timeout: Duration,
    errors: &Errors,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + POOL_LIMIT;
    let mut filling = JoinSet::new();
    for (connector, pool) in connectors.iter().cloned().zip(pools.iter().cloned()) {
        filling.spawn(async move {
            while pool.len() < size && tokio::time::Instant::now() < deadline {
                let session = short_session(&connector, target, protocol);
                match tokio::time::timeout(session_timeout, session).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Some(error.context("collecting tickets")),
                    Err(_) => return Some(anyhow::anyhow!("collecting tickets: timed out")),
                }
            }
            None
        });
    }
    while let Some(failure) = filling.join_next().await {
        if let Some(error) = failure? {
            errors.add(&error);
        }
    }
    Ok(())
}

/// One session of the resumption figure: connect, implicit TLS handshake
/// (offering a ticket if the connector holds one), the greeting, close.
/// Whether the handshake resumed.
async fn short_session(
    connector: &TlsConnector,
    target: SocketAddr,
    protocol: Protocol,
) -> Result<bool> {
    let tcp = client::connect(target).await?;
    let tls = client::tls_handshake(connector, tcp).await?;
    let resumed = client::resumed(&tls);
    let mut lines = Lines::new(tls);
    client::greeting(&mut lines, protocol).await?;
    client::close_tls(lines.stream).await;
    Ok(resumed)
}

/// Waits for workers to finish, aborting what is still running at `limit`.
async fn drain(mut workers: JoinSet<()>, limit: Duration) {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = workers.join_next() => if next.is_none() { return },
            _ = &mut deadline => {
                workers.abort_all();
                while workers.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// Figure 3: the round trip of `NOOP` on an established IMAP session (after
/// LOGIN, so every proxy is copying without parsing). `Mode::Plain` talks to
/// the backend directly: the baseline the others are compared with.
pub async fn latency(
    context: &Context,
    target: SocketAddr,
    mode: Mode,
    samples: usize,
    limit: Duration,
) -> Result<Vec<Record>> {
    let (timings, start, end) = match mode {
        Mode::Plain => {
            let mut lines = Lines::new(client::connect(target).await?);
            lines.imap_greeting().await?;
            noop_round_trips(context, &mut lines, samples, limit).await?
        }
        Mode::Implicit => {
            let mut lines =
                client::open_tls(&context.connector, target, Mode::Implicit, Protocol::Imap)
                    .await?;
            let measured = noop_round_trips(context, &mut lines, samples, limit).await?;
            client::close_tls(lines.stream).await;
            measured
        }
        Mode::Starttls => bail!("the latency figure uses implicit TLS or plain"),
    };
    let (proxy_seconds, _, _) = cpu_between(&start, &end);
    let percentile = |p: f64| -> f64 {
        let index = ((timings.len() as f64 * p) as usize).min(timings.len() - 1);
        timings[index] as f64 / 1000.0
    };
    let mean = timings.iter().sum::<u64>() as f64 / timings.len() as f64 / 1000.0;
    eprintln!(
        "  NOOP round trip via {}: p50 {:.1} µs, p99 {:.1} µs, mean {mean:.1} µs ({} samples)",
        context.labels.proxy,
        percentile(0.50),
        percentile(0.99),
        timings.len()
    );
    let mut records = vec![
        context.record("latency", "noop", "p50_us", percentile(0.50)),
        context.record("latency", "noop", "p99_us", percentile(0.99)),
        context.record("latency", "noop", "mean_us", mean),
        context.record("latency", "noop", "samples", timings.len() as f64),
    ];
    if let Some(seconds) = proxy_seconds {
        // The proxy's own work per round trip (both directions), apart from
        // the waiting: what its code costs, free of wake-up latency.
        records.push(context.record(
            "latency",
            "noop",
            "cpu_us_per_round_trip",
            seconds * 1e6 / timings.len() as f64,
        ));
    }
    Ok(records)
}

/// LOGIN, a warm-up, then `samples` NOOPs (or until `limit`); sorted
/// round-trip times in nanoseconds, and CPU snapshots around them.
async fn noop_round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    context: &Context,
    lines: &mut Lines<S>,
    samples: usize,
    limit: Duration,
) -> Result<(Vec<u64>, Snapshot, Snapshot)> {
    lines.send(b"l LOGIN bench bench\r\n").await?;
    lines.imap_tagged("l").await?;
    for _ in 0..(samples / 10).clamp(10, 1000) {
        lines.send(b"a NOOP\r\n").await?;
        lines.imap_tagged("a").await?;
    }
    let deadline = Instant::now() + limit;
    let mut timings = Vec::with_capacity(samples);
    let start = context.snapshot();
    while timings.len() < samples && Instant::now() < deadline {
        let started = Instant::now();
        lines.send(b"a NOOP\r\n").await?;
        lines.imap_tagged("a").await?;
        timings.push(started.elapsed().as_nanos() as u64);
    }
    let end = context.snapshot();
    if timings.is_empty() {
        bail!("no NOOP completed");
    }
    timings.sort_unstable();
    Ok((timings, start, end))
}

/// What a bulk connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bulk {
    /// Data sent and echoed back at once: the figure is bytes each way.
    Echo,
    /// SMTP DATA to the sink, one way.
    Data,
}

/// Bytes in one SMTP message of the DATA figure.
pub const MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// A block of 78-byte text lines (no line starts with a dot).
fn data_block() -> Vec<u8> {
    let mut line = vec![b'x'; 76];
    line.extend_from_slice(b"\r\n");
    line.repeat(840)
}

/// Figure 4: bulk throughput on `connections` connections (MB/s, 10^6 bytes),
/// with the proxy's CPU %.
pub async fn bulk(
    context: &Context,
    target: SocketAddr,
    mode: Mode,
    kind: Bulk,
    connections: usize,
    window: Window,
) -> Result<Vec<Record>> {
    if mode == Mode::Starttls {
        bail!("the bulk figure uses implicit TLS or plain");
    }
    let moved = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Errors::default());
    // Every connection is set up before any starts sending, so a busy
    // connection never delays another's handshake.
    let ready = Arc::new(Barrier::new(connections + 1));
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let shared = Shared {
            moved: moved.clone(),
            stop: stop.clone(),
            errors: errors.clone(),
            ready: ready.clone(),
        };
        let connector = context.connector.clone();
        tasks.spawn(async move {
            let connect = async {
                let tcp = client::connect(target).await?;
                anyhow::Ok(match mode {
                    Mode::Implicit => {
                        Either::Tls(Box::new(client::tls_handshake(&connector, tcp).await?))
                    }
                    _ => Either::Plain(tcp),
                })
            };
            match connect.await {
                Ok(Either::Tls(stream)) => bulk_connection(*stream, kind, shared).await,
                Ok(Either::Plain(stream)) => bulk_connection(stream, kind, shared).await,
                Err(error) => shared.errors.add(&error),
            }
        });
    }
    if tokio::time::timeout(SETUP_LIMIT, ready.wait())
        .await
        .is_err()
    {
        tasks.abort_all();
        errors.report("bulk");
        bail!("the {connections} bulk connections were not set up within {SETUP_LIMIT:?}");
    }
    tokio::time::sleep(window.warmup).await;
    let (start, before) = (context.snapshot(), moved.load(Ordering::Relaxed));
    tokio::time::sleep(window.measure).await;
    let (end, after) = (context.snapshot(), moved.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    // Readers would wait for data forever: end every connection now.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let wall = end.at.duration_since(start.at).as_secs_f64();
    let rate = (after - before) as f64 / wall / 1e6;
    let (_, proxy_pct, client_pct) = cpu_between(&start, &end);
    let variant = format!(
        "{}-{connections}",
        match kind {
            Bulk::Echo => "echo",
            Bulk::Data => "data",
        }
    );
    eprintln!(
        "  bulk {variant} via {}: {rate:.0} MB/s, proxy CPU {}, client core {client_pct:.0}%",
        context.labels.proxy,
        proxy_pct.map_or("n/a".into(), |p| format!("{p:.0}%"))
    );
    errors.report("bulk");
    let mut records = vec![
        context.record("bulk", &variant, "mb_per_s", rate),
        context.record("bulk", &variant, "client_cpu_pct", client_pct),
        context.record(
            "bulk",
            &variant,
            "errors",
            errors.count.load(Ordering::Relaxed) as f64,
        ),
    ];
    if let Some(pct) = proxy_pct {
        records.push(context.record("bulk", &variant, "proxy_cpu_pct", pct));
    }
    Ok(records)
}

/// How long setting up the bulk connections may take.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

enum Either<T> {
    Tls(Box<T>),
    Plain(tokio::net::TcpStream),
}

/// What the connections of one bulk run share.
struct Shared {
    moved: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    errors: Arc<Errors>,
    /// Passed once set up; all start sending together.
    ready: Arc<Barrier>,
}

async fn bulk_connection<S>(stream: S, kind: Bulk, shared: Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let result = match kind {
        Bulk::Echo => echo_connection(stream, &shared).await,
        Bulk::Data => data_connection(stream, &shared).await,
    };
    if let Err(error) = result {
        if !shared.stop.load(Ordering::Relaxed) {
            shared.errors.add(&error);
        }
    }
}

async fn echo_connection<S>(stream: S, shared: &Shared) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (moved, stop) = (&*shared.moved, &*shared.stop);
    let mut lines = Lines::new(stream);
    lines.imap_greeting().await?;
    // An unknown command ends every proxy's inspection; the echo returns it.
    lines.send(b"a ECHO\r\n").await?;
    let echoed = lines.line().await?.to_vec();
    if echoed != b"a ECHO\r\n" || !lines.buffered().is_empty() {
        bail!("echo: unexpected {:?}", String::from_utf8_lossy(&echoed));
    }
    shared.ready.wait().await;
    let (mut reader, mut writer) = tokio::io::split(lines.into_stream()?);
    let block = data_block();
    let write = async {
        while !stop.load(Ordering::Relaxed) {
            writer.write_all(&block).await?;
        }
        anyhow::Ok(())
    };
    let read = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = reader.read(&mut buffer).await?;
            if read == 0 {
                bail!("echo: closed by the server");
            }
            moved.fetch_add(read as u64, Ordering::Relaxed);
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    tokio::try_join!(write, read).map(|_| ())
}

async fn data_connection<S>(stream: S, shared: &Shared) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (moved, stop) = (&*shared.moved, &*shared.stop);
    let mut lines = Lines::new(stream);
    lines.smtp_reply("220").await?;
    lines.send(b"EHLO bench.client\r\n").await?;
    lines.smtp_reply("250").await?;
    shared.ready.wait().await;
    let block = data_block();
    let blocks = MESSAGE_BYTES / block.len();
    while !stop.load(Ordering::Relaxed) {
        lines
            .send(b"MAIL FROM:<bench@client.test>\r\nRCPT TO:<sink@backend.test>\r\nDATA\r\n")
            .await?;
        lines.smtp_reply("250").await?;
        lines.smtp_reply("250").await?;
        lines.smtp_reply("354").await?;
        for _ in 0..blocks {
            lines.stream.write_all(&block).await?;
            moved.fetch_add(block.len() as u64, Ordering::Relaxed);
        }
        lines.send(b".\r\n").await?;
        lines.smtp_reply("250").await?;
    }
    Ok(())
}

/// Which point of the dialogue an idle session waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdleState {
    /// After the greeting (our proxy is still inspecting lines).
    Greeting,
    /// After LOGIN (every proxy copies without parsing), like a logged-in
    /// IMAP client waiting in IDLE.
    Login,
}

/// Figure 5: the proxy's RSS with 0 and then each of `counts` idle implicit
/// TLS IMAP sessions open; KiB per session from the first to the last point.
pub async fn idle(
    context: &Context,
    target: SocketAddr,
    counts: &[usize],
    state: IdleState,
    open_concurrency: usize,
    settle: Duration,
    limit: Duration,
) -> Result<Vec<Record>> {
    let pid = context
        .proxy_pid
        .context("the memory figure needs the proxy's pid")?;
    let variant = match state {
        IdleState::Greeting => "idle-greeting",
        IdleState::Login => "idle-login",
    };
    let deadline = Instant::now() + limit;
    let mut held: Vec<client::TlsLines> = Vec::new();
    let mut points = vec![(0usize, procstat::rss_kib(pid)?)];
    let errors = Errors::default();
    'counts: for &count in counts {
        while held.len() < count {
            if Instant::now() > deadline {
                errors.add(&anyhow::anyhow!(
                    "only {} sessions open after {limit:?}",
                    held.len()
                ));
            }
            if errors.count.load(Ordering::Relaxed) > 0 {
                // The most this proxy held: measure that, and stop.
                errors.report("idle sessions");
                tokio::time::sleep(settle).await;
                let rss = procstat::rss_kib(pid)?;
                eprintln!(
                    "  opening idle sessions failed: {} held via {}, RSS {rss} KiB",
                    held.len(),
                    context.labels.proxy
                );
                points.push((held.len(), rss));
                break 'counts;
            }
            let batch = (count - held.len()).min(open_concurrency);
            let mut opening = JoinSet::new();
            for _ in 0..batch {
                let connector = context.connector.clone();
                opening.spawn(async move {
                    let open = async {
                        let mut lines =
                            client::open_tls(&connector, target, Mode::Implicit, Protocol::Imap)
                                .await?;
                        if state == IdleState::Login {
                            lines.send(b"l LOGIN bench bench\r\n").await?;
                            lines.imap_tagged("l").await?;
                        }
                        anyhow::Ok(lines)
                    };
                    tokio::time::timeout(Duration::from_secs(10), open)
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("open timed out")))
                });
            }
            while let Some(opened) = opening.join_next().await {
                match opened? {
                    Ok(lines) => held.push(lines),
                    Err(error) => errors.add(&error),
                }
            }
        }
        tokio::time::sleep(settle).await;
        let rss = procstat::rss_kib(pid)?;
        eprintln!(
            "  {} idle TLS sessions via {}: RSS {rss} KiB",
            held.len(),
            context.labels.proxy
        );
        points.push((count, rss));
    }
    // Everything still open and answering: one NOOP on a sample of them.
    for lines in held.iter_mut().step_by(997) {
        let noop = async {
            lines.send(b"a NOOP\r\n").await?;
            lines.imap_tagged("a").await
        };
        if let Err(error) = noop.await {
            errors.add(&error.context("a held session no longer answers"));
        }
    }
    let mut records = Vec::new();
    for (count, rss) in &points {
        records.push(context.record("memory", variant, &format!("rss_kib_{count}"), *rss as f64));
    }
    let (first, last) = (points[0], points[points.len() - 1]);
    if last.0 > first.0 {
        let per_session = (last.1 as f64 - first.1 as f64) / (last.0 - first.0) as f64;
        eprintln!("  {per_session:.1} KiB per idle TLS session");
        records.push(context.record("memory", variant, "kib_per_session", per_session));
    }
    records.push(context.record("memory", variant, "sessions_held", held.len() as f64));
    records.push(context.record(
        "memory",
        variant,
        "errors",
        errors.count.load(Ordering::Relaxed) as f64,
    ));
    drop(held);
    Ok(records)
}
