//! `sluice new`: a plugin project in one of the four languages, with a test
//! (recorded messages and the outcome lines they should give) that passes
//! as created, and for Rust, Python and JavaScript a native unit test that
//! passes too.
//!
//! A project needs nothing from the Sluice repository: what it builds
//! against is written into it from copies compiled into this binary (the
//! Rust SDK as `sluice-sdk/`, `sluice.py`, `sluice.js`), so it builds on any
//! machine.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::Lang;

const README: &str = include_str!("templates/README.md");
const MESSAGES: &str = include_str!("templates/messages.jsonl");
const EXPECTED: &str = include_str!("templates/expected.txt");
const GITIGNORE: &str = "target/\n__pycache__/\nnode_modules/\n";

/// Where a Rust project keeps its copy of the SDK.
const VENDORED_SDK: &str = "sluice-sdk";

/// The Rust SDK's manifest, as this repository builds it.
const SDK_MANIFEST: &str = include_str!("../../../sdk/Cargo.toml");

/// The Rust SDK's files but its manifest, by their path in the crate: what
/// `cargo package -p sluice-sdk` ships. A unit test below keeps the list
/// complete.
const SDK_FILES: &[(&str, &str)] = &[
    ("README.md", include_str!("../../../sdk/README.md")),
    ("LICENSE-MIT", include_str!("../../../sdk/LICENSE-MIT")),
    (
        "LICENSE-APACHE",
        include_str!("../../../sdk/LICENSE-APACHE"),
    ),
    (
        "wit/sluice.wit",
        include_str!("../../../sdk/wit/sluice.wit"),
    ),
    ("src/lib.rs", include_str!("../../../sdk/src/lib.rs")),
    ("src/batch.rs", include_str!("../../../sdk/src/batch.rs")),
    (
        "src/handler.rs",
        include_str!("../../../sdk/src/handler.rs"),
    ),
    ("src/host.rs", include_str!("../../../sdk/src/host.rs")),
    ("src/log.rs", include_str!("../../../sdk/src/log.rs")),
    ("src/types.rs", include_str!("../../../sdk/src/types.rs")),
];

/// Creates `dir/name`; refuses to write into an existing directory. A Rust
/// project depends on the SDK at `sdk` if given, else on its own copy.
pub fn scaffold(name: &str, lang: Lang, dir: &Path, sdk: Option<&Path>) -> Result<PathBuf> {
    check_name(name)?;
    let project = dir.join(name);
    if project.exists() {
        bail!("{} already exists", project.display());
    }
    let sdk_version = sdk_version();
    let (testing, entry) = match lang {
        Lang::Rust => (include_str!("templates/rust/testing.md"), "src/lib.rs"),
        Lang::Python => (include_str!("templates/python/testing.md"), "plugin.py"),
        Lang::Js => (include_str!("templates/js/testing.md"), "plugin.js"),
        Lang::C => (include_str!("templates/c/testing.md"), "plugin.c"),
    };
    // Written with `{{name}}` and `{{sdk_version}}` filled in.
    let mut templated: Vec<(String, String)> = vec![
        ("test/messages.jsonl".into(), MESSAGES.into()),
        ("test/expected.txt".into(), EXPECTED.into()),
        (".gitignore".into(), GITIGNORE.into()),
    ];
    // Written as they are.
    let mut verbatim: Vec<(String, String)> = Vec::new();
    // The README's closing section, if the language has one.
    let mut more = String::new();
    match lang {
        Lang::Rust => {
            let dependency = match sdk {
                Some(sdk) => {
                    let (dependency, path) = sdk_at(sdk)?;
                    more = format!(
                        "\n## The SDK\n\nThe project depends on the Sluice SDK in `{path}` \
                         (`sluice new --sdk`). Once `sluice-sdk` is published on crates.io, \
                         make that dependency in `Cargo.toml`\n`sluice-sdk = \"{sdk_version}\"`.\n"
                    );
                    dependency
                }
                None => {
                    verbatim.extend(vendored_sdk());
                    more = format!("\n{}", include_str!("templates/rust/sdk.md"));
                    format!(
                        "# A copy of the Sluice SDK, so the project builds anywhere. Once\n\
                         # sluice-sdk is published on crates.io, make this line\n\
                         #     sluice-sdk = \"{sdk_version}\"\n\
                         # and delete {VENDORED_SDK}/.\n\
                         sluice-sdk = {{ path = \"{VENDORED_SDK}\" }}"
                    )
                }
            };
            templated.push((
                "Cargo.toml".into(),
                include_str!("templates/rust/Cargo.toml")
                    .replace("{{sdk_dependency}}", &dependency),
            ));
            templated.push((
                "src/lib.rs".into(),
                include_str!("templates/rust/lib.rs").into(),
            ));
        }
        Lang::Python => {
            templated.push((
                "plugin.py".into(),
                include_str!("templates/python/plugin.py").into(),
            ));
            templated.push((
                "test_plugin.py".into(),
                include_str!("templates/python/test_plugin.py").into(),
            ));
            verbatim.push(("sluice.py".into(), super::PYTHON_HELPER.into()));
        }
        Lang::Js => {
            templated.push((
                "plugin.js".into(),
                include_str!("templates/js/plugin.js").into(),
            ));
            templated.push((
                "plugin.test.js".into(),
                include_str!("templates/js/plugin.test.js").into(),
            ));
            templated.push((
                "package.json".into(),
                include_str!("templates/js/package.json").into(),
            ));
            verbatim.push(("sluice.js".into(), super::JS_HELPER.into()));
        }
        Lang::C => templated.push((
            "plugin.c".into(),
            include_str!("templates/c/plugin.c").into(),
        )),
    }
    let readme = README
        .replace("{{testing}}", testing.trim_end())
        .replace("{{more}}", &more)
        .replace("{{entry}}", entry)
        .replace("{{lang}}", lang_name(lang))
        .replace("{{c_packages}}", super::toolchain::C_PACKAGES);
    templated.push(("README.md".into(), readme));
    let filled = templated.into_iter().map(|(path, contents)| {
        let contents = contents
            .replace("{{name}}", name)
            .replace("{{sdk_version}}", &sdk_version);
        (path, contents)
    });
    for (path, contents) in filled.chain(verbatim) {
        let path = project.join(path);
        std::fs::create_dir_all(path.parent().expect("files live in the project"))?;
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(project)
}

/// A name that works as a directory, a crate, a file and a topic token.
fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !starts_well
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        bail!(
            "`{name}` is not a plugin name: use lowercase letters, digits, `-` and `_`, starting with a letter"
        );
    }
    Ok(())
}

/// The dependency line on the SDK in the directory `sdk` (`--sdk PATH`),
/// and the directory it names.
fn sdk_at(sdk: &Path) -> Result<(String, String)> {
    if !sdk.join("Cargo.toml").is_file() {
        bail!(
            "no Rust SDK at {}: pass --sdk PATH (the `sdk/` directory of a Sluice checkout), \
             or leave it out to get a copy of the SDK in the project",
            sdk.display()
        );
    }
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", sdk.display()))?;
    let path = sdk.to_str().context("the SDK's path is not UTF-8")?;
    let dependency = format!(
        "# The Sluice SDK given to `sluice new --sdk`.\nsluice-sdk = {{ path = {} }}",
        toml::Value::from(path)
    );
    Ok((dependency, path.to_string()))
}

/// The version of the SDK compiled into this binary.
fn sdk_version() -> String {
    let manifest: toml::Table = toml::from_str(SDK_MANIFEST).expect("sdk/Cargo.toml is TOML");
    manifest["package"]["version"]
        .as_str()
        .expect("sdk/Cargo.toml names a version")
        .to_string()
}

/// The SDK's files under `sluice-sdk/`, as a crate of the project's own
/// workspace.
fn vendored_sdk() -> Vec<(String, String)> {
    let mut files = vec![(
        format!("{VENDORED_SDK}/Cargo.toml"),
        vendored_manifest(SDK_MANIFEST),
    )];
    files.extend(
        SDK_FILES
            .iter()
            .map(|(path, contents)| (format!("{VENDORED_SDK}/{path}"), contents.to_string())),
    );
    files
}

/// The SDK's manifest without its place in this repository's guest
/// workspace (the key and the comment above it): in a project the copy is a
/// member of the project's workspace.
fn vendored_manifest(manifest: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    for line in manifest.lines() {
        if line.starts_with("workspace =") {
            while lines.last().is_some_and(|l| l.starts_with('#')) {
                lines.pop();
            }
            continue;
        }
        lines.push(line);
    }
    format!(
        "# sluice-sdk, copied here by `sluice new` until it is on crates.io;\n\
         # see the dependency in ../Cargo.toml.\n{}\n",
        lines.join("\n")
    )
}

fn lang_name(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
        Lang::Js => "JavaScript",
        Lang::C => "C",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_suit_a_crate_a_file_and_a_topic() {
        for good in ["enrich", "my-plugin", "p2_x"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Enrich", "2fast", "a b", "a.b", "a/b", "-x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_language_gets_its_entry_file_and_the_shared_test() {
        let dir = tempfile::tempdir().unwrap();
        for lang in Lang::ALL {
            let name = format!("p-{lang}");
            let project = scaffold(&name, lang, dir.path(), None).unwrap();
            assert_eq!(Lang::detect(&project).unwrap(), lang);
            let expected = std::fs::read_to_string(project.join("test/expected.txt")).unwrap();
            assert!(expected.contains(&format!("{name}.out key=k1 by={name} HELLO")));
            for file in ["README.md", lang.marker()] {
                let text = std::fs::read_to_string(project.join(file)).unwrap();
                assert!(!text.contains("{{"), "{file}: {text}");
            }
            assert!(scaffold(&name, lang, dir.path(), None).is_err(), "exists");
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(Lang::detect(empty.path()).is_err());
        std::fs::write(empty.path().join("plugin.py"), "").unwrap();
        std::fs::write(empty.path().join("plugin.c"), "").unwrap();
        let error = Lang::detect(empty.path()).unwrap_err().to_string();
        assert!(error.contains("several languages"), "{error}");
    }

    #[test]
    fn the_vendored_sdk_is_every_file_of_the_crate() {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
        let mut on_disk = Vec::new();
        for dir in ["src", "wit"] {
            for entry in std::fs::read_dir(sdk.join(dir)).unwrap() {
                let name = entry.unwrap().file_name();
                on_disk.push(format!("{dir}/{}", name.to_string_lossy()));
            }
        }
        for path in on_disk {
            assert!(
                SDK_FILES.iter().any(|(vendored, _)| *vendored == path),
                "sdk/{path} is not copied into new Rust projects: add it to SDK_FILES"
            );
        }
    }

    #[test]
    fn the_vendored_manifest_stands_alone() {
        let manifest: toml::Table = toml::from_str(&vendored_manifest(SDK_MANIFEST)).unwrap();
        let package = manifest["package"].as_table().unwrap();
        assert!(!package.contains_key("workspace"), "{package:?}");
        assert_eq!(package["name"].as_str(), Some("sluice-sdk"));
        assert_eq!(package["version"].as_str(), Some(sdk_version().as_str()));
        let wit_bindgen = &manifest["dependencies"]["wit-bindgen"];
        assert!(
            wit_bindgen.is_str(),
            "inherited from a workspace: {wit_bindgen:?}"
        );
        for file in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
            assert!(SDK_FILES.iter().any(|(path, _)| *path == file), "{file}");
        }
    }

    #[test]
    fn a_given_sdk_is_depended_on_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
        let project = scaffold("given", Lang::Rust, dir.path(), Some(&sdk)).unwrap();
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(project.join("Cargo.toml")).unwrap()).unwrap();
        let path = manifest["dependencies"]["sluice-sdk"]["path"]
            .as_str()
            .unwrap();
        assert_eq!(Path::new(path), sdk.canonicalize().unwrap());
        assert!(!project.join(VENDORED_SDK).exists());
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert!(readme.contains(path), "{readme}");
        assert!(!readme.contains("{{"), "{readme}");
        assert!(scaffold("other", Lang::Rust, dir.path(), Some(dir.path())).is_err());
    }
}
