//! The daemon writing to PostgreSQL and MariaDB end to end (issue 9): the built `collector`
//! binary with `[database] connection = "postgresql://..."` / `"mysql+pymysql://..."`, real
//! loopback sockets, and the rows counted with the servers' own CLIs (`psql`, `mariadb`).
//!
//! Servers: `COLLECTOR_TEST_POSTGRES` (default `postgresql://postgres@127.0.0.1:5432`) and
//! `COLLECTOR_TEST_MYSQL` (default `mysql://root@127.0.0.1:3306`); CI starts both. Each test
//! creates its own database and drops it afterwards.

use collector_e2e::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Postgres,
    Mysql,
}

/// `user@host:port` of the server.
fn base(kind: Kind) -> String {
    let (var, default) = match kind {
        Kind::Postgres => (
            "COLLECTOR_TEST_POSTGRES",
            "postgresql://postgres@127.0.0.1:5432",
        ),
        Kind::Mysql => ("COLLECTOR_TEST_MYSQL", "mysql://root@127.0.0.1:3306"),
    };
    let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
    url.split_once("://")
        .map(|(_, r)| r.trim_end_matches('/').to_string())
        .unwrap_or(url)
}

fn host_port(kind: Kind) -> (String, String) {
    let b = base(kind);
    let addr = b.rsplit_once('@').map_or(b.as_str(), |(_, a)| a);
    let (h, p) = addr.rsplit_once(':').unwrap_or((addr, ""));
    (h.to_string(), p.to_string())
}

fn user(kind: Kind) -> String {
    let b = base(kind);
    b.rsplit_once('@')
        .map(|(u, _)| u.split(':').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Run one SQL statement with the server's CLI; the trimmed output.
fn sql(kind: Kind, db: &str, statement: &str) -> String {
    let (host, port) = host_port(kind);
    let out = match kind {
        Kind::Postgres => Command::new("psql")
            .args(["-h", &host, "-p", &port, "-U", &user(kind), "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-tAc", statement])
            .output(),
        Kind::Mysql => Command::new("mariadb")
            .args(["-h", &host, "-P", &port, "-u", &user(kind), "-N", "-B"])
            .args(["-e", statement])
            .args((!db.is_empty()).then_some(db))
            .output(),
    }
    .unwrap_or_else(|e| panic!("cannot run the {kind:?} CLI: {e}"));
    assert!(
        out.status.success(),
        "\n*** {kind:?} at {}: {statement}: {}\n*** The server must be running (CI's .ci/run starts it).\n",
        base(kind),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A database of its own for one test, dropped on drop.
struct TestDb {
    kind: Kind,
    name: String,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl TestDb {
    fn new(kind: Kind) -> TestDb {
        let name = format!(
            "collector_e2e{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let admin = match kind {
            Kind::Postgres => "postgres",
            Kind::Mysql => "",
        };
        let force = if kind == Kind::Postgres {
            " WITH (FORCE)"
        } else {
            ""
        };
        sql(
            kind,
            admin,
            &format!("DROP DATABASE IF EXISTS {name}{force}"),
        );
        sql(kind, admin, &format!("CREATE DATABASE {name}"));
        TestDb { kind, name }
    }

    /// The connection string the daemon gets, in ceilometer's spelling.
    fn url(&self) -> String {
        match self.kind {
            Kind::Postgres => format!("postgresql+psycopg2://{}/{}", base(self.kind), self.name),
            Kind::Mysql => format!(
                "mysql+pymysql://{}/{}?charset=utf8",
                base(self.kind),
                self.name
            ),
        }
    }

    fn url_via(&self, addr: &str) -> String {
        let (h, p) = host_port(self.kind);
        self.url().replacen(&format!("{h}:{p}"), addr, 1)
    }

    fn query(&self, statement: &str) -> String {
        sql(self.kind, &self.name, statement)
    }

    fn count(&self) -> i64 {
        self.query("SELECT COUNT(*) FROM sample")
            .parse()
            .unwrap_or(-1)
    }

    fn wait_count(&self, n: i64) -> i64 {
        let mut last = 0;
        wait_for(WAIT, || {
            last = self.count();
            (last >= n).then_some(())
        });
        last
    }

    fn message_ids(&self) -> Vec<String> {
        self.query("SELECT message_id FROM sample")
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, force) = match self.kind {
            Kind::Postgres => ("postgres", " WITH (FORCE)"),
            Kind::Mysql => ("", ""),
        };
        let _ = std::panic::catch_unwind(|| {
            sql(
                self.kind,
                admin,
                &format!("DROP DATABASE IF EXISTS {}{force}", self.name),
            )
        });
    }
}

/// Start a daemon whose `[database] connection` is `connection`.
fn start(setup: Setup, connection: &str) -> Daemon {
    Daemon::start(setup.connection(connection))
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// Samples over UDP, TCP (ceilometer's framing) and RPC through two workers all land once.
fn collects_udp_tcp_and_rpc_with_two_workers(kind: Kind) {
    let db = TestDb::new(kind);
    let d = start(Setup::default().workers(2), &db.url());
    let udp = ids("udp", 60);
    send_udp(
        d.udp.unwrap(),
        &udp.iter()
            .map(|id| encode(&sample(id, SECRET)))
            .collect::<Vec<_>>(),
    );
    let tcp = ids("tcp", 60);
    let mut s = TcpStream::connect(d.tcp.unwrap()).unwrap();
    for id in &tcp {
        s.write_all(&tcp_frame(&sample(id, SECRET))).unwrap();
    }
    let rpc = ids("rpc", 300);
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    for chunk in rpc.chunks(100) {
        let r = c
            .call(chunk.iter().map(|id| sample(id, SECRET)).collect())
            .unwrap();
        assert_eq!(
            (r.error.as_deref(), r.stored, r.duplicates),
            (None, 100, 0),
            "{r:?}"
        );
    }
    // A replay is all duplicates.
    let r = c
        .call(rpc[..100].iter().map(|id| sample(id, SECRET)).collect())
        .unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 100), "{r:?}");
    // UDP may drop under load on a busy machine, so only TCP and RPC are counted exactly;
    // loopback UDP at this rate is not expected to lose anything either.
    let want = (udp.len() + tcp.len() + rpc.len()) as i64;
    assert_eq!(db.wait_count(want), want, "log:\n{}", d.log());
    let got: BTreeSet<String> = db.message_ids().into_iter().collect();
    let all: BTreeSet<String> = udp.iter().chain(&tcp).chain(&rpc).cloned().collect();
    assert_eq!(got, all);
    // Both workers served (each logs that it is serving).
    assert!(d.log_count("serving") >= 2);
}

/// Two daemons on their own ports write one database; their RPC clients send overlapping
/// batches at once. Nothing is lost or stored twice, and the replies account for every sample.
fn two_daemons_share_one_database(kind: Kind) {
    let db = TestDb::new(kind);
    let a = start(Setup::default().workers(2), &db.url());
    let b = start(Setup::default().workers(2), &db.url());
    assert_ne!(a.rpc, b.rpc);
    let shared = ids("shared", 1000);
    let run = |addr: std::net::SocketAddr, own: &'static str| {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let mut c = RpcClient::connect(addr).unwrap();
            let (mut stored, mut dups) = (0i64, 0i64);
            let mine = ids(own, 1000);
            for (i, chunk) in mine.chunks(100).enumerate() {
                // Half own ids, half shared with the other daemon's client.
                let mut batch: Vec<_> = chunk.iter().map(|id| sample(id, SECRET)).collect();
                batch.extend(
                    shared[i * 100..(i + 1) * 100]
                        .iter()
                        .map(|id| sample(id, SECRET)),
                );
                // Retry on an error answer, as ceilometer's publisher does.
                let deadline = Instant::now() + WAIT;
                loop {
                    let r = c.call(batch.clone()).unwrap();
                    match r.error {
                        None => {
                            stored += r.stored;
                            dups += r.duplicates;
                            break;
                        }
                        Some(e) if Instant::now() < deadline => {
                            eprintln!("retrying after: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Some(e) => panic!("{e}"),
                    }
                }
            }
            (stored, dups)
        })
    };
    let ta = run(a.rpc.unwrap(), "a");
    let tb = run(b.rpc.unwrap(), "b");
    let (sa, da) = ta.join().unwrap();
    let (sb, db_) = tb.join().unwrap();
    assert_eq!(sa + da, 2000);
    assert_eq!(sb + db_, 2000);
    assert_eq!(sa + sb, 3000, "each shared id stored by exactly one daemon");
    assert_eq!(da + db_, 1000);
    assert_eq!(db.count(), 3000);
    assert_eq!(
        db.query("SELECT COUNT(DISTINCT message_id) FROM sample"),
        "3000"
    );
    assert_eq!(db.query("SELECT COUNT(*) FROM resource"), "1");
}

/// The database is down when the daemon starts: the workers start anyway, RPC answers
/// "storage unavailable" (clients retry), and once the server is back the same requests are
/// stored. A crash of the server later is survived the same way.
fn a_database_down_at_start_is_waited_for(kind: Kind) {
    let db = TestDb::new(kind);
    let (h, p) = host_port(kind);
    let proxy = Proxy::start(&format!("{h}:{p}"));
    proxy.set_up(false);
    let d = start(Setup::default().workers(1), &db.url_via(&proxy.addr));
    let batch: Vec<_> = ids("down", 10)
        .iter()
        .map(|id| sample(id, SECRET))
        .collect();
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let r = c.call(batch.clone()).unwrap();
    let err = r.error.expect("an error while the database is down");
    assert!(err.contains("storage unavailable"), "{err}");
    proxy.set_up(true);
    let stored = wait_for(WAIT, || {
        let r = c.call(batch.clone()).unwrap();
        r.error.is_none().then_some(r.stored)
    });
    assert_eq!(stored, Some(10), "log:\n{}", d.log());
    // Crash: connections cut and refused for a moment.
    proxy.set_up(false);
    proxy.cut();
    let batch2: Vec<_> = ids("crash", 10)
        .iter()
        .map(|id| sample(id, SECRET))
        .collect();
    let r = c.call(batch2.clone()).unwrap();
    assert!(r.error.is_some(), "{r:?}");
    proxy.set_up(true);
    let stored = wait_for(WAIT, || {
        let r = c.call(batch2.clone()).unwrap();
        r.error.is_none().then_some(r.stored)
    });
    assert_eq!(stored, Some(10));
    assert_eq!(db.count(), 20);
    // One line when the connection went, one when it came back — not one per request.
    assert!(d.log_count("connected again") >= 1, "log:\n{}", d.log());
    assert!(d.log_count("connection lost") <= 2, "log:\n{}", d.log());
}

/// The graves (expired days' tables) left in the database.
fn graves(db: &TestDb) -> i64 {
    let q = match db.kind {
        Kind::Postgres => {
            "SELECT COUNT(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 'sample\\_expired%'"
        }
        Kind::Mysql => {
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()
               AND TABLE_NAME LIKE 'sample\\_expired%'"
        }
    };
    db.query(q).parse().unwrap_or(-1)
}

/// `sample(id)` stamped `ago` before now (the support sample is a month old), signed again.
fn sample_ago(id: &str, ago: Duration) -> meter::Value {
    let mut v = sample(id, SECRET);
    let at = (time::OffsetDateTime::now_utc() - ago)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    if let Some(t) = v.get_mut("timestamp") {
        *t = meter::Value::Str(at);
    }
    meter::signature::sign(&mut v, SECRET);
    v
}

/// Samples 15 s old in 10 s partitions, then a daemon with a 20 s TTL whose worker 0 expires
/// every 0.5 s on its retention thread: their partition expires some seconds after the daemon
/// starts, while four clients keep a full batch always waiting (the writer never idle, so it
/// never takes a retention step itself). The partition's grave is dropped under that load.
fn an_expired_day_is_dropped_under_a_steady_load(kind: Kind) {
    let db = TestDb::new(kind);
    {
        let d = start(
            Setup::default().workers(1).database("partition_span = 10"),
            &db.url(),
        );
        let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
        let old = ids("old", 10);
        let r = c
            .call(
                old.iter()
                    .map(|id| sample_ago(id, Duration::from_secs(15)))
                    .collect(),
            )
            .unwrap();
        assert_eq!(r.stored, 10, "{r:?}");
    }
    // The load, made before the daemon starts so that it begins at once: four clients on
    // threads of their own, each cycling through 100 calls of a full batch.
    let loads: Vec<Vec<Vec<meter::Value>>> = (0..4)
        .map(|k| {
            (0..100)
                .map(|n| {
                    (0..10)
                        .map(|i| sample_ago(&format!("new-{k}-{n}-{i}"), Duration::ZERO))
                        .collect()
                })
                .collect()
        })
        .collect();
    let d = start(
        Setup::default()
            .workers(1)
            .collector("batch_size = 10")
            .database("partition_span = 10")
            .database("metering_time_to_live = 20")
            .database("expiry_interval = 0.5"),
        &db.url(),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = loads
        .into_iter()
        .map(|batches| {
            let (stop, to) = (stop.clone(), d.rpc.unwrap());
            std::thread::spawn(move || {
                let mut c = RpcClient::connect(to).unwrap();
                let mut calls = 0;
                for batch in batches.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = c.call(batch.clone()).unwrap();
                    assert_eq!(r.error.as_deref(), None, "{r:?}");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let load = std::thread::spawn(move || {
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .sum::<usize>()
    });
    let old_left = || db.query("SELECT COUNT(*) FROM sample WHERE message_id LIKE 'old-%'");
    let deadline = Instant::now() + WAIT;
    while !(old_left() == "0" && graves(&db) == 0) {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            let _ = load.join();
            panic!("graves left: {}; log:\n{}", graves(&db), d.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let calls = load.join().unwrap();
    assert!(calls > 0);
}

#[test]
fn postgresql_drops_an_expired_day_under_a_steady_load() {
    an_expired_day_is_dropped_under_a_steady_load(Kind::Postgres);
}

#[test]
fn mariadb_drops_an_expired_day_under_a_steady_load() {
    an_expired_day_is_dropped_under_a_steady_load(Kind::Mysql);
}

#[test]
fn postgresql_collects_udp_tcp_and_rpc_with_two_workers() {
    collects_udp_tcp_and_rpc_with_two_workers(Kind::Postgres);
}

#[test]
fn postgresql_two_daemons_share_one_database() {
    two_daemons_share_one_database(Kind::Postgres);
}

#[test]
fn postgresql_down_at_start_is_waited_for() {
    a_database_down_at_start_is_waited_for(Kind::Postgres);
}

#[test]
fn mariadb_collects_udp_tcp_and_rpc_with_two_workers() {
    collects_udp_tcp_and_rpc_with_two_workers(Kind::Mysql);
}

#[test]
fn mariadb_two_daemons_share_one_database() {
    two_daemons_share_one_database(Kind::Mysql);
}

#[test]
fn mariadb_down_at_start_is_waited_for() {
    a_database_down_at_start_is_waited_for(Kind::Mysql);
}

#[test]
fn refused_credentials_are_a_boot_error() {
    // Unlike a server that is down, a refused login needs an operator: the worker fails to
    // boot and the launcher reports it instead of serving errors forever.
    let db = TestDb::new(Kind::Postgres);
    let (h, p) = host_port(Kind::Postgres);
    let url = format!("postgresql://no_such_role_e2e:pw@{h}:{p}/{}", db.name);
    let dir = tempfile::tempdir().unwrap();
    let text = Setup::default().render(dir.path());
    let sqlite_line = format!(
        "connection = \"sqlite:///{}/collector.db\"",
        dir.path().display()
    );
    let text = text.replace(&sqlite_line, &format!("connection = \"{url}\""));
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(bin("collector"))
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(WAIT, || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let log = std::fs::read_to_string(dir.path().join("collector.log")).unwrap_or_default();
    let status = status.expect("the daemon exits");
    assert!(!status.success());
    let all = format!("{err}{log}");
    assert!(all.contains("no_such_role_e2e"), "{all}");
    assert!(!all.contains(":pw@"), "password shown: {all}");
}

/// The daemon on PostgreSQL over TLS (issue 17): `sslmode=verify-full` with the server's
/// snakeoil certificate as root, host `localhost` as the certificate names it; every
/// connection the workers hold is encrypted by the server's own account (`pg_stat_ssl`).
#[test]
fn postgres_over_tls_every_worker_connection_is_encrypted() {
    let db = TestDb::new(Kind::Postgres);
    let (_, port) = host_port(Kind::Postgres);
    let url = format!(
        "postgresql://{}@localhost:{port}/{}?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ssl-cert-snakeoil.pem",
        user(Kind::Postgres),
        db.name
    );
    let d = start(Setup::default().workers(2), &url);
    let rpc = ids("tls", 200);
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    for chunk in rpc.chunks(100) {
        let r = c
            .call(chunk.iter().map(|id| sample(id, SECRET)).collect())
            .unwrap();
        assert_eq!((r.error.as_deref(), r.stored), (None, 100), "{r:?}");
    }
    assert_eq!(db.count(), 200);
    let sessions = db.query(&format!(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = '{}' AND a.application_name = 'collector'",
        db.name
    ));
    let sessions: Vec<&str> = sessions.lines().collect();
    assert!(!sessions.is_empty(), "no daemon session found");
    assert!(
        sessions.iter().all(|s| *s == "t"),
        "clear sessions: {sessions:?}"
    );
}

/// The daemon on MariaDB over TLS: an account the server admits only over TLS, the test CA,
/// the chain checked (`ssl_ca`; PyMySQL's default then is to verify the certificate).
#[test]
fn mariadb_over_tls_stores_through_an_account_that_requires_it() {
    let db = TestDb::new(Kind::Mysql);
    let account = format!("tls_{}", db.name.trim_start_matches("collector_"));
    sql(
        Kind::Mysql,
        "",
        &format!("DROP USER IF EXISTS '{account}'@'%'"),
    );
    sql(
        Kind::Mysql,
        "",
        &format!("CREATE USER '{account}'@'%' IDENTIFIED BY 'pw' REQUIRE SSL"),
    );
    sql(
        Kind::Mysql,
        "",
        &format!("GRANT ALL ON `{}`.* TO '{account}'@'%'", db.name),
    );
    let (host, port) = host_port(Kind::Mysql);
    let ca = std::env::var("COLLECTOR_TEST_TLS_DIR")
        .unwrap_or_else(|_| "/etc/collector-test-tls".into());
    let url = format!(
        "mysql+pymysql://{account}:pw@{host}:{port}/{}?charset=utf8&ssl_ca={ca}/ca.pem",
        db.name
    );
    let d = start(Setup::default().workers(2), &url);
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let rpc = ids("tls", 100);
    let r = c
        .call(rpc.iter().map(|id| sample(id, SECRET)).collect())
        .unwrap();
    assert_eq!((r.error.as_deref(), r.stored), (None, 100), "{r:?}");
    assert_eq!(db.count(), 100);
    drop(d);
    sql(
        Kind::Mysql,
        "",
        &format!("DROP USER IF EXISTS '{account}'@'%'"),
    );
}

/// A database the daemon cannot reach at start (here: a TLS name mismatch, connecting by
/// address to a server whose certificate names `localhost`) is reported at once: the handshake
/// failure is retried, not a boot error, and `collectorctl status` and `/readyz` say why
/// before any sample arrives.
#[test]
fn a_tls_failure_at_start_shows_in_status_and_readyz() {
    let db = TestDb::new(Kind::Postgres);
    let (host, port) = host_port(Kind::Postgres);
    let url = format!(
        "postgresql://{}@{host}:{port}/{}?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ssl-cert-snakeoil.pem",
        user(Kind::Postgres),
        db.name
    );
    let d = start(Setup::default().workers(1), &url);
    let status = wait_for(WAIT, || {
        let (code, out, _) = d.ctl(&["status", "--output", "json"]);
        (code == 0 && out.contains("name mismatch")).then_some(out)
    });
    assert!(status.is_some(), "status never showed the TLS failure");
    let addr = d.metrics_addr().expect("metrics endpoint");
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503") || answer.starts_with("HTTP/1.0 503"),
        "{answer}"
    );
}
