//! The config parser's tests: defaults, overrides, secrets, and errors
//! that name where a value came from.

use super::*;

const GOOD: &str = r#"
[backends.main]
url = "sqlite://demo.db"

[plugins.upper]
path = "upper.wasm"

[[routes]]
name = "upper"
topics = ["orders.*"]
plugin = "upper"
"#;

fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<Loaded> {
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    parse(text, "test.toml", PathBuf::from("/etc/sluice"), |k| {
        env.get(k).cloned()
    })
}

#[test]
fn good_config_loads_with_defaults() {
    let loaded = parse_with(GOOD, &[]).unwrap();
    let route = &loaded.config.routes[0];
    assert_eq!(route.group(), "upper");
    assert_eq!(route.dead_letter_topic(), "upper.dead-letter");
    assert_eq!(loaded.source_backend(route), "main");
    let (path, settings) = loaded.plugin_settings("upper").unwrap();
    assert_eq!(path, PathBuf::from("/etc/sluice/upper.wasm"));
    assert_eq!(settings.timeout, Duration::from_secs(1));
}

#[test]
fn environment_overrides_backend_url() {
    let all = parse_with(GOOD, &[("SLUICE_BACKEND_URL", "memory://")]).unwrap();
    assert_eq!(all.config.backends["main"].url, "memory://");
    let one = parse_with(
        GOOD,
        &[
            ("SLUICE_BACKEND_URL", "memory://"),
            ("SLUICE_BACKEND_MAIN_URL", "sqlite://x.db"),
        ],
    )
    .unwrap();
    assert_eq!(one.config.backends["main"].url, "sqlite://x.db");
}

#[test]
fn a_backend_url_takes_variables_from_the_environment() {
    let text = GOOD.replace(
        "url = \"sqlite://demo.db\"",
        "url = \"redis://app:${REDIS_PASSWORD}@cache:6379/${DB}\"",
    );
    let loaded = parse_with(&text, &[("REDIS_PASSWORD", "s3cr/t"), ("DB", "2")]).unwrap();
    assert_eq!(
        loaded.config.backends["main"].url,
        "redis://app:s3cr/t@cache:6379/2"
    );
    let err = format!("{:#}", parse_with(&text, &[("DB", "2")]).unwrap_err());
    assert!(err.contains("backends.main.url"), "{err}");
    assert!(err.contains("`REDIS_PASSWORD`"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    let broken = GOOD.replace("sqlite://demo.db", "redis://${OOPS@cache");
    let err = format!("{:#}", parse_with(&broken, &[]).unwrap_err());
    assert!(err.contains("without a closing"), "{err}");
}

#[test]
fn a_backend_url_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("url"), "postgres://app:pw@db/test\n").unwrap();
    let text = GOOD.replace("url = \"sqlite://demo.db\"", "url_file = \"url\"");
    let parse_in = |text: &str| parse(text, "test.toml", dir.path().to_path_buf(), |_| None);
    let loaded = parse_in(&text).unwrap();
    assert_eq!(
        loaded.config.backends["main"].url,
        "postgres://app:pw@db/test"
    );

    let both = GOOD.replace(
        "url = \"sqlite://demo.db\"",
        "url = \"memory://\"\nurl_file = \"url\"",
    );
    let err = format!("{:#}", parse_in(&both).unwrap_err());
    assert!(err.contains("backends.main.url_file"), "{err}");
    assert!(err.contains("not both"), "{err}");
    let missing = GOOD.replace("url = \"sqlite://demo.db\"", "url_file = \"nowhere\"");
    let err = format!("{:#}", parse_in(&missing).unwrap_err());
    assert!(
        err.contains("`backends.main.url_file`: cannot read"),
        "{err}"
    );
    std::fs::write(dir.path().join("url"), "cache:6379\n").unwrap();
    let err = format!("{:#}", parse_in(&text).unwrap_err());
    assert!(
        err.starts_with("test.toml: line 3: `backends.main.url` (read from "),
        "{err}"
    );
    assert!(err.contains("`cache:6379` is not a URL"), "{err}");
    let neither = GOOD.replace("url = \"sqlite://demo.db\"", "");
    let err = format!("{:#}", parse_in(&neither).unwrap_err());
    assert!(err.contains("`backends.main.url`: missing"), "{err}");
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let text = GOOD.replace("plugin = \"upper\"", "plugin = \"upper\"\nconcurency = 4");
    let err = format!("{:#}", parse_with(&text, &[]).unwrap_err());
    assert!(err.contains("concurency"), "{err}");
    assert!(err.contains("line 12"), "{err}");
}

#[test]
fn wrong_type_is_named_with_its_line() {
    let text = GOOD.replace("[plugins.upper]", "[plugins.upper]\ntimeout_ms = \"soon\"");
    let err = format!("{:#}", parse_with(&text, &[]).unwrap_err());
    assert!(err.contains("timeout_ms"), "{err}");
    assert!(err.contains("line 6"), "{err}");
}

#[test]
fn missing_plugin_is_named_with_its_line() {
    let text = GOOD.replace("plugin = \"upper\"", "plugin = \"lower\"");
    let err = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("routes[0].plugin"), "{err}");
    assert!(err.contains("line 11"), "{err}");
    assert!(err.contains("no plugin named `lower`"), "{err}");
}

#[test]
fn bad_pattern_is_refused() {
    let text = GOOD.replace("orders.*", "orders.>.x");
    let err = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("routes[0].topics"), "{err}");
}

#[test]
fn an_outbound_grant_must_be_an_origin() {
    let granted = |hosts: &str| {
        GOOD.replace(
            "path = \"upper.wasm\"\n",
            &format!("path = \"upper.wasm\"\nallowed_outbound_hosts = {hosts}\n"),
        )
    };
    let loaded = parse_with(
        &granted(r#"["https://api.example.com", "http://127.0.0.1:*"]"#),
        &[],
    )
    .unwrap();
    let (_, settings) = loaded.plugin_settings("upper").unwrap();
    assert!(
        settings
            .outbound_http
            .allows(&"https://api.example.com/v1".parse().unwrap())
    );
    assert!(
        settings
            .outbound_http
            .allows(&"http://127.0.0.1:9000/".parse().unwrap())
    );
    assert!(
        !settings
            .outbound_http
            .allows(&"https://example.com/".parse().unwrap())
    );

    let err = parse_with(&granted(r#"["https://api.example.com/v1"]"#), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugins.upper.allowed_outbound_hosts"),
        "{err}"
    );
    assert!(err.contains("`/v1` is not allowed"), "{err}");

    // Nothing is granted by default.
    let (_, settings) = parse_with(GOOD, &[])
        .unwrap()
        .plugin_settings("upper")
        .unwrap();
    assert!(
        !settings
            .outbound_http
            .allows(&"https://api.example.com/".parse().unwrap())
    );
}

#[test]
fn max_rate_must_be_a_positive_rate() {
    for bad in ["0", "-5", "nan", "inf"] {
        let text = GOOD.replace(
            "plugin = \"upper\"\n",
            &format!("plugin = \"upper\"\nmax_rate = {bad}\n"),
        );
        let err = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("routes[0].max_rate"), "{bad}: {err}");
    }
    let text = GOOD.replace(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nmax_rate = 2.5\n",
    );
    assert_eq!(
        parse_with(&text, &[]).unwrap().config.routes[0].max_rate,
        Some(2.5)
    );
}

#[test]
fn telemetry_takes_its_endpoint_and_headers_from_the_environment() {
    let text = format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"${{OTLP}}\"\nheaders = {{ key = \"${{KEY}}\" }}\n"
    );
    let loaded = parse_with(&text, &[("OTLP", "http://collector:4318"), ("KEY", "k")]).unwrap();
    let telemetry = loaded.config.telemetry.unwrap();
    assert_eq!(telemetry.otlp_endpoint, "http://collector:4318");
    assert_eq!(telemetry.headers["key"], "k");
    assert_eq!(telemetry.service_name, "sluice");
    let err = parse_with(&text, &[("OTLP", "collector:4317"), ("KEY", "k")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
    let err = parse_with(&text, &[("OTLP", "http://c")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("telemetry.headers.key"), "{err}");
    assert!(err.contains("`KEY`"), "{err}");
}

#[test]
fn a_password_file_fills_the_urls_user_part() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "p@ss/wörd:1\n").unwrap();
    let text = |url: &str| {
        format!(
            "[backends.main]\nurl = \"{url}\"\npassword_file = \"pw\"\n\n\
             [plugins.upper]\npath = \"upper.wasm\"\n\n\
             [[routes]]\nname = \"upper\"\ntopics = [\"t\"]\nplugin = \"upper\"\n"
        )
    };
    let load = |url: &str| {
        parse(&text(url), "t.toml", dir.path().to_path_buf(), |_| None)
            .map(|l| l.config.backends["main"].url.clone())
    };
    assert_eq!(
        load("redis://app@cache:6379/0?prefix=x").unwrap(),
        "redis://app:p%40ss%2Fw%C3%B6rd%3A1@cache:6379/0?prefix=x"
    );
    assert_eq!(
        load("redis://cache").unwrap(),
        "redis://:p%40ss%2Fw%C3%B6rd%3A1@cache"
    );
    assert_eq!(
        crate::backend::redact(&load("postgres://app@db/test").unwrap()),
        "postgres://app:***@db/test"
    );
    let err = load("redis://app:inline@cache").unwrap_err().to_string();
    assert!(err.contains("backends.main.password_file"), "{err}");
    assert!(err.contains("not both"), "{err}");
    assert!(!err.contains("inline"), "{err}");
    std::fs::remove_file(dir.path().join("pw")).unwrap();
    let err = load("redis://app@cache").unwrap_err().to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn every_accepted_key_is_in_the_reference_and_only_those() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
    let reference = std::fs::read_to_string(&path).unwrap();
    let documented = reference_keys(&reference);
    let mut missing = Vec::new();
    for key in keys::accepted() {
        let wanted = if key.is_table() {
            (key.inner_table(), None)
        } else {
            (key.table.clone(), Some(key.name.clone()))
        };
        if !documented.contains(&wanted) {
            missing.push(format!("{wanted:?} ({})", key.kind));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/config.md leaves out keys the parser accepts (table, key): {missing:#?}"
    );
    let mut unknown = Vec::new();
    for (table, key) in &documented {
        let accepted = keys::accepted().iter().any(|k| match key {
            Some(key) => !k.is_table() && &k.table == table && &k.name == key,
            None => k.is_table() && &k.inner_table() == table,
        });
        if !accepted {
            unknown.push(format!("{table:?} {key:?}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/config.md lists keys the parser does not accept: {unknown:#?}"
    );
}

/// The keys `docs/config.md` documents: each heading naming a table
/// (`` ### `[[routes]]` ``) as `(table, None)`, and each row of a table
/// under it whose first cell is a key (`` | `concurrency` | … ``) as
/// `(table, Some(key))`.
fn reference_keys(text: &str) -> std::collections::BTreeSet<(String, Option<String>)> {
    let mut keys = std::collections::BTreeSet::new();
    let mut table: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('#') {
            table = line
                .split('`')
                .nth(1)
                .filter(|name| name.starts_with('['))
                .map(|name| name.trim_matches(|c| c == '[' || c == ']').to_string());
            if let Some(table) = &table {
                keys.insert((table.clone(), None));
            }
        } else if let (Some(table), Some(row)) = (&table, line.strip_prefix("| `"))
            && let Some((key, _)) = row.split_once('`')
        {
            keys.insert((table.clone(), Some(key.to_string())));
        }
    }
    keys
}

#[test]
fn the_keys_are_read_from_the_structs() {
    keys::trace().expect("every config struct deserializes from the probe");
    let find = |table: &str, name: &str| {
        keys::accepted()
            .iter()
            .find(|k| k.table == table && k.name == name)
            .unwrap_or_else(|| panic!("no key {table}.{name} in {:#?}", keys::accepted()))
            .kind
            .clone()
    };
    assert_eq!(find("", "routes"), "array of tables");
    assert_eq!(find("", "backends"), "tables by name");
    assert_eq!(find("", "runtime"), "table");
    assert_eq!(find("routes", "topics"), "array of strings");
    assert_eq!(find("routes", "start"), "`earliest` or `latest`");
    assert_eq!(find("routes", "retry"), "table");
    assert_eq!(find("routes.retry", "multiplier"), "number");
    assert_eq!(find("plugins.NAME", "env"), "table of strings");
    assert_eq!(find("plugins.NAME.shadow", "sample"), "number");
    assert_eq!(find("backends.NAME", "url"), "string");
    assert_eq!(find("admin", "token"), "string");
    assert_eq!(keys::header("routes"), "[[routes]]");
    assert_eq!(keys::header("backends.NAME"), "[backends.NAME]");
}

#[test]
fn a_misspelt_key_suggests_the_key_meant() {
    let err = |text: &str| format!("{:#}", parse_with(text, &[]).unwrap_err());

    let text = GOOD.replace("plugin = \"upper\"", "plugin = \"upper\"\nconcurency = 4");
    let message = err(&text);
    assert!(
        message.contains(
            "test.toml: line 12: unknown field `concurency` in [[routes]]; \
             did you mean `concurrency`?"
        ),
        "{message}"
    );

    let text = format!("{GOOD}\n[routes.retry]\nmax_attemps = 3\n");
    let message = err(&text);
    assert!(message.contains("in [routes.retry]"), "{message}");
    assert!(
        message.contains("did you mean `max_attempts`?"),
        "{message}"
    );

    let text = GOOD.replace("plugin = \"upper\"", "plugin = \"upper\"\ntimeout_ms = 500");
    let message = err(&text);
    assert!(
        message.contains("`timeout_ms` belongs in [plugins.NAME]"),
        "{message}"
    );

    let text = GOOD.replace("[[routes]]", "[[route]]");
    let message = err(&text);
    assert!(message.contains("at the top level"), "{message}");
    assert!(message.contains("did you mean `routes`?"), "{message}");

    let text = GOOD.replace(
        "path = ",
        "shadow = { path = \"c.wasm\", smaple = 0.5 }\npath = ",
    );
    let message = err(&text);
    assert!(message.contains("in [plugins.upper.shadow]"), "{message}");
    assert!(message.contains("did you mean `sample`?"), "{message}");

    let text = GOOD.replace("plugin = \"upper\"", "plugin = \"upper\"\nzzz = 1");
    let message = err(&text);
    assert!(!message.contains("did you mean"), "{message}");
    assert!(
        message.contains("`concurrency`"),
        "the keys there: {message}"
    );
}

#[test]
fn a_wrong_type_names_the_key() {
    let text = GOOD.replace("[plugins.upper]", "[plugins.upper]\ntimeout_ms = \"soon\"");
    let message = format!("{:#}", parse_with(&text, &[]).unwrap_err());
    assert!(
        message.starts_with("test.toml: line 6: `plugins.upper.timeout_ms`: invalid type"),
        "{message}"
    );
}

#[test]
fn a_value_from_the_environment_names_the_variable() {
    for variable in ["SLUICE_BACKEND_URL", "SLUICE_BACKEND_MAIN_URL"] {
        let message = format!(
            "{:#}",
            parse_with(GOOD, &[(variable, "not-a-url")]).unwrap_err()
        );
        assert!(
            message.contains(&format!(
                "`backends.main.url` as set by the environment variable {variable}: \
                 `not-a-url` is not a URL"
            )),
            "{message}"
        );
        assert!(!message.contains("line"), "{message}");
    }
    let message = format!(
        "{:#}",
        parse_with(GOOD, &[("SLUICE_BACKEND_URL", "redis://${NOPE}@cache")]).unwrap_err()
    );
    assert!(message.contains("SLUICE_BACKEND_URL"), "{message}");
    assert!(message.contains("`NOPE`"), "{message}");

    let admin = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9464\"\n");
    let message = format!(
        "{:#}",
        parse_with(&admin, &[("SLUICE_ADMIN_TOKEN", "")]).unwrap_err()
    );
    assert!(
        message.contains("`admin.token` as set by the environment variable SLUICE_ADMIN_TOKEN"),
        "{message}"
    );
}

#[test]
fn a_value_from_the_file_names_its_line() {
    let text = GOOD.replace("sqlite://demo.db", "not-a-url");
    let message = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with("test.toml: line 3: `backends.main.url`: `not-a-url`"),
        "{message}"
    );
    let text = format!("{GOOD}\n[routes.retry]\nmax_attempts = 3\njitter = 2.0\n");
    let message = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with(
            "test.toml: line 15: `routes[0].retry.jitter` (route `upper`): must be within"
        ),
        "{message}"
    );
    // A key left to its default is placed at its table.
    let text = GOOD.replace("[plugins.upper]", "[plugins.upper]\ntimeout_ms = 60000");
    let message = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with("test.toml: line 9: `routes[0].lease_ms` (route `upper`)"),
        "{message}"
    );
    assert!(!message.contains("line 0"), "{message}");
}

#[test]
fn a_scheme_this_build_lacks_names_the_feature() {
    let without_kafka = ["memory", "sqlite", "redis"];
    let message = crate::backend::unsupported_scheme("kafka", &without_kafka);
    assert!(
        message.starts_with("kafka:// needs a sluice built with --features kafka (or full)"),
        "{message}"
    );
    let message = crate::backend::unsupported_scheme("sns+sqs", &without_kafka);
    assert!(message.contains("--features sqs (or full)"), "{message}");
    let message = crate::backend::unsupported_scheme("redsi", &without_kafka);
    assert!(message.contains("did you mean `redis://`?"), "{message}");
    // Through the config: the key and its line, and what this build has.
    let text = GOOD.replace("sqlite://demo.db", "redsi://cache");
    let message = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with("test.toml: line 3: `backends.main.url`: unknown backend `redsi://`"),
        "{message}"
    );
}

/// Numbers out of their range are refused by `check`, naming the key and
/// its line, rather than wrapping or misbehaving at run time.
#[test]
fn numbers_out_of_range_name_their_key() {
    let plugin = "path = \"upper.wasm\"\n";
    let route = "plugin = \"upper\"\n";
    let cases = [
        (
            plugin,
            "memory_limit_mb = 17592186044416",
            "plugins.upper.memory_limit_mb",
            "line 7",
        ),
        (
            plugin,
            "memory_limit_mb = 0",
            "plugins.upper.memory_limit_mb",
            "line 7",
        ),
        (
            plugin,
            "max_output_mb = 5000",
            "plugins.upper.max_output_mb",
            "line 7",
        ),
        (
            plugin,
            "max_outputs = 0",
            "plugins.upper.max_outputs",
            "line 7",
        ),
        (
            plugin,
            "max_outbound_requests = 0",
            "plugins.upper.max_outbound_requests",
            "line 7",
        ),
        (route, "max_hops = 0", "routes[0].max_hops", "line 12"),
        (
            route,
            "retry = { multiplier = nan }",
            "routes[0].retry.multiplier",
            "line 12",
        ),
        (
            route,
            "retry = { multiplier = inf }",
            "routes[0].retry.multiplier",
            "line 12",
        ),
        (
            route,
            "retry = { multiplier = 0.5 }",
            "routes[0].retry.multiplier",
            "line 12",
        ),
        (
            route,
            "retry = { jitter = 2.0 }",
            "routes[0].retry.jitter",
            "line 12",
        ),
        (
            route,
            "retry = { initial_backoff_ms = 5000, max_backoff_ms = 100 }",
            "routes[0].retry.initial_backoff_ms",
            "line 12",
        ),
    ];
    for (after, line, key, at) in cases {
        let text = GOOD.replace(after, &format!("{after}{line}\n"));
        let err = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(err.contains(key), "{line}: {err}");
        assert!(err.contains(at), "{line}: {err}");
    }
    let runtime = format!("{GOOD}\n[runtime]\nmax_message_bytes = 0\n");
    let err = parse_with(&runtime, &[]).unwrap_err().to_string();
    assert!(err.contains("runtime.max_message_bytes"), "{err}");
    let admin = format!("{GOOD}\n[admin]\nmax_upload_mb = 99999999999999\n");
    let err = parse_with(&admin, &[]).unwrap_err().to_string();
    assert!(err.contains("admin.max_upload_mb"), "{err}");
    assert!(err.contains("outside 1..=4096 MiB"), "{err}");
}

/// A route that needs what its backend does not guarantee is refused,
/// naming the key and the backends of this build that would do.
#[cfg(all(
    feature = "redis",
    feature = "sqs",
    feature = "nats",
    feature = "postgres"
))]
#[test]
fn a_route_needing_what_its_backend_lacks_is_refused() {
    let ordered = GOOD.replace(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nordered = true\n",
    );
    assert!(parse_with(&ordered, &[]).is_ok());
    let on_jetstream = ordered.replace("sqlite://demo.db", "jetstream://localhost");
    let err = parse_with(&on_jetstream, &[]).unwrap_err().to_string();
    assert!(err.contains("routes[0].ordered"), "{err}");
    assert!(err.contains("line 12"), "{err}");
    assert!(
        err.contains("(jetstream://) does not keep each key's messages in order"),
        "{err}"
    );
    assert!(err.contains("sqlite://"), "{err}");
    assert!(err.contains("redis://"), "{err}");
    assert!(err.contains("jetstream:// with shards=N"), "{err}");
    let sharded = ordered.replace("sqlite://demo.db", "jetstream://localhost?shards=16");
    assert!(parse_with(&sharded, &[]).is_ok());
    assert!(
        err.contains("sqs://") && !err.contains("sns+sqs://"),
        "{err}"
    );
    let on_redis = ordered.replace("sqlite://demo.db", "redis://localhost");
    assert!(parse_with(&on_redis, &[]).is_ok());
    // At-most-once backends keep order for one subscriber only.
    for scheme in ["nats://localhost", "redis+pubsub://localhost"] {
        let at_most_once = ordered.replace("sqlite://demo.db", scheme);
        let err = parse_with(&at_most_once, &[]).unwrap_err().to_string();
        assert!(err.contains("routes[0].ordered"), "{scheme}: {err}");
        assert!(
            err.contains("across the consumers of a group"),
            "{scheme}: {err}"
        );
        assert!(!err.contains("nats://,"), "{scheme}: {err}");
        assert!(err.contains("postgres://"), "{scheme}: {err}");
    }

    // Every backend takes topic patterns, SQS's included.
    let on_sqs = GOOD.replace("sqlite://demo.db", "sqs://localhost:4566");
    assert!(on_sqs.contains("orders.*"));
    assert!(parse_with(&on_sqs, &[]).is_ok());
}

/// `start = "earliest"` asks for what was published before the group
/// existed: refused on a backend that keeps no history, naming those that
/// do; left out, the default stands on every backend.
#[cfg(feature = "nats")]
#[test]
fn earliest_is_refused_where_nothing_is_kept() {
    let earliest = GOOD.replace(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nstart = \"earliest\"\n",
    );
    assert!(parse_with(&earliest, &[]).is_ok());
    for url in ["memory://", "nats://127.0.0.1:4222"] {
        let on = earliest.replace("sqlite://demo.db", url);
        let err = parse_with(&on, &[]).unwrap_err().to_string();
        assert!(err.contains("routes[0].start"), "{err}");
        assert!(err.contains("line 12"), "{err}");
        assert!(err.contains("keeps none"), "{err}");
        let these: Vec<&str> = err
            .split("these do: ")
            .nth(1)
            .unwrap()
            .split(", ")
            .collect();
        assert!(these.contains(&"sqlite://"), "{err}");
        for none in ["memory://", "nats://", "redis+pubsub://"] {
            assert!(!these.contains(&none), "{err}");
        }
        let default = GOOD.replace("sqlite://demo.db", url);
        assert!(parse_with(&default, &[]).is_ok(), "{url}");
        let latest = earliest.replace("\"earliest\"", "\"latest\"");
        assert!(parse_with(&latest.replace("sqlite://demo.db", url), &[]).is_ok());
    }
}

/// Every backend's URL parameters are parsed by `check` as connecting
/// would: an unknown, repeated or malformed one is refused, named.
#[cfg(all(
    feature = "redis",
    feature = "nats",
    feature = "postgres",
    feature = "kafka",
    feature = "sqs",
    feature = "filelog"
))]
#[test]
fn backend_parameters_are_checked_without_connecting() {
    let cases = [
        ("memory://?capacity=abc", "capacity"),
        ("memory://?capasity=5", "capasity"),
        ("sqlite://", "sqlite://"),
        ("sqlite://x.db?poll_ms=fast", "poll_ms"),
        (
            "sqlite://x.db?synchronous=full&synchronous=off",
            "synchronous",
        ),
        ("file:///tmp/log?fsync=sometimes", "fsync"),
        ("redis://h?blok_ms=5", "blok_ms"),
        ("redis://h?block_ms=5&block_ms=6", "block_ms"),
        ("redis+pubsub://h?prefix", "prefix"),
        ("nats://h:4222?pending=lots", "pending"),
        ("nats://h:4222?nmae=x", "nmae"),
        ("jetstream://h:4222?replicas=two", "replicas"),
        ("postgres://h/db?pool=none", "pool"),
        ("postgres://h/db?poool=3", "poool"),
        ("kafka://h:9092?timeout_ms=soon", "timeout_ms"),
        ("sqs://localhost:4566?wait_s=30", "wait_s"),
        ("sqs://localhost:4566?wiat_s=3", "wiat_s"),
        ("sns+sqs://localhost:4566?prefix=a&prefix=b", "prefix"),
    ];
    let mut wrong = Vec::new();
    for (url, named) in cases {
        let text = GOOD.replace("sqlite://demo.db", url);
        match parse_with(&text, &[]) {
            Ok(_) => wrong.push(format!("{url}: accepted")),
            Err(e) => {
                let err = format!("{e:#}");
                if !(err.contains("backends.main.url") && err.contains(named)) {
                    wrong.push(format!("{url}: {err}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_route_may_publish_to_several_backends() {
    let text = GOOD.replace(
        "url = \"sqlite://demo.db\"",
        "url = \"sqlite://demo.db\"\n[backends.nats]\nurl = \"nats://127.0.0.1:4222\"\n\
         [backends.sqs]\nurl = \"sqs://127.0.0.1:4566\"",
    );
    let with_outputs = |outputs: &str| {
        format!(
            "{}[[routes]]\nname = \"r\"\ntopics = [\"t\"]\nplugin = \"upper\"\nbackend = \"main\"\n{outputs}\n",
            text.split("[[routes]]").next().unwrap()
        )
    };
    let loaded = parse_with(
        &with_outputs("output_backends = [\"nats\", \"sqs\"]\noutput_failure = \"dead-letter\""),
        &[],
    )
    .unwrap();
    let route = &loaded.config.routes[0];
    assert_eq!(loaded.output_backends(route), ["nats", "sqs"]);
    assert_eq!(loaded.dead_letter_backend(route), "nats");
    assert_eq!(route.output_failure, OutputFailure::DeadLetter);

    let one = parse_with(&with_outputs(""), &[]).unwrap();
    assert_eq!(one.output_backends(&one.config.routes[0]), ["main"]);
    assert_eq!(one.config.routes[0].output_failure, OutputFailure::Wait);

    for (outputs, expected) in [
        (
            "output_backend = \"nats\"\noutput_backends = [\"sqs\"]",
            "not both",
        ),
        ("output_backends = [\"nats\", \"nats\"]", "listed twice"),
        (
            "output_backends = [\"nats\", \"kafka\"]",
            "no backend named `kafka`",
        ),
        ("output_failure = \"drop\"", "unknown variant"),
    ] {
        let err = format!("{:#}", parse_with(&with_outputs(outputs), &[]).unwrap_err());
        assert!(err.contains(expected), "{outputs}: {err}");
        let key = outputs.split(' ').next().unwrap();
        assert!(err.contains(key), "{outputs}: {err}");
    }
}
