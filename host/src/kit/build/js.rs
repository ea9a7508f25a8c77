//! JavaScript plugins: `plugin.js` (and the modules it imports) next to the
//! `sluice.js` helper, made into a component of the `batch-handler` world
//! by componentize-js. The component's entry is a module written here that
//! hands `sluice.js` the host's import (so the helper also runs under plain
//! Node, with a stand-in host, for the plugin's unit tests) and exports the
//! plugin's `handle` and a `handleBatch` (the plugin's own, or one made from
//! its `handle`), so a plugin exports `handle` alone.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::copy_sources;
use crate::kit::toolchain::{Toolchains, run};

/// The component's entry module.
const ENTRY: &str = r#"// Written by `sluice build`: the component's exports, from plugin.js.
import * as host from "sluice:plugin/host@0.2.0";
import * as plugin from "./plugin.js";
import { batchOf, connectHost } from "./sluice.js";

connectHost(host);

if (typeof plugin.handle !== "function") {
  throw new Error("plugin.js must export a function `handle` (e.g. `export const handle = handler(f)`)");
}

export const handle = plugin.handle;
export const handleBatch = batchOf(plugin);
"#;

pub fn build(project: &Path, stage: &Path, out: &Path, toolchains: &Toolchains) -> Result<()> {
    let componentize = toolchains.componentize_js()?;
    let sources = stage.join("src");
    copy_sources(project, &sources, &["js", "mjs", "json"])?;
    std::fs::write(sources.join("sluice.js"), crate::kit::JS_HELPER)?;
    let entry = sources.join("sluice-entry.js");
    std::fs::write(&entry, ENTRY)?;
    run(Command::new("node")
        .arg(componentize)
        .arg(&entry)
        .arg("--wit")
        .arg(stage.join("wit"))
        .args(["--world-name", "batch-handler", "--out"])
        .arg(out))
}
