//! The config file parser as a fuzz target: any text must load or give an
//! error, and a config that loads must yield what the host derives from it
//! (plugin settings, retry delays, leases, its backend URLs parsed) without
//! a panic. A comment line `#env NAME=VALUE` in an input sets an
//! environment variable for it, so overrides are fuzzed too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{Target, fuzz};
use crate::config::parse;
use crate::router::RetryPolicy;

pub const TARGET: Target = Target {
    name: "config",
    dictionary: &[
        b"[backends.main]",
        b"[backends.",
        b"[plugins.upper]",
        b"[plugins.",
        b"[[routes]]",
        b"[routes.retry]",
        b"[runtime]",
        b"[admin]",
        b"url = ",
        b"\"sqlite://sluice.db\"",
        b"\"memory://\"",
        b"path = \"upper.wasm\"",
        b"name = ",
        b"topics = [\"orders.*\"]",
        b"plugin = \"upper\"",
        b"backend = ",
        b"output_backend = ",
        b"dead_letter_topic = ",
        b"concurrency = ",
        b"max_in_flight = ",
        b"batch_size = ",
        b"lease_ms = ",
        b"timeout_ms = ",
        b"memory_limit_mb = ",
        b"max_output_mb = ",
        b"max_attempts = ",
        b"multiplier = ",
        b"jitter = ",
        b"initial_backoff_ms = ",
        b"max_backoff_ms = ",
        b"listen = \"0.0.0.0:9464\"",
        b"token = ",
        b"publish_to = [\"orders.>\"]",
        b"read_dirs = { data = \"data\" }",
        b"config = { a = \"b\" }",
        b"start = \"latest\"",
        b"inf",
        b"-inf",
        b"1e308",
        b"orders.>",
        b"'",
        b"'''",
        b"#env SLUICE_BACKEND_URL=",
        b"#env SLUICE_ADMIN_TOKEN=",
    ],
    max_len: 1024,
};

#[test]
fn config() {
    fuzz(&TARGET, check);
}

fn check(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let env: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("#env ")?.split_once('='))
        .collect();
    let Ok(loaded) = parse(&text, "fuzz.toml", PathBuf::from("/etc/sluice"), |name| {
        env.get(name).map(|value| value.to_string())
    }) else {
        return;
    };
    for name in loaded.config.plugins.keys() {
        let (_, settings) = loaded
            .plugin_settings(name)
            .expect("a plugin of the config has settings");
        assert!(!settings.timeout.is_zero(), "plugin `{name}` has no time");
    }
    for route in &loaded.config.routes {
        assert!(
            loaded
                .config
                .backends
                .contains_key(loaded.source_backend(route))
                && loaded
                    .config
                    .backends
                    .contains_key(loaded.output_backend(route)),
            "route `{}` names a backend the config does not have",
            route.name
        );
        let _ = (route.group(), route.dead_letter_topic());
        let _ = Duration::from_millis(route.lease_ms);
        let policy = RetryPolicy::from(&route.retry);
        for attempt in [1, 2, route.retry.max_attempts, u32::MAX] {
            let _ = policy.may_retry(attempt);
            let _ = policy.backoff(attempt);
        }
    }
    for backend in loaded.config.backends.values() {
        super::urls::parse_everywhere(&backend.url);
    }
}
