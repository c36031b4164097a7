//! `[messaging] transport_url`, read as oslo.messaging's `TransportURL.parse` reads it.

use super::HEARTBEAT;

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
}

impl TransportUrl {
    pub(super) fn parse(url: &str) -> Result<TransportUrl, String> {
        let bad = |why: &str| format!("[messaging] transport_url {:?}: {why}", redact(url));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected rabbit://user:password@host:port/vhost"))?;
        if !matches!(scheme, "rabbit" | "kombu") {
            return Err(bad(&format!(
                "unsupported scheme \"{scheme}\" (only rabbit:// is supported)"
            )));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (netloc, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut heartbeat = HEARTBEAT;
        for (key, value) in query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        {
            match key {
                "ssl" if !matches!(value, "0" | "false" | "False") => {
                    return Err(bad("TLS (ssl) is not supported"));
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
fn redact(url: &str) -> String {
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
