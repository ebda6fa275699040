//! The walk over a document's raw JSON against the field table: refuses
//! unknown and refused fields, checks the JSON shape of used ones, collects
//! warnings, drops what weir sets itself, and normalises quantities given as
//! numbers into strings (k8s-openapi's `Quantity` only takes strings).

use serde_json::{Map, Value};

use super::ManifestError;
use super::table::{FieldClass, Inert, Shape, Table};

/// What the walk learnt about a document; the document itself is edited in place.
pub(super) struct Walked {
    /// One line per warned field that is present.
    pub warnings: Vec<String>,
    /// `(field path, JSON pointer)` of warned fields kept in the document,
    /// whose contents only k8s-openapi checks.
    pub kept_warned: Vec<(String, String)>,
}

struct Walker<'a> {
    file: &'a str,
    table: &'a Table,
    out: Walked,
}

/// Walks a document (a mapping) from the top against `table`, editing it in place.
pub(super) fn walk(
    file: &str,
    table: &Table,
    doc: &mut Map<String, Value>,
) -> Result<Walked, ManifestError> {
    let mut w = Walker {
        file,
        table,
        out: Walked {
            warnings: Vec::new(),
            kept_warned: Vec::new(),
        },
    };
    w.object("", "", "", doc)?;
    Ok(w.out)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Walker<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            file: self.file.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// Checks the fields of one mapping; `pattern` is its table path
    /// (`spec.containers[]`), `path` its display path (`spec.containers[0]`).
    fn object(
        &mut self,
        pattern: &str,
        path: &str,
        pointer: &str,
        map: &mut Map<String, Value>,
    ) -> Result<(), ManifestError> {
        let mut drop = Vec::new();
        for (key, value) in map.iter_mut() {
            let child_pattern = join(pattern, key);
            let child_path = join(path, key);
            let child_pointer = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
            let Some(class) = self.table.rule(&child_pattern) else {
                return Err(self.err(&child_path, unknown_field(self.table, pattern, key)));
            };
            match class {
                FieldClass::Used { shape, .. } => {
                    self.used(shape, &child_pattern, &child_path, &child_pointer, value)?;
                }
                FieldClass::Warn {
                    inert,
                    dropped,
                    why,
                } => {
                    if !is_inert(value, inert) {
                        self.out
                            .warnings
                            .push(format!("{}: {child_path}: ignored: {why}", self.file));
                    }
                    if dropped {
                        drop.push(key.clone());
                    } else {
                        self.out.kept_warned.push((child_path, child_pointer));
                    }
                }
                FieldClass::Refused { inert, why } => {
                    if !is_inert(value, inert) {
                        return Err(self.err(&child_path, format!("not supported: {why}")));
                    }
                    // It asks for nothing; dropping it spares k8s-openapi an
                    // odd spelling such as `hostNetwork: {}`.
                    drop.push(key.clone());
                }
            }
        }
        for key in drop {
            map.remove(&key);
        }
        for (name, class) in self.table.children(pattern) {
            let FieldClass::Used { required: true, .. } = class else {
                continue;
            };
            if map.get(name).is_none_or(Value::is_null) {
                return Err(self.err(&join(path, name), "required"));
            }
        }
        Ok(())
    }

    fn used(
        &mut self,
        shape: Shape,
        pattern: &str,
        path: &str,
        pointer: &str,
        value: &mut Value,
    ) -> Result<(), ManifestError> {
        if value.is_null() {
            // Kubernetes reads null as "not set"; `required` is checked by the parent.
            return Ok(());
        }
        match shape {
            Shape::Object => {
                let Value::Object(map) = value else {
                    return Err(
                        self.err(path, format!("must be a mapping, got {}", describe(value)))
                    );
                };
                self.object(pattern, path, pointer, map)
            }
            Shape::ObjectList => {
                let Value::Array(items) = value else {
                    return Err(self.err(path, format!("must be a list, got {}", describe(value))));
                };
                let item_pattern = format!("{pattern}[]");
                for (i, item) in items.iter_mut().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    let Value::Object(map) = item else {
                        return Err(self.err(
                            &item_path,
                            format!("must be a mapping, got {}", describe(item)),
                        ));
                    };
                    self.object(&item_pattern, &item_path, &format!("{pointer}/{i}"), map)?;
                }
                Ok(())
            }
            Shape::String
            | Shape::Bool
            | Shape::IntOrString
            | Shape::I32
            | Shape::I64
            | Shape::StringList => self.scalar(shape, path, value),
            Shape::StringMap => {
                let Value::Object(map) = value else {
                    return Err(
                        self.err(path, format!("must be a mapping, got {}", describe(value)))
                    );
                };
                for (key, v) in map.iter_mut() {
                    if v.is_null() {
                        // `key:` with nothing after it: Kubernetes reads "".
                        *v = Value::String(String::new());
                    }
                    expect_string(v).map_err(|r| self.err(&join(path, key), r))?;
                }
                Ok(())
            }
            Shape::QuantityMap => {
                let Value::Object(map) = value else {
                    return Err(
                        self.err(path, format!("must be a mapping, got {}", describe(value)))
                    );
                };
                for (key, v) in map.iter_mut() {
                    match v {
                        Value::String(_) => {}
                        Value::Number(n) => {
                            let text = n.to_string();
                            let text = text.strip_suffix(".0").unwrap_or(&text).to_owned();
                            *v = Value::String(text);
                        }
                        other => {
                            return Err(self.err(
                                &join(path, key),
                                format!(
                                    "must be a quantity such as \"500m\" or \"64Mi\", got {}",
                                    describe(other)
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Strings, booleans, integers and lists of strings.
    fn scalar(&self, shape: Shape, path: &str, value: &Value) -> Result<(), ManifestError> {
        match shape {
            Shape::String => expect_string(value).map_err(|r| self.err(path, r)),
            Shape::Bool => match value {
                Value::Bool(_) => Ok(()),
                other => Err(self.err(
                    path,
                    format!("must be true or false, got {}", describe(other)),
                )),
            },
            Shape::IntOrString => match value {
                Value::String(_) => Ok(()),
                Value::Number(n) if n.as_i64().and_then(|n| i32::try_from(n).ok()).is_some() => {
                    Ok(())
                }
                other => Err(self.err(
                    path,
                    format!(
                        "must be an integer or a string such as \"25%\", got {}",
                        describe(other)
                    ),
                )),
            },
            Shape::I32 => {
                let n = expect_integer(value).map_err(|r| self.err(path, r))?;
                i32::try_from(n)
                    .map(drop)
                    .map_err(|_| self.err(path, format!("{n} is out of range")))
            }
            Shape::I64 => expect_integer(value)
                .map(drop)
                .map_err(|r| self.err(path, r)),
            Shape::StringList => {
                let Value::Array(items) = value else {
                    return Err(self.err(
                        path,
                        format!("must be a list of strings, got {}", describe(value)),
                    ));
                };
                for (i, item) in items.iter().enumerate() {
                    expect_string(item).map_err(|r| self.err(&format!("{path}[{i}]"), r))?;
                }
                Ok(())
            }
            Shape::Object | Shape::ObjectList | Shape::StringMap | Shape::QuantityMap => Ok(()),
        }
    }
}

fn expect_string(v: &Value) -> Result<(), String> {
    match v {
        Value::String(_) => Ok(()),
        Value::Number(_) | Value::Bool(_) => Err(format!(
            "must be a string, got {} (put it in quotes)",
            describe(v)
        )),
        _ => Err(format!("must be a string, got {}", describe(v))),
    }
}

fn expect_integer(v: &Value) -> Result<i64, String> {
    v.as_i64()
        .ok_or_else(|| format!("must be an integer, got {}", describe(v)))
}

/// Whether a warned or refused field's value asks for nothing.
fn is_inert(v: &Value, inert: Inert) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(b) => inert == if *b { Inert::True } else { Inert::False },
        Value::Number(n) => inert == Inert::Zero && n.as_f64() == Some(0.0),
        Value::String(s) => matches!(inert, Inert::Str(want) if want == s),
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// "unknown field", with a hint when a known field is spelt nearly the same.
fn unknown_field(table: &Table, parent: &str, key: &str) -> String {
    let best = table
        .children(parent)
        .map(|(known, _)| {
            (
                edit_distance(&key.to_ascii_lowercase(), &known.to_ascii_lowercase()),
                known,
            )
        })
        .min();
    match best {
        Some((d, known)) if d <= 2 && d < key.len() / 2 => {
            format!("unknown field (Kubernetes has no such field; did you mean {known:?}?)")
        }
        _ => "unknown field (Kubernetes has no such field here)".to_owned(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
