//! One row of documentation per configuration option: its section, key, embedded default,
//! the `ceilometer.conf` option it corresponds to, and a one-line help.
//!
//! This table is what `collector.toml(5)` is generated from, and what the ceilometer.conf
//! importer's documentation points at. A unit test checks that every key the serde
//! [`Config`](crate::config::Config) has (as serialized from its defaults) has exactly one row
//! here and that the row's default is the real one, so an option added to `config.rs` without a
//! row fails the tests and names the missing row.

/// Documentation of one option of `collector.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionDoc {
    /// TOML section, without brackets: `collector`.
    pub section: &'static str,
    pub key: &'static str,
    /// The embedded default as a TOML value (`4952`, `"127.0.0.1"`, `["database"]`).
    pub default: &'static str,
    /// The corresponding `ceilometer.conf` option as `[section] name`, or `""` when ceilometer
    /// had none.
    pub ceilometer: &'static str,
    /// One line: what it does, what `""`/`0` mean.
    pub help: &'static str,
}

const fn row(
    section: &'static str,
    key: &'static str,
    default: &'static str,
    ceilometer: &'static str,
    help: &'static str,
) -> OptionDoc {
    OptionDoc {
        section,
        key,
        default,
        ceilometer,
        help,
    }
}

/// Sections in the order the man page and `etc/collector.toml` present them.
pub const SECTIONS: &[(&str, &str)] = &[
    (
        "service",
        "The launcher: processes, files, logging, privileges.",
    ),
    ("collector", "Listening sockets, batching and dispatch."),
    (
        "publisher",
        "Sample signatures shared with ceilometer's publishers.",
    ),
    (
        "messaging",
        "ceilometer's notifier:// path: consuming samples from RabbitMQ.",
    ),
    ("database", "Storage for the database dispatcher."),
    (
        "dispatcher_file",
        "The file dispatcher: one JSON line per sample.",
    ),
];

/// Every option of `collector.toml`.
pub const OPTIONS: &[OptionDoc] = &[
    // [service]
    row("service", "workers", "0", "[collector] workers",
        "Worker processes; 0 = one per CPU. TTIN/TTOU and `collectorctl workers N` change it live."),
    row("service", "pidfile", "\"\"", "",
        "Launcher pid file, flock-ed while running; \"\" = none. --pidfile overrides."),
    row("service", "control_socket", "\"data/collector.sock\"", "",
        "Unix socket (mode 0600) collectorctl talks to."),
    row("service", "log_file", "\"\"", "[DEFAULT] log_file, log_dir",
        "Log file; \"\" logs to stderr. USR1 reopens it (logrotate). --log-file overrides."),
    row("service", "log_level", "\"info\"", "[DEFAULT] debug",
        "error, warn, info, debug or trace. RUST_LOG overrides; `collectorctl loglevel` changes it live."),
    row("service", "graceful_shutdown_timeout", "30.0", "[DEFAULT] graceful_shutdown_timeout",
        "Seconds a graceful stop waits for workers before killing them."),
    row("service", "worker_timeout", "30.0", "",
        "Seconds without a heartbeat before a worker is killed and replaced."),
    row("service", "user", "\"\"", "",
        "Drop privileges to this user after binding the sockets; \"\" = stay."),
    row("service", "group", "\"\"", "",
        "Drop privileges to this group (default: the user's primary group); \"\" = stay."),
    row("service", "log_format", "\"text\"", "[DEFAULT] use_json",
        "text or json: one JSON object per line (time, level, pid, worker, target, message, fields)."),
    row("service", "metrics_address", "\"127.0.0.1\"", "",
        "Address of the HTTP endpoint /metrics, /healthz, /readyz; \"\" disables it."),
    row("service", "metrics_port", "9552", "",
        "Port of the HTTP metrics endpoint."),
    // [collector]
    row("collector", "udp_address", "\"127.0.0.1\"", "[collector] udp_address",
        "Address of the ceilometer udp:// listener; \"\" disables it."),
    row("collector", "udp_port", "4952", "[collector] udp_port",
        "Port of the ceilometer udp:// listener."),
    row("collector", "udp_reuseport", "false", "",
        "One SO_REUSEPORT UDP socket per worker (the kernel spreads publishers by source address and port) instead of one socket all workers share. Changed by a restart, not a reload."),
    row("collector", "tcp_address", "\"127.0.0.1\"", "",
        "Address of the ceilometer tcp:// listener (length-prefixed frames); \"\" disables it."),
    row("collector", "tcp_port", "4952", "",
        "Port of the ceilometer tcp:// listener."),
    row("collector", "rpc_address", "\"127.0.0.1\"", "",
        "Address of the MessagePack-RPC listener (acknowledged after commit); \"\" disables it."),
    row("collector", "rpc_port", "4953", "",
        "Port of the MessagePack-RPC listener."),
    row("collector", "rpc_socket", "\"\"", "",
        "Unix socket path for MessagePack-RPC; \"\" = none."),
    row("collector", "batch_size", "1000", "[collector] batch_size",
        "Samples per storage write (one transaction)."),
    row("collector", "batch_timeout", "0.05", "[collector] batch_timeout",
        "Seconds a partial batch may wait before it is written."),
    row("collector", "max_frame_bytes", "16777216", "",
        "Largest RPC or TCP frame accepted; a larger one closes the connection."),
    row("collector", "max_connections", "1024", "",
        "Open connections per worker; more are refused."),
    row("collector", "idle_timeout", "300.0", "",
        "Seconds after which an idle connection is closed."),
    row("collector", "max_buffered_bytes", "268435456", "",
        "Bytes one worker's connections may buffer in total; past it, reading pauses and the largest partial frame is dropped."),
    row("collector", "frame_timeout", "60.0", "",
        "Seconds a frame may take from its first byte to its last (a trickle cannot hold a buffer)."),
    row("collector", "max_frame_elements", "1048576", "",
        "msgpack elements one frame may hold, counted before decoding (bounds its decoded size)."),
    row("collector", "dispatchers", "[\"database\"]", "[DEFAULT] meter_dispatchers",
        "Where samples go: any of \"database\", \"file\"."),
    row("collector", "requeue_sample_on_dispatcher_error", "true",
        "[collector] requeue_sample_on_dispatcher_error",
        "true: an RPC call or AMQP delivery whose samples could not be stored is answered with an error / requeued."),
    // [publisher]
    row("publisher", "telemetry_secret", "\"change this for valid signing\"",
        "[publisher] telemetry_secret",
        "HMAC-SHA256 key shared with the publishers; \"\" disables verification. ceilometer's default is logged as a warning."),
    // [messaging]
    row("messaging", "transport_url", "\"\"", "[DEFAULT] transport_url",
        "RabbitMQ URL (rabbit://user:pass@host:5672/vhost) to consume samples from; \"\" disables."),
    row("messaging", "control_exchange", "\"ceilometer\"", "[DEFAULT] control_exchange",
        "Topic exchange the metering queue is bound to."),
    row("messaging", "metering_topic", "\"metering\"", "[publisher_notifier] metering_topic",
        "Topic; the consumed queue is \"<topic>.sample\"."),
    row("messaging", "amqp_durable_queues", "false", "[oslo_messaging_rabbit] amqp_durable_queues",
        "Declare the queue durable; must match ceilometer's side."),
    row("messaging", "rabbit_qos_prefetch_count", "1000",
        "[oslo_messaging_rabbit] rabbit_qos_prefetch_count",
        "Unacknowledged deliveries per consumer."),
    row("messaging", "ssl", "false", "[oslo_messaging_rabbit] ssl",
        "TLS to the broker; also on with an amqps:// URL or ?ssl=1 in transport_url."),
    row("messaging", "ssl_ca_file", "\"\"", "[oslo_messaging_rabbit] ssl_ca_file",
        "CA file of the broker's certificate: given, its chain and name are checked; empty, TLS only encrypts."),
    row("messaging", "ssl_cert_file", "\"\"", "[oslo_messaging_rabbit] ssl_cert_file",
        "Client certificate (PEM) for brokers that ask for one."),
    row("messaging", "ssl_key_file", "\"\"", "[oslo_messaging_rabbit] ssl_key_file",
        "Key (PEM) of ssl_cert_file."),
    // [database]
    row("database", "connection", "\"sqlite:///data/collector.db\"", "[database] connection",
        "Storage URL: sqlite:///relative.db, sqlite:////absolute.db, postgresql://, mysql+pymysql://."),
    row("database", "metering_time_to_live", "-1", "[database] metering_time_to_live",
        "Seconds samples are kept; <= 0 keeps them forever."),
    row("database", "partition_span", "86400", "",
        "Seconds of sample timestamps per time partition (UTC-aligned); SQLite: one table each."),
    row("database", "expiry_interval", "600.0", "",
        "Seconds between retention passes (worker 0, also when idle)."),
    row("database", "rollups",
        "[{ granularity = 3600, time_to_live = 7776000 }, { granularity = 86400, time_to_live = 157680000 }]",
        "",
        "Rollup granularities and how long each keeps its buckets (seconds; 0: forever)."),
    row("database", "sqlite_synchronous", "\"NORMAL\"", "",
        "SQLite PRAGMA synchronous: NORMAL survives a process crash (WAL); FULL also power loss."),
    // [dispatcher_file]
    row("dispatcher_file", "file_path", "\"data/samples.log\"", "[dispatcher_file] file_path",
        "File the file dispatcher appends one JSON line per sample to."),
    row("dispatcher_file", "max_bytes", "0", "[dispatcher_file] max_bytes",
        "Rotate the file at this size; 0 = never."),
    row("dispatcher_file", "backup_count", "0", "[dispatcher_file] backup_count",
        "Rotated files kept (.1 is the newest)."),
];

/// The row of `[section] key`, if documented.
pub fn find(section: &str, key: &str) -> Option<&'static OptionDoc> {
    OPTIONS
        .iter()
        .find(|o| o.section == section && o.key == key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::BTreeSet;

    /// `(section, key, default as TOML)` of every key the serde Config has.
    fn config_keys() -> Vec<(String, String, toml::Value)> {
        let v = toml::Value::try_from(Config::default()).expect("Config serializes");
        let mut out = Vec::new();
        for (section, table) in v.as_table().expect("table") {
            let table = table.as_table().expect("every top-level key is a section");
            for (key, value) in table {
                out.push((section.clone(), key.clone(), value.clone()));
            }
        }
        out
    }

    #[test]
    fn every_config_key_has_one_row_with_its_real_default() {
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for (section, key, value) in config_keys() {
            let rows: Vec<_> = OPTIONS
                .iter()
                .filter(|o| o.section == section && o.key == key)
                .collect();
            match rows.as_slice() {
                [] => missing.push(format!(
                    "row(\"{section}\", \"{key}\", {:?}, \"<[ceilometer] name or empty>\", \"<help>\")",
                    value.to_string()
                )),
                [one] => {
                    let doc: toml::Value = toml::from_str::<toml::Table>(&format!(
                        "v = {}",
                        one.default
                    ))
                    .map(|t| t["v"].clone())
                    .unwrap_or_else(|e| panic!("[{section}] {key}: bad default text: {e}"));
                    if doc != value {
                        wrong.push(format!(
                            "[{section}] {key}: table says {}, Config::default() has {value}",
                            one.default
                        ));
                    }
                }
                _ => wrong.push(format!("[{section}] {key}: more than one row")),
            }
        }
        assert!(
            missing.is_empty() && wrong.is_empty(),
            "options.rs is out of date with config.rs.\nRows to add to OPTIONS:\n  {}\nRows to fix:\n  {}",
            missing.join("\n  "),
            wrong.join("\n  ")
        );
    }

    #[test]
    fn every_row_is_a_real_key_in_a_known_section() {
        let keys: BTreeSet<(String, String)> =
            config_keys().into_iter().map(|(s, k, _)| (s, k)).collect();
        let sections: BTreeSet<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
        for o in OPTIONS {
            assert!(
                keys.contains(&(o.section.to_string(), o.key.to_string())),
                "[{}] {} is documented but is not a Config key",
                o.section,
                o.key
            );
            assert!(
                sections.contains(o.section),
                "section {} not in SECTIONS",
                o.section
            );
            assert!(
                !o.help.is_empty() && !o.help.contains('\n'),
                "{}: one-line help",
                o.key
            );
        }
    }
}
