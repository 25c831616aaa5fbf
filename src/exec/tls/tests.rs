use super::*;

use SslMode::*;

#[test]
fn first_attempt_by_mode() {
    assert_eq!(start(Disable), Start::Plain);
    assert_eq!(start(Allow), Start::Plain);
    for m in [Prefer, Require, VerifyCa, VerifyFull] {
        assert_eq!(start(m), Start::SslRequest, "{m}");
    }
}

#[test]
fn answer_to_the_tls_request() {
    for m in SslMode::ALL {
        assert_eq!(on_answer(m, b'S'), OnAnswer::Handshake, "{m}");
    }
    // 'N': plain text only where the mode allows it.
    assert_eq!(on_answer(Prefer, b'N'), OnAnswer::Plain);
    assert_eq!(on_answer(Allow, b'N'), OnAnswer::Plain);
    for m in [Require, VerifyCa, VerifyFull] {
        match on_answer(m, b'N') {
            OnAnswer::Fail(why) => assert_eq!(
                why,
                format!("the server does not support TLS, but pg_sslmode={m} requires it")
            ),
            other => panic!("{m}: {other:?}"),
        }
    }
    // An ErrorResponse (a pre-7.0 server) or garbage: never plain text.
    for m in SslMode::ALL {
        assert!(matches!(on_answer(m, b'E'), OnAnswer::Fail(_)), "{m}");
    }
}

#[test]
fn second_attempt_as_libpq() {
    // prefer: TLS failed (handshake or refused over TLS) -> plain text.
    assert_eq!(retry(Prefer, true, Failure::Handshake), Some(Start::Plain));
    assert_eq!(retry(Prefer, true, Failure::Refused), Some(Start::Plain));
    // prefer that already fell back to plain text ('N'): no more.
    assert_eq!(retry(Prefer, false, Failure::Refused), None);
    // allow: plain text refused -> TLS; TLS refused -> done.
    assert_eq!(
        retry(Allow, false, Failure::Refused),
        Some(Start::SslRequest)
    );
    assert_eq!(retry(Allow, true, Failure::Refused), None);
    assert_eq!(retry(Allow, true, Failure::Handshake), None);
    // The strict modes never fall back; timeouts are never tried again.
    for m in [Disable, Require, VerifyCa, VerifyFull] {
        for used in [false, true] {
            for f in [Failure::Handshake, Failure::Refused, Failure::Other] {
                assert_eq!(retry(m, used, f), None, "{m} {used} {f:?}");
            }
        }
    }
    for m in SslMode::ALL {
        assert_eq!(retry(m, true, Failure::Other), None);
        assert_eq!(retry(m, false, Failure::Other), None);
    }
}

#[test]
fn verification_by_mode() {
    assert_eq!(verify_for(VerifyFull, false), Verify::Full);
    assert_eq!(verify_for(VerifyCa, true), Verify::Chain);
    // libpq: require with a root certificate behaves as verify-ca.
    assert_eq!(verify_for(Require, true), Verify::Chain);
    assert_eq!(verify_for(Require, false), Verify::Nothing);
    for m in [Disable, Allow, Prefer] {
        assert_eq!(verify_for(m, true), Verify::Nothing, "{m}");
    }
}

#[test]
fn root_file_errors_name_the_file() {
    let ssl = PgSsl {
        mode: VerifyFull,
        rootcert: "/nonexistent/clup-ca.pem".into(),
    };
    let e = client_config(&ssl).unwrap_err();
    assert!(
        e.contains("root certificate file \"/nonexistent/clup-ca.pem\" does not exist"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("clup-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("empty.pem");
    std::fs::write(&f, "not a certificate\n").unwrap();
    let e = read_roots(f.to_str().unwrap()).unwrap_err();
    assert!(e.contains("holds no PEM certificate"), "{e}");
    // Not verifying: no file needed.
    assert!(build_config(Verify::Nothing, "/nonexistent/clup-ca.pem").is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_say_what_is_wrong() {
    let ssl = PgSsl {
        mode: VerifyFull,
        rootcert: "/etc/clup/ca.pem".into(),
    };
    let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert_eq!(
        describe(&e, &ssl, "10.0.0.1"),
        "TLS: certificate signed by an unknown authority (pg_sslrootcert=/etc/clup/ca.pem)"
    );
    let e = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
    assert_eq!(
        describe(&e, &ssl, "10.0.0.1"),
        "TLS: certificate is not valid for host 10.0.0.1"
    );
    assert!(server_name("10.0.0.1").is_ok());
    assert!(server_name("db-1.example").is_ok());
    assert!(server_name("bad name").is_err());
}

#[test]
fn a_server_saying_no_to_tls() {
    use std::net::TcpListener;
    use std::time::Duration;
    // A server that answers 'N' to SSLRequest.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 8];
            s.read_exact(&mut req).unwrap();
            assert_eq!(req, [0, 0, 0, 8, 4, 210, 22, 47]);
            s.write_all(b"N").unwrap();
        }
    });
    let deadline = || Deadline::after(Duration::from_secs(2));
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    let ssl = |mode| PgSsl {
        mode,
        rootcert: String::new(),
    };
    let s = negotiate(
        connect(),
        &ssl(Prefer),
        "127.0.0.1",
        Start::SslRequest,
        deadline(),
    );
    assert!(matches!(s, Ok(Stream::Plain(_))), "{:?}", s.err());
    match negotiate(
        connect(),
        &ssl(Require),
        "127.0.0.1",
        Start::SslRequest,
        deadline(),
    ) {
        Err(NegotiateError::Refused(m)) => assert!(m.contains("requires it"), "{m}"),
        other => panic!("{:?}", other.err()),
    }
    server.join().unwrap();
}
