//! Backend URLs: `scheme://[user:password@]host[:port][/path][?name=value&…]`
//! split into the address a client library connects to and Sluice's own query
//! parameters, parsed with errors that name the parameter and never show the
//! password.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::redact;

/// Undoes `%XX` escapes (URL parameters and credentials, escaped headers).
pub fn percent_decode(text: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).context("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).context("bad %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("not UTF-8 after %-decoding")
}

/// A backend URL split into its address and its query parameters.
pub struct BackendUrl {
    /// What follows `scheme://` up to the query: `[user:password@]host[:port][/path]`.
    pub address: String,
    /// Safe to log.
    pub redacted: String,
    params: Vec<(String, String)>,
}

impl BackendUrl {
    /// Splits `url`, which must start with `scheme://`.
    pub fn parse(url: &str, scheme: &str) -> Result<Self> {
        let redacted = redact(url);
        let Some(rest) = url.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) else {
            bail!("backend URL `{redacted}` does not start with {scheme}://");
        };
        // The query starts after the credentials, which may hold a `?`.
        let query_from = rest.rfind('@').map_or(0, |at| at + 1);
        let (address, query) = match rest[query_from..].find('?') {
            Some(i) => (&rest[..query_from + i], &rest[query_from + i + 1..]),
            None => (rest, ""),
        };
        if address.is_empty() {
            bail!("backend URL `{redacted}` names no server (expected {scheme}://HOST:PORT)");
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                bail!(
                    "backend URL `{redacted}`: parameter `{pair}` has no value (expected NAME=VALUE)"
                );
            };
            params.push((name.to_string(), value.to_string()));
        }
        Ok(BackendUrl {
            address: address.to_string(),
            redacted,
            params,
        })
    }

    /// Removes and parses parameter `name`.
    pub fn take<T: FromStr>(&mut self, name: &str, expected: &str) -> Result<Option<T>> {
        let Some(i) = self.params.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (_, value) = self.params.remove(i);
        if self.params.iter().any(|(n, _)| n == name) {
            bail!("backend URL `{}`: `{name}` is given twice", self.redacted);
        }
        match value.parse() {
            Ok(parsed) => Ok(Some(parsed)),
            Err(_) => bail!(
                "backend URL `{}`: {name} `{value}` is not {expected}",
                self.redacted
            ),
        }
    }

    /// A duration parameter in milliseconds.
    pub fn take_ms(&mut self, name: &str) -> Result<Option<Duration>> {
        Ok(self
            .take::<u64>(name, "a number of milliseconds")?
            .map(Duration::from_millis))
    }

    /// The parameters not taken yet, e.g. to hand on to a client library.
    pub fn remaining(&self) -> &[(String, String)] {
        &self.params
    }

    /// Fails on any parameter not taken yet.
    pub fn finish(&self, known: &[&str]) -> Result<()> {
        if let Some((name, _)) = self.params.first() {
            bail!(
                "backend URL `{}`: unknown parameter `{name}` (known: {})",
                self.redacted,
                known.join(", ")
            );
        }
        Ok(())
    }
}
