//! `collector --import-ceilometer-conf FILE`: translate a `ceilometer.conf` into an equivalent
//! `collector.toml`.
//!
//! The file is read as oslo.config reads it (its `iniparser`: `key = value` or `key: value`,
//! `#`/`;` comment lines, indented continuation lines, matching quotes stripped, a repeated key
//! is a multi-valued option, `-` and `_` in names are the same). Option names and defaults are
//! those of the last ceilometer releases that had the collector (8.x Ocata, 9.x Pike) and of
//! the oslo libraries they used (oslo.messaging, oslo.db, oslo.log, cotyledon); where an option
//! is absent, ceilometer's default is carried over, so the result behaves as that ceilometer
//! did.
//!
//! What cannot be carried over is listed in the output as a comment with the reason; a value
//! the importer understands but the collector cannot honour (a MongoDB connection, the gnocchi
//! dispatcher, an AMQP 1.0 transport) is an error naming the option, because silently
//! dropping it would change where samples go.

use crate::config::Config;
use crate::options::{OPTIONS, SECTIONS};
use std::collections::{BTreeMap, BTreeSet};

/// One assignment of the ini file: every value it was given (a repeated key is multi-valued)
/// and the line of the last one.
#[derive(Debug, Clone)]
struct Entry {
    values: Vec<String>,
    line: usize,
}

/// A parsed ini file, sections and keys in file order.
#[derive(Debug, Default)]
struct Ini {
    order: Vec<(String, String)>,
    entries: BTreeMap<(String, String), Entry>,
}

/// oslo.config's `iniparser`, keeping what the importer needs.
fn parse_ini(text: &str) -> Result<Ini, String> {
    let mut ini = Ini::default();
    let mut section: Option<String> = None;
    // The assignment being read: key, its lines, its line number.
    let mut pending: Option<(String, Vec<String>, usize)> = None;
    let flush =
        |ini: &mut Ini, section: &Option<String>, p: &mut Option<(String, Vec<String>, usize)>| {
            if let Some((key, lines, line)) = p.take() {
                let section = section.clone().unwrap_or_else(|| "DEFAULT".into());
                let k = (section, key);
                let value = lines.join("\n");
                match ini.entries.get_mut(&k) {
                    Some(e) => {
                        e.values.push(value);
                        e.line = line;
                    }
                    None => {
                        ini.order.push(k.clone());
                        ini.entries.insert(
                            k,
                            Entry {
                                values: vec![value],
                                line,
                            },
                        );
                    }
                }
            }
        };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end();
        if line.is_empty() {
            flush(&mut ini, &section, &mut pending);
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match pending.as_mut() {
                Some((_, lines, _)) => lines.push(line.trim_start().to_string()),
                None => return Err(format!("line {n}: unexpected continuation line: {line:?}")),
            }
            continue;
        }
        flush(&mut ini, &section, &mut pending);
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| format!("line {n}: section must end with ']': {line:?}"))?;
            if name.is_empty() {
                return Err(format!("line {n}: empty section name"));
            }
            section = Some(name.to_string());
        } else if line.starts_with(['#', ';']) {
            continue;
        } else {
            let colon = line.find(':');
            let equal = line.find('=');
            let at = match (colon, equal) {
                (None, None) => {
                    return Err(format!("line {n}: no ':' or '=' in assignment: {line:?}"))
                }
                (Some(c), Some(e)) => c.min(e),
                (Some(c), None) => c,
                (None, Some(e)) => e,
            };
            let key = line[..at].trim().replace('-', "_");
            if key.is_empty() {
                return Err(format!("line {n}: empty key"));
            }
            let mut value = line[at + 1..].trim();
            if value.len() >= 2
                && (value.starts_with('"') || value.starts_with('\''))
                && value.ends_with(&value[..1])
            {
                value = &value[1..value.len() - 1];
            }
            pending = Some((key, vec![value.to_string()], n));
        }
    }
    flush(&mut ini, &section, &mut pending);
    Ok(ini)
}

/// Options whose values are secrets: never echoed in comments or errors.
const SECRET_KEYS: &[&str] = &[
    "telemetry_secret",
    "metering_secret",
    "password",
    "connection",
    "metering_connection",
    "transport_url",
    "admin_password",
    "secret_key",
    "access_key",
];

/// The state of one translation: the ini, what has been read from it, the config being built,
/// where each option of the result came from, and the errors.
struct Importer {
    ini: Ini,
    used: BTreeSet<(String, String)>,
    cfg: Config,
    notes: BTreeMap<(&'static str, &'static str), String>,
    errors: Vec<String>,
}

/// How a value read for an option is shown in an error: secrets are not.
fn shown(key: &str, value: &str) -> String {
    if SECRET_KEYS.contains(&key) {
        crate::config::mask_url_password(value)
    } else {
        value.to_string()
    }
}

impl Importer {
    /// The last value of the first of `names` present (the first is the current name, the
    /// others deprecated ones, as oslo.config looks them up), with the name it was found under.
    fn get(&mut self, names: &[(&str, &str)]) -> Option<(String, String, String)> {
        for (section, key) in names {
            let k = (section.to_string(), key.to_string());
            if let Some(e) = self.ini.entries.get(&k) {
                let value = e.values.last().cloned().unwrap_or_default();
                self.used.insert(k);
                return Some((section.to_string(), key.to_string(), value));
            }
        }
        None
    }

    /// Every value of a multi-valued option (MultiStrOpt), by the same lookup.
    fn get_all(&mut self, names: &[(&str, &str)]) -> Option<(String, String, Vec<String>)> {
        for (section, key) in names {
            let k = (section.to_string(), key.to_string());
            if let Some(e) = self.ini.entries.get(&k) {
                let values = e.values.clone();
                self.used.insert(k);
                return Some((section.to_string(), key.to_string(), values));
            }
        }
        None
    }

    fn error(&mut self, section: &str, key: &str, value: &str, why: &str) {
        let line = self
            .ini
            .entries
            .get(&(section.to_string(), key.to_string()))
            .map(|e| format!(" (line {})", e.line))
            .unwrap_or_default();
        self.errors.push(format!(
            "[{section}] {key} = {:?}{line}: {why}",
            shown(key, value)
        ));
    }

    fn note(&mut self, target: (&'static str, &'static str), text: impl Into<String>) {
        self.notes.insert(target, text.into());
    }

    /// A BoolOpt, as oslo.config's `strutils.bool_from_string(strict)` reads it.
    fn bool_opt(&mut self, names: &[(&str, &str)], default: bool) -> Option<(bool, bool)> {
        let Some((s, k, v)) = self.get(names) else {
            return Some((default, false));
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "on" | "yes" | "y" | "t" => Some((true, true)),
            "false" | "0" | "off" | "no" | "n" | "f" => Some((false, true)),
            _ => {
                self.error(&s, &k, &v, "not a boolean (true/false)");
                None
            }
        }
    }

    /// An IntOpt within `min..=max`; `None` on error (reported), `Some((v, explicit))` else.
    fn int_opt(
        &mut self,
        names: &[(&str, &str)],
        default: i64,
        min: i64,
        max: i64,
    ) -> Option<(i64, bool)> {
        let Some((s, k, v)) = self.get(names) else {
            return Some((default, false));
        };
        match v.trim().parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Some((n, true)),
            Ok(_) => {
                self.error(&s, &k, &v, &format!("must be between {min} and {max}"));
                None
            }
            Err(_) => {
                self.error(&s, &k, &v, "not an integer");
                None
            }
        }
    }
}

fn from(names: &[(&str, &str)]) -> String {
    format!("from [{}] {}", names[0].0, names[0].1)
}

/// Translate ceilometer.conf text. `Ok`: the collector.toml text (with comments); `Err`: every
/// problem found, each naming its option.
pub fn import(text: &str, source: &str) -> Result<String, Vec<String>> {
    let ini = parse_ini(text).map_err(|e| vec![format!("{source}: {e}")])?;
    let mut im = Importer {
        ini,
        used: BTreeSet::new(),
        cfg: Config::default(),
        notes: BTreeMap::new(),
        errors: Vec::new(),
    };
    service(&mut im);
    collector(&mut im);
    publisher(&mut im);
    messaging(&mut im);
    database(&mut im);
    if im.errors.is_empty() {
        if let Err(e) = im.cfg.validate() {
            im.errors
                .push(format!("the imported configuration is invalid: {e}"));
        }
    }
    if !im.errors.is_empty() {
        return Err(im.errors);
    }
    Ok(render(&im, source))
}

fn service(im: &mut Importer) {
    let names = [("collector", "workers"), ("DEFAULT", "collector_workers")];
    if let Some((n, explicit)) = im.int_opt(&names, 1, 1, 4096) {
        im.cfg.service.workers = n as usize;
        let how = if explicit {
            from(&names)
        } else {
            "ceilometer's default for [collector] workers".into()
        };
        im.note(("service", "workers"), how);
    }
    let names = [("DEFAULT", "use_json")];
    if let Some((json, true)) = im.bool_opt(&names, false) {
        im.cfg.service.log_format = if json { "json" } else { "text" }.into();
        im.note(("service", "log_format"), from(&names));
    }
    let names = [("DEFAULT", "debug")];
    if let Some((debug, explicit)) = im.bool_opt(&names, false) {
        im.cfg.service.log_level = if debug { "debug" } else { "info" }.into();
        if explicit {
            im.note(("service", "log_level"), from(&names));
        }
    }
    let file = im.get(&[("DEFAULT", "log_file"), ("DEFAULT", "logfile")]);
    let dir = im.get(&[("DEFAULT", "log_dir"), ("DEFAULT", "logdir")]);
    let path = match (file, dir) {
        (Some((_, _, f)), _) if f.starts_with('/') => Some(f),
        (Some((_, _, f)), Some((_, _, d))) => Some(format!("{}/{f}", d.trim_end_matches('/'))),
        (Some((_, _, f)), None) => Some(f),
        // oslo.log names the file after the program when only the directory is set.
        (None, Some((_, _, d))) => Some(format!("{}/collector.log", d.trim_end_matches('/'))),
        (None, None) => None,
    };
    if let Some(p) = path {
        im.cfg.service.log_file = p;
        im.note(("service", "log_file"), "from [DEFAULT] log_file / log_dir");
    }
    let names = [("DEFAULT", "graceful_shutdown_timeout")];
    if let Some((n, explicit)) = im.int_opt(&names, 60, 0, i64::from(u32::MAX)) {
        im.cfg.service.graceful_shutdown_timeout = n as f64;
        let how = if explicit {
            from(&names)
        } else {
            "ceilometer's (cotyledon's) default".into()
        };
        im.note(("service", "graceful_shutdown_timeout"), how);
    }
}

fn collector(im: &mut Importer) {
    let names = [("collector", "udp_address")];
    let addr = im.get(&names);
    let explicit = addr.is_some();
    im.cfg.collector.udp_address = addr.map(|a| a.2).unwrap_or_else(|| "0.0.0.0".into());
    im.note(
        ("collector", "udp_address"),
        if explicit {
            from(&names)
        } else {
            "ceilometer's default for [collector] udp_address".into()
        },
    );
    let names = [("collector", "udp_port")];
    if let Some((p, explicit)) = im.int_opt(&names, 4952, 0, 65535) {
        im.cfg.collector.udp_port = p as u16;
        if explicit {
            im.note(("collector", "udp_port"), from(&names));
        }
    }
    for key in ["tcp_address", "rpc_address"] {
        im.note(
            ("collector", key),
            "collector-only listener (ceilometer had none): loopback default kept; set it like \
             udp_address to accept other hosts",
        );
    }
    let names = [("collector", "batch_size")];
    if let Some((n, explicit)) = im.int_opt(&names, 1, 1, i64::from(u32::MAX)) {
        im.cfg.collector.batch_size = n as usize;
        let how = if explicit {
            from(&names)
        } else {
            "ceilometer's default for [collector] batch_size (1: one write per sample; raise it \
             for throughput)"
                .into()
        };
        im.note(("collector", "batch_size"), how);
    }
    let names = [("collector", "batch_timeout")];
    match im.get(&names) {
        Some((s, k, v)) => match v.trim().parse::<i64>() {
            Ok(n) if n >= 0 => {
                im.cfg.collector.batch_timeout = n as f64;
                im.note(("collector", "batch_timeout"), from(&names));
            }
            _ => im.error(&s, &k, &v, "must be a non-negative integer (seconds)"),
        },
        None => im.note(
            ("collector", "batch_timeout"),
            "ceilometer's default (none: wait indefinitely) has no equivalent; the collector \
             writes a partial batch after this many seconds",
        ),
    }
    let names = [("DEFAULT", "meter_dispatchers"), ("DEFAULT", "dispatcher")];
    match im.get_all(&names) {
        Some((s, k, values)) => {
            let mut ds = Vec::new();
            for v in values {
                match v.trim() {
                    d @ ("database" | "file") => {
                        if !ds.iter().any(|x| x == d) {
                            ds.push(d.to_string())
                        }
                    }
                    d @ ("gnocchi" | "http" | "panko") => im.error(
                        &s,
                        &k,
                        &v,
                        &format!(
                            "the {d} dispatcher is not supported: the collector stores in its \
                             database or a file (dispatchers \"database\", \"file\")"
                        ),
                    ),
                    _ => im.error(&s, &k, &v, "unknown dispatcher; known: database, file"),
                }
            }
            im.cfg.collector.dispatchers = ds;
            im.note(("collector", "dispatchers"), format!("from [{s}] {k}"));
        }
        None => im.note(
            ("collector", "dispatchers"),
            "[DEFAULT] meter_dispatchers was not set (ceilometer 8/9 then dispatched nowhere): \
             the database dispatcher is kept",
        ),
    }
    let names = [("collector", "requeue_sample_on_dispatcher_error")];
    if let Some((b, explicit)) = im.bool_opt(&names, true) {
        im.cfg.collector.requeue_sample_on_dispatcher_error = b;
        let how = if explicit {
            from(&names)
        } else {
            "ceilometer >= 7 always requeues (the option was removed)".into()
        };
        im.note(("collector", "requeue_sample_on_dispatcher_error"), how);
    }
}

fn publisher(im: &mut Importer) {
    let names = [
        ("publisher", "telemetry_secret"),
        ("DEFAULT", "metering_secret"),
        ("publisher_rpc", "metering_secret"),
        ("publisher", "metering_secret"),
    ];
    match im.get(&names) {
        Some((s, k, v)) => {
            im.cfg.publisher.telemetry_secret = v;
            im.note(("publisher", "telemetry_secret"), format!("from [{s}] {k}"));
        }
        None => im.note(
            ("publisher", "telemetry_secret"),
            "ceilometer's default: change it on both sides",
        ),
    }
}

fn messaging(im: &mut Importer) {
    let names = [("DEFAULT", "transport_url")];
    match im.get(&names) {
        Some((s, k, v)) => {
            let scheme = v.split_once("://").map(|(s, _)| s);
            match scheme {
                // `?ssl=1` in the URL is understood by the collector as by oslo.messaging.
                Some("rabbit" | "kombu") => {
                    im.cfg.messaging.transport_url = v;
                    im.note(("messaging", "transport_url"), from(&names));
                }
                Some(other) => im.error(
                    &s,
                    &k,
                    &v,
                    &format!(
                        "transport {other}:// is not supported: the collector consumes \
                         RabbitMQ (rabbit://) only"
                    ),
                ),
                None => im.error(&s, &k, &v, "not a transport URL (driver://...)"),
            }
        }
        None => im.note(
            ("messaging", "transport_url"),
            "not set: ceilometer would use oslo.messaging's default rabbit:// (localhost); the \
             collector consumes nothing until this is set",
        ),
    }
    // TLS to the broker: oslo.messaging's options (and their deprecated kombu_ names).
    let names = [
        ("oslo_messaging_rabbit", "ssl"),
        ("oslo_messaging_rabbit", "rabbit_use_ssl"),
    ];
    if let Some((ssl, true)) = im.bool_opt(&names, false) {
        im.cfg.messaging.ssl = ssl;
        im.note(("messaging", "ssl"), from(&names));
    }
    for (target, names) in [
        (
            "ssl_ca_file",
            [
                ("oslo_messaging_rabbit", "ssl_ca_file"),
                ("oslo_messaging_rabbit", "kombu_ssl_ca_certs"),
            ],
        ),
        (
            "ssl_cert_file",
            [
                ("oslo_messaging_rabbit", "ssl_cert_file"),
                ("oslo_messaging_rabbit", "kombu_ssl_certfile"),
            ],
        ),
        (
            "ssl_key_file",
            [
                ("oslo_messaging_rabbit", "ssl_key_file"),
                ("oslo_messaging_rabbit", "kombu_ssl_keyfile"),
            ],
        ),
    ] {
        if let Some((_, _, v)) = im.get(&names) {
            if !v.is_empty() {
                let m = &mut im.cfg.messaging;
                *match target {
                    "ssl_ca_file" => &mut m.ssl_ca_file,
                    "ssl_cert_file" => &mut m.ssl_cert_file,
                    _ => &mut m.ssl_key_file,
                } = v;
                im.note(("messaging", target), from(&names));
            }
        }
    }
    let names = [("DEFAULT", "control_exchange")];
    if let Some((_, _, v)) = im.get(&names) {
        im.cfg.messaging.control_exchange = v;
        im.note(("messaging", "control_exchange"), from(&names));
    }
    let names = [("publisher_notifier", "metering_topic")];
    if let Some((_, _, v)) = im.get(&names) {
        im.cfg.messaging.metering_topic = v;
        im.note(("messaging", "metering_topic"), from(&names));
    }
    let names = [
        ("publisher_notifier", "telemetry_driver"),
        ("publisher_notifier", "metering_driver"),
    ];
    if let Some((s, k, v)) = im.get(&names) {
        match v.trim() {
            "messagingv2" => {}
            "messaging" => im.error(
                &s,
                &k,
                &v,
                "the version 1 (messaging) envelope is not supported; the collector reads \
                 messagingv2",
            ),
            _ => {}
        }
    }
    let names = [
        ("oslo_messaging_rabbit", "amqp_durable_queues"),
        ("DEFAULT", "amqp_durable_queues"),
    ];
    if let Some((b, explicit)) = im.bool_opt(&names, false) {
        im.cfg.messaging.amqp_durable_queues = b;
        if explicit {
            im.note(("messaging", "amqp_durable_queues"), from(&names));
        }
    }
    let names = [("oslo_messaging_rabbit", "rabbit_qos_prefetch_count")];
    if let Some((n, explicit)) = im.int_opt(&names, 100, 0, i64::from(u16::MAX)) {
        im.cfg.messaging.rabbit_qos_prefetch_count = n as u16;
        let how = if explicit {
            from(&names)
        } else {
            "ceilometer's default (it sets 100)".into()
        };
        im.note(("messaging", "rabbit_qos_prefetch_count"), how);
    }
    let names = [("oslo_messaging_rabbit", "rabbit_quorum_queue")];
    if let Some((true, _)) = im.bool_opt(&names, false) {
        im.error(
            "oslo_messaging_rabbit",
            "rabbit_quorum_queue",
            "true",
            "quorum queues are not supported: the collector declares a classic queue",
        );
    }
}

fn database(im: &mut Importer) {
    let names = [
        ("database", "metering_connection"),
        ("database", "connection"),
    ];
    match im.get(&names) {
        Some((s, k, v)) => {
            if let Err(e) = storage::check_url(&v) {
                im.error(&s, &k, &v, &format!("not supported: {e}"));
            } else {
                im.cfg.database.connection = v;
                im.note(("database", "connection"), format!("from [{s}] {k}"));
            }
        }
        None => im.note(
            ("database", "connection"),
            "[database] connection was not set: the collector's default is kept",
        ),
    }
    let names = [
        ("database", "metering_time_to_live"),
        ("database", "time_to_live"),
    ];
    if let Some((n, explicit)) = im.int_opt(&names, -1, i64::MIN, i64::MAX) {
        im.cfg.database.metering_time_to_live = n;
        if explicit {
            im.note(("database", "metering_time_to_live"), from(&names));
        }
    }
    let names = [("dispatcher_file", "file_path")];
    match im.get(&names) {
        Some((_, _, v)) if !v.is_empty() => {
            im.cfg.dispatcher_file.file_path = v;
            im.note(("dispatcher_file", "file_path"), from(&names));
        }
        _ if im.cfg.has_dispatcher("file") => im.error(
            "dispatcher_file",
            "file_path",
            "",
            "required by the file dispatcher (meter_dispatchers = file)",
        ),
        _ => {}
    }
    let names = [("dispatcher_file", "max_bytes")];
    if let Some((n, true)) = im.int_opt(&names, 0, 0, i64::MAX) {
        im.cfg.dispatcher_file.max_bytes = n as u64;
        im.note(("dispatcher_file", "max_bytes"), from(&names));
    }
    let names = [("dispatcher_file", "backup_count")];
    if let Some((n, true)) = im.int_opt(&names, 0, 0, i64::from(u32::MAX)) {
        im.cfg.dispatcher_file.backup_count = n as u32;
        im.note(("dispatcher_file", "backup_count"), from(&names));
    }
}

/// Why an option of a ceilometer.conf has no place in collector.toml.
fn not_carried_reason(section: &str, key: &str) -> &'static str {
    match (section, key) {
        ("DEFAULT", "event_dispatchers") => "events are not collected: the collector stores samples",
        ("DEFAULT", "use_syslog" | "syslog_log_facility") => {
            "the collector logs to [service] log_file or stderr (journald under systemd)"
        }
        ("DEFAULT", "host") => "a name for agents' AMQP keys; the collector has no use for it",
        ("DEFAULT", k)
            if k.starts_with("log_rotat") || k.starts_with("max_logfile") =>
        {
            "rotation is logrotate's job: USR1 (or the package's logrotate file) reopens the log"
        }
        ("DEFAULT", "verbose") => "removed from oslo.log; [service] log_level is info unless debug is set",
        ("DEFAULT", k) if k.starts_with("log") || k.starts_with("logging") || k.starts_with("default_log") || k.starts_with("use_") || k.starts_with("fatal_") || k.starts_with("instance_") || k.starts_with("rate_limit") || k.starts_with("publish_errors") => {
            "oslo.log formatting: the collector's own text or JSON lines ([service] log_format; filter with RUST_LOG)"
        }
        ("DEFAULT", "rpc_response_timeout" | "executor_thread_pool_size" | "rpc_conn_pool_size" | "conn_pool_min_size" | "conn_pool_ttl") => {
            "oslo.messaging RPC tuning: the collector consumes notifications only"
        }
        ("publisher_notifier", "telemetry_driver" | "metering_driver") => {
            "messagingv2 is what the collector reads"
        }
        ("publisher_notifier", _) => "event and telemetry publishing happen on the agents",
        ("collector", _) => "not an option of the ceilometer collector this importer knows",
        ("database", _) => "oslo.db/SQLAlchemy tuning or event/alarm storage: the collector's drivers manage their own connection",
        ("dispatcher_file", _) => "not an option of ceilometer's file dispatcher",
        ("oslo_messaging_rabbit", "rabbit_ha_queues") => {
            "queue mirroring is a broker policy; nothing to carry"
        }
        ("oslo_messaging_rabbit", _) => {
            "oslo.messaging rabbit tuning with no equivalent: the consumer reconnects with its \
             own backoff (a heartbeat goes in transport_url's ?heartbeat_timeout_threshold=N)"
        }
        ("oslo_messaging_amqp" | "oslo_messaging_kafka" | "oslo_messaging_zmq" | "matchmaker_redis", _) => {
            "other transports than RabbitMQ are not supported"
        }
        ("oslo_messaging_notifications", _) => "the collector sends no notifications",
        ("api" | "oslo_policy" | "oslo_middleware" | "cors" | "keystone_authtoken" | "paste_deploy", _) => {
            "the collector serves no HTTP API (query with collectorctl)"
        }
        ("service_credentials" | "service_types", _) => {
            "the collector calls no other OpenStack service"
        }
        ("polling" | "compute" | "hardware" | "ipmi" | "vmware" | "xenapi" | "rgw_admin_credentials"
        | "meter" | "notification" | "event" | "coordination" | "pipeline", _) => {
            "an agent option: it stays in the agents' ceilometer.conf"
        }
        ("dispatcher_gnocchi" | "dispatcher_http", _) => "that dispatcher is not supported",
        ("DEFAULT", _) => "an agent, API or notification-agent option: no equivalent in the collector",
        _ => "no equivalent in the collector",
    }
}

fn render(im: &Importer, source: &str) -> String {
    let mut out = format!(
        "# collector.toml imported from {source} by collector {}.\n\
         # \"from\" names the ceilometer.conf option a value came from; options without a note\n\
         # keep the collector's embedded defaults (see collector.toml(5)).\n\
         # Check it with: collector --check-config --config THIS_FILE\n",
        env!("CARGO_PKG_VERSION")
    );
    let value = toml::Value::try_from(&im.cfg).unwrap_or(toml::Value::Table(Default::default()));
    let empty = toml::Table::new();
    let table = value.as_table().unwrap_or(&empty);
    let mut sections: Vec<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
    for s in table.keys() {
        if !sections.contains(&s.as_str()) {
            sections.push(s);
        }
    }
    for section in sections {
        let Some(keys) = table.get(section).and_then(toml::Value::as_table) else {
            continue;
        };
        out.push_str(&format!("\n[{section}]\n"));
        let mut order: Vec<&str> = OPTIONS
            .iter()
            .filter(|o| o.section == section)
            .map(|o| o.key)
            .collect();
        for k in keys.keys() {
            if !order.contains(&k.as_str()) {
                order.push(k);
            }
        }
        for key in order {
            let Some(v) = keys.get(key) else { continue };
            if let Some(note) = im
                .notes
                .iter()
                .find(|((s, k), _)| *s == section && *k == key)
                .map(|(_, n)| n)
            {
                out.push_str(&format!("# {note}\n"));
            }
            out.push_str(&format!("{key} = {v}\n"));
        }
    }
    let left: Vec<&(String, String)> = im
        .ini
        .order
        .iter()
        .filter(|k| !im.used.contains(*k))
        .collect();
    if !left.is_empty() {
        out.push_str("\n# Not carried over from ");
        out.push_str(source);
        out.push_str(":\n");
        for (section, key) in left {
            out.push_str(&format!(
                "# [{section}] {key}: {}\n",
                not_carried_reason(section, key)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (String, Config) {
        let out = import(text, "test.conf").unwrap_or_else(|e| panic!("{e:?}"));
        let cfg = Config::parse(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        cfg.validate().unwrap();
        (out, cfg)
    }

    fn err(text: &str) -> String {
        import(text, "test.conf").unwrap_err().join("\n")
    }

    #[test]
    fn empty_file_gives_ceilometers_defaults() {
        let (out, c) = ok("");
        assert_eq!(c.collector.udp_address, "0.0.0.0");
        assert_eq!(c.collector.udp_port, 4952);
        assert_eq!(c.collector.batch_size, 1);
        assert_eq!(c.service.workers, 1);
        assert_eq!(c.service.graceful_shutdown_timeout, 60.0);
        assert_eq!(c.messaging.rabbit_qos_prefetch_count, 100);
        assert_eq!(c.messaging.transport_url, "");
        assert_eq!(
            c.publisher.telemetry_secret,
            crate::config::CEILOMETER_DEFAULT_SECRET
        );
        assert!(!out.contains("Not carried over"), "{out}");
    }

    #[test]
    fn ini_syntax_as_oslo_reads_it() {
        let text = "[DEFAULT]\n# comment\n; other\nmeter_dispatchers = database\nmeter_dispatchers: file\n\
                    [publisher]\ntelemetry_secret = \"quoted secret\"\n\
                    [dispatcher_file]\nfile-path = /var/log/s.log\n\
                    [api]\npecan_debug = true\n  continued\n";
        let (out, c) = ok(text);
        assert_eq!(c.collector.dispatchers, vec!["database", "file"]);
        assert_eq!(c.publisher.telemetry_secret, "quoted secret");
        assert_eq!(c.dispatcher_file.file_path, "/var/log/s.log");
        assert!(
            out.contains("# [api] pecan_debug: the collector serves no HTTP API"),
            "{out}"
        );
        assert!(
            !out.contains("continued"),
            "values of dropped options are not echoed: {out}"
        );
    }

    #[test]
    fn deprecated_names_are_read() {
        let (_, c) = ok(
            "[DEFAULT]\ncollector_workers = 3\nmetering_secret = s\ndispatcher = file\n\
                         [dispatcher_file]\nfile_path = /x\n[database]\ntime_to_live = 60\n",
        );
        assert_eq!(c.service.workers, 3);
        assert_eq!(c.publisher.telemetry_secret, "s");
        assert_eq!(c.collector.dispatchers, vec!["file"]);
        assert_eq!(c.database.metering_time_to_live, 60);
    }

    #[test]
    fn log_file_and_dir() {
        let (_, c) =
            ok("[DEFAULT]\nlog_dir = /var/log/ceilometer\nlog_file = c.log\ndebug = True\n");
        assert_eq!(c.service.log_file, "/var/log/ceilometer/c.log");
        assert_eq!(c.service.log_level, "debug");
        let (_, c) = ok("[DEFAULT]\nlog_dir = /var/log/ceilometer/\n");
        assert_eq!(c.service.log_file, "/var/log/ceilometer/collector.log");
    }

    #[test]
    fn use_json_becomes_the_json_log_format() {
        let (_, cfg) = ok("[DEFAULT]\nuse_json = true\n");
        assert_eq!(cfg.service.log_format, "json");
        let (_, cfg) = ok("[DEFAULT]\n");
        assert_eq!(cfg.service.log_format, "text");
    }

    #[test]
    fn tls_to_the_broker_is_carried_over() {
        // Debian's snakeoil certificate stands in for a CA file (the importer checks that
        // the translation is a valid configuration, which reads the file).
        let ca = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
        let (text, cfg) = ok(&format!(
            "[DEFAULT]\ntransport_url = rabbit://u:p@mq:5671/?ssl=1\n\
             [oslo_messaging_rabbit]\nrabbit_use_ssl = true\nkombu_ssl_ca_certs = {ca}\n"
        ));
        assert_eq!(cfg.messaging.transport_url, "rabbit://u:p@mq:5671/?ssl=1");
        assert!(cfg.messaging.ssl);
        assert_eq!(cfg.messaging.ssl_ca_file, ca);
        assert!(text.contains("ssl_ca_file"), "{text}");
        assert!(
            text.contains("from [oslo_messaging_rabbit] ssl_ca_file"),
            "{text}"
        );
    }

    #[test]
    fn unsupported_values_are_errors_naming_the_option() {
        for (text, want) in [
            (
                "[database]\nconnection = mongodb://u:pw@h/ceilometer\n",
                "[database] connection",
            ),
            (
                "[DEFAULT]\nmeter_dispatchers = gnocchi\n",
                "[DEFAULT] meter_dispatchers",
            ),
            (
                "[DEFAULT]\ntransport_url = amqp://h:5672/\n",
                "[DEFAULT] transport_url",
            ),
            (
                "[oslo_messaging_rabbit]\nrabbit_quorum_queue = true\n",
                "rabbit_quorum_queue",
            ),
            (
                "[oslo_messaging_rabbit]\nrabbit_qos_prefetch_count = 70000\n",
                "rabbit_qos_prefetch_count",
            ),
            ("[collector]\nudp_port = http\n", "[collector] udp_port"),
            ("[collector]\nworkers = 0\n", "[collector] workers"),
            (
                "[publisher_notifier]\ntelemetry_driver = messaging\n",
                "telemetry_driver",
            ),
            (
                "[DEFAULT]\nmeter_dispatchers = file\n",
                "[dispatcher_file] file_path",
            ),
            (
                "[collector]\nrequeue_sample_on_dispatcher_error = maybe\n",
                "requeue_sample",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
        // Secrets in errors are masked.
        assert!(!err("[database]\nconnection = mongodb://u:pw@h/c\n").contains(":pw@"));
    }

    proptest::proptest! {
        /// Whatever the file holds, the importer answers (a translation or errors) and a
        /// translation always parses back as a valid collector.toml.
        #[test]
        fn any_input_is_answered(text in "(\\[(DEFAULT|collector|database|publisher|publisher_notifier|oslo_messaging_rabbit|dispatcher_file|[a-z]{1,6})\\]\n|(udp_address|udp_port|batch_size|batch_timeout|workers|collector_workers|requeue_sample_on_dispatcher_error|telemetry_secret|connection|metering_time_to_live|transport_url|control_exchange|meter_dispatchers|debug|log_file|log_dir|rabbit_qos_prefetch_count|amqp_durable_queues|rabbit_quorum_queue|ssl|file_path|max_bytes|backup_count|[a-z_-]{1,12}) ?[=:] ?(-?[0-9]{1,6}|true|false|database|file|rabbit://[a-z:@]{0,10}/|sqlite:///[a-z/]{1,10}|[ -~\u{e9}]{0,20})\n|[ \t#;][ -~]{0,20}\n|\n){0,30}") {
            if let Ok(out) = import(&text, "fuzz.conf") {
                let c = Config::parse(&out).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}\n{out}")))?;
                proptest::prop_assert!(c.validate().is_ok(), "{}", out);
            }
        }

        #[test]
        fn any_bytes_never_panic(text in "\\PC{0,200}") {
            let _ = import(&text, "fuzz.conf");
        }
    }

    #[test]
    fn ini_syntax_errors_name_the_line() {
        assert!(err("[DEFAULT\n").contains("line 1"));
        assert!(err("[DEFAULT]\njunk\n").contains("line 2"));
        assert!(err("  x\n").contains("line 1"));
    }
}
