//! `sluice new`: a plugin project in one of the four languages, with a test
//! (recorded messages and the outcome lines they should give) that passes
//! as created.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::Lang;

const README: &str = include_str!("templates/README.md");
const MESSAGES: &str = include_str!("templates/messages.jsonl");
const EXPECTED: &str = include_str!("templates/expected.txt");
const GITIGNORE: &str = "target/\n__pycache__/\n";

/// The Rust SDK of the checkout this binary was built from, if it is there.
const BUILT_FROM_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");

/// Creates `dir/name`; refuses to write into an existing directory.
pub fn scaffold(name: &str, lang: Lang, dir: &Path, sdk: Option<&Path>) -> Result<PathBuf> {
    check_name(name)?;
    let project = dir.join(name);
    if project.exists() {
        bail!("{} already exists", project.display());
    }
    let mut files: Vec<(&str, String)> = vec![
        ("README.md", README.replace("{{lang}}", lang_name(lang))),
        ("test/messages.jsonl", MESSAGES.to_string()),
        ("test/expected.txt", EXPECTED.to_string()),
        (".gitignore", GITIGNORE.to_string()),
    ];
    match lang {
        Lang::Rust => {
            let sdk = rust_sdk(sdk)?;
            files.push((
                "Cargo.toml",
                include_str!("templates/rust/Cargo.toml")
                    .replace("{{sdk}}", &sdk.display().to_string()),
            ));
            files.push(("src/lib.rs", include_str!("templates/rust/lib.rs").into()));
        }
        Lang::Python => files.push((
            "plugin.py",
            include_str!("templates/python/plugin.py").into(),
        )),
        Lang::Js => files.push(("plugin.js", include_str!("templates/js/plugin.js").into())),
        Lang::C => files.push(("plugin.c", include_str!("templates/c/plugin.c").into())),
    }
    for (path, contents) in files {
        let path = project.join(path);
        std::fs::create_dir_all(path.parent().expect("files live in the project"))?;
        std::fs::write(&path, contents.replace("{{name}}", name))
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

fn rust_sdk(sdk: Option<&Path>) -> Result<PathBuf> {
    let sdk = sdk.map_or_else(|| PathBuf::from(BUILT_FROM_SDK), Path::to_path_buf);
    if !sdk.join("Cargo.toml").is_file() {
        bail!(
            "no Rust SDK at {}: pass --sdk PATH (the `sdk/` directory of a Sluice checkout)",
            sdk.display()
        );
    }
    sdk.canonicalize()
        .with_context(|| format!("cannot resolve {}", sdk.display()))
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
        for lang in [Lang::Python, Lang::Js, Lang::C] {
            let name = format!("p-{lang}");
            let project = scaffold(&name, lang, dir.path(), None).unwrap();
            assert_eq!(Lang::detect(&project).unwrap(), lang);
            let expected = std::fs::read_to_string(project.join("test/expected.txt")).unwrap();
            assert!(expected.contains(&format!("{name}.out key=k1 by={name} HELLO")));
            let entry = std::fs::read_to_string(project.join(lang.marker())).unwrap();
            assert!(!entry.contains("{{"), "{entry}");
            assert!(scaffold(&name, lang, dir.path(), None).is_err(), "exists");
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(Lang::detect(empty.path()).is_err());
        std::fs::write(empty.path().join("plugin.py"), "").unwrap();
        std::fs::write(empty.path().join("plugin.c"), "").unwrap();
        let error = Lang::detect(empty.path()).unwrap_err().to_string();
        assert!(error.contains("several languages"), "{error}");
    }
}
