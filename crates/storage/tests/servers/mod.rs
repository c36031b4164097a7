//! Per-test databases on every backend the conformance suite runs against, plus the SQL the
//! tests use to look behind the driver (counting rows, killing the driver's connections).
//!
//! Servers: PostgreSQL at `COLLECTOR_TEST_POSTGRES` (default `postgresql://postgres@127.0.0.1:5432`)
//! and MariaDB/MySQL at `COLLECTOR_TEST_MYSQL` (default `mysql://root@127.0.0.1:3306`). Each test
//! creates its own database and drops it when its [`TestDb`] is dropped. A server that does not
//! answer fails the test with a message saying so: CI starts both.
#![allow(dead_code)]

pub mod proxy;

use std::sync::atomic::{AtomicUsize, Ordering};
use storage::{Storage, StorageOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
    Mysql,
}

impl Kind {
    /// `user@host:port` base URL of the server (without scheme and database).
    fn base(self) -> String {
        let (var, default) = match self {
            Kind::Postgres => (
                "COLLECTOR_TEST_POSTGRES",
                "postgresql://postgres@127.0.0.1:5432",
            ),
            Kind::Mysql => ("COLLECTOR_TEST_MYSQL", "mysql://root@127.0.0.1:3306"),
            Kind::Sqlite => return String::new(),
        };
        let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
        url.split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/').to_string())
            .unwrap_or(url)
    }

    /// `host:port` of the server, for the proxy.
    pub fn addr(self) -> String {
        let base = self.base();
        base.rsplit_once('@')
            .map_or(base.clone(), |(_, a)| a.to_string())
    }

    pub fn scheme(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgresql",
            Kind::Mysql => "mysql",
        }
    }
}

/// A connection for looking behind the driver.
pub enum Admin {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
    Mysql(mysql::Conn),
}

fn unreachable(kind: Kind, url: &str, e: &dyn std::fmt::Display) -> ! {
    panic!(
        "\n*** The {kind:?} server at {url} is not reachable: {e}\n*** The conformance suite needs \
         it (CI's .ci/run starts PostgreSQL and MariaDB). Start it, or point \
         COLLECTOR_TEST_POSTGRES / COLLECTOR_TEST_MYSQL at one.\n"
    )
}

/// A connection to the server's maintenance database (to create and drop test databases).
fn server_admin(kind: Kind) -> Admin {
    let base = kind.base();
    match kind {
        Kind::Postgres => {
            let url = format!("postgresql://{base}/postgres");
            match postgres::Client::connect(&url, postgres::NoTls) {
                Ok(c) => Admin::Postgres(c),
                Err(e) => unreachable(kind, &url, &e),
            }
        }
        Kind::Mysql => {
            let url = format!("mysql://{base}/");
            let opts = mysql::Opts::from_url(&url).expect("mysql admin url");
            let opts = mysql::OptsBuilder::from_opts(opts).prefer_socket(false);
            match mysql::Conn::new(opts) {
                Ok(c) => Admin::Mysql(c),
                Err(e) => unreachable(kind, &url, &e),
            }
        }
        Kind::Sqlite => unreachable!("sqlite has no server"),
    }
}

/// The driver URL with `COLLECTOR_TEST_POSTGRES_PARAMS` / `COLLECTOR_TEST_MYSQL_PARAMS`
/// appended: scripts/test runs the server half of the conformance suite a second time with
/// TLS parameters there, so every driver test also runs over TLS.
fn with_test_params(kind: Kind, url: String) -> String {
    let var = match kind {
        Kind::Postgres => "COLLECTOR_TEST_POSTGRES_PARAMS",
        Kind::Mysql => "COLLECTOR_TEST_MYSQL_PARAMS",
        Kind::Sqlite => return url,
    };
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}{p}")
        }
        _ => url,
    }
}

/// One test's own database, dropped (with any connections left to it) on drop.
pub struct TestDb {
    pub kind: Kind,
    /// The driver URL.
    pub url: String,
    /// The database name (server) or file path (SQLite).
    pub name: String,
    _dir: Option<tempfile::TempDir>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl TestDb {
    pub fn new(kind: Kind) -> TestDb {
        let name = format!(
            "collector_t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("c.db");
                TestDb {
                    kind,
                    url: format!("sqlite:///{}", path.display()),
                    name: path.display().to_string(),
                    _dir: Some(dir),
                }
            }
            Kind::Postgres => {
                let Admin::Postgres(mut c) = server_admin(kind) else {
                    unreachable!()
                };
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .expect("drop stale test database");
                c.batch_execute(&format!("CREATE DATABASE {name}"))
                    .expect("create test database");
                TestDb {
                    kind,
                    url: with_test_params(kind, format!("postgresql://{}/{name}", kind.base())),
                    name,
                    _dir: None,
                }
            }
            Kind::Mysql => {
                let Admin::Mysql(mut c) = server_admin(kind) else {
                    unreachable!()
                };
                use mysql::prelude::Queryable;
                c.query_drop(format!("DROP DATABASE IF EXISTS {name}"))
                    .expect("drop stale test database");
                c.query_drop(format!("CREATE DATABASE {name}"))
                    .expect("create test database");
                TestDb {
                    kind,
                    url: with_test_params(
                        kind,
                        format!("mysql+pymysql://{}/{name}?charset=utf8", kind.base()),
                    ),
                    name,
                    _dir: None,
                }
            }
        }
    }

    pub fn open(&self) -> Box<dyn Storage> {
        storage::open(&self.url, &StorageOptions::default())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url))
    }

    /// The same database reached through `addr` (`127.0.0.1:port`, e.g. a proxy).
    pub fn url_via(&self, addr: &str) -> String {
        let server = self.kind.addr();
        self.url.replacen(&server, addr, 1)
    }

    /// A direct connection to this test's database.
    pub fn admin(&self) -> Admin {
        match self.kind {
            Kind::Sqlite => {
                let c = rusqlite::Connection::open(&self.name).expect("open sqlite");
                c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                Admin::Sqlite(c)
            }
            Kind::Postgres => Admin::Postgres(
                postgres::Client::connect(
                    &format!("postgresql://{}/{}", self.kind.base(), self.name),
                    postgres::NoTls,
                )
                .expect("connect to test database"),
            ),
            Kind::Mysql => {
                let opts =
                    mysql::Opts::from_url(&format!("mysql://{}/{}", self.kind.base(), self.name))
                        .expect("url");
                Admin::Mysql(
                    mysql::Conn::new(mysql::OptsBuilder::from_opts(opts).prefer_socket(false))
                        .expect("connect to test database"),
                )
            }
        }
    }

    /// The first column of the first row of `sql`, as an integer.
    pub fn scalar(&self, sql: &str) -> i64 {
        match self.admin() {
            Admin::Sqlite(c) => c.query_row(sql, [], |r| r.get(0)).expect(sql),
            Admin::Postgres(mut c) => {
                let row = c.query_one(sql, &[]).expect(sql);
                // COUNT is BIGINT, an INTEGER column is not.
                row.try_get::<_, i64>(0)
                    .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
                    .expect(sql)
            }
            Admin::Mysql(mut c) => {
                use mysql::prelude::Queryable;
                c.query_first::<i64, _>(sql).expect(sql).expect("a row")
            }
        }
    }

    /// Run one statement that returns no rows.
    pub fn execute(&self, sql: &str) {
        match self.admin() {
            Admin::Sqlite(c) => {
                c.execute_batch(sql).expect(sql);
            }
            Admin::Postgres(mut c) => {
                c.batch_execute(sql).expect(sql);
            }
            Admin::Mysql(mut c) => {
                use mysql::prelude::Queryable;
                c.query_drop(sql).expect(sql);
            }
        }
    }

    /// Every stored message_id.
    pub fn message_ids(&self) -> Vec<String> {
        let sql = "SELECT message_id FROM sample";
        match self.admin() {
            Admin::Sqlite(c) => {
                let mut st = c.prepare(sql).unwrap();
                let rows = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
                rows.map(|r| r.unwrap()).collect()
            }
            Admin::Postgres(mut c) => c
                .query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect(),
            Admin::Mysql(mut c) => {
                use mysql::prelude::Queryable;
                c.query(sql).unwrap()
            }
        }
    }

    /// Kill every other session on this database; returns how many.
    pub fn kill_connections(&self) -> usize {
        kill_sessions(self.kind, &self.name)
    }
}

/// Kill every session on database `name` but our own; returns how many.
pub fn kill_sessions(kind: Kind, name: &str) -> usize {
    match kind {
        Kind::Sqlite => 0,
        Kind::Postgres => {
            let mut c = postgres::Client::connect(
                &format!("postgresql://{}/{name}", kind.base()),
                postgres::NoTls,
            )
            .expect("connect to test database");
            c.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .expect("pg_terminate_backend")
            .len()
        }
        Kind::Mysql => {
            use mysql::prelude::Queryable;
            let Admin::Mysql(mut c) = server_admin(kind) else {
                unreachable!()
            };
            let ids: Vec<u64> = c
                .exec(
                    "SELECT ID FROM information_schema.PROCESSLIST
                      WHERE DB = ? AND ID <> CONNECTION_ID()",
                    (name,),
                )
                .expect("processlist");
            for id in &ids {
                // It may be gone already.
                let _ = c.query_drop(format!("KILL {id}"));
            }
            ids.len()
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match self.kind {
            Kind::Sqlite => {}
            Kind::Postgres => {
                if let Admin::Postgres(mut c) = server_admin(self.kind) {
                    let _ = c.batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.name
                    ));
                }
            }
            Kind::Mysql => {
                if let Admin::Mysql(mut c) = server_admin(self.kind) {
                    use mysql::prelude::Queryable;
                    let _ = c.query_drop(format!("DROP DATABASE IF EXISTS {}", self.name));
                }
            }
        }
    }
}
