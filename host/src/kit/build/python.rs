//! Python plugins: `plugin.py` and the `sluice` helper module, made into a
//! component by componentize-py (the helper's decorators define both
//! `handle` and `handle_batch`).
//!
//! The world is `batch-handler` plus `wasi:http/outgoing-handler`, so a
//! plugin can make requests (`sluice.http_get`) where its config grants
//! them. componentize-py only binds what the world names, and a Python
//! plugin has no other way to reach `wasi:http`; the host links it for
//! every plugin anyway, so every Python plugin gets the import. Its WIT is
//! the wasmtime-wasi-http crate's own (see build.rs), written into the
//! stage's `wit/deps/`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::copy_sources;
use crate::kit::toolchain::{Toolchains, run};
use crate::kit::{WASI_HTTP_DEPS, WASI_HTTP_VERSION};

/// The world Python plugins are built against.
const WORLD: &str = "batch-handler-with-http";

/// The file that defines [`WORLD`] in the staged `sluice:plugin` package,
/// and its text: no package line, so it joins the one `sluice.wit` names.
const WORLD_FILE: &str = "python-world.wit";
const WORLD_WIT: &str = "/// Written by `sluice build`: what Python plugins are built against,
/// `batch-handler` with outbound HTTP (granted per plugin by the host).
world batch-handler-with-http {
    include batch-handler;
    import wasi:http/outgoing-handler@{version};
}
";

/// The text of [`WORLD_FILE`].
pub(super) fn world_wit() -> String {
    WORLD_WIT.replace("{version}", WASI_HTTP_VERSION)
}

pub fn build(project: &Path, stage: &Path, out: &Path, toolchains: &Toolchains) -> Result<()> {
    let componentize = toolchains.componentize_py()?;
    let wit = stage.join("wit");
    std::fs::write(wit.join(WORLD_FILE), world_wit())?;
    std::fs::create_dir_all(wit.join("deps"))?;
    for (name, text) in WASI_HTTP_DEPS {
        std::fs::write(wit.join("deps").join(name), text)?;
    }
    let sources = stage.join("src");
    copy_sources(project, &sources, &["py"])?;
    // Over the project's own copy (`sluice new` writes one for its unit
    // tests), so the helper always matches the WIT this binary builds.
    std::fs::write(sources.join("sluice.py"), crate::kit::PYTHON_HELPER)?;
    // Two interfaces are called `types`; componentize-py would then name
    // both modules by package. Ours keeps `wit_world.imports.types`, as in
    // a build without wasi:http, and wasi:http's becomes `http_types`.
    run(Command::new(componentize)
        .arg("--wit-path")
        .arg(&wit)
        .args(["--world", WORLD])
        .arg("--import-interface-name")
        .arg(format!("{}=types", our_types()?))
        .arg("--import-interface-name")
        .arg(format!("wasi:http/types@{WASI_HTTP_VERSION}=http_types"))
        .args(["componentize", "plugin"])
        .arg("--python-path")
        .arg(&sources)
        .arg("--output")
        .arg(out)
        .stdout(std::process::Stdio::null()))
}

/// `sluice:plugin/types@VERSION`, from the package line of the WIT.
fn our_types() -> Result<String> {
    let package = crate::runtime::wit_package().context("the world's WIT has no package line")?;
    let (name, version) = package
        .split_once('@')
        .context("the world's WIT package has no version")?;
    Ok(format!("{name}/types@{version}"))
}
