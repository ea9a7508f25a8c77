//! Imports a plugin may declare but is not granted: currently `wasi:http`,
//! which componentize-js components import whether or not they fetch
//! anything. Each such function is defined as a stub that traps with a
//! clear error when called, so the component loads and runs as long as it
//! does not use them. Every other import must still be satisfied by the
//! host for real: a component importing something unknown is refused.

use wasmtime::Engine;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceType};

use super::instance::State;

/// Interface prefixes stubbed as denied.
const DENIED_PREFIXES: &[&str] = &["wasi:http/"];

/// The resource type behind every denied resource; no value of it is ever
/// created, since every function that could create one traps.
struct Denied;

/// The names of the denied interfaces `component` imports.
pub(super) fn denied_imports(component: &Component, engine: &Engine) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .filter(|(name, _)| is_denied(name))
        .map(|(name, _)| name.to_string())
        .collect()
}

fn is_denied(name: &str) -> bool {
    DENIED_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// The host's type for a WASI resource that a denied interface re-exports
/// (`wasi:http/types` uses wasi:io's streams, pollables and errors).
fn host_resource(interface: &str, resource: &str) -> Option<ResourceType> {
    use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, IoError};
    Some(match (interface, resource) {
        ("wasi:io/poll", "pollable") => ResourceType::host::<DynPollable>(),
        ("wasi:io/streams", "input-stream") => ResourceType::host::<DynInputStream>(),
        ("wasi:io/streams", "output-stream") => ResourceType::host::<DynOutputStream>(),
        ("wasi:io/error", "error") => ResourceType::host::<IoError>(),
        _ => return None,
    })
}

/// A copy of `base` with trapping stubs for the denied interfaces that
/// `component` imports.
pub(super) fn linker_with_stubs(
    base: &Linker<State>,
    component: &Component,
    engine: &Engine,
) -> wasmtime::Result<Linker<State>> {
    let ty = component.component_type();
    // Resources of the interfaces the host provides, by the component's
    // own type for them, so a denied interface that re-exports one gets
    // the host's type rather than a stub's.
    let mut provided: Vec<(ResourceType, String, String)> = Vec::new();
    for (name, item) in ty.imports(engine) {
        if let ComponentItem::ComponentInstance(interface) = item.ty
            && !is_denied(name)
        {
            let unversioned = name.split('@').next().unwrap_or(name);
            for (export, item) in interface.exports(engine) {
                if let ComponentItem::Resource(resource) = item.ty {
                    provided.push((resource, unversioned.to_string(), export.to_string()));
                }
            }
        }
    }
    let mut linker = base.clone();
    for (name, item) in ty.imports(engine) {
        if !is_denied(name) {
            continue;
        }
        let ComponentItem::ComponentInstance(interface) = item.ty else {
            continue;
        };
        let mut instance = linker.instance(name)?;
        for (export, item) in interface.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let qualified = format!("{name}#{export}");
                    instance.func_new(export, move |store, _, _, _| {
                        Err(wasmtime::Error::msg(format!(
                            "plugin `{}` called `{qualified}`, but outgoing HTTP is not granted \
                             to plugins",
                            store.data().settings.name
                        )))
                    })?;
                }
                ComponentItem::Resource(resource) => {
                    let host = match provided.iter().find(|(r, _, _)| *r == resource) {
                        // Left undefined if unknown: linking then fails and
                        // says which resource did not match.
                        Some((_, interface, name)) => host_resource(interface, name),
                        None => Some(ResourceType::host::<Denied>()),
                    };
                    if let Some(host) = host {
                        instance.resource(export, host, |_, _| Ok(()))?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(linker)
}
