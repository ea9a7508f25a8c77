//! Backend URLs: `scheme://[user:password@]address[?name=value&…]`, split
//! into the address a backend connects to (or opens) and its query
//! parameters. Every backend reads its parameters here, so they follow one
//! set of rules: `NAME=VALUE` pairs joined by `&`, each given at most once,
//! values %-decoded, none unknown; and every error names the parameter and
//! shows the URL without its password.

use std::fmt::{Debug, Display};
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use super::{is_secret_parameter, redact};

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

/// Splits what follows `scheme://` into the address and the query. A
/// password may hold a `?` and a query value an `@` (`name=app@host`), so
/// a `?` followed by an `@` before any `=` or `&` is taken to be inside the
/// credentials, and the query starts at the first `?` that is not.
pub(crate) fn split_query(rest: &str) -> (&str, Option<&str>) {
    let mut from = 0;
    while let Some(i) = rest[from..].find('?') {
        let at = from + i;
        let after = &rest[at + 1..];
        let in_credentials = after
            .find(['@', '=', '&'])
            .is_some_and(|j| after[j..].starts_with('@'));
        if !in_credentials {
            return (&rest[..at], Some(after));
        }
        from = at + 1;
    }
    (rest, None)
}

/// A backend URL split into its address and its query parameters, which
/// the backend takes one by one and then [`finish`](Self::finish)es.
pub struct BackendUrl {
    /// What follows `scheme://` up to the query: `[user:password@]host[:port][/path]`,
    /// a file's path, or nothing.
    pub address: String,
    /// Safe to log.
    pub redacted: String,
    /// The parameters not taken yet, values as written (%-encoded).
    params: Vec<(String, String)>,
}

impl BackendUrl {
    /// Splits `url`, which must start with `scheme://` and name a server.
    pub fn parse(url: &str, scheme: &str) -> Result<Self> {
        let parsed = Self::split(url, scheme)?;
        parsed.require_address(&format!("server (expected {scheme}://HOST:PORT)"))?;
        Ok(parsed)
    }

    /// Splits `url`, which must start with `scheme://`; the address may be
    /// empty (see [`require_address`](Self::require_address)).
    pub fn split(url: &str, scheme: &str) -> Result<Self> {
        let redacted = redact(url);
        let fail = |problem: String| anyhow!("backend URL `{redacted}`: {problem}");
        let Some(rest) = url.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) else {
            return Err(fail(format!("does not start with {scheme}://")));
        };
        let (address, query) = split_query(rest);
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(fail(format!(
                    "parameter `{pair}` has no value (expected NAME=VALUE)"
                )));
            };
            if params.iter().any(|(n, _)| n == name) {
                return Err(fail(format!("`{name}` is given twice")));
            }
            params.push((name.to_string(), value.to_string()));
        }
        Ok(BackendUrl {
            address: address.to_string(),
            redacted,
            params,
        })
    }

    /// Fails unless the URL names something before its parameters; `what`
    /// says what, e.g. `file (expected sqlite://PATH)`.
    pub fn require_address(&self, what: &str) -> Result<()> {
        if self.address.is_empty() {
            return Err(self.error(format!("names no {what}")));
        }
        Ok(())
    }

    /// An error about this URL, in the form every URL error takes.
    pub fn error(&self, problem: impl Display) -> anyhow::Error {
        anyhow!("backend URL `{}`: {problem}", self.redacted)
    }

    /// An error about the value of parameter `name`, hiding a secret's.
    fn invalid(&self, name: &str, value: &str, problem: impl Display) -> anyhow::Error {
        let shown = if is_secret_parameter(name) && !value.is_empty() {
            "***"
        } else {
            value
        };
        self.error(format!("{name} `{shown}` {problem}"))
    }

    /// Removes parameter `name`, its value %-decoded.
    fn take_value(&mut self, name: &str) -> Result<Option<String>> {
        let Some(i) = self.params.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (_, raw) = self.params.remove(i);
        match percent_decode(&raw) {
            Ok(value) => Ok(Some(value)),
            Err(e) => Err(self.invalid(name, &raw, format!("is not valid %-encoding ({e})"))),
        }
    }

    /// Removes parameter `name` and checks its value with `check`, which
    /// answers what is wrong with a value it refuses (`is not a region name`).
    pub fn take_with<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>> {
        let Some(value) = self.take_value(name)? else {
            return Ok(None);
        };
        check(&value)
            .map(Some)
            .map_err(|problem| self.invalid(name, &value, problem))
    }

    /// Removes and parses parameter `name`; `expected` says what it must
    /// be (`a number`).
    pub fn take<T: FromStr>(&mut self, name: &str, expected: &str) -> Result<Option<T>> {
        self.take_with(name, |value| {
            value.parse().map_err(|_| format!("is not {expected}"))
        })
    }

    /// A number within `range` (`1..=1000`, `1..`).
    pub fn take_in<T>(&mut self, name: &str, range: impl RangeBounds<T>) -> Result<Option<T>>
    where
        T: FromStr + PartialOrd + Display + Debug,
    {
        self.take_with(name, |value| match value.parse() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(format!("is not a number {}", allowed(&range))),
        })
    }

    /// A duration parameter in milliseconds.
    pub fn take_ms(&mut self, name: &str) -> Result<Option<Duration>> {
        Ok(self
            .take::<u64>(name, "a number of milliseconds")?
            .map(Duration::from_millis))
    }

    /// `true` or `false` (or `1` and `0`, `yes` and `no`).
    pub fn take_bool(&mut self, name: &str) -> Result<Option<bool>> {
        self.take_with(name, |value| match value {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err("is not true or false".into()),
        })
    }

    /// A file's path.
    pub fn take_path(&mut self, name: &str) -> Result<Option<PathBuf>> {
        self.take_with(name, |value| match value {
            "" => Err("is not a file path".into()),
            path => Ok(PathBuf::from(path)),
        })
    }

    /// One of `choices`, named in any case.
    pub fn take_choice<T: Clone>(
        &mut self,
        name: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>> {
        self.take_with(name, |value| {
            match choices.iter().find(|(c, _)| c.eq_ignore_ascii_case(value)) {
                Some((_, choice)) => Ok(choice.clone()),
                None => {
                    let names: Vec<&str> = choices.iter().map(|(c, _)| *c).collect();
                    Err(format!("is not one of {}", names.join(", ")))
                }
            }
        })
    }

    /// Removes every parameter `PREFIXNAME`, answering each NAME with its
    /// value, in the URL's order: properties passed on to a client library.
    pub fn take_prefixed(&mut self, prefix: &str) -> Result<Vec<(String, String)>> {
        let names: Vec<String> = self
            .params
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, _)| n.clone())
            .collect();
        let mut taken = Vec::new();
        for name in names {
            if name == prefix {
                return Err(self.error(format!("`{prefix}` needs a property name after it")));
            }
            if let Some(value) = self.take_value(&name)? {
                taken.push((name[prefix.len()..].to_string(), value));
            }
        }
        Ok(taken)
    }

    /// The parameters not taken yet, values as written (%-encoded), e.g. to
    /// hand on to a client library that decodes them itself.
    pub fn remaining(&self) -> &[(String, String)] {
        &self.params
    }

    /// Fails on any parameter not taken yet.
    pub fn finish(&self, known: &[&str]) -> Result<()> {
        if let Some((name, _)) = self.params.first() {
            return Err(self.error(format!(
                "unknown parameter `{name}` (known: {})",
                known.join(", ")
            )));
        }
        Ok(())
    }
}

/// Which numbers `range` holds, for an error.
fn allowed<T: Display + Debug>(range: &impl RangeBounds<T>) -> String {
    match (range.start_bound(), range.end_bound()) {
        (Bound::Included(lo), Bound::Included(hi)) => format!("from {lo} to {hi}"),
        (Bound::Included(lo), Bound::Unbounded) => format!("of at least {lo}"),
        (start, end) => format!("within {start:?} and {end:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(result: Result<impl Sized>) -> String {
        format!("{:#}", result.err().expect("an error"))
    }

    #[test]
    fn the_query_starts_after_the_credentials() {
        assert_eq!(split_query("h:1/0?a=b"), ("h:1/0", Some("a=b")));
        assert_eq!(split_query("u:p?ss@h?a=b"), ("u:p?ss@h", Some("a=b")));
        assert_eq!(split_query("h?name=app@host"), ("h", Some("name=app@host")));
        assert_eq!(split_query("?capacity=1"), ("", Some("capacity=1")));
        assert_eq!(split_query("/var/a.db"), ("/var/a.db", None));
    }

    #[test]
    fn pairs_are_checked_as_they_are_split() {
        let url = "x://u:secret@h?a=1&b";
        assert!(err(BackendUrl::parse(url, "x")).contains("parameter `b` has no value"));
        let twice = err(BackendUrl::parse("x://u:secret@h?a=1&a=1", "x"));
        assert!(twice.contains("`a` is given twice"), "{twice}");
        assert!(
            twice.starts_with("backend URL `x://u:***@h?a=1&a=1`: "),
            "{twice}"
        );
        assert!(err(BackendUrl::parse("x://?a=1", "x")).contains("names no server"));
        assert!(err(BackendUrl::parse("y://h", "x")).contains("does not start with x://"));
        assert_eq!(BackendUrl::split("x://?a=1", "x").unwrap().address, "");
    }

    #[test]
    fn typed_takers_decode_and_say_what_they_expect() {
        let mut url = BackendUrl::parse(
            "x://h?n=7&r=0&b=yes&p=%2Ftmp%2Fa%20b&c=FULL&rd.a.b=x%26y&s=t%3D1",
            "x",
        )
        .unwrap();
        assert_eq!(url.take::<u32>("n", "a number").unwrap(), Some(7));
        assert_eq!(url.take::<u32>("absent", "a number").unwrap(), None);
        assert!(err(url.take_in::<u32>("r", 1..)).contains("r `0` is not a number of at least 1"));
        assert_eq!(url.take_bool("b").unwrap(), Some(true));
        assert_eq!(url.take_path("p").unwrap(), Some(PathBuf::from("/tmp/a b")));
        assert_eq!(
            url.take_choice("c", &[("normal", 1), ("full", 2)]).unwrap(),
            Some(2)
        );
        assert_eq!(
            url.take_prefixed("rd.").unwrap(),
            [("a.b".into(), "x&y".into())]
        );
        let odd = |v: &str| {
            if v.len() % 2 == 1 {
                Ok(v.to_string())
            } else {
                Err("is even".into())
            }
        };
        assert_eq!(url.take_with("s", odd).unwrap().as_deref(), Some("t=1"));
        url.finish(&[]).unwrap();

        let mut url = BackendUrl::parse(
            "x://h?r=1001&c=off&b=maybe&p=&v=%zz&password=hunter2&e=ab&rd.=1",
            "x",
        )
        .unwrap();
        assert!(
            err(url.take_in::<u32>("r", 1..=1000))
                .contains("r `1001` is not a number from 1 to 1000")
        );
        assert!(
            err(url.take_choice("c", &[("normal", 1), ("full", 2)]))
                .contains("c `off` is not one of normal, full")
        );
        assert!(err(url.take_bool("b")).contains("b `maybe` is not true or false"));
        assert!(err(url.take_path("p")).contains("p `` is not a file path"));
        assert!(err(url.take::<String>("v", "text")).contains("v `%zz` is not valid %-encoding"));
        let hidden = err(url.take::<u8>("password", "a number"));
        assert!(
            hidden.contains("password `***` is not a number") && !hidden.contains("hunter2"),
            "{hidden}"
        );
        assert!(
            err(url.take_with("e", |_| Err::<(), _>("is even".into()))).contains("e `ab` is even")
        );
        assert!(err(url.take_prefixed("rd.")).contains("`rd.` needs a property name"));
        assert!(err(url.finish(&["x", "y"])).contains("unknown parameter `rd.` (known: x, y)"));
    }

    #[test]
    fn the_rest_stays_as_written() {
        let mut url = BackendUrl::parse("x://h?a=1&options=-c%20x", "x").unwrap();
        url.take::<u8>("a", "a number").unwrap();
        assert_eq!(url.remaining(), [("options".into(), "-c%20x".into())]);
    }
}
