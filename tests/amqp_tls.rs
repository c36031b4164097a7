//! The AMQP consumer over TLS against the machine's RabbitMQ, whose TLS listener on 5671 uses
//! the test CA from scripts/tls-setup (`COLLECTOR_TEST_TLS_DIR`, default
//! `/etc/collector-test-tls`): the broker itself says the connection is TLS, and each way a
//! TLS connection fails is reported as what it is. The expired-certificate case needs a
//! certificate RabbitMQ does not have, so it runs against a TLS server in this test made with
//! rcgen (only the handshake is exercised there).
//!
//! The rest of the consumer's behaviour over TLS (deliveries, reconnects, heartbeats, the daemon
//! end to end) is the amqp_consumer and amqp suites, which scripts/test runs a second time
//! with `COLLECTOR_TEST_AMQP_TLS` set.

use collector::amqp::AmqpConsumer;
use collector::config::MessagingConfig;
use collector::dispatch::Wake;
use collector_e2e::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Nop;
impl Wake for Nop {
    fn wake(&self) {}
}

fn tls_dir() -> PathBuf {
    std::env::var_os("COLLECTOR_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/collector-test-tls"))
}

fn ca(name: &str) -> String {
    tls_dir().join(name).display().to_string()
}

fn unique(test: &str) -> String {
    format!(
        "tls-{test}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn config(test: &str, url: &str, ca_file: &str) -> MessagingConfig {
    let name = unique(test);
    MessagingConfig {
        transport_url: url.to_string(),
        control_exchange: name.clone(),
        metering_topic: name,
        ssl_ca_file: ca_file.to_string(),
        ..MessagingConfig::default()
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Delete the test's queue and exchange (with the notify script the other AMQP tests use).
fn cleanup(cfg: &MessagingConfig) {
    let _ = Command::new(ceilometer_python())
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/notify.py"))
        .args([
            "--delete",
            "127.0.0.1:5672",
            &cfg.control_exchange,
            &format!("{}.sample", cfg.metering_topic),
        ])
        .output();
}

/// The consumer's last error once it has one.
fn error_of(cfg: &MessagingConfig) -> String {
    let consumer = AmqpConsumer::start(cfg, Arc::new(Nop)).expect("start");
    let error = wait_for(Duration::from_secs(15), || consumer.status().last_error)
        .expect("the consumer reports an error");
    assert!(!consumer.status().connected);
    consumer.shutdown();
    eprintln!("reported as: {error}");
    error
}

#[test]
fn amqps_with_the_ca_consumes_and_the_broker_sees_tls() {
    let cfg = config("ok", "amqps://guest:guest@localhost/", &ca("ca.pem"));
    let consumer = AmqpConsumer::start(&cfg, Arc::new(Nop)).expect("start");
    wait_for(Duration::from_secs(15), || {
        consumer.status().consuming.then_some(())
    })
    .unwrap_or_else(|| panic!("not consuming: {:?}", consumer.status()));
    // The broker's view of our connection, found by the name we give it.
    let out = rabbitmqctl(&[
        "list_connections",
        "ssl",
        "ssl_protocol",
        "client_properties",
    ]);
    let ours = out
        .lines()
        .find(|l| l.contains(&cfg.control_exchange))
        .unwrap_or_else(|| panic!("our connection is not listed:\n{out}"));
    assert!(ours.starts_with("true\t"), "not TLS: {ours}");
    assert!(
        ours.contains("tlsv1.3") || ours.contains("tlsv1.2"),
        "{ours}"
    );
    consumer.shutdown();
    cleanup(&cfg);
}

#[test]
fn the_transport_url_query_and_the_ssl_option_also_turn_tls_on() {
    for (url, ssl) in [
        ("rabbit://guest:guest@localhost:5671/?ssl=1", false),
        ("rabbit://guest:guest@localhost:5671/", true),
    ] {
        let mut cfg = config("on", url, &ca("ca.pem"));
        cfg.ssl = ssl;
        let consumer = AmqpConsumer::start(&cfg, Arc::new(Nop)).expect("start");
        wait_for(Duration::from_secs(15), || {
            consumer.status().consuming.then_some(())
        })
        .unwrap_or_else(|| panic!("{url}: not consuming: {:?}", consumer.status()));
        consumer.shutdown();
        cleanup(&cfg);
    }
}

#[test]
fn an_address_the_certificate_does_not_name_is_a_name_mismatch() {
    let cfg = config("name", "amqps://guest:guest@127.0.0.1:5671/", &ca("ca.pem"));
    let e = error_of(&cfg);
    assert!(
        e.contains("name mismatch") && e.contains("127.0.0.1"),
        "{e}"
    );
}

#[test]
fn a_certificate_from_another_ca_is_an_unknown_ca() {
    let cfg = config("ca", "amqps://guest:guest@localhost/", &ca("other-ca.pem"));
    let e = error_of(&cfg);
    assert!(e.contains("unknown CA"), "{e}");
}

#[test]
fn tls_to_a_plain_listener_says_the_server_does_not_speak_tls() {
    let cfg = config(
        "plain",
        "amqps://guest:guest@localhost:5672/",
        &ca("ca.pem"),
    );
    let e = error_of(&cfg);
    assert!(e.contains("does not speak TLS"), "{e}");
}

#[test]
fn an_expired_certificate_is_named() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();

    // A TLS server that presents it; the handshake fails before any AMQP byte.
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server_config = Arc::new(server_config);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let mut conn = rustls::ServerConnection::new(server_config.clone()).unwrap();
            let _ = conn.complete_io(&mut tcp);
            if Instant::now() > deadline {
                break;
            }
        }
    });
    let cfg = config(
        "expired",
        &format!("amqps://guest:guest@localhost:{port}/"),
        &ca_path.display().to_string(),
    );
    let e = error_of(&cfg);
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn unreadable_tls_files_stop_the_start_and_check_config_names_them_without_connecting() {
    let cfg = config(
        "files",
        "amqps://guest:guest@localhost/",
        "/nonexistent/ca.pem",
    );
    let e = AmqpConsumer::start(&cfg, Arc::new(Nop))
        .err()
        .expect("a missing CA file is a start-up error");
    assert!(
        e.contains("ssl_ca_file") && e.contains("cannot read"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("c.toml");
    std::fs::write(
        &conf,
        "[messaging]\ntransport_url = \"amqps://guest:guest@localhost/\"\nssl_key_file = \"/etc/hostname\"\n",
    )
    .unwrap();
    let out = Command::new(bin("collector"))
        .args(["--check-config", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ssl_key_file"), "{stderr}");
    // The storage drivers' TLS files too, named by their URL parameter, without connecting.
    for (url, param) in [
        (
            "postgresql://u@db.invalid/c?sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
            "sslrootcert",
        ),
        (
            "mysql+pymysql://u@db.invalid/c?ssl_ca=/etc/hostname",
            "ssl_ca",
        ),
    ] {
        std::fs::write(&conf, format!("[database]\nconnection = \"{url}\"\n")).unwrap();
        let out = Command::new(bin("collector"))
            .args(["--check-config", "--config"])
            .arg(&conf)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(param), "{url}: {stderr}");
    }
}
