//! A small blocking HTTP/1.1 server: one request per connection
//! (`Connection: close`), a thread per connection, every read bounded.
//!
//! Why our own: tiny_http 0.12's accept thread stops for good on the first
//! accept error and unwraps the clone of an accepted socket, so a server
//! that runs out of descriptors (EMFILE) went deaf, or, with the release
//! profile's `panic = "abort"`, died. Here an accept error is logged once,
//! waited out and retried; a connection over [`MAX_CONNS`] is closed at
//! once; nothing in the loop can panic.
//!
//! Owns: the socket, request parsing (request line, headers, a body of at
//! most `max_body` bytes announced by Content-Length) and writing the
//! answer. Must not: route or authenticate (the caller's handler does).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Connections served at once; more are closed as soon as accepted.
pub const MAX_CONNS: usize = 4096;

/// How long a client may take to send its request line and headers, and
/// its body, each.
const READ_WAIT: Duration = Duration::from_secs(30);

/// The request line and headers, at most.
const MAX_HEAD: usize = 16 << 10;

/// One request.
pub struct Request {
    pub method: String,
    /// The target as sent: path and query.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value (names compare without case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// One answer.
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type: content_type.to_string(),
            body: body.into(),
        }
    }

    fn error(status: u16, msg: &str) -> Response {
        let body = serde_json::json!({ "error": msg }).to_string();
        Response::new(status, "application/json", body)
    }
}

/// What the server calls for each request.
pub type Handler = dyn Fn(Request) -> Response + Send + Sync;

/// Serve `listener` until `stop` is set (checked at least every 100 ms).
/// `max_body`: a request announcing a longer body gets 413 unread.
pub fn serve(listener: TcpListener, handler: Arc<Handler>, max_body: usize, stop: &AtomicBool) {
    let conns = Arc::new(AtomicUsize::new(0));
    let mut failing = false;
    while !stop.load(Ordering::SeqCst) {
        if !readable(&listener, 100) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS...: the connection waits in the
                // backlog until descriptors are free again.
                if !failing {
                    log::error!("web server: cannot accept a connection: {e}; retrying");
                    failing = true;
                }
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            log::info!("web server: accepting connections again.");
        }
        if conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
            conns.fetch_sub(1, Ordering::SeqCst);
            drop(stream);
            continue;
        }
        let (handler, n) = (handler.clone(), conns.clone());
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                connection(stream, &*handler, max_body);
                n.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            // The stream went with the closure: closed.
            conns.fetch_sub(1, Ordering::SeqCst);
            log::warn!("web server: cannot start a connection thread: {e}");
        }
    }
}

/// Whether the listener has a connection to accept within `ms`.
fn readable(listener: &TcpListener, ms: i32) -> bool {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one descriptor we own, with a valid pollfd.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    n > 0
}

/// Read one request, answer it, close.
fn connection(stream: TcpStream, handler: &Handler, max_body: usize) {
    let _ = stream.set_nodelay(true);
    let resp = match read_request(&stream, max_body) {
        Ok(req) => handler(req),
        Err(Bad::Gone) => return,
        Err(Bad::Status(status, msg)) => Response::error(status, &msg),
    };
    let _ = write_response(&stream, &resp);
    // Half-close, then read what the client still sends (an unread body):
    // closing with unread data would reset the connection, and the client
    // could lose the answer before it reads it.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    while drained < (4 << 20) {
        match (&stream).read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Why a request was not read.
enum Bad {
    /// The client left or went quiet: nothing to answer.
    Gone,
    /// Answer with this status and message.
    Status(u16, String),
}

fn read_request(stream: &TcpStream, max_body: usize) -> Result<Request, Bad> {
    let began = Instant::now();
    let mut r = BufReader::new(stream);
    let mut head = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    loop {
        let left = READ_WAIT
            .checked_sub(began.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or(Bad::Gone)?;
        let _ = stream.set_read_timeout(Some(left));
        let mut line = Vec::new();
        let n = (&mut r)
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|_| Bad::Gone)?;
        if n == 0 {
            return Err(Bad::Gone);
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(Bad::Status(431, "request head too large".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(Bad::Gone);
        }
        let text = String::from_utf8(line)
            .map_err(|_| Bad::Status(400, "request head is not UTF-8".into()))?;
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        if text.is_empty() {
            if lines.is_empty() {
                continue; // a stray empty line before the request line
            }
            break;
        }
        lines.push(text);
    }
    let mut req = parse_head(&lines).map_err(|m| Bad::Status(400, m))?;
    let len = match req.header("content-length") {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| Bad::Status(400, "bad Content-Length".into()))?,
    };
    if req.header("transfer-encoding").is_some() {
        return Err(Bad::Status(411, "a body needs a Content-Length".into()));
    }
    if len > max_body {
        return Err(Bad::Status(
            413,
            format!("request body over {max_body} bytes"),
        ));
    }
    let _ = stream.set_read_timeout(Some(READ_WAIT));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|_| Bad::Gone)?;
    req.body = body;
    Ok(req)
}

/// The request line and headers (without the empty line).
pub fn parse_head(lines: &[String]) -> Result<Request, String> {
    let first = lines.first().ok_or("empty request")?;
    let mut parts = first.split(' ');
    let (Some(method), Some(url), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("bad request line".to_string());
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !url.starts_with('/')
    {
        return Err("bad request line".to_string());
    }
    let mut headers = Vec::new();
    for l in &lines[1..] {
        let (k, v) = l.split_once(':').ok_or("bad header line")?;
        if k.is_empty() || k.contains(' ') {
            return Err("bad header line".to_string());
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        url: url.to_string(),
        headers,
        body: Vec::new(),
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(mut stream: &TcpStream, resp: &Response) -> io::Result<()> {
    let _ = stream.set_write_timeout(Some(READ_WAIT));
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&resp.body)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn heads_parse_or_are_refused() {
        let r = parse_head(&lines(&[
            "GET /a?b=c HTTP/1.1",
            "Host: x",
            "X-Clup-Pass:  p ",
        ]))
        .unwrap();
        assert_eq!((r.method.as_str(), r.url.as_str()), ("GET", "/a?b=c"));
        assert_eq!(r.header("x-clup-pass").as_deref(), Some("p"));
        for bad in [
            &["GARBAGE"][..],
            &["GET /a"],
            &["GET a HTTP/1.1"],
            &["get /a HTTP/1.1"],
            &["GET /a HTTP/1.1 x"],
            &["GET /a HTTP/1.1", "no colon"],
        ] {
            assert!(parse_head(&lines(bad)).is_err(), "{bad:?}");
        }
    }

    /// A round trip over loopback: the handler sees the request, the client
    /// the answer; a body over the limit gets 413 without being read.
    #[test]
    fn serves_requests_and_refuses_large_bodies() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(|r: Request| {
            Response::new(
                200,
                "text/plain",
                format!("{} {} {}", r.method, r.url, r.body.len()),
            )
        });
        let s = stop.clone();
        let t = thread::spawn(move || serve(l, handler, 100, &s));
        let ask = |req: &[u8]| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(req).unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        };
        let a = ask(b"POST /x?y HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nPOST /x?y 3"), "{a}");
        let a = ask(b"POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 413 "), "{a}");
        let a = ask(b"GARBAGE\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 400 "), "{a}");
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }
}
