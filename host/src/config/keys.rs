//! The keys the config parser accepts, read from its serde structs: the
//! one list that `did you mean` suggestions and the reference in
//! `docs/config.md` (checked by a test) are held to.
//!
//! [`accepted`] deserializes a [`Config`](super::Config) from a probe that
//! answers every request with a sample value and records what was asked:
//! the `fields` of each struct, and the type each field wanted.

use std::cell::RefCell;
use std::sync::OnceLock;

use serde::Deserialize;
use serde::de::value::{BorrowedStrDeserializer, Error, U64Deserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

/// Stands for a name the user chooses (`[backends.NAME]`) in a table path.
pub const NAME: &str = "NAME";

/// toml's `Spanned<T>` is a struct of this name wrapping the value.
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";

/// One key the parser accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The table it is in, dotted, with [`NAME`] for a name the user
    /// chooses and no brackets (`routes.retry`, `backends.NAME`); empty at
    /// the top.
    pub table: String,
    pub name: String,
    /// What it holds: `string`, `integer`, `array of strings`, `table`, …
    pub kind: String,
}

impl Key {
    /// Whether the key holds tables of keys of their own (then documented
    /// as a table, not as a row of its parent).
    pub fn is_table(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "table" | "tables by name" | "array of tables"
        )
    }

    /// The path of the table this key holds, for a key that holds tables.
    pub fn inner_table(&self) -> String {
        let own = join(&self.table, &self.name);
        if self.kind == "tables by name" {
            join(&own, NAME)
        } else {
            own
        }
    }
}

/// Every key of the config, tables included, in the order of the structs;
/// none if the structs could not be traced (a test makes sure they can).
pub fn accepted() -> &'static [Key] {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    KEYS.get_or_init(|| trace().unwrap_or_default())
}

/// Deserializes a [`Config`](super::Config) from the probe, recording its keys.
pub fn trace() -> Result<Vec<Key>, Error> {
    let keys = RefCell::new(Vec::new());
    let kind = RefCell::new(String::new());
    super::Config::deserialize(Probe {
        path: String::new(),
        keys: &keys,
        kind: &kind,
    })?;
    Ok(keys.into_inner())
}

/// The keys of one table. `table` is a path of the document (`routes`,
/// `backends.main`, `plugins.upper.shadow`): any segment matches [`NAME`].
pub fn of_table(table: &[&str]) -> Vec<&'static Key> {
    accepted()
        .iter()
        .filter(|key| {
            let segments: Vec<&str> = if key.table.is_empty() {
                Vec::new()
            } else {
                key.table.split('.').collect()
            };
            segments.len() == table.len()
                && segments
                    .iter()
                    .zip(table)
                    .all(|(accepted, written)| *accepted == NAME || accepted == written)
        })
        .collect()
}

/// How a table is written as a header: `[[routes]]`, `[backends.NAME]`.
pub fn header(table: &str) -> String {
    let array = accepted()
        .iter()
        .any(|key| key.kind == "array of tables" && key.inner_table() == table);
    if array {
        format!("[[{table}]]")
    } else {
        format!("[{table}]")
    }
}

fn join(table: &str, name: &str) -> String {
    if table.is_empty() {
        name.to_string()
    } else {
        format!("{table}.{name}")
    }
}

/// A value at `path`: records what its type asks for in `kind`, and the
/// fields of every struct below it in `keys`.
struct Probe<'k> {
    path: String,
    keys: &'k RefCell<Vec<Key>>,
    kind: &'k RefCell<String>,
}

impl Probe<'_> {
    fn is(&self, kind: &str) {
        *self.kind.borrow_mut() = kind.to_string();
    }
}

macro_rules! sample {
    ($de:lifetime; $($method:ident => $kind:literal, $visit:ident($($value:expr)?);)*) => {
        $(fn $method<V: Visitor<$de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.is($kind);
            visitor.$visit($($value)?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "`{}` takes any type, so its keys cannot be listed",
            self.path
        )))
    }

    sample! { 'de;
        deserialize_bool => "boolean", visit_bool(false);
        deserialize_i8 => "integer", visit_i64(1);
        deserialize_i16 => "integer", visit_i64(1);
        deserialize_i32 => "integer", visit_i64(1);
        deserialize_i64 => "integer", visit_i64(1);
        deserialize_u8 => "integer", visit_u64(1);
        deserialize_u16 => "integer", visit_u64(1);
        deserialize_u32 => "integer", visit_u64(1);
        deserialize_u64 => "integer", visit_u64(1);
        deserialize_f32 => "number", visit_f64(1.0);
        deserialize_f64 => "number", visit_f64(1.0);
        deserialize_str => "string", visit_str("x");
        deserialize_string => "string", visit_str("x");
        deserialize_unit => "nothing", visit_unit();
        deserialize_ignored_any => "anything", visit_unit();
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let element = RefCell::new(String::new());
        let value = visitor.visit_seq(One {
            key: None,
            value: Some(Probe {
                path: self.path.clone(),
                keys: self.keys,
                kind: &element,
            }),
        })?;
        self.is(&plural("array", &element.into_inner()));
        Ok(value)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let entry = RefCell::new(String::new());
        let value = visitor.visit_map(One {
            key: Some(NAME),
            value: Some(Probe {
                path: join(&self.path, NAME),
                keys: self.keys,
                kind: &entry,
            }),
        })?;
        let entry = entry.into_inner();
        self.is(&if entry == "table" {
            "tables by name".to_string()
        } else {
            plural("table", &entry)
        });
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name != SPANNED {
            self.is("table");
        }
        visitor.visit_map(Fields {
            spanned: name == SPANNED,
            probe: self,
            fields: fields.iter(),
            current: "",
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let names: Vec<String> = variants.iter().map(|v| format!("`{v}`")).collect();
        self.is(&names.join(" or "));
        visitor.visit_enum(UnitVariant(variants.first().copied().unwrap_or_default()))
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit_struct tuple tuple_struct identifier
    }
}

/// `array` + `string` = `array of strings`.
fn plural(container: &str, element: &str) -> String {
    format!("{container} of {element}s")
}

/// A struct's fields, each given a probe of its own and recorded with the
/// kind it turned out to be. A `Spanned` is seen through: its value is the
/// field's.
struct Fields<'k> {
    spanned: bool,
    probe: Probe<'k>,
    fields: std::slice::Iter<'static, &'static str>,
    current: &'static str,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(&field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = field;
        seed.deserialize(BorrowedStrDeserializer::new(field))
            .map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
        if self.spanned {
            if self.current == SPANNED_VALUE {
                return seed.deserialize(Probe {
                    path: self.probe.path.clone(),
                    keys: self.probe.keys,
                    kind: self.probe.kind,
                });
            }
            let offset: U64Deserializer<Error> = 0u64.into_deserializer();
            return seed.deserialize(offset);
        }
        let kind = RefCell::new(String::new());
        let value = seed.deserialize(Probe {
            path: join(&self.probe.path, self.current),
            keys: self.probe.keys,
            kind: &kind,
        })?;
        self.probe.keys.borrow_mut().push(Key {
            table: self.probe.path.clone(),
            name: self.current.to_string(),
            kind: kind.into_inner(),
        });
        Ok(value)
    }
}

/// A sequence of one element, or a map of one entry named `key`.
struct One<'k> {
    key: Option<&'static str>,
    value: Option<Probe<'k>>,
}

impl<'de> de::SeqAccess<'de> for One<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.value
            .take()
            .map(|probe| seed.deserialize(probe))
            .transpose()
    }
}

impl<'de> de::MapAccess<'de> for One<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.key.take() {
            Some(key) => seed
                .deserialize(BorrowedStrDeserializer::new(key))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
        let probe = self
            .value
            .take()
            .ok_or_else(|| <Error as de::Error>::custom("one value only"))?;
        seed.deserialize(probe)
    }
}

/// The first variant of an enum, taken as a unit variant.
struct UnitVariant(&'static str);

impl<'de> de::EnumAccess<'de> for UnitVariant {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Error> {
        let name = seed.deserialize(BorrowedStrDeserializer::new(self.0))?;
        Ok((name, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, Error> {
        Err(de::Error::custom("only unit variants are listed"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom("only unit variants are listed"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom("only unit variants are listed"))
    }
}

/// The accepted key nearest to `word`, if one is near enough to be what
/// was meant: a typo, a letter too many or too few, a plural.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (distance(word, candidate), candidate))
        .filter(|(d, candidate)| {
            let longer = word.chars().count().max(candidate.chars().count()).max(1);
            // At least 55% alike: `retries` for `retry`, not `url` for `path`.
            (*d as f64) <= longer as f64 * 0.45
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, candidate)| candidate)
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}
