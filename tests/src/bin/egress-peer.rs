//! The external destination of the test cluster, and a client to run inside pods.
//!
//! `serve`: HTTP on TCP (`/` answers with the client's source IP, `/bytes/N` with N bytes,
//! `/drip/N` with N KiB at 10 KiB/s, `/hold` echoes the source IP for every line the client
//! sends until it closes, `/reset` resets the connection with an RST) and a UDP echo of the datagram's source `ip:port`, on one or more
//! ports each; every connection/datagram is appended to a log.
//! `udp` / `tcp-burst`: clients printing the source the server saw, one line per reply.
//! `tcp-hold` / `udp-stream`: long-lived flows until a stop file appears, then a JSON summary.
//! `udp-flows`: many UDP flows at once, each answered or not, with a JSON summary.
//! `udp-big`: one large datagram each way (fragmented), with a JSON summary.
//! `tcp-resets`: connections one after another to `/reset`, with a JSON summary.
//! `udp-probe`: one datagram on a connected socket, printing `refused`, `reply <src>` or
//! `timeout` (an ICMP port unreachable must reach the pod as ECONNREFUSED).
#![allow(
    unused_crate_dependencies,
    reason = "a binary links every dependency of its package; the library uses most of them"
)]

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    sync::{Arc, Barrier, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use egress_tests::peer::{PeerProtocol, format_record};

#[derive(Parser)]
#[command(about = "Destination server and pod-side client of the egress test cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the destination server.
    Serve {
        /// HTTP listening address; repeat for more ports.
        #[arg(long, default_value = "0.0.0.0:8080")]
        http: Vec<SocketAddr>,
        /// UDP echo address; repeat for more ports.
        #[arg(long, default_value = "0.0.0.0:8081")]
        udp: Vec<SocketAddr>,
        /// Append `tcp|udp <source ip:port>` per connection/datagram here.
        #[arg(long)]
        log: std::path::PathBuf,
    },
    /// Send datagrams from one socket and print each reply (the source the server saw).
    Udp {
        server: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Send one datagram asking the server for a feed of `count` datagrams, one every
    /// `interval-ms`, and never answer: a flow where the remote does the sending. Prints a
    /// JSON summary (received, longest gap).
    UdpFeed {
        server: SocketAddr,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Send one datagram of `size` bytes asking for a reply of `size` bytes (both are
    /// fragmented on a 1500-byte path); prints a JSON summary (source the server saw, bytes
    /// sent and received).
    UdpBig {
        server: SocketAddr,
        #[arg(long, default_value_t = 8192)]
        size: usize,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Open `flows` UDP flows at once (one socket each), a datagram from each (resent once a
    /// second until answered or the timeout), then the same again from every flow that was
    /// answered; prints a JSON summary (flows, answered, answered_again). Flows beyond what
    /// the path holds go unanswered.
    UdpFlows {
        server: SocketAddr,
        #[arg(long, default_value_t = 100)]
        flows: u32,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Open many TCP connections at once and print the source IP each one was seen with.
    TcpBurst {
        server: SocketAddr,
        #[arg(long, default_value_t = 10)]
        connections: u32,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Open connections to the server's `/hold` and exchange a line on each every interval
    /// until `--until-file` exists; prints `connected K failed M` once all connects were
    /// tried, then a JSON summary. Connect failures are reported, not fatal.
    TcpHold {
        server: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: u32,
        #[arg(long)]
        until_file: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Per connect and per reply.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Send a datagram every interval from one socket until `--until-file` exists; prints a
    /// JSON summary (sent, received, longest gap between replies, sources the server saw).
    UdpStream {
        server: SocketAddr,
        #[arg(long)]
        until_file: std::path::PathBuf,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Open `connections` connections one after another to the server's `/reset`, which
    /// answers each with an RST; prints a JSON summary (connected, failed).
    TcpResets {
        server: SocketAddr,
        #[arg(long, default_value_t = 10)]
        connections: u32,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Send one datagram on a connected socket and report what came back.
    UdpProbe {
        server: SocketAddr,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve { http, udp, log } => serve(http, udp, &log),
        Command::Udp {
            server,
            count,
            timeout_ms,
        } => udp_client(server, count, Duration::from_millis(timeout_ms)),
        Command::UdpFeed {
            server,
            count,
            interval_ms,
        } => udp_feed(server, count, Duration::from_millis(interval_ms)),
        Command::TcpBurst {
            server,
            connections,
            timeout_ms,
        } => tcp_burst(server, connections, Duration::from_millis(timeout_ms)),
        Command::UdpBig {
            server,
            size,
            timeout_ms,
        } => udp_big(server, size, Duration::from_millis(timeout_ms)),
        Command::UdpFlows {
            server,
            flows,
            timeout_ms,
        } => udp_flows(server, flows, Duration::from_millis(timeout_ms)),
        Command::TcpResets {
            server,
            connections,
            interval_ms,
            timeout_ms,
        } => tcp_resets(
            server,
            connections,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Command::TcpHold {
            server,
            connections,
            until_file,
            interval_ms,
            timeout_ms,
        } => tcp_hold(
            server,
            connections,
            &until_file,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Command::UdpStream {
            server,
            until_file,
            interval_ms,
        } => udp_stream(server, &until_file, Duration::from_millis(interval_ms)),
        Command::UdpProbe { server, timeout_ms } => {
            udp_probe(server, Duration::from_millis(timeout_ms))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("egress-peer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ----- server -----

type Log = Arc<Mutex<File>>;

fn record(log: &Log, protocol: PeerProtocol, source: SocketAddr) {
    if let SocketAddr::V4(source) = source {
        let mut file = log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = file.write_all(format_record(protocol, source).as_bytes());
    }
}

fn serve(http: Vec<SocketAddr>, udp: Vec<SocketAddr>, log_path: &std::path::Path) -> Result<()> {
    let log: Log = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .context("opening the log")?,
    ));
    let mut listeners = Vec::new();
    for address in &http {
        listeners.push(TcpListener::bind(address).with_context(|| format!("binding {address}"))?);
    }
    for address in &udp {
        let socket = UdpSocket::bind(address).with_context(|| format!("binding {address}"))?;
        let udp_log = log.clone();
        thread::spawn(move || udp_echo(socket, udp_log));
    }
    println!("ready: http {http:?} udp {udp:?}");
    std::io::stdout().flush()?;

    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let log = log.clone();
            thread::spawn(move || accept_http(listener, log))
        })
        .collect();
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    Ok(())
}

fn accept_http(listener: TcpListener, log: Log) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let log = log.clone();
        thread::spawn(move || {
            if let Ok(source) = stream.peer_addr() {
                record(&log, PeerProtocol::Tcp, source);
                let _ = answer_http(stream, source);
            }
        });
    }
}

fn udp_echo(socket: UdpSocket, log: Log) {
    let mut buffer = vec![0u8; 65536];
    loop {
        let Ok((length, source)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        record(&log, PeerProtocol::Udp, source);
        // `feed COUNT INTERVAL_MS`: COUNT datagrams back, one every INTERVAL_MS.
        // `big SIZE`: one datagram of SIZE bytes back, the source first.
        let head = &buffer[..length.min(64)];
        let request = String::from_utf8_lossy(head);
        let mut words = request.split_whitespace();
        let command = words.next();
        let mut number = || words.next().and_then(|word| word.parse::<u64>().ok());
        match (command, number(), number()) {
            (Some("big"), Some(size), _) => {
                let mut reply = format!("{source}\n").into_bytes();
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                reply.resize(size.clamp(reply.len(), 65_000), b'x');
                let _ = socket.send_to(&reply, source);
                continue;
            }
            (Some("feed"), Some(count), Some(interval)) => {
                if let Ok(sender) = socket.try_clone() {
                    thread::spawn(move || {
                        for sequence in 0..count.min(100_000) {
                            let _ = sender.send_to(format!("feed {sequence}\n").as_bytes(), source);
                            thread::sleep(Duration::from_millis(interval));
                        }
                    });
                    continue;
                }
            }
            _ => {}
        }
        let _ = socket.send_to(format!("{source}\n").as_bytes(), source);
    }
}

/// Minimal HTTP/1.x: reads the request head, answers, closes.
fn answer_http(stream: TcpStream, source: SocketAddr) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let mut stream = stream;
    if path == "/hold" {
        // A long-lived connection: one line of the source IP per line received.
        stream.set_read_timeout(None)?;
        write!(stream, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            writeln!(stream, "{}", source.ip())?;
            line.clear();
        }
        return Ok(());
    }
    if path == "/reset" {
        reset(&stream)?;
        return Ok(());
    }
    if let Some(size) = path.strip_prefix("/bytes/") {
        let Ok(size) = size.parse::<u64>() else {
            return respond(&mut stream, "400 Bad Request", b"bad size\n");
        };
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\
             X-Source-IP: {}\r\nConnection: close\r\n\r\n",
            source.ip()
        )?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let now = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..now])?;
            left -= now as u64;
        }
        return Ok(());
    }
    // `/drip/N`: N KiB, one every 100 ms, so the connection lasts N/10 s whatever the client.
    if let Some(chunks) = path.strip_prefix("/drip/") {
        let Ok(chunks) = chunks.parse::<u64>() else {
            return respond(&mut stream, "400 Bad Request", b"bad count\n");
        };
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            chunks * 1024
        )?;
        let chunk = [b'x'; 1024];
        for _ in 0..chunks {
            stream.write_all(&chunk)?;
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        return Ok(());
    }
    if path == "/" {
        return respond(
            &mut stream,
            "200 OK",
            format!("{}\n", source.ip()).as_bytes(),
        );
    }
    respond(&mut stream, "404 Not Found", b"not found\n")
}

/// Closes with an RST instead of a FIN (SO_LINGER with a zero timeout), as servers and
/// load balancers that reset their connections do.
fn reset(stream: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size passed.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error()).context("setting SO_LINGER");
    }
    // The stream (and its clone in the reader) close when dropped: with an RST.
    Ok(())
}

fn respond(stream: &mut TcpStream, status: &str, body: &[u8]) -> Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    Ok(())
}

// ----- clients -----

fn udp_client(server: SocketAddr, count: u32, timeout: Duration) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut missing = 0;
    let mut buffer = [0u8; 2048];
    for sequence in 0..count {
        socket.send(format!("ping {sequence}\n").as_bytes())?;
        match socket.recv(&mut buffer) {
            Ok(length) => print!("{}", String::from_utf8_lossy(&buffer[..length])),
            Err(error) => {
                eprintln!("datagram {sequence}: no reply ({error})");
                missing += 1;
            }
        }
    }
    if missing > 0 {
        bail!("{missing} of {count} datagrams got no reply");
    }
    Ok(())
}

fn udp_feed(server: SocketAddr, count: u32, interval: Duration) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(server)?;
    // A gap this long means the feed stopped reaching us.
    socket.set_read_timeout(Some(interval * 10 + Duration::from_secs(1)))?;
    socket.send(format!("feed {count} {}\n", interval.as_millis()).as_bytes())?;
    let mut buffer = [0u8; 2048];
    let (mut received, mut max_gap) = (0u32, Duration::ZERO);
    let mut last = std::time::Instant::now();
    while received < count && socket.recv(&mut buffer).is_ok() {
        received += 1;
        max_gap = max_gap.max(last.elapsed());
        last = std::time::Instant::now();
    }
    println!(
        "{}",
        serde_json::json!({"received": received, "max_gap_ms": max_gap.as_millis() as u64})
    );
    Ok(())
}

fn tcp_burst(server: SocketAddr, connections: u32, timeout: Duration) -> Result<()> {
    // All connections are opened at the same moment, to stress concurrent SNAT.
    let start = Arc::new(Barrier::new(connections as usize));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                fetch_source_ip(server, timeout)
            })
        })
        .collect();
    let mut failures = 0;
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(source)) => println!("{source}"),
            Ok(Err(error)) => {
                eprintln!("connection {index}: {error:#}");
                failures += 1;
            }
            Err(_) => failures += 1,
        }
    }
    if failures > 0 {
        bail!("{failures} of {connections} connections failed");
    }
    Ok(())
}

fn udp_big(server: SocketAddr, size: usize, timeout: Duration) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    let mut request = format!("big {size}\n").into_bytes();
    request.resize(size.max(request.len()), b'y');
    socket.send_to(&request, server)?;
    let mut buffer = vec![0u8; 65536];
    let (length, _) = socket.recv_from(&mut buffer).context("no reply")?;
    let reply = &buffer[..length];
    let source = String::from_utf8_lossy(reply.split(|b| *b == b'\n').next().unwrap_or(&[]));
    println!(
        "{}",
        serde_json::json!({ "source": source, "sent": request.len(), "received": length })
    );
    Ok(())
}

fn udp_flows(server: SocketAddr, flows: u32, timeout: Duration) -> Result<()> {
    raise_open_files_limit()?;
    let sockets = (0..flows)
        .map(|_| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(server)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<Result<Vec<_>>>()?;
    // A round sends from every socket not answered yet, once a second (as a UDP client
    // retries), until all are answered or the timeout passes.
    let round = |sockets: &[&UdpSocket]| -> Vec<bool> {
        let deadline = std::time::Instant::now() + timeout;
        let mut answered = vec![false; sockets.len()];
        let mut buffer = [0u8; 256];
        let mut next_send = std::time::Instant::now();
        while std::time::Instant::now() < deadline && answered.contains(&false) {
            if std::time::Instant::now() >= next_send {
                let unanswered = sockets.iter().zip(&answered).filter(|(_, ok)| !**ok);
                for (index, (socket, _)) in unanswered.enumerate() {
                    let _ = socket.send(b"flow\n");
                    // Paced a little: a burst beyond the veth queues drops datagrams there.
                    if index % 64 == 63 {
                        thread::sleep(Duration::from_millis(2));
                    }
                }
                next_send += Duration::from_secs(1);
            }
            for (index, socket) in sockets.iter().enumerate() {
                if !answered[index] && socket.recv(&mut buffer).is_ok() {
                    answered[index] = true;
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        answered
    };
    let all: Vec<&UdpSocket> = sockets.iter().collect();
    let first = round(&all);
    let answered: Vec<&UdpSocket> = all
        .iter()
        .zip(&first)
        .filter_map(|(socket, ok)| ok.then_some(*socket))
        .collect();
    let again = round(&answered).iter().filter(|ok| **ok).count();
    println!(
        "{}",
        serde_json::json!({ "flows": flows, "answered": answered.len(), "answered_again": again })
    );
    Ok(())
}

/// A socket per flow: lift the soft limit on open files to the hard one.
fn raise_open_files_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer, then the same struct back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit");
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit");
        }
    }
    Ok(())
}

fn tcp_resets(
    server: SocketAddr,
    connections: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<()> {
    let (mut connected, mut failed) = (0u32, 0u32);
    for _ in 0..connections {
        match TcpStream::connect_timeout(&server, timeout) {
            Ok(mut stream) => {
                connected += 1;
                stream.set_read_timeout(Some(timeout))?;
                let _ = write!(stream, "GET /reset HTTP/1.1\r\nHost: {server}\r\n\r\n");
                // Until the RST (or EOF): the connection ends on the server's side only.
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink);
            }
            Err(error) => {
                eprintln!("connect: {error}");
                failed += 1;
            }
        }
        thread::sleep(interval);
    }
    println!(
        "{}",
        serde_json::json!({ "connected": connected, "failed": failed })
    );
    Ok(())
}

fn fetch_source_ip(server: SocketAddr, timeout: Duration) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response {head:?}");
    }
    let source = body.trim();
    source
        .parse::<std::net::Ipv4Addr>()
        .with_context(|| format!("body {source:?} is not an IP"))?;
    Ok(source.to_string())
}

/// One `/hold` connection of `tcp-hold`.
struct HeldConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HeldConnection {
    fn open(server: SocketAddr, timeout: Duration) -> Result<HeldConnection> {
        let mut writer = TcpStream::connect_timeout(&server, timeout)?;
        writer.set_read_timeout(Some(timeout))?;
        write!(writer, "GET /hold HTTP/1.1\r\nHost: {server}\r\n\r\n")?;
        let mut reader = BufReader::new(writer.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("unexpected response {line:?}");
        }
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("closed during the response head");
            }
            if line == "\r\n" {
                break;
            }
        }
        Ok(HeldConnection { reader, writer })
    }

    /// Sends a line, returns the source IP the server saw.
    fn exchange(&mut self) -> Result<String> {
        self.writer.write_all(b"ping\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the server closed the connection");
        }
        Ok(line.trim().to_string())
    }
}

fn tcp_hold(
    server: SocketAddr,
    connections: u32,
    until_file: &std::path::Path,
    interval: Duration,
    timeout: Duration,
) -> Result<()> {
    let mut held = Vec::new();
    let mut connect_errors = Vec::new();
    for index in 0..connections {
        match HeldConnection::open(server, timeout) {
            Ok(connection) => held.push(connection),
            Err(error) => connect_errors.push(format!("connection {index}: {error:#}")),
        }
    }
    println!("connected {} failed {}", held.len(), connect_errors.len());
    std::io::stdout().flush()?;
    let mut sources = std::collections::BTreeSet::new();
    let mut exchanges = 0u64;
    let mut broken: Vec<String> = Vec::new();
    let mut alive: Vec<Option<HeldConnection>> = held.into_iter().map(Some).collect();
    let mut last_ok = std::time::Instant::now();
    let mut max_gap = Duration::ZERO;
    loop {
        // The stop file is checked before the round, so the last round runs after it exists.
        let stop = until_file.exists();
        let mut round_ok = false;
        for (index, slot) in alive.iter_mut().enumerate() {
            let Some(connection) = slot else { continue };
            match connection.exchange() {
                Ok(source) => {
                    exchanges += 1;
                    round_ok = true;
                    sources.insert(source);
                }
                Err(error) => {
                    broken.push(format!("connection {index}: {error:#}"));
                    *slot = None;
                }
            }
        }
        if round_ok {
            max_gap = max_gap.max(last_ok.elapsed());
            last_ok = std::time::Instant::now();
        }
        if stop {
            break;
        }
        thread::sleep(interval);
    }
    let still_working = alive.iter().filter(|slot| slot.is_some()).count();
    println!(
        "{}",
        serde_json::json!({
            "connected": connections as usize - connect_errors.len(),
            "connect_failed": connect_errors.len(),
            "connect_errors": connect_errors,
            "still_working": still_working,
            "broken": broken,
            "exchanges": exchanges,
            "max_gap_ms": max_gap.as_millis() as u64,
            "sources": sources,
        })
    );
    Ok(())
}

fn udp_stream(server: SocketAddr, until_file: &std::path::Path, interval: Duration) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(server)?;
    let reader = socket.try_clone()?;
    reader.set_read_timeout(Some(Duration::from_millis(200)))?;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let done = done.clone();
        thread::spawn(move || {
            let mut received = 0u64;
            let mut sources = std::collections::BTreeSet::new();
            let mut errors = Vec::new();
            let mut last = std::time::Instant::now();
            let mut max_gap = Duration::ZERO;
            let mut buffer = [0u8; 2048];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match reader.recv(&mut buffer) {
                    Ok(length) => {
                        received += 1;
                        max_gap = max_gap.max(last.elapsed());
                        last = std::time::Instant::now();
                        let text = String::from_utf8_lossy(&buffer[..length]);
                        if let Some((ip, _)) = text.trim().rsplit_once(':') {
                            sources.insert(ip.to_string());
                        }
                    }
                    Err(error)
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(error) => errors.push(error.to_string()),
                }
            }
            (received, sources, errors, max_gap)
        })
    };
    let mut sent = 0u64;
    let mut send_errors = 0u64;
    while !until_file.exists() {
        match socket.send(format!("ping {sent}\n").as_bytes()) {
            Ok(_) => sent += 1,
            Err(_) => send_errors += 1,
        }
        thread::sleep(interval);
    }
    // Replies still in flight.
    thread::sleep(Duration::from_secs(1));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (received, sources, errors, max_gap) = listener
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "send_errors": send_errors,
            "received": received,
            "receive_errors": errors,
            "max_gap_ms": max_gap.as_millis() as u64,
            "sources": sources,
        })
    );
    Ok(())
}

fn udp_probe(server: SocketAddr, timeout: Duration) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"probe\n")?;
    let mut buffer = [0u8; 2048];
    match socket.recv(&mut buffer) {
        Ok(length) => println!(
            "reply {}",
            String::from_utf8_lossy(&buffer[..length]).trim()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => println!("refused"),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            println!("timeout");
        }
        Err(error) => bail!("receiving: {error}"),
    }
    Ok(())
}
