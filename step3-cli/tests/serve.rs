//! `step3 serve` as a user starts it: the bundled demo on an ephemeral loopback port, the address
//! logged, requests answered, and a clean exit (status 0) on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_starts_answers_and_stops_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_step3"))
        .args(["serve", "--port", "0", "--api-key", "k"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start step3 serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut log = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("the server never said where it listens");
        log.push(line.clone());
        if let Some(rest) = line.split("on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(120));
    };
    assert!(addr.starts_with("127.0.0.1:"), "binds loopback by default: {addr}");
    assert!(log.iter().any(|l| l.contains("its answers are noise")), "{log:?}");
    let health = http(&addr, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = r#"{"model":"step3-demo","messages":[{"role":"user","content":"Hi"}],"max_tokens":3}"#;
    let denied = http(
        &addr,
        &format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    );
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let ok = http(
        &addr,
        &format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    );
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("chat.completion"), "{ok}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(0));
    // One log line per request.
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("POST /v1/chat/completions 200")), "{rest:?}");
}
