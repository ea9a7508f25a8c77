//! The plugin author's kit: `sluice new` scaffolds a plugin project,
//! `sluice build` turns one (Rust, Python, JavaScript or C) into a component
//! and checks it against the world, and `sluice test` runs a component on
//! recorded messages with no backend.
//!
//! The WIT world and the language helpers are compiled into the binary (and
//! for Python the `wasi:http` WIT of the wasmtime-wasi-http the host links),
//! so a project needs nothing from the Sluice repository; the language
//! toolchains (componentize-py, componentize-js) are installed on first use
//! into a toolchain directory ([`toolchain`]).

pub mod build;
pub mod cli;
pub mod dev;
pub mod new;
pub mod test;
pub mod toolchain;

use std::fmt;
use std::path::Path;

use anyhow::{Result, bail};

/// The world's WIT, as plugin toolchains read it.
pub const WIT: &str = crate::runtime::WIT;
// `WASI_HTTP_DEPS` and `WASI_HTTP_VERSION`: the `wasi:http` WIT the host
// links, from its wasmtime-wasi-http dependency (see build.rs).
include!(concat!(env!("OUT_DIR"), "/wasi_http_wit.rs"));
/// The Python helper module (`import sluice`).
pub const PYTHON_HELPER: &str = include_str!("../../../sdk/python/sluice.py");
/// The JavaScript helper module (`import … from "./sluice.js"`).
pub const JS_HELPER: &str = include_str!("../../../sdk/js/sluice.js");
/// The C helper's header (`#include "sluice.h"`).
pub const C_HEADER: &str = include_str!("../../../sdk/c/sluice.h");
/// The C helper's implementation, compiled into every C plugin.
pub const C_SOURCE: &str = include_str!("../../../sdk/c/sluice.c");

/// Where the kit caches compiled components: where `sluice run` caches them
/// when its config names no directory (`$SLUICE_CACHE_DIR`, else the user's
/// cache directory), so a build's check makes the next test and run start
/// at once.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    crate::app::default_cache_dir()
}

/// The languages a plugin can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

impl Lang {
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::C];

    /// The file that marks a project of this language.
    pub fn marker(self) -> &'static str {
        match self {
            Lang::Rust => "Cargo.toml",
            Lang::Python => "plugin.py",
            Lang::Js => "plugin.js",
            Lang::C => "plugin.c",
        }
    }

    /// Which language the project in `dir` is written in, by its entry file.
    pub fn detect(dir: &Path) -> Result<Lang> {
        let found: Vec<Lang> = Lang::ALL
            .into_iter()
            .filter(|lang| dir.join(lang.marker()).is_file())
            .collect();
        match found.as_slice() {
            [lang] => Ok(*lang),
            [] => bail!(
                "{} is not a plugin project: it has none of Cargo.toml (Rust), plugin.py (Python), \
                 plugin.js (JavaScript) or plugin.c (C)",
                dir.display()
            ),
            several => bail!(
                "{} holds entry files of several languages ({}); keep one",
                dir.display(),
                several
                    .iter()
                    .map(|l| l.marker())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        })
    }
}
