//! Python plugins: `plugin.py` and the `sluice` helper module, made into a
//! component of the `batch-handler` world by componentize-py (the helper's
//! decorators define both `handle` and `handle_batch`).

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::copy_sources;
use crate::kit::toolchain::{Toolchains, run};

pub fn build(project: &Path, stage: &Path, out: &Path, toolchains: &Toolchains) -> Result<()> {
    let componentize = toolchains.componentize_py()?;
    let sources = stage.join("src");
    copy_sources(project, &sources, &["py"])?;
    // Over the project's own copy (`sluice new` writes one for its unit
    // tests), so the helper always matches the WIT this binary builds.
    std::fs::write(sources.join("sluice.py"), crate::kit::PYTHON_HELPER)?;
    run(Command::new(componentize)
        .arg("--wit-path")
        .arg(stage.join("wit"))
        .args(["--world", "batch-handler", "componentize", "plugin"])
        .arg("--python-path")
        .arg(&sources)
        .arg("--output")
        .arg(out)
        .stdout(std::process::Stdio::null()))
}
