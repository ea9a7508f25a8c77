//! JavaScript plugins: `plugin.js` (and the modules it imports) next to the
//! `sluice.js` helper, made into a component by componentize-js.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::copy_sources;
use crate::kit::toolchain::{Toolchains, run};

pub fn build(project: &Path, stage: &Path, out: &Path, toolchains: &Toolchains) -> Result<()> {
    let componentize = toolchains.componentize_js()?;
    let sources = stage.join("src");
    copy_sources(project, &sources, &["js", "mjs", "json"])?;
    std::fs::write(sources.join("sluice.js"), crate::kit::JS_HELPER)?;
    run(Command::new("node")
        .arg(componentize)
        .arg(sources.join("plugin.js"))
        .arg("--wit")
        .arg(stage.join("wit"))
        .args(["--world-name", "handler", "--out"])
        .arg(out))
}
