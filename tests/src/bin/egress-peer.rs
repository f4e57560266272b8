//! The external destination of the test cluster, and a client to run inside pods.
//!
//! `serve`: HTTP on TCP (`/` answers with the client's source IP, `/bytes/N` with N bytes,
//! `/drip/N` with N KiB at 10 KiB/s) and a
//! UDP echo of the datagram's source `ip:port`; every connection/datagram is appended to a log.
//! `udp` / `tcp-burst`: clients printing the source the server saw, one line per reply.

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
        #[arg(long, default_value = "0.0.0.0:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "0.0.0.0:8081")]
        udp: SocketAddr,
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
    /// Open many TCP connections at once and print the source IP each one was seen with.
    TcpBurst {
        server: SocketAddr,
        #[arg(long, default_value_t = 10)]
        connections: u32,
        #[arg(long, default_value_t = 5000)]
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
        Command::TcpBurst {
            server,
            connections,
            timeout_ms,
        } => tcp_burst(server, connections, Duration::from_millis(timeout_ms)),
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
        let mut file = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = file.write_all(format_record(protocol, source).as_bytes());
    }
}

fn serve(http: SocketAddr, udp: SocketAddr, log_path: &std::path::Path) -> Result<()> {
    let log: Log = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .context("opening the log")?,
    ));
    let listener = TcpListener::bind(http).with_context(|| format!("binding {http}"))?;
    let socket = UdpSocket::bind(udp).with_context(|| format!("binding {udp}"))?;
    println!("ready: http {http} udp {udp}");
    std::io::stdout().flush()?;

    let udp_log = log.clone();
    thread::spawn(move || udp_echo(socket, udp_log));
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
    Ok(())
}

fn udp_echo(socket: UdpSocket, log: Log) {
    let mut buffer = [0u8; 2048];
    loop {
        let Ok((_, source)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        record(&log, PeerProtocol::Udp, source);
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
