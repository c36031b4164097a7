//! The daemon's configuration (DESIGN §3): TOML, ceilometer's option names, embedded defaults.
//!
//! Every section and key has its default here and only here; the defaults are the embedded
//! mode (SQLite under `./data`, loopback ports). Unknown keys and wrong types are errors that
//! name the key and the line, because a typo silently ignored is an outage found later.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// ceilometer's default telemetry secret: signing with it is no signing at all.
pub const CEILOMETER_DEFAULT_SECRET: &str = "change this for valid signing";

/// The HTTP metrics endpoint's default port (DESIGN §3's suggestion; not registered with
/// Prometheus's port list, and free of the exporters commonly run beside ceilometer).
pub const DEFAULT_METRICS_PORT: u16 = 9552;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub service: ServiceConfig,
    pub collector: CollectorConfig,
    pub publisher: PublisherConfig,
    pub messaging: MessagingConfig,
    pub database: DatabaseConfig,
    pub dispatcher_file: DispatcherFileConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// 0 = number of CPUs.
    pub workers: usize,
    pub pidfile: String,
    pub control_socket: String,
    pub log_file: String,
    pub log_level: String,
    pub graceful_shutdown_timeout: f64,
    pub worker_timeout: f64,
    pub user: String,
    pub group: String,
    /// `text` (default) or `json`: one JSON object per line.
    pub log_format: String,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz); "" disables it.
    pub metrics_address: String,
    pub metrics_port: u16,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            workers: 0,
            pidfile: String::new(),
            control_socket: "data/collector.sock".into(),
            log_file: String::new(),
            log_level: "info".into(),
            graceful_shutdown_timeout: 30.0,
            worker_timeout: 30.0,
            user: String::new(),
            group: String::new(),
            log_format: "text".into(),
            metrics_address: "127.0.0.1".into(),
            metrics_port: DEFAULT_METRICS_PORT,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    pub udp_address: String,
    pub udp_port: u16,
    /// One `SO_REUSEPORT` UDP socket per worker instead of one socket all workers share.
    pub udp_reuseport: bool,
    pub tcp_address: String,
    pub tcp_port: u16,
    pub rpc_address: String,
    pub rpc_port: u16,
    pub rpc_socket: String,
    pub batch_size: usize,
    pub batch_timeout: f64,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub idle_timeout: f64,
    /// Bytes one worker's connections may buffer in total (partial frames).
    pub max_buffered_bytes: usize,
    /// Seconds a frame may take from its first byte to its last.
    pub frame_timeout: f64,
    /// Elements (array items, map keys and values) one RPC or TCP frame may hold.
    pub max_frame_elements: u64,
    pub dispatchers: Vec<String>,
    pub requeue_sample_on_dispatcher_error: bool,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            udp_address: "127.0.0.1".into(),
            udp_port: 4952,
            udp_reuseport: false,
            tcp_address: "127.0.0.1".into(),
            tcp_port: 4952,
            rpc_address: "127.0.0.1".into(),
            rpc_port: 4953,
            rpc_socket: String::new(),
            batch_size: 1000,
            batch_timeout: 0.05,
            max_frame_bytes: 16 * 1024 * 1024,
            max_connections: 1024,
            idle_timeout: 300.0,
            max_buffered_bytes: 256 * 1024 * 1024,
            frame_timeout: 60.0,
            max_frame_elements: 1 << 20,
            dispatchers: vec!["database".into()],
            requeue_sample_on_dispatcher_error: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherConfig {
    pub telemetry_secret: String,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            telemetry_secret: CEILOMETER_DEFAULT_SECRET.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MessagingConfig {
    pub transport_url: String,
    pub control_exchange: String,
    pub metering_topic: String,
    pub amqp_durable_queues: bool,
    pub rabbit_qos_prefetch_count: u16,
    /// TLS to the broker (oslo.messaging's `[oslo_messaging_rabbit] ssl`); also on with an
    /// `amqps://` URL or `?ssl=1`.
    pub ssl: bool,
    /// CA file that signed the broker's certificate: given, the certificate's chain and name
    /// are checked (oslo.messaging's `ssl_ca_file`); empty, TLS encrypts without checking.
    pub ssl_ca_file: String,
    /// Client certificate and key for brokers that ask for one (`ssl_cert_file`,
    /// `ssl_key_file`).
    pub ssl_cert_file: String,
    pub ssl_key_file: String,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            transport_url: String::new(),
            control_exchange: "ceilometer".into(),
            metering_topic: "metering".into(),
            amqp_durable_queues: false,
            rabbit_qos_prefetch_count: 1000,
            ssl: false,
            ssl_ca_file: String::new(),
            ssl_cert_file: String::new(),
            ssl_key_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub connection: String,
    pub metering_time_to_live: i64,
    /// SQLite `PRAGMA synchronous` (OFF, NORMAL, FULL, EXTRA). NORMAL in WAL mode survives a
    /// process crash; FULL also survives power loss.
    pub sqlite_synchronous: String,
    /// Seconds of sample timestamps per time partition (UTC-aligned).
    pub partition_span: u64,
    /// Seconds between retention passes (worker 0's writer thread, also when idle).
    pub expiry_interval: f64,
    /// Rollup granularities and how long each keeps its buckets (seconds; 0: forever).
    pub rollups: Vec<RollupConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RollupConfig {
    pub granularity: u64,
    pub time_to_live: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            connection: "sqlite:///data/collector.db".into(),
            metering_time_to_live: -1,
            sqlite_synchronous: "NORMAL".into(),
            partition_span: 86_400,
            expiry_interval: 600.0,
            rollups: storage::rollup::default_granularities()
                .into_iter()
                .map(|g| RollupConfig {
                    granularity: g.seconds,
                    time_to_live: g.retention_seconds,
                })
                .collect(),
        }
    }
}

impl DatabaseConfig {
    /// The storage driver's options for this section.
    pub fn storage_options(&self) -> storage::StorageOptions {
        storage::StorageOptions {
            sqlite_synchronous: self.sqlite_synchronous.clone(),
            partition_span_seconds: self.partition_span,
            time_to_live_seconds: (self.metering_time_to_live > 0)
                .then_some(self.metering_time_to_live as u64),
            rollups: self
                .rollups
                .iter()
                .map(|r| storage::rollup::Granularity {
                    seconds: r.granularity,
                    retention_seconds: r.time_to_live,
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherFileConfig {
    pub file_path: String,
    pub max_bytes: u64,
    pub backup_count: u32,
}

impl Default for DispatcherFileConfig {
    fn default() -> Self {
        DispatcherFileConfig {
            file_path: "data/samples.log".into(),
            max_bytes: 0,
            backup_count: 0,
        }
    }
}

/// A configuration that could not be loaded; the message names the file, key and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config{where_}: {message}", where_ = .path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        message: String,
        path: Option<PathBuf>,
    },
}

impl Config {
    /// Load from a file, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let c = Config::default();
            c.validate().map_err(|message| ConfigError::Invalid {
                message,
                path: None,
            })?;
            return Ok(c);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let c = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        c.validate().map_err(|message| ConfigError::Invalid {
            message,
            path: Some(path.to_path_buf()),
        })?;
        Ok(c)
    }

    /// Parse TOML text; the error text carries line and column and the offending key, never
    /// the offending line itself (it may hold a secret: `telemetry_secret = "s3cret…`), nor
    /// the message when that line sets a secret (type errors quote the value).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| {
            let Some(span) = e.span() else {
                return e.message().trim_end().to_string();
            };
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = text[line_start..start].chars().count() + 1;
            let line_text = text[line_start..].lines().next().unwrap_or("");
            let key = line_text.split('=').next().unwrap_or("").trim();
            let secret = line_text.contains('=')
                && (is_secret_key(key)
                    || key == "connection"
                    || key == "transport_url"
                    || line_text.contains("://"));
            if secret {
                format!("line {line}, column {column}: invalid value for {key} (not shown: it may hold a secret)")
            } else if line_text.contains('=') && !key.is_empty() {
                format!("line {line}, column {column}, {key}: {}", e.message().trim_end())
            } else {
                format!("line {line}, column {column}: {}", e.message().trim_end())
            }
        })
    }

    /// Semantic checks serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.collector;
        if c.batch_size == 0 {
            return Err("[collector] batch_size must be at least 1".into());
        }
        if !(c.batch_timeout.is_finite() && c.batch_timeout >= 0.0) {
            return Err("[collector] batch_timeout must be a non-negative number".into());
        }
        if c.max_frame_bytes < 64 {
            return Err("[collector] max_frame_bytes must be at least 64".into());
        }
        if c.max_connections == 0 {
            return Err("[collector] max_connections must be at least 1".into());
        }
        if !(c.idle_timeout.is_finite() && c.idle_timeout > 0.0) {
            return Err("[collector] idle_timeout must be a positive number".into());
        }
        if c.max_buffered_bytes < c.max_frame_bytes {
            return Err(format!(
                "[collector] max_buffered_bytes ({}) must be at least max_frame_bytes ({})",
                c.max_buffered_bytes, c.max_frame_bytes
            ));
        }
        if c.max_frame_elements == 0 {
            return Err("[collector] max_frame_elements must be at least 1".into());
        }
        if !(c.frame_timeout.is_finite() && c.frame_timeout > 0.0) {
            return Err("[collector] frame_timeout must be a positive number".into());
        }
        for d in &c.dispatchers {
            if d != "database" && d != "file" {
                return Err(format!(
                    "[collector] dispatchers: unknown dispatcher {d:?}; known: database, file"
                ));
            }
        }
        let d = &self.database;
        if d.partition_span == 0 {
            return Err("[database] partition_span: must be > 0 seconds".into());
        }
        if !(d.expiry_interval.is_finite() && d.expiry_interval > 0.0) {
            return Err(format!(
                "[database] expiry_interval: must be > 0 seconds, not {}",
                d.expiry_interval
            ));
        }
        if let Some(r) = d.rollups.iter().find(|r| r.granularity == 0) {
            return Err(format!(
                "[database] rollups: granularity must be > 0 seconds ({r:?})"
            ));
        }
        let s = &self.service;
        if !matches!(
            s.log_level.to_ascii_lowercase().as_str(),
            "error" | "warn" | "warning" | "info" | "debug" | "trace"
        ) {
            return Err(format!(
                "[service] log_level: unknown level {:?}; known: error, warn, info, debug, trace",
                s.log_level
            ));
        }
        if !matches!(s.log_format.as_str(), "text" | "json") {
            return Err(format!(
                "[service] log_format: unknown format {:?}; known: text, json",
                s.log_format
            ));
        }
        if !(s.graceful_shutdown_timeout.is_finite() && s.graceful_shutdown_timeout >= 0.0) {
            return Err("[service] graceful_shutdown_timeout must be a non-negative number".into());
        }
        if !(s.worker_timeout.is_finite() && s.worker_timeout > 0.0) {
            return Err("[service] worker_timeout must be a positive number".into());
        }
        if !matches!(
            self.database
                .sqlite_synchronous
                .to_ascii_uppercase()
                .as_str(),
            "OFF" | "NORMAL" | "FULL" | "EXTRA"
        ) {
            return Err(format!(
                "[database] sqlite_synchronous: {:?} is not one of OFF, NORMAL, FULL, EXTRA",
                self.database.sqlite_synchronous
            ));
        }
        // The transport URL and the TLS files: read and parsed, not connected to.
        crate::amqp::tls_config(&self.messaging)?;
        Ok(())
    }

    pub fn has_dispatcher(&self, name: &str) -> bool {
        self.collector.dispatchers.iter().any(|d| d == name)
    }

    /// `host:port` of the HTTP metrics endpoint, `None` when disabled.
    pub fn metrics_endpoint(&self) -> Option<String> {
        let a = &self.service.metrics_address;
        if a.is_empty() {
            None
        } else if a.contains(':') && !a.starts_with('[') {
            Some(format!("[{a}]:{}", self.service.metrics_port))
        } else {
            Some(format!("{a}:{}", self.service.metrics_port))
        }
    }

    /// The number of workers to run: the configured one, or one per CPU.
    pub fn worker_count(&self) -> usize {
        if self.service.workers > 0 {
            self.service.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// The effective configuration as TOML, with secrets masked, for `--check-config` and the
    /// control socket's `config`.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        if !c.publisher.telemetry_secret.is_empty() {
            c.publisher.telemetry_secret = "***".into();
        }
        c.database.connection = mask_url_password(&c.database.connection);
        c.messaging.transport_url = mask_url_password(&c.messaging.transport_url);
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// `scheme://user:secret@host/db?password=x` → `scheme://user:***@host/db?password=***`:
/// the userinfo password and every query parameter whose name says it is a secret.
pub fn mask_url_password(url: &str) -> String {
    let url = &mask_query_secrets(url);
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let auth = &rest[..auth_end];
    match (auth.rfind('@'), auth.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &auth[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

/// Whether a URL query parameter (or similar key) names a secret: `password`, `passwd`,
/// `sslpassword`, `pwd`, `secret`, `token`, ….
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "credential"]
        .iter()
        .any(|s| k.contains(s))
}

/// `…?user=u&password=x` → `…?user=u&password=***`.
fn mask_query_secrets(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    let mut out = format!("{head}?{}", masked.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_url_queries_are_masked() {
        assert_eq!(
            mask_url_password("postgresql://ceilo@db/c?sslmode=require&password=PgS3cret"),
            "postgresql://ceilo@db/c?sslmode=require&password=***"
        );
        assert_eq!(
            mask_url_password("mysql://u:pw@h/db?PASSWD=x&charset=utf8"),
            "mysql://u:***@h/db?PASSWD=***&charset=utf8"
        );
        let mut c = Config::default();
        c.database.connection = "postgresql://ceilo@db/c?password=PgS3cret".into();
        c.messaging.transport_url = "rabbit://guest@mq:5672/?sslpassword=MqS3cret".into();
        let t = c.to_masked_toml();
        assert!(!t.contains("PgS3cret") && !t.contains("MqS3cret"), "{t}");
    }

    #[test]
    fn syntax_errors_do_not_echo_the_line() {
        let e = Config::parse("[publisher]\ntelemetry_secret = \"s3cret-value\n").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = Config::parse("[publisher]\ntelemetry_secret = 123456\n").unwrap_err();
        assert!(!e.contains("123456"), "{e}");
        let e = Config::parse("[collector]\nbatch_size = \"many\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("batch_size"), "{e}");
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.database.connection, "sqlite:///data/collector.db");
        assert_eq!(c.collector.udp_port, 4952);
        assert_eq!(c.collector.rpc_port, 4953);
        assert_eq!(c.service.control_socket, "data/collector.sock");
    }

    #[test]
    fn full_design_example_parses() {
        let text = r#"
[service]
workers = 2
pidfile = "/run/collector/collector.pid"
control_socket = "/run/collector/control.sock"
log_file = "/var/log/collector/collector.log"
log_level = "info"
graceful_shutdown_timeout = 30
worker_timeout = 30
user = "collector"
group = "collector"
log_format = "json"
metrics_address = "::1"
metrics_port = 9552
[collector]
udp_address = "127.0.0.1"
udp_port = 4952
tcp_address = "127.0.0.1"
tcp_port = 4952
rpc_address = "127.0.0.1"
rpc_port = 4953
rpc_socket = ""
batch_size = 1000
batch_timeout = 0.05
max_frame_bytes = 16777216
max_connections = 1024
idle_timeout = 300
dispatchers = ["database", "file"]
requeue_sample_on_dispatcher_error = true
[publisher]
telemetry_secret = "s3cret"
[messaging]
transport_url = ""
control_exchange = "ceilometer"
metering_topic = "metering"
amqp_durable_queues = false
rabbit_qos_prefetch_count = 1000
[database]
connection = "sqlite:///var/lib/collector/collector.db"
metering_time_to_live = -1
[dispatcher_file]
file_path = "/var/log/collector/samples.log"
max_bytes = 0
backup_count = 0
"#;
        let c = Config::parse(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.service.workers, 2);
        assert!(c.has_dispatcher("file"));
        assert_eq!(c.service.graceful_shutdown_timeout, 30.0);
        assert_eq!(c.service.log_format, "json");
        assert_eq!(c.metrics_endpoint().as_deref(), Some("[::1]:9552"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse("[collector]\nudp_port = 1\nudp_prot = 2\n").unwrap_err();
        assert!(e.contains("udp_prot"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = Config::parse("[collector]\n\nudp_port = \"x\"\n").unwrap_err();
        assert!(e.contains("udp_port") || e.contains("line 3"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn semantic_errors() {
        let c = Config::parse("[collector]\ndispatchers = [\"mongo\"]\n").unwrap();
        assert!(c.validate().unwrap_err().contains("mongo"));
        let c = Config::parse("[service]\nlog_level = \"loud\"\n").unwrap();
        assert!(c.validate().unwrap_err().contains("loud"));
        let c = Config::parse("[service]\nlog_format = \"xml\"\n").unwrap();
        assert!(c.validate().unwrap_err().contains("xml"));
    }

    #[test]
    fn secrets_are_masked() {
        let mut c = Config::default();
        c.publisher.telemetry_secret = "topsecret".into();
        c.database.connection = "postgresql://u:pw@h:5432/db".into();
        c.messaging.transport_url = "rabbit://guest:guest@127.0.0.1:5672/".into();
        let t = c.to_masked_toml();
        assert!(
            !t.contains("topsecret") && !t.contains(":pw@") && !t.contains("guest:guest"),
            "{t}"
        );
        assert!(t.contains("postgresql://u:***@h:5432/db"), "{t}");
    }
}
