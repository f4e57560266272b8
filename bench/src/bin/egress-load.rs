//! The project's own load tool for the benchmarks, for what iperf3 does not measure:
//!
//! - `serve`: TCP echo server (run at the destination);
//! - `rr`: 1-byte request-response on one connection, latency percentiles;
//! - `crr`: short connections (connect, 1-byte exchange, close) per second;
//! - `hold`: many concurrent connections held open, to push the gateway's NAT port space,
//!   then checks that the established ones still work.
//!
//! Every client prints one JSON line with its figures on stdout.
#![allow(
    unused_crate_dependencies,
    reason = "a binary links every dependency of its package; the library uses most of them"
)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};

#[derive(Parser)]
#[command(about = "Load generator and echo server of the egress gateway benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// TCP echo server (several may listen on one port: `SO_REUSEPORT`).
    Serve {
        #[arg(long, default_value = "0.0.0.0:9000")]
        listen: SocketAddr,
    },
    /// 1-byte ping-pong on one connection for a while: latency p50/p99.
    Rr {
        server: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
    },
    /// Short connections (connect, 1-byte exchange, close) for a while: connections/s.
    Crr {
        server: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Opens `connections` connections and holds them; once `verify_when` exists, checks
    /// every established one with a 1-byte exchange.
    Hold {
        server: SocketAddr,
        #[arg(long)]
        connections: u32,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// A connect not done by then counts as failed.
        #[arg(long, default_value_t = 3000)]
        connect_timeout_ms: u64,
        #[arg(long)]
        verify_when: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("egress-load: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { listen } => serve(listen).await,
            Command::Rr {
                server,
                duration_ms,
            } => rr(server, Duration::from_millis(duration_ms)).await,
            Command::Crr {
                server,
                duration_ms,
                concurrency,
            } => crr(server, Duration::from_millis(duration_ms), concurrency).await,
            Command::Hold {
                server,
                connections,
                concurrency,
                connect_timeout_ms,
                verify_when,
            } => {
                hold(
                    server,
                    connections,
                    concurrency,
                    Duration::from_millis(connect_timeout_ms),
                    verify_when,
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("egress-load: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Tens of thousands of sockets need more than the default 1024 descriptors: the soft limit
/// goes up to the hard one (raising the hard one needs `CAP_SYS_RESOURCE`, which containers
/// often lack; spread the load over processes instead).
fn raise_fd_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
    }
    Ok(limit.rlim_cur)
}

async fn serve(listen: SocketAddr) -> Result<()> {
    raise_fd_limit()?;
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    // Several servers may share the port, each under its own descriptor limit.
    socket.set_reuseport(true)?;
    socket.bind(listen)?;
    let listener: TcpListener = socket.listen(4096)?;
    println!("ready");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn exchange(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    stream.write_all(b"x").await?;
    stream.read_exact(&mut byte).await?;
    Ok(())
}

async fn rr(server: SocketAddr, duration: Duration) -> Result<()> {
    let mut stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(true)?;
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = Instant::now();
        exchange(&mut stream).await.context("1-byte exchange")?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[expect(clippy::cast_sign_loss, reason = "q and the length are not negative")]
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    println!(
        "{}",
        json!({"exchanges": samples.len(), "p50_us": at(0.5), "p99_us": at(0.99)})
    );
    Ok(())
}

/// Closes with RST (`SO_LINGER` 0) as load tools do: no `TIME_WAIT` left to eat the client's
/// ephemeral ports, so the rate is the datapath's, not the port space's.
async fn short_connection(server: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    exchange(&mut stream).await?;
    // Deprecated because a non-zero linger blocks on drop; zero resets at once.
    #[expect(
        deprecated,
        reason = "SO_LINGER 0 never blocks: the close is an immediate RST"
    )]
    stream.set_linger(Some(Duration::ZERO))?;
    Ok(())
}

async fn crr(server: SocketAddr, duration: Duration, concurrency: usize) -> Result<()> {
    raise_fd_limit()?;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    let attempt =
                        tokio::time::timeout(Duration::from_secs(2), short_connection(server));
                    match attempt.await {
                        Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({
            "connections": ok,
            "failed": failed.load(Ordering::Relaxed),
            "seconds": elapsed,
            "per_second": ok as f64 / elapsed,
        })
    );
    Ok(())
}

async fn hold(
    server: SocketAddr,
    connections: u32,
    concurrency: usize,
    connect_timeout: Duration,
    verify_when: PathBuf,
) -> Result<()> {
    raise_fd_limit()?;
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let attempts: Vec<_> = (0..connections)
        .map(|_| {
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await.ok()?;
                let connect = async {
                    let mut stream = TcpStream::connect(server).await?;
                    exchange(&mut stream).await?;
                    std::io::Result::Ok(stream)
                };
                tokio::time::timeout(connect_timeout, connect)
                    .await
                    .ok()?
                    .ok()
            })
        })
        .collect();
    let mut established = Vec::new();
    for attempt in attempts {
        if let Some(stream) = attempt.await? {
            established.push(stream);
        }
    }
    let attempted_after = started.elapsed().as_secs_f64();
    let count = established.len();
    println!(
        "{}",
        json!({"phase": "attempted", "established": count, "failed": connections as usize - count,
               "seconds": attempted_after})
    );
    while !verify_when.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every connection that got through must still work, now that the port space is full.
    let checks: Vec<_> = established
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), exchange(&mut stream))
                    .await
                    .is_ok_and(|result| result.is_ok())
            })
        })
        .collect();
    let mut still_working = 0;
    for check in checks {
        if check.await? {
            still_working += 1;
        }
    }
    println!(
        "{}",
        json!({"phase": "verified", "attempted": connections, "established": count,
               "failed": connections as usize - count, "still_working": still_working})
    );
    Ok(())
}
