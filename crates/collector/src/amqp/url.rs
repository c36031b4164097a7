//! `[messaging] transport_url`, read as oslo.messaging's `TransportURL.parse` reads it, and the
//! TLS configuration `[messaging]` asks for. Pure parsing: no sockets.

use super::HEARTBEAT;
use crate::config::MessagingConfig;
use std::sync::Arc;

/// One broker of a `transport_url`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Host {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) password: String,
}

/// `rabbit://user:pass@host:port[,user:pass@host2:port2]/vhost?options`, read as
/// oslo.messaging's `TransportURL.parse` reads it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TransportUrl {
    pub(super) hosts: Vec<Host>,
    pub(super) vhost: String,
    /// `?heartbeat_timeout_threshold=N`: oslo.messaging lets the URL's query override its
    /// `[oslo_messaging_rabbit]` options; this is the one a consumer needs.
    pub(super) heartbeat: u16,
    /// `amqps://`, or `?ssl=1` (oslo.messaging's query form of `[oslo_messaging_rabbit] ssl`).
    pub(super) ssl: bool,
}

impl TransportUrl {
    pub(super) fn parse(url: &str) -> Result<TransportUrl, String> {
        let bad = |why: &str| format!("[messaging] transport_url {:?}: {why}", redact(url));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected rabbit://user:password@host:port/vhost"))?;
        if !matches!(scheme, "rabbit" | "kombu" | "amqps") {
            return Err(bad(&format!(
                "unsupported scheme \"{scheme}\" (rabbit:// or amqps://)"
            )));
        }
        let mut ssl = scheme == "amqps";
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (netloc, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut heartbeat = HEARTBEAT;
        for (key, value) in query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        {
            match key {
                "ssl" => {
                    ssl = match value.to_ascii_lowercase().as_str() {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" => false,
                        _ => return Err(bad(&format!("bad ssl {value:?} (expected 1 or 0)"))),
                    }
                }
                "heartbeat_timeout_threshold" => {
                    heartbeat = value
                        .parse()
                        .map_err(|_| bad(&format!("bad heartbeat_timeout_threshold {value:?}")))?;
                }
                _ => log::warn!("amqp: transport_url option {key:?} is ignored"),
            }
        }
        let vhost = match percent_decode(path).map_err(|e| bad(&e))? {
            v if v.is_empty() => "/".to_string(),
            v => v,
        };
        let mut hosts = Vec::new();
        for part in netloc.split(',').filter(|p| !p.is_empty()) {
            let (creds, hostport) = match part.rsplit_once('@') {
                Some((c, h)) => (Some(c), h),
                None => (None, part),
            };
            let (user, password) = match creds {
                Some(c) => {
                    let (u, p) = c.split_once(':').unwrap_or((c, ""));
                    (
                        percent_decode(u).map_err(|e| bad(&e))?,
                        percent_decode(p).map_err(|e| bad(&e))?,
                    )
                }
                None => (String::new(), String::new()),
            };
            let (host, port) = split_host_port(hostport).map_err(|e| bad(&e))?;
            // RabbitMQ's TLS listener is 5671 by convention; a URL naming no port means it.
            let port = if scheme == "amqps" && !hostport.ends_with(":5672") && port == 5672 {
                5671
            } else {
                port
            };
            hosts.push(Host {
                host,
                port,
                user,
                password,
            });
        }
        if hosts.is_empty() {
            // oslo.messaging's default for a URL without hosts.
            hosts.push(Host {
                host: "localhost".into(),
                port: 5672,
                user: "guest".into(),
                password: "guest".into(),
            });
        }
        Ok(TransportUrl {
            hosts,
            vhost,
            heartbeat,
            ssl,
        })
    }
}

fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in host {s:?}"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("bad host {s:?}"))?,
                ),
            ),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(format!("empty host in {s:?}"));
    }
    let port = match port {
        None | Some("") => 5672,
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("percent-escapes in {s:?} are not UTF-8"))
}

/// The URL with passwords replaced, for messages.
pub(super) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (netloc, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let hosts: Vec<String> = netloc
        .split(',')
        .map(|h| match h.rsplit_once('@') {
            Some((creds, host)) => match creds.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => h.to_string(),
            },
            None => h.to_string(),
        })
        .collect();
    format!("{scheme}://{}{tail}", hosts.join(","))
}

/// The TLS configuration `[messaging]` asks for, or `None` for a plain connection. TLS is on
/// with an `amqps://` URL, `?ssl=1` or `ssl = true`; as in oslo.messaging, the broker's
/// certificate is checked (chain and name) when `ssl_ca_file` is given and not otherwise.
/// Reads and parses the files, so a bad one is a start-up (and `--check-config`) error.
pub fn tls_config(cfg: &MessagingConfig) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if cfg.transport_url.is_empty() {
        return Ok(None);
    }
    let url = TransportUrl::parse(&cfg.transport_url)?;
    tls_config_for(cfg, &url)
}

pub(super) fn tls_config_for(
    cfg: &MessagingConfig,
    url: &TransportUrl,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let file = |name: &'static str, v: &str| (!v.is_empty()).then(|| (name, v.into()));
    let files = storage::tls::TlsFiles {
        root: file("ssl_ca_file", &cfg.ssl_ca_file),
        cert: file("ssl_cert_file", &cfg.ssl_cert_file),
        key: file("ssl_key_file", &cfg.ssl_key_file),
    };
    let any_file = files.root.is_some() || files.cert.is_some() || files.key.is_some();
    if !(url.ssl || cfg.ssl) {
        if any_file {
            log::warn!(
                "[messaging] ssl_*_file options are set but TLS is off (ssl = false and a \
                 rabbit:// URL without ?ssl=1): they are not used"
            );
        }
        return Ok(None);
    }
    let verify = if files.root.is_some() {
        storage::tls::Verify::Full
    } else {
        storage::tls::Verify::Encrypt
    };
    storage::tls::client_config(verify, &files)
        .map(|c| Some(Arc::new(c)))
        .map_err(|e| format!("[messaging] TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_urls_read_like_oslo_messaging() {
        let u = TransportUrl::parse("rabbit://guest:guest@127.0.0.1:5672/").unwrap();
        assert_eq!(u.vhost, "/");
        assert_eq!(
            u.hosts,
            vec![Host {
                host: "127.0.0.1".into(),
                port: 5672,
                user: "guest".into(),
                password: "guest".into()
            }]
        );
        let u = TransportUrl::parse(
            "rabbit://a:p%40ss@h1:5673,b:q@h2,c:r@[::1]:5674/open%2Fstack?heartbeat_timeout_threshold=5",
        )
        .unwrap();
        assert_eq!(u.vhost, "open/stack");
        assert_eq!(u.heartbeat, 5);
        let hp: Vec<_> = u
            .hosts
            .iter()
            .map(|h| {
                (
                    h.host.as_str(),
                    h.port,
                    h.user.as_str(),
                    h.password.as_str(),
                )
            })
            .collect();
        assert_eq!(
            hp,
            [
                ("h1", 5673, "a", "p@ss"),
                ("h2", 5672, "b", "q"),
                ("::1", 5674, "c", "r")
            ]
        );
        let u = TransportUrl::parse("rabbit://").unwrap();
        assert_eq!(u.hosts[0].host, "localhost");
        assert_eq!(u.hosts[0].user, "guest");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.heartbeat, HEARTBEAT);
        let u = TransportUrl::parse("kombu://h").unwrap();
        assert_eq!((u.hosts[0].port, u.hosts[0].user.as_str()), (5672, ""));
        assert!(!u.ssl);
        let u = TransportUrl::parse("amqps://u:p@h1,u:p@h2:5672,u:p@h3:6000/").unwrap();
        assert!(u.ssl);
        let ports: Vec<_> = u.hosts.iter().map(|h| h.port).collect();
        assert_eq!(ports, [5671, 5672, 6000]);
        assert!(TransportUrl::parse("rabbit://h/?ssl=1").unwrap().ssl);
        assert!(!TransportUrl::parse("rabbit://h/?ssl=0").unwrap().ssl);

        for (bad, want) in [
            ("127.0.0.1:5672", "expected rabbit://"),
            ("amqp://h/", "unsupported scheme \"amqp\""),
            ("rabbit://u:secret@h/?ssl=perhaps", "bad ssl"),
            ("kafka://h/", "unsupported scheme"),
            ("rabbit://u:secret@h:port/", "bad port \"port\""),
            ("rabbit://u:secret@[::1/", "unclosed"),
            ("rabbit://u:secret@h/%zz", "percent-escape"),
            (
                "rabbit://u:secret@h/?heartbeat_timeout_threshold=-1",
                "bad heartbeat",
            ),
        ] {
            let err = TransportUrl::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
            assert!(!err.contains("secret"), "password leaked: {err}");
        }
    }
}
