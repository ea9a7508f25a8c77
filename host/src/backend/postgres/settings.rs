//! The PostgreSQL backend's URL:
//! `postgres://[user[:password]@]host[:port]/database[?params]`.
//!
//! Sluice's own parameters are taken out; the rest (`sslmode`,
//! `application_name`, …) go to the driver unchanged. TLS takes libpq's
//! names: `sslmode` (`disable`, `prefer`, `require`, `verify-ca`,
//! `verify-full`), `sslrootcert` (PEM file of the CA; the system's roots
//! without it), `sslcert` and `sslkey` (PEM files of a client certificate,
//! for `hostssl … cert` in `pg_hba.conf`).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::postgres::PgConnectOptions;

use crate::backend::url::{BackendUrl, percent_decode};

/// Settings of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The schema holding Sluice's tables (`schema`, default `sluice`); it is
    /// created if missing. Deployments sharing a database use one each.
    pub schema: String,
    /// Connections in the pool (`pool`, default 10).
    pub pool: u32,
    /// How long messages every group has settled are kept, so a group that
    /// subscribes later from `earliest` still sees them (`retention_ms`,
    /// default one day; 0 deletes them at the next cleanup).
    pub retention: Duration,
    /// How often settled messages past their retention are deleted
    /// (`cleanup_ms`, default 60000).
    pub cleanup: Duration,
    /// The longest a waiting consumer goes without looking at the table
    /// (`poll_ms`, default 1000). Consumers are woken by NOTIFY; this only
    /// bounds the delay when a notification is lost (e.g. the listening
    /// connection was re-established).
    pub poll: Duration,
    /// What the driver connects with.
    pub connect: PgConnectOptions,
    /// The TLS files the URL names (`sslrootcert`, `sslcert`, `sslkey`),
    /// by parameter.
    files: Vec<(&'static str, String)>,
    /// Safe to log.
    pub redacted: String,
}

impl PostgresSettings {
    pub const PARAMS: &[&str] = &["schema", "pool", "retention_ms", "cleanup_ms", "poll_ms"];
    /// The driver's parameters that name a file.
    const FILE_PARAMS: &[&str] = &["sslrootcert", "sslcert", "sslkey"];
    /// Parameters the driver understands, passed on as they are.
    const DRIVER_PARAMS: &[&str] = &[
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "application_name",
        "options",
        "statement-cache-capacity",
    ];

    /// Parses `postgres://…` or `postgresql://…`.
    pub fn parse(url: &str) -> Result<Self> {
        let scheme = if url.starts_with("postgresql://") {
            "postgresql"
        } else {
            "postgres"
        };
        let mut parsed = BackendUrl::parse(url, scheme)?;
        let schema: String = parsed
            .take("schema", "a schema name")?
            .unwrap_or_else(|| "sluice".into());
        if !is_identifier(&schema) {
            bail!(
                "backend URL `{}`: schema `{schema}` must be a lowercase identifier \
                 (letters, digits and `_`, not starting with a digit, at most 63 bytes)",
                parsed.redacted
            );
        }
        let settings_pool: u32 = parsed.take("pool", "a number")?.unwrap_or(10);
        if settings_pool == 0 {
            bail!("backend URL `{}`: pool must be at least 1", parsed.redacted);
        }
        let retention = parsed
            .take_ms("retention_ms")?
            .unwrap_or(Duration::from_secs(24 * 3600));
        let cleanup = parsed
            .take_ms("cleanup_ms")?
            .unwrap_or(Duration::from_secs(60));
        let poll = parsed
            .take_ms("poll_ms")?
            .unwrap_or(Duration::from_millis(1000));
        for (name, value) in [("cleanup_ms", cleanup), ("poll_ms", poll)] {
            if value.is_zero() {
                bail!(
                    "backend URL `{}`: {name} must be at least 1",
                    parsed.redacted
                );
            }
        }
        let mut driver_url = format!("postgres://{}", parsed.address);
        let mut passed_on = Vec::new();
        let mut files = Vec::new();
        for (name, value) in parsed.remaining() {
            if let Some(file) = Self::FILE_PARAMS.iter().find(|f| **f == name.as_str()) {
                let path = percent_decode(value).with_context(|| {
                    format!("backend URL `{}`: parameter `{name}`", parsed.redacted)
                })?;
                files.push((*file, path));
            }
            if !Self::DRIVER_PARAMS.contains(&name.as_str()) {
                bail!(
                    "backend URL `{}`: unknown parameter `{name}` (known: {}, {})",
                    parsed.redacted,
                    Self::PARAMS.join(", "),
                    Self::DRIVER_PARAMS.join(", ")
                );
            }
            passed_on.push(format!("{name}={value}"));
        }
        if !passed_on.is_empty() {
            driver_url = format!("{driver_url}?{}", passed_on.join("&"));
        }
        let connect: PgConnectOptions = driver_url.parse().with_context(|| {
            format!("backend URL `{}` is not a PostgreSQL URL", parsed.redacted)
        })?;
        Ok(PostgresSettings {
            connect: connect.options([("search_path", schema.as_str())]),
            schema,
            pool: settings_pool,
            retention,
            cleanup,
            poll,
            files,
            redacted: parsed.redacted,
        })
    }

    /// Fails naming the parameter and the file unless every TLS file the
    /// URL names can be read: the driver's own error does not say which.
    pub fn check_files(&self) -> Result<()> {
        for (name, path) in &self.files {
            std::fs::File::open(path).with_context(|| {
                format!(
                    "backend URL `{}`: cannot read the {name} file `{path}`",
                    self.redacted
                )
            })?;
        }
        Ok(())
    }
}

/// A name that needs no quoting in SQL, so it can be put into statements
/// that cannot take parameters (`CREATE SCHEMA`).
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_its_own_parameters_and_passes_the_rest_on() {
        let settings = PostgresSettings::parse(
            "postgres://app:secret@db:5433/orders?schema=billing&retention_ms=0&sslmode=disable",
        )
        .unwrap();
        assert_eq!(settings.schema, "billing");
        assert_eq!(settings.retention, Duration::ZERO);
        assert_eq!(settings.connect.get_host(), "db");
        assert_eq!(settings.connect.get_port(), 5433);
        assert_eq!(settings.connect.get_database(), Some("orders"));
    }

    #[test]
    fn errors_name_the_parameter_and_hide_the_password() {
        let err = PostgresSettings::parse("postgres://u:secret@h/db?poll_ms=soon")
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_ms `soon`"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = PostgresSettings::parse("postgres://h/db?schema=Bad-Name")
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema `Bad-Name`"), "{err}");
        let err = PostgresSettings::parse("postgres://h/db?pool=0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool"), "{err}");
        let err = PostgresSettings::parse("postgres://h/db?retension_ms=5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown parameter `retension_ms`"), "{err}");
    }

    #[test]
    fn tls_files_are_checked_by_name() {
        let settings = PostgresSettings::parse(
            "postgres://u:secret@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca%20x.pem",
        )
        .unwrap();
        let err = format!("{:#}", settings.check_files().unwrap_err());
        assert!(
            err.contains("sslrootcert file `/nonexistent/ca x.pem`"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }
}
