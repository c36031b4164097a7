//! TLS to the server databases, against the machine's real servers.
//!
//! PostgreSQL runs with `ssl = on` and Debian's snakeoil certificate (CN and SAN `localhost`).
//! MariaDB gets TLS from `scripts/tls-setup` (run by scripts/test before the suite): a CA and a
//! server certificate for `localhost` under `COLLECTOR_TEST_TLS_DIR` (default
//! `/etc/collector-test-tls`); these tests read `ca.pem` there. Each test checks what the
//! server itself reports about the connection (`pg_stat_ssl`, `Ssl_cipher`), not only that
//! the driver did not complain.

mod common;
mod servers;

use common::sample;
use servers::{Admin, Kind, TestDb};
use std::path::PathBuf;
use storage::{SampleFilter, Storage, StorageOptions};

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn tls_dir() -> PathBuf {
    std::env::var_os("COLLECTOR_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/collector-test-tls"))
}

/// What a driver on `url` says when it cannot connect: the open's error, or (for what is
/// transient, such as a failed handshake) the first call's.
fn first_error(url: &str) -> String {
    match storage::open(url, &StorageOptions::default()) {
        Err(e) => e.to_string(),
        Ok(mut st) => st
            .record_metering_data(&[sample("m", "cpu", "r", "2026-01-01T00:00:00", 1.0)])
            .unwrap_err()
            .to_string(),
    }
}

fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

fn store_two(st: &mut dyn Storage, tag: &str) {
    let batch = vec![
        sample(&format!("{tag}-1"), "cpu", "r1", "2026-01-01T00:00:00", 1.0),
        sample(&format!("{tag}-2"), "cpu", "r1", "2026-01-01T00:01:00", 2.0),
    ];
    let out = st.record_metering_data(&batch).expect("record over TLS");
    assert_eq!(out.stored, 2, "{out:?}");
    let back = st
        .get_samples(&SampleFilter {
            meter: Some("cpu".into()),
            ..SampleFilter::default()
        })
        .expect("query over TLS");
    assert_eq!(back.len(), 2);
}

/// Sessions on `db` that the server says use TLS, and all its sessions (the test's admin
/// connection is in clear and counted in the second number only).
fn pg_ssl_sessions(db: &TestDb) -> (i64, i64) {
    let Admin::Postgres(mut c) = db.admin() else {
        unreachable!()
    };
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s
             JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
            &[&db.name],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn postgres_sslmode_require_stores_over_tls() {
    let db = TestDb::new(Kind::Postgres);
    let mut st = storage::open(
        &with_params(&db.url, "sslmode=require"),
        &StorageOptions::default(),
    )
    .expect("open");
    store_two(st.as_mut(), "req");
    let (tls, all) = pg_ssl_sessions(&db);
    assert_eq!(
        tls, 1,
        "the driver's session must be encrypted ({all} sessions)"
    );
}

#[test]
fn postgres_verify_full_with_the_servers_name_works() {
    let db = TestDb::new(Kind::Postgres);
    let url = with_params(
        &db.url.replacen("127.0.0.1", "localhost", 1),
        &format!("sslmode=verify-full&sslrootcert={SNAKEOIL}"),
    );
    assert!(url.contains("@localhost:"), "{url}");
    let mut st = storage::open(&url, &StorageOptions::default()).expect("open");
    store_two(st.as_mut(), "full");
    assert_eq!(pg_ssl_sessions(&db).0, 1);
}

#[test]
fn postgres_verify_full_against_an_ip_is_a_name_mismatch() {
    let db = TestDb::new(Kind::Postgres);
    let url = with_params(
        &db.url,
        &format!("sslmode=verify-full&sslrootcert={SNAKEOIL}"),
    );
    assert!(url.contains("@127.0.0.1:"), "{url}");
    // A handshake failure is not a start-up error (the server's certificate can be fixed while
    // the daemon runs): the open succeeds disconnected and every call says why.
    let mut st = storage::open(&url, &StorageOptions::default()).expect("open");
    let e = st
        .record_metering_data(&[sample("m", "cpu", "r", "2026-01-01T00:00:00", 1.0)])
        .unwrap_err()
        .to_string();
    eprintln!("name mismatch reported as: {e}");
    assert!(e.contains("name mismatch"), "{e}");
    assert!(e.contains("127.0.0.1"), "{e}");
    // verify-ca checks the chain only, so the same URL with verify-ca connects.
    let url = with_params(
        &db.url,
        &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}"),
    );
    let mut st = storage::open(&url, &StorageOptions::default()).expect("open");
    store_two(st.as_mut(), "ca");
}

#[test]
fn postgres_unknown_ca_is_named() {
    let db = TestDb::new(Kind::Postgres);
    let ca = tls_dir().join("ca.pem");
    let url = with_params(
        &db.url.replacen("127.0.0.1", "localhost", 1),
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let e = first_error(&url);
    eprintln!("unknown CA reported as: {e}");
    assert!(e.contains("unknown CA"), "{e}");
}

#[test]
fn postgres_sslmode_disable_connects_in_clear() {
    let db = TestDb::new(Kind::Postgres);
    let mut st = storage::open(
        &with_params(&db.url, "sslmode=disable"),
        &StorageOptions::default(),
    )
    .expect("open");
    store_two(st.as_mut(), "clear");
    let (tls, all) = pg_ssl_sessions(&db);
    assert_eq!(tls, 0);
    assert!(all >= 2, "driver and admin sessions: {all}");
}

#[test]
fn bad_tls_files_fail_the_open_naming_the_parameter() {
    let db = TestDb::new(Kind::Postgres);
    let e = storage::open(
        &with_params(
            &db.url,
            "sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
        ),
        &StorageOptions::default(),
    )
    .err()
    .expect("a missing root file is a start-up error")
    .to_string();
    assert!(
        e.contains("sslrootcert") && e.contains("cannot read"),
        "{e}"
    );
    // --check-config's path: the same check without connecting.
    let e = storage::check_url(&with_params(
        "postgresql://u@db.example/c",
        "sslmode=require&sslcert=/etc/hostname&sslkey=/etc/hostname",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("sslcert"), "{e}");
}

/// A MariaDB account on `db` that the server lets in only over TLS (`REQUIRE SSL`, or
/// `REQUIRE X509`: with a client certificate signed by a CA it trusts), so a stored sample
/// proves the driver's session was encrypted. Dropped with the returned guard.
struct TlsUser {
    name: String,
}

impl TlsUser {
    fn new(db: &TestDb, require: &str) -> TlsUser {
        use mysql::prelude::Queryable;
        let name = format!("tls_{}", db.name.trim_start_matches("collector_"));
        let Admin::Mysql(mut c) = db.admin() else {
            unreachable!()
        };
        c.query_drop(format!("DROP USER IF EXISTS '{name}'@'%'"))
            .unwrap();
        c.query_drop(format!(
            "CREATE USER '{name}'@'%' IDENTIFIED BY 'pw' REQUIRE {require}"
        ))
        .unwrap();
        c.query_drop(format!("GRANT ALL ON `{}`.* TO '{name}'@'%'", db.name))
            .unwrap();
        TlsUser { name }
    }

    /// The test database's URL as this user, on `host`, with `params`.
    fn url(&self, db: &TestDb, host: &str, params: &str) -> String {
        format!(
            "mysql://{}:pw@{host}:{}/{}?{params}",
            self.name,
            Kind::Mysql.addr().rsplit_once(':').unwrap().1,
            db.name
        )
    }
}

fn mysql_drop_user(name: &str) {
    use mysql::prelude::Queryable;
    if let Ok(mut c) = mysql::Conn::new(
        mysql::OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(3306)
            .user(Some("root"))
            .prefer_socket(false),
    ) {
        let _ = c.query_drop(format!("DROP USER IF EXISTS '{name}'@'%'"));
    }
}

impl Drop for TlsUser {
    fn drop(&mut self) {
        mysql_drop_user(&self.name);
    }
}

fn ca(name: &str) -> String {
    tls_dir().join(name).display().to_string()
}

#[test]
fn mariadb_refuses_the_tls_only_account_in_clear() {
    // The check the other MariaDB tests rely on: without TLS, that account is refused.
    let db = TestDb::new(Kind::Mysql);
    let user = TlsUser::new(&db, "SSL");
    let e = storage::open(
        &user.url(&db, "127.0.0.1", "ssl_mode=DISABLED"),
        &StorageOptions::default(),
    )
    .err()
    .expect("a REQUIRE SSL account in clear is refused")
    .to_string();
    assert!(e.contains("Access denied"), "{e}");
}

#[test]
fn mariadb_ssl_true_encrypts() {
    let db = TestDb::new(Kind::Mysql);
    let user = TlsUser::new(&db, "SSL");
    let mut st = storage::open(
        &user.url(&db, "127.0.0.1", "ssl=true"),
        &StorageOptions::default(),
    )
    .expect("open over TLS");
    store_two(st.as_mut(), "ssl");
}

#[test]
fn mariadb_verify_identity_with_the_servers_name_works() {
    let db = TestDb::new(Kind::Mysql);
    let user = TlsUser::new(&db, "SSL");
    let url = user.url(
        &db,
        "localhost",
        &format!(
            "ssl_ca={}&ssl_verify_cert=true&ssl_verify_identity=true",
            ca("ca.pem")
        ),
    );
    let mut st = storage::open(&url, &StorageOptions::default()).expect("open");
    store_two(st.as_mut(), "full");
}

#[test]
fn mariadb_verify_identity_against_an_ip_is_a_name_mismatch() {
    let db = TestDb::new(Kind::Mysql);
    let user = TlsUser::new(&db, "SSL");
    let url = user.url(
        &db,
        "127.0.0.1",
        &format!("ssl_ca={}&ssl_verify_identity=true", ca("ca.pem")),
    );
    let e = first_error(&url);
    eprintln!("name mismatch reported as: {e}");
    assert!(e.contains("name mismatch"), "{e}");
    // The chain alone (ssl_ca, verify_cert by default, no identity check) is accepted.
    let url = user.url(&db, "127.0.0.1", &format!("ssl_ca={}", ca("ca.pem")));
    let mut st = storage::open(&url, &StorageOptions::default()).expect("open");
    store_two(st.as_mut(), "chain");
}

#[test]
fn mariadb_unknown_ca_is_named() {
    let db = TestDb::new(Kind::Mysql);
    let user = TlsUser::new(&db, "SSL");
    let url = user.url(&db, "localhost", &format!("ssl_ca={}", ca("other-ca.pem")));
    let e = first_error(&url);
    eprintln!("unknown CA reported as: {e}");
    assert!(e.contains("unknown CA"), "{e}");
}

#[test]
fn mariadb_client_certificate_authenticates() {
    let db = TestDb::new(Kind::Mysql);
    let user = TlsUser::new(&db, "X509");
    let without = user.url(&db, "localhost", &format!("ssl_ca={}", ca("ca.pem")));
    let e = storage::open(&without, &StorageOptions::default())
        .err()
        .expect("REQUIRE X509 without a client certificate is refused")
        .to_string();
    assert!(e.contains("Access denied"), "{e}");
    let with = user.url(
        &db,
        "localhost",
        &format!(
            "ssl_ca={}&ssl_cert={}&ssl_key={}",
            ca("ca.pem"),
            ca("client.pem"),
            ca("client-key.pem")
        ),
    );
    let mut st = storage::open(&with, &StorageOptions::default()).expect("open with a client cert");
    store_two(st.as_mut(), "x509");
}
