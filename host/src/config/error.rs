//! Config errors that say where the value came from (the file and line, or
//! the environment variable that set it) and, for a key the parser does
//! not know, which key was meant.

use std::collections::BTreeMap;
use std::fmt;

use super::keys;
use super::locate::{self, Document, Step};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file, at this line.
    Line(usize),
    /// The config file, where no line says it (a key left to its default).
    File,
    /// An environment variable that overrides the file.
    Env(String),
}

/// A config that does not parse, refers to something that does not exist
/// or makes no sense.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file's name as given.
    pub file: String,
    pub origin: Origin,
    /// The key at fault (`routes[0].lease_ms`); empty where the message
    /// names it.
    pub key: String,
    /// What the key belongs to, when its path alone does not say
    /// (`route `upper``).
    pub within: Option<String>,
    pub message: String,
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        match &self.origin {
            Origin::Line(line) => write!(f, ": line {line}")?,
            Origin::File => {}
            Origin::Env(variable) => {
                return write!(
                    f,
                    ": `{}` as set by the environment variable {variable}: {}",
                    self.key, self.message
                );
            }
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        if let Some(within) = &self.within {
            write!(f, " ({within})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What errors need to name a value's origin: the file, its spans, and the
/// keys the environment set.
pub struct Sources<'a> {
    pub file: String,
    pub document: Document<'a>,
    /// Keys (`backends.main.url`) whose value an environment variable set,
    /// with the variable.
    pub from_env: BTreeMap<String, String>,
    /// Keys (`backends.main.url`) whose value a file named by another key
    /// held: that key (`backends.main.url_file`) and the file.
    pub from_file: BTreeMap<String, (String, String)>,
}

impl Sources<'_> {
    /// Where the value of `key` (`routes[0].lease_ms`) came from.
    pub fn origin(&self, key: &str) -> Origin {
        if let Some(variable) = self.from_env.get(key) {
            return Origin::Env(variable.clone());
        }
        if let Some((naming, _)) = self.from_file.get(key) {
            return self.origin(naming);
        }
        self.document.line(key).map_or(Origin::File, Origin::Line)
    }

    /// An error about `key`, placed where its value came from.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.error_within(key, None, message)
    }

    /// An error about `key` of what `within` names (`route `upper``).
    pub fn error_within(
        &self,
        key: &str,
        within: Option<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            origin: self.origin(key),
            key: key.to_string(),
            within: within.or_else(|| {
                let (_, file) = self.from_file.get(key)?;
                Some(format!("read from {file}"))
            }),
            message: message.into(),
        }
    }
}

/// A TOML or deserialization error, placed at its line and key; an unknown
/// key comes with the key that was probably meant.
pub fn from_toml(error: &toml::de::Error, document: &Document<'_>, file: &str) -> anyhow::Error {
    let Some(span) = error.span() else {
        return anyhow::anyhow!("{file}: {error}");
    };
    let path = document.path_at(span.start);
    if path.is_empty() {
        // Not valid TOML: toml's own message shows the line and a caret.
        return anyhow::anyhow!("{file}: {error}");
    }
    let line = document.line_of(span.start);
    let message = error.message();
    if let Some(unknown) = unknown_field(message) {
        let table = &path[..path.len() - 1];
        return ConfigError {
            file: file.to_string(),
            origin: Origin::Line(line),
            key: String::new(),
            within: None,
            message: unknown_key_message(unknown, table),
        }
        .into();
    }
    ConfigError {
        file: file.to_string(),
        origin: Origin::Line(line),
        key: locate::display(&path),
        within: None,
        message: message.to_string(),
    }
    .into()
}

/// The key of serde's "unknown field `X`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

/// "unknown field `concurency` in [[routes]]; did you mean `concurrency`?"
pub fn unknown_key_message(unknown: &str, table: &[Step]) -> String {
    let names: Vec<&str> = table
        .iter()
        .filter_map(|step| match step {
            Step::Key(name) => Some(name.as_str()),
            Step::Index(_) => None,
        })
        .collect();
    let written = match table.last() {
        None => "at the top level".to_string(),
        Some(Step::Index(_)) => format!("in [[{}]]", names.join(".")),
        Some(Step::Key(_)) => format!("in [{}]", names.join(".")),
    };
    let accepted = keys::of_table(&names);
    let mut message = format!("unknown field `{unknown}` {written}");
    let elsewhere = keys::accepted()
        .iter()
        .find(|key| key.name == unknown && !key.is_table());
    if let Some(home) = elsewhere {
        message.push_str(&format!(
            "; `{unknown}` belongs in {}",
            keys::header(&home.table)
        ));
    } else if let Some(meant) = keys::nearest(unknown, accepted.iter().map(|k| k.name.as_str())) {
        message.push_str(&format!("; did you mean `{meant}`?"));
    } else if !accepted.is_empty() {
        let names: Vec<String> = accepted.iter().map(|k| format!("`{}`", k.name)).collect();
        message.push_str(&format!("; the keys there are {}", names.join(", ")));
    }
    message
}
