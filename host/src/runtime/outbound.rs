//! Outbound HTTP for plugins, by grant. A plugin's `wasi:http` requests go
//! out only to the origins its config lists in `allowed_outbound_hosts`;
//! any other request fails in the guest with `HTTP-request-denied` at once,
//! and the host logs what to grant. Granted requests share the plugin's
//! bound on requests in flight and never outlive the call's deadline.
//!
//! Redirects are not followed by the host: a plugin that follows one sends
//! a new request, which is checked like any other. A response body reaches
//! the plugin one frame at a time as it reads, so what it keeps counts
//! against its memory cap.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Scheme, Uri};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// What a plugin may reach over HTTP, shared by all its instances.
#[derive(Debug)]
pub struct OutboundHttp {
    origins: Vec<Origin>,
    /// Requests in flight (sent, response body not yet dropped).
    in_flight: Arc<Semaphore>,
}

impl Default for OutboundHttp {
    /// Nothing granted.
    fn default() -> Self {
        OutboundHttp::new(Vec::new(), 1)
    }
}

impl OutboundHttp {
    /// A grant of `origins`, at most `max_in_flight` requests at a time.
    pub fn new(origins: Vec<Origin>, max_in_flight: usize) -> Self {
        OutboundHttp {
            origins,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// Whether a request to `uri` is granted.
    pub fn allows(&self, uri: &Uri) -> bool {
        self.origins.iter().any(|origin| origin.matches(uri))
    }
}

/// One entry of `allowed_outbound_hosts`: `scheme://host[:port]`, where the
/// scheme may be `*` (http or https), the host `*` or `*.example.com` (any
/// subdomain), and the port `*`; a port left out is the scheme's default.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    scheme: Option<Scheme>,
    host: Host,
    port: Port,
}

#[derive(Debug, Clone, PartialEq)]
enum Host {
    Any,
    Exactly(String),
    /// `*.example.com`: any name ending in `.example.com`.
    SubdomainOf(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Port {
    Any,
    Exactly(u16),
    /// The scheme's own: 80 for http, 443 for https.
    Default,
}

impl std::str::FromStr for Origin {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("`{text}` is not `scheme://host[:port]` (no `://`)"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "*" => None,
            "http" => Some(Scheme::HTTP),
            "https" => Some(Scheme::HTTPS),
            other => {
                return Err(format!(
                    "`{text}`: scheme `{other}` is not http, https or *"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(extra) = rest.find(['/', '?', '#', '@']) {
            return Err(format!(
                "`{text}`: a grant is an origin (scheme, host and port) only; `{}` is not allowed",
                &rest[extra..]
            ));
        }
        let (host, port) = split_port(rest).map_err(|m| format!("`{text}`: {m}"))?;
        let host = host.to_ascii_lowercase();
        let host = if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
            Host::Exactly(v6.to_string())
        } else if host == "*" {
            Host::Any
        } else if let Some(domain) = host.strip_prefix("*.") {
            valid_host(domain).map_err(|m| format!("`{text}`: {m}"))?;
            Host::SubdomainOf(domain.to_string())
        } else {
            valid_host(&host).map_err(|m| format!("`{text}`: {m}"))?;
            Host::Exactly(host)
        };
        let port = match port {
            None if scheme.is_none() => {
                return Err(format!(
                    "`{text}`: with any scheme, give the port (`:443`, or `:*` for any)"
                ));
            }
            None => Port::Default,
            Some("*") => Port::Any,
            Some(number) => Port::Exactly(
                number
                    .parse()
                    .map_err(|_| format!("`{text}`: port `{number}` is not a number or *"))?,
            ),
        };
        Ok(Origin { scheme, host, port })
    }
}

/// `host` and its port, if it has one; an IPv6 host is in brackets.
fn split_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(inner) = authority.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or("an IPv6 address misses its `]`")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`[{host}]` is not an IPv6 address"));
        }
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("`{after}` after the IPv6 address")),
            },
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn valid_host(host: &str) -> Result<(), String> {
    let fine = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    if fine {
        Ok(())
    } else {
        Err(format!(
            "`{host}` is not a host name or address (a wildcard may only be all of it, `*`, or \
             lead it, `*.example.com`)"
        ))
    }
}

impl Origin {
    fn matches(&self, uri: &Uri) -> bool {
        let (Some(scheme), Some(host)) = (uri.scheme(), uri.host()) else {
            return false;
        };
        if !(*scheme == Scheme::HTTP || *scheme == Scheme::HTTPS) {
            return false;
        }
        if self.scheme.as_ref().is_some_and(|own| own != scheme) {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_fits = match &self.host {
            Host::Any => true,
            Host::Exactly(own) => match host.parse::<std::net::Ipv6Addr>() {
                Ok(v6) => v6.to_string() == *own,
                Err(_) => host.eq_ignore_ascii_case(own),
            },
            Host::SubdomainOf(domain) => {
                host.len().checked_sub(domain.len() + 1).is_some_and(|cut| {
                    host.as_bytes()[cut] == b'.' && host[cut + 1..].eq_ignore_ascii_case(domain)
                })
            }
        };
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let port_fits = match self.port {
            Port::Any => true,
            Port::Exactly(own) => port == own,
            Port::Default => port == default_port,
        };
        host_fits && port_fits
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scheme {
            Some(scheme) => write!(f, "{scheme}://")?,
            None => write!(f, "*://")?,
        }
        match &self.host {
            Host::Any => write!(f, "*")?,
            Host::Exactly(host) if host.contains(':') => write!(f, "[{host}]")?,
            Host::Exactly(host) => write!(f, "{host}")?,
            Host::SubdomainOf(domain) => write!(f, "*.{domain}")?,
        }
        match self.port {
            Port::Any => write!(f, ":*"),
            Port::Exactly(port) => write!(f, ":{port}"),
            Port::Default => Ok(()),
        }
    }
}

/// The `wasi:http` hooks of one instance: its plugin's grant and the
/// deadline of the call under way.
pub(super) struct Hooks {
    pub(super) plugin: String,
    pub(super) grant: Arc<OutboundHttp>,
    pub(super) deadline: Instant,
}

type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ),
    wasmtime_wasi_http::Error,
>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        if !self.grant.allows(request.uri()) {
            tracing::warn!(
                plugin = %self.plugin,
                uri = %origin_of(request.uri()),
                "outbound HTTP request denied: the origin is not in `plugins.{}.allowed_outbound_hosts`",
                self.plugin
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let options = within(
            options,
            self.deadline.saturating_duration_since(Instant::now()),
        );
        let in_flight = self.grant.in_flight.clone();
        Box::new(async move {
            // Waiting for a turn counts against the call's deadline too:
            // the call is cut there, and this future with it.
            let turn = in_flight
                .acquire_owned()
                .await
                .map_err(|_| wasmtime_wasi_http::Error::ConnectionLimitReached)?;
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            // The turn ends when the plugin is done with the body.
            let response = response.map(move |body| {
                body.map_frame(move |frame| {
                    let _ = &turn;
                    frame
                })
                .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// How far past the call's deadline a request's waits may reach. Cut to the
/// deadline itself, a read timing out in the same millisecond as the call
/// would race it: the guest might see `ConnectionReadTimeout` first and
/// answer something of its own (a reject, say) for what is a timeout. A
/// little beyond it, the call's deadline always ends the call first.
const PAST_DEADLINE: Duration = Duration::from_millis(100);

/// `options` with every wait cut to what is left of the call (and
/// [`PAST_DEADLINE`]), so none outlives it.
fn within(options: Option<RequestOptions>, left: Duration) -> RequestOptions {
    let options = options.unwrap_or_default();
    let left = left + PAST_DEADLINE;
    let cut = |wait: Option<Duration>| Some(wait.map_or(left, |wait| wait.min(left)));
    RequestOptions {
        connect_timeout: cut(options.connect_timeout),
        first_byte_timeout: cut(options.first_byte_timeout),
        between_bytes_timeout: cut(options.between_bytes_timeout),
    }
}

/// The scheme, host and port of `uri`, for a log line: the path and query
/// may carry secrets.
fn origin_of(uri: &Uri) -> String {
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map_or("?", |a| a.as_str())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(origins: &[&str]) -> OutboundHttp {
        OutboundHttp::new(origins.iter().map(|o| o.parse().unwrap()).collect(), 1)
    }

    fn uri(text: &str) -> Uri {
        text.parse().unwrap()
    }

    #[test]
    fn an_origin_grants_its_scheme_host_and_port_only() {
        let api = grant(&["https://api.example.com"]);
        assert!(api.allows(&uri("https://api.example.com/v1/users?id=1")));
        assert!(api.allows(&uri("https://API.example.com:443/")));
        assert!(!api.allows(&uri("http://api.example.com/")), "scheme");
        assert!(!api.allows(&uri("https://api.example.com:8443/")), "port");
        assert!(!api.allows(&uri("https://evil.example.com/")), "host");
        assert!(!api.allows(&uri("https://api.example.com.evil.org/")));
        assert!(!OutboundHttp::default().allows(&uri("https://api.example.com/")));
    }

    #[test]
    fn wildcards_stand_for_a_whole_part() {
        let local = grant(&["http://127.0.0.1:*"]);
        assert!(local.allows(&uri("http://127.0.0.1:8080/x")));
        assert!(local.allows(&uri("http://127.0.0.1/")));
        assert!(!local.allows(&uri("https://127.0.0.1:8080/")));
        assert!(!local.allows(&uri("http://127.0.0.2:8080/")));

        let subdomains = grant(&["https://*.example.com"]);
        assert!(subdomains.allows(&uri("https://a.b.example.com/")));
        assert!(!subdomains.allows(&uri("https://example.com/")));
        assert!(!subdomains.allows(&uri("https://badexample.com/")));

        let any = grant(&["*://*:*"]);
        assert!(any.allows(&uri("http://anything:1/")));
        assert!(any.allows(&uri("https://[::1]:9/")));

        let v6 = grant(&["http://[::1]:8080"]);
        assert!(v6.allows(&uri("http://[::1]:8080/")));
        assert!(!v6.allows(&uri("http://[::2]:8080/")));
    }

    #[test]
    fn a_grant_that_is_not_an_origin_is_refused_saying_why() {
        for (text, says) in [
            ("api.example.com", "no `://`"),
            ("ftp://api.example.com", "scheme `ftp`"),
            ("https://api.example.com/v1", "`/v1` is not allowed"),
            ("https://user@api.example.com", "`@api.example.com`"),
            ("https://api.example.com:http", "port `http`"),
            ("https://api.*.com", "wildcard"),
            ("*://api.example.com", "give the port"),
            ("http://[::1", "`]`"),
        ] {
            let error = text.parse::<Origin>().unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn an_origin_prints_as_written() {
        for text in [
            "https://api.example.com",
            "http://127.0.0.1:*",
            "*://*.example.com:443",
            "http://[::1]:8080",
        ] {
            assert_eq!(text.parse::<Origin>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn a_request_waits_no_longer_than_the_call_has_left() {
        let left = Duration::from_millis(300);
        let given = RequestOptions {
            connect_timeout: Some(Duration::from_millis(100)),
            first_byte_timeout: Some(Duration::from_secs(60)),
            between_bytes_timeout: None,
        };
        assert_eq!(
            within(Some(given), left),
            RequestOptions {
                connect_timeout: Some(Duration::from_millis(100)),
                first_byte_timeout: Some(left + PAST_DEADLINE),
                between_bytes_timeout: Some(left + PAST_DEADLINE),
            }
        );
    }
}
