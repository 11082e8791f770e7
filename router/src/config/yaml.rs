//! The YAML layer of the config: a span-carrying node tree, and a reader that walks it while
//! collecting every error with its line and column.
//!
//! serde's derive stops at the first problem; an operator fixing a config wants all of them at
//! once, each pointing at the exact place. So the file is parsed once into [`Node`]s (every node
//! keeps where it came from) and typed by hand in `config::parse`. This module must not know
//! any config key: it only knows YAML shapes and how to report them.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::error::{ConfigError, Location};

/// A YAML node and where it starts in the file.
#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub at: Location,
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// How the value is described in "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Seq(_) => f.write_str("a list"),
            Value::Map(_) => f.write_str("a mapping"),
        }
    }
}

/// What serde-saphyr hands us: the value with its span. Converted to [`Node`] right away so
/// the rest of the config code does not depend on the YAML crate's types.
struct RawNode(Spanned<RawValue>);

enum RawValue {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<RawNode>),
    Map(Vec<(Spanned<RawKey>, RawNode)>),
}

/// Keys are scalars in every config we accept; a non-scalar key is reported, not parsed.
enum RawKey {
    Scalar(String),
    Complex,
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spanned::<RawValue>::deserialize(d).map(RawNode)
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<RawValue, E> {
                Ok(RawValue::Null)
            }
            fn visit_none<E>(self) -> Result<RawValue, E> {
                Ok(RawValue::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawValue, D::Error> {
                RawValue::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<RawValue, E> {
                Ok(RawValue::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawValue, E> {
                Ok(RawValue::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawValue, E> {
                Ok(RawValue::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<RawValue, E> {
                Ok(RawValue::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawValue, E> {
                i128::try_from(v)
                    .map(RawValue::Int)
                    .map_err(|_| E::custom("integer too large"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<RawValue, E> {
                Ok(RawValue::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawValue, E> {
                Ok(RawValue::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<RawValue, E> {
                Ok(RawValue::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<RawValue, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element()? {
                    items.push(item);
                }
                Ok(RawValue::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<RawValue, A::Error> {
                let mut entries = Vec::new();
                while let Some(k) = a.next_key()? {
                    let v = a.next_value()?;
                    entries.push((k, v));
                }
                Ok(RawValue::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match RawValue::deserialize(d)? {
            RawValue::Str(s) => RawKey::Scalar(s),
            RawValue::Int(i) => RawKey::Scalar(i.to_string()),
            RawValue::Bool(b) => RawKey::Scalar(b.to_string()),
            RawValue::Float(x) => RawKey::Scalar(x.to_string()),
            RawValue::Null => RawKey::Scalar(String::new()),
            RawValue::Seq(_) | RawValue::Map(_) => RawKey::Complex,
        })
    }
}

fn location(l: &serde_saphyr::Location) -> Location {
    Location {
        line: l.line() as u32,
        column: l.column() as u32,
    }
}

fn convert(raw: RawNode) -> Node {
    let at = location(&raw.0.referenced);
    let value = match raw.0.value {
        RawValue::Null => Value::Null,
        RawValue::Bool(b) => Value::Bool(b),
        RawValue::Int(i) => Value::Int(i),
        RawValue::Float(x) => Value::Float(x),
        RawValue::Str(s) => Value::Str(s),
        RawValue::Seq(items) => Value::Seq(items.into_iter().map(convert).collect()),
        RawValue::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key_at = location(&k.referenced);
                    let key = match k.value {
                        RawKey::Scalar(s) => Value::Str(s),
                        RawKey::Complex => Value::Seq(Vec::new()),
                    };
                    (
                        Node {
                            value: key,
                            at: key_at,
                        },
                        convert(v),
                    )
                })
                .collect(),
        ),
    };
    Node { value, at }
}

/// Parses YAML text into a node tree. A syntax error is one error: YAML cannot be read past it.
pub fn parse_document(text: &str) -> Result<Node, ConfigError> {
    if text.trim().is_empty() {
        // An empty file is a valid, empty config: every section is optional.
        return Ok(Node {
            value: Value::Map(Vec::new()),
            at: Location { line: 1, column: 1 },
        });
    }
    match serde_saphyr::from_str::<RawNode>(text) {
        Ok(raw) => Ok(convert(raw)),
        Err(e) => {
            let at = e
                .location()
                .map(|l| location(&l))
                .filter(|l| l.line > 0)
                .unwrap_or(Location { line: 1, column: 1 });
            // The crate's Display renders a snippet over several lines; the first line is the
            // message an operator needs, the location is already ours.
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid YAML");
            let msg = first
                .trim_start_matches("error: ")
                .split_once(": ")
                .filter(|(head, _)| head.starts_with("line "))
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or_else(|| first.trim_start_matches("error: ").to_owned());
            Err(ConfigError::new(at, format!("invalid YAML: {msg}")))
        }
    }
}
