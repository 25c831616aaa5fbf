//! The codec on bytes and the client against fake servers on loopback.

use super::*;

fn params_for(port: u16) -> Params {
    Params {
        host: "127.0.0.1".to_string(),
        port,
        user: "u".to_string(),
        dbname: "d".to_string(),
        password: Secret::new(""),
        options: String::new(),
        // libpq's default: an SSLRequest first, plain text after 'N'.
        ssl: PgSsl::default(),
    }
}

#[test]
fn handshake_tells_answered_from_stalled_from_unreachable() {
    let limit = Duration::from_millis(300);
    // A listener nobody accepts on: the kernel completes the TCP
    // handshake into the backlog and nothing answers, as with a stopped
    // postmaster.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalled.local_addr().unwrap().port();
    let h = handshake(&params_for(port), "probe x", Deadline::after(limit));
    assert!(
        matches!(h, Handshake::Stalled(ref m) if m.contains("accepts TCP")),
        "{h:?}"
    );

    // A server that asks for a password.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let packet = |s: &mut std::net::TcpStream| {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            s.read_exact(&mut rest).unwrap();
            rest
        };
        // The SSLRequest (code 80877103): no TLS here.
        assert_eq!(packet(&mut s), 80877103u32.to_be_bytes());
        s.write_all(b"N").unwrap();
        let startup = packet(&mut s);
        assert_eq!(&startup[..4], &[0, 3, 0, 0]);
        s.write_all(&message(b'R', &3u32.to_be_bytes())).unwrap();
        // The client leaves before sending a password.
        let mut buf = [0u8; 16];
        s.read(&mut buf).unwrap()
    });
    let h = handshake(&params_for(port), "probe x", Deadline::after(limit));
    assert_eq!(h, Handshake::Answered);
    assert_eq!(t.join().unwrap(), 0, "nothing sent after the answer");

    // Nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h = handshake(&params_for(port), "probe x", Deadline::after(limit));
    assert!(matches!(h, Handshake::Unreachable(_)), "{h:?}");
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    message(tag, body)
}

#[test]
fn frontend_messages() {
    let s = startup(&[("user", "u"), ("database", "d")]);
    assert_eq!(&s[..4], &(s.len() as u32).to_be_bytes());
    assert_eq!(&s[4..8], &[0, 3, 0, 0]);
    assert_eq!(&s[8..], b"user\0u\0database\0d\0\0");
    assert_eq!(query("SELECT 1").unwrap(), b"Q\0\0\0\x0dSELECT 1\0");
    assert!(query("a\0b").is_err());
    assert_eq!(password(b"pw"), b"p\0\0\0\x07pw\0");
    assert_eq!(
        sasl_initial("SCRAM-SHA-256", b"n,,x"),
        b"p\0\0\0\x1aSCRAM-SHA-256\0\0\0\0\x04n,,x"
    );
    assert_eq!(sasl_response(b"abc"), b"p\0\0\0\x07abc");
    assert_eq!(TERMINATE, *b"X\0\0\0\x04");
    assert_eq!(
        parse("clup0", "SELECT 1").unwrap(),
        b"P\0\0\0\x15clup0\0SELECT 1\0\0\0"
    );
    assert!(parse("clup0", "a\0b").is_err());
    assert_eq!(
        bind_execute("clup1"),
        b"B\0\0\0\x11\0clup1\0\0\0\0\0\0\0E\0\0\0\x09\0\0\0\0\0"
    );
    assert_eq!(SYNC, *b"S\0\0\0\x04");
}

#[test]
fn backend_messages() {
    let d = |b: &[u8]| decode(b).unwrap().unwrap();
    assert_eq!(d(&msg(b'R', &[0, 0, 0, 0])), (Backend::Auth(Auth::Ok), 9));
    assert_eq!(
        d(&msg(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])).0,
        Backend::Auth(Auth::Md5([1, 2, 3, 4]))
    );
    assert_eq!(
        d(&msg(
            b'R',
            b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
        ))
        .0,
        Backend::Auth(Auth::Sasl(vec![
            "SCRAM-SHA-256-PLUS".into(),
            "SCRAM-SHA-256".into()
        ]))
    );
    assert_eq!(
        d(&msg(b'R', b"\0\0\0\x0br=abc")).0,
        Backend::Auth(Auth::SaslContinue(b"r=abc".to_vec()))
    );
    assert_eq!(
        d(&msg(b'R', &[0, 0, 0, 7])).0,
        Backend::Auth(Auth::Other(7))
    );
    assert_eq!(
        d(&msg(b'S', b"TimeZone\0UTC\0")).0,
        Backend::ParameterStatus("TimeZone".into(), "UTC".into())
    );
    assert_eq!(
        d(&msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7])).0,
        Backend::BackendKeyData { pid: 42, key: 7 }
    );
    assert_eq!(d(&msg(b'Z', b"I")).0, Backend::ReadyForQuery(b'I'));
    // Two columns: 'ab' and NULL.
    assert_eq!(
        d(&msg(b'D', b"\0\x02\0\0\0\x02ab\xff\xff\xff\xff")).0,
        Backend::DataRow(vec![Some("ab".into()), None])
    );
    assert_eq!(
        d(&msg(b'C', b"UPDATE 3\0")).0,
        Backend::CommandComplete("UPDATE 3".into())
    );
    assert_eq!(
        d(&msg(
            b'E',
            b"SERROR\0VERROR\0C25006\0Mcannot execute UPDATE in a read-only transaction\0\0"
        ))
        .0,
        Backend::Error(Fields {
            severity: "ERROR".into(),
            code: "25006".into(),
            message: "cannot execute UPDATE in a read-only transaction".into(),
        })
    );
    assert_eq!(d(&msg(b'A', b"x")).0, Backend::Other(b'A'));
}

#[test]
fn partial_and_bad_input() {
    let full = msg(b'C', b"SELECT 1\0");
    for cut in 0..full.len() {
        assert_eq!(decode(&full[..cut]).unwrap(), None, "{cut}");
    }
    // Two messages back to back: the first is taken alone.
    let mut two = full.clone();
    two.extend(msg(b'Z', b"I"));
    let (_, used) = decode(&two).unwrap().unwrap();
    assert_eq!(used, full.len());
    assert!(decode(b"C\0\0\0\x02").is_err(), "length below 4");
    assert!(decode(b"C\x7f\0\0\0").is_err(), "absurd length");
    // Lies inside the body are errors, not panics.
    assert!(decode(&msg(b'D', b"\0\x01\0\0\0\x09ab")).is_err());
    assert!(decode(&msg(b'K', &[0, 0])).is_err());
    assert!(decode(&msg(b'C', b"no nul")).is_err());
    assert!(decode(&msg(b'E', b"Sx")).is_err());
}

#[test]
fn collecting_several_statements() {
    let mut c = Collect::default();
    let feed = |c: &mut Collect, m| c.feed(m).unwrap();
    assert_eq!(feed(&mut c, Backend::RowDescription(1)), None);
    feed(&mut c, Backend::DataRow(vec![Some("1".into())]));
    feed(&mut c, Backend::DataRow(vec![None]));
    feed(&mut c, Backend::CommandComplete("SELECT 2".into()));
    feed(&mut c, Backend::Notice(Fields::default()));
    feed(&mut c, Backend::CommandComplete("UPDATE 0".into()));
    feed(&mut c, Backend::RowDescription(1));
    feed(&mut c, Backend::CommandComplete("SELECT 0".into()));
    assert_eq!(feed(&mut c, Backend::ReadyForQuery(b'I')), Some(b'I'));
    let r = c.finish().unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].rows, vec![vec![Some("1".into())], vec![None]]);
    assert_eq!(r[0].count(), 2);
    assert_eq!(r[1].count(), 0);
    assert!(r[2].rows.is_empty());
    let insert = QueryResult {
        rows: vec![],
        tag: "INSERT 0 1".into(),
    };
    assert_eq!(insert.count(), 1);

    let mut c = Collect::default();
    feed(&mut c, Backend::CommandComplete("SELECT 0".into()));
    feed(
        &mut c,
        Backend::Error(Fields {
            severity: "ERROR".into(),
            code: "42P01".into(),
            message: "relation does not exist".into(),
        }),
    );
    feed(&mut c, Backend::ReadyForQuery(b'I'));
    assert_eq!(c.finish().unwrap_err().code, "42P01");
    assert!(Collect::default().feed(Backend::Auth(Auth::Ok)).is_err());
}

#[test]
fn collecting_an_extended_batch() {
    let feed = |c: &mut Collect, m| c.feed(m).unwrap();
    let d = |b: &[u8]| decode(b).unwrap().unwrap().0;
    assert_eq!(d(&msg(b'1', b"")), Backend::ParseComplete);
    assert_eq!(d(&msg(b'2', b"")), Backend::Other(b'2'));
    // Two statements parsed, the second bound and run: no RowDescription
    // (no Describe is sent), DataRows straight away.
    let mut c = Collect::default();
    feed(&mut c, Backend::ParseComplete);
    feed(&mut c, Backend::ParseComplete);
    feed(&mut c, Backend::Other(b'2'));
    feed(&mut c, Backend::DataRow(vec![Some("7".into())]));
    feed(&mut c, Backend::CommandComplete("SELECT 1".into()));
    feed(&mut c, Backend::Other(b'2'));
    feed(&mut c, Backend::CommandComplete("SELECT 0".into()));
    assert_eq!(feed(&mut c, Backend::ReadyForQuery(b'I')), Some(b'I'));
    assert_eq!(c.parsed, 2);
    let r = c.finish().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].rows, vec![vec![Some("7".into())]]);
    assert!(r[1].rows.is_empty());
}

#[test]
fn deadline_bounds_a_silent_server() {
    use std::net::TcpListener;
    let d = Deadline::after(Duration::from_millis(50));
    assert!(d.remaining().unwrap() <= Duration::from_millis(50));
    let past = Deadline {
        at: Instant::now() - Duration::from_millis(1),
        limit: Duration::from_millis(100),
    };
    assert_eq!(
        past.remaining().unwrap_err().kind(),
        io::ErrorKind::TimedOut
    );

    // A listener that accepts (the kernel does) but never answers: the
    // login waits until the deadline, then the error says so.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = Params {
        host: "127.0.0.1".into(),
        port: l.local_addr().unwrap().port(),
        user: "u".into(),
        dbname: "d".into(),
        password: Secret::new("pw"),
        options: String::new(),
        ssl: PgSsl::default(),
    };
    let started = Instant::now();
    let e = Conn::connect(&p, "test", Deadline::after(Duration::from_millis(300)))
        .err()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(e.msg, "no answer within 0.3s");
    // Past the deadline: no socket call at all.
    let e = Conn::connect(&p, "test", past).err().unwrap();
    assert_eq!(e.msg, "no answer within 0.1s");
}

#[test]
fn params_compare_sessions() {
    let p = Params {
        host: "10.0.0.1".into(),
        port: 5432,
        user: "u".into(),
        dbname: "d".into(),
        password: Secret::new("pw"),
        options: "-c statement_timeout=1000".into(),
        ssl: PgSsl::default(),
    };
    assert!(p.same_session(&p.clone()));
    let other = Params {
        port: 5433,
        ..p.clone()
    };
    assert!(!p.same_session(&other));
    let other = Params {
        dbname: "postgres".into(),
        ..p.clone()
    };
    assert!(!p.same_session(&other));
    let other = Params {
        ssl: PgSsl {
            mode: crate::model::config::SslMode::VerifyFull,
            rootcert: "/ca.pem".into(),
        },
        ..p.clone()
    };
    assert!(!p.same_session(&other));
}
