//! Where in the config file a key is written, from the spans of the parsed
//! document: the line an error names, and the key an offset falls in.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// The config text with its spans.
pub struct Document<'a> {
    text: &'a str,
    /// None for text that is not TOML (then no line is known but a
    /// parse error's own).
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> Document<'a> {
    pub fn parse(text: &'a str) -> Self {
        Document {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// The 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let mut end = offset.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        self.text[..end].matches('\n').count() + 1
    }

    /// The line of the key at `path` (`routes[0].retry.jitter`, or
    /// `backends.main.url`): where it is written, else where the nearest
    /// table above it is (a route's `[[routes]]` for a key it leaves to
    /// its default); None when not even the first step is written.
    pub fn line(&self, path: &str) -> Option<usize> {
        let root = self.root.as_ref()?;
        let mut table = Some(root.get_ref());
        let mut value: Option<&Spanned<DeValue<'a>>> = None;
        let mut line = None;
        for step in steps(path) {
            let next = match (step, table, value.map(|v| v.get_ref())) {
                (Step::Key(name), Some(table), _) => {
                    let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref() == &name)
                    else {
                        break;
                    };
                    line = Some(self.line_of(key.span().start));
                    value
                }
                (Step::Index(index), _, Some(DeValue::Array(array))) => {
                    let Some(element) = array.get(index) else {
                        break;
                    };
                    line = Some(self.line_of(element.span().start));
                    element
                }
                _ => break,
            };
            value = Some(next);
            table = match next.get_ref() {
                DeValue::Table(inner) => Some(inner),
                _ => None,
            };
        }
        line
    }

    /// The path of the key, value or table header at `offset`, the deepest
    /// that holds it; empty if none does.
    pub fn path_at(&self, offset: usize) -> Vec<Step> {
        let mut path = Vec::new();
        if let Some(root) = &self.root {
            find_in_table(root.get_ref(), offset, &mut path);
        }
        path
    }
}

fn find_in_table(table: &DeTable<'_>, offset: usize, path: &mut Vec<Step>) -> bool {
    for (key, value) in table {
        path.push(Step::Key(key.get_ref().to_string()));
        if key.span().contains(&offset) || find_in_value(value, offset, path) {
            return true;
        }
        path.pop();
    }
    false
}

/// A table's span is its header only (its keys come after it), so every
/// child is searched whatever the span says.
fn find_in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut Vec<Step>) -> bool {
    match value.get_ref() {
        DeValue::Table(table) if find_in_table(table, offset, path) => return true,
        DeValue::Array(array) => {
            for (index, element) in array.iter().enumerate() {
                path.push(Step::Index(index));
                if find_in_value(element, offset, path) {
                    return true;
                }
                path.pop();
            }
        }
        _ => {}
    }
    value.span().contains(&offset)
}

/// `routes[0].retry` as steps; a name in quotes or with brackets of its
/// own is taken as written, so at worst its line is not found.
pub fn steps(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (name, mut indexes) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        steps.push(Step::Key(name.to_string()));
        while let Some(rest) = indexes.strip_prefix('[') {
            let Some((index, after)) = rest.split_once(']') else {
                break;
            };
            match index.parse() {
                Ok(index) => steps.push(Step::Index(index)),
                Err(_) => break,
            }
            indexes = after;
        }
    }
    steps
}

/// Steps as a path: `routes[0].retry`.
pub fn display(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(name) if out.is_empty() => out.push_str(name),
            Step::Key(name) => {
                out.push('.');
                out.push_str(name);
            }
            Step::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}
