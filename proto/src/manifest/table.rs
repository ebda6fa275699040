//! The field tables: every field Kubernetes knows in the parts of an object
//! that weir reads, each with its class (used, accepted with a warning, or
//! refused) and the reason. Fields absent from a table are unknown to
//! Kubernetes and refused. Below a warned or refused field nothing is checked
//! here (k8s-openapi still checks the types of warned fields).
//!
//! A kind's table is built from [`Part`]s: rows, and other parts mounted
//! below a path, so the Pod's `spec` rows also check
//! `spec.template.spec` of a Deployment and one label-selector part serves
//! every selector. The rows themselves are in `fields.rs`.

use std::fmt::Write as _;

/// The JSON shape a used field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A mapping whose keys are themselves fields in the table.
    Object,
    /// A list of mappings whose keys are fields in the table (`path[].key`).
    ObjectList,
    /// A string.
    String,
    /// A boolean.
    Bool,
    /// An integer that fits in `i32`.
    I32,
    /// An integer that fits in `i64`.
    I64,
    /// An integer or a string (`maxSurge: 1`, `maxSurge: "25%"`).
    IntOrString,
    /// A list of strings.
    StringList,
    /// A mapping of string keys to string values (labels, annotations).
    StringMap,
    /// A mapping of resource names to quantities (strings or numbers).
    QuantityMap,
}

/// The value at which a warned or refused field asks for nothing, so it is
/// accepted silently. `null`, `[]` and `{}` are always inert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inert {
    /// Only `null`, `[]` and `{}`.
    Empty,
    /// Also `false`.
    False,
    /// Also `true`.
    True,
    /// Also `0`.
    Zero,
    /// Also this exact string.
    Str(&'static str),
}

/// What weir does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldClass {
    /// weir reads and honours the field; `note` says how it is checked or defaulted.
    Used {
        /// The JSON shape the value must have.
        shape: Shape,
        /// Whether the field must be present (when its parent is).
        required: bool,
        /// How the value is checked or defaulted.
        note: &'static str,
    },
    /// Accepted and ignored with a warning; `why` says why ignoring it is
    /// harmless. A `dropped` field is also removed from the parsed object.
    Warn {
        /// The value that asks for nothing (no warning).
        inert: Inert,
        /// Whether the field is removed from the object.
        dropped: bool,
        /// Why ignoring it is harmless.
        why: &'static str,
    },
    /// Refused; `why` says what weir cannot honour.
    Refused {
        /// The value that asks for nothing (accepted silently).
        inert: Inert,
        /// What weir cannot honour.
        why: &'static str,
    },
}

/// One row of a table. `path` uses `[]` for "every element of this list".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRule {
    /// Field path in Kubernetes style, e.g. `spec.containers[].ports[].containerPort`.
    pub path: &'static str,
    /// What weir does with it.
    pub class: FieldClass,
}

/// A piece of a kind's table.
#[derive(Debug, Clone, Copy)]
pub enum Part {
    /// Rows whose paths are relative to where the part is mounted.
    Rows(&'static [FieldRule]),
    /// Other parts below a path (`spec.template`, `spec.selector`).
    Mount(&'static str, &'static [Part]),
}

/// A kind's whole table, with every mounted part flattened to full paths.
#[derive(Debug)]
pub struct Table {
    kind: &'static str,
    rows: Vec<(String, FieldClass)>,
}

fn join(parent: &str, path: &str) -> String {
    if path.is_empty() {
        parent.to_owned()
    } else if parent.is_empty() {
        path.to_owned()
    } else {
        format!("{parent}.{path}")
    }
}

impl Table {
    /// Flattens `parts`; a row of `overrides` replaces the row of the same
    /// full path (the standalone agent's view of a Pod).
    pub(super) fn new(kind: &'static str, parts: &[Part], overrides: &[FieldRule]) -> Self {
        let mut rows = Vec::new();
        flatten("", parts, &mut rows);
        for (path, class) in &mut rows {
            if let Some(o) = overrides.iter().find(|o| o.path == path) {
                *class = o.class;
            }
        }
        Self { kind, rows }
    }

    /// The kind the table is for, e.g. `Deployment`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Every row: full path and class, in table order.
    pub fn rows(&self) -> impl Iterator<Item = (&str, FieldClass)> {
        self.rows.iter().map(|(p, c)| (p.as_str(), *c))
    }

    /// The class of exactly this path pattern, if Kubernetes knows the field.
    pub(super) fn rule(&self, path: &str) -> Option<FieldClass> {
        self.rows.iter().find(|(p, _)| p == path).map(|(_, c)| *c)
    }

    /// The names of the fields directly below `parent`, for "did you mean"
    /// hints and the required check.
    pub(super) fn children<'a>(
        &'a self,
        parent: &'a str,
    ) -> impl Iterator<Item = (&'a str, FieldClass)> + 'a {
        self.rows
            .iter()
            .filter_map(move |(p, c)| child_name(parent, p).map(|n| (n, *c)))
    }
}

fn flatten(at: &str, parts: &[Part], out: &mut Vec<(String, FieldClass)>) {
    for part in parts {
        match part {
            Part::Rows(rows) => out.extend(rows.iter().map(|r| (join(at, r.path), r.class))),
            Part::Mount(below, parts) => flatten(&join(at, below), parts, out),
        }
    }
}

/// The name of the field `path` when it sits directly below `parent` (a
/// pattern such as `spec.containers[]`; `""` for the top level).
pub(super) fn child_name<'p>(parent: &str, path: &'p str) -> Option<&'p str> {
    let rest = if parent.is_empty() {
        path
    } else {
        path.strip_prefix(parent)?.strip_prefix('.')?
    };
    (!rest.contains('.')).then_some(rest)
}

fn class_text(class: FieldClass) -> (&'static str, &'static str) {
    match class {
        FieldClass::Used {
            required: true,
            note,
            ..
        } => ("used (required)", note),
        FieldClass::Used { note, .. } => ("used", note),
        FieldClass::Warn {
            dropped: true, why, ..
        } => ("warning, dropped", why),
        FieldClass::Warn { why, .. } => ("warning, ignored", why),
        FieldClass::Refused { why, .. } => ("refused", why),
    }
}

/// Renders a table as Markdown for the README. Rows whose path starts with
/// one of `summarised` (a prefix and what to say instead) are replaced by
/// one row; where the standalone agent's table differs, the row says so.
pub(super) fn markdown(
    table: &Table,
    standalone: Option<&Table>,
    summarised: &[(&str, &str)],
) -> String {
    let mut out = format!("| {} field | Class | Notes |\n|---|---|---|\n", table.kind);
    let mut said = Vec::new();
    for (path, class) in table.rows() {
        if let Some((prefix, what)) = summarised
            .iter()
            .find(|(prefix, _)| path == *prefix || path.starts_with(&format!("{prefix}.")))
        {
            if !said.contains(prefix) {
                said.push(prefix);
                let _ = writeln!(out, "| `{prefix}.*` | as {what} | |");
            }
            continue;
        }
        let (class_name, note) = class_text(class);
        let _ = write!(out, "| `{path}` | {class_name} | {note}");
        if let Some(alone) = standalone
            .and_then(|t| t.rule(path))
            .filter(|c| *c != class)
        {
            let (alone_name, alone_note) = class_text(alone);
            let _ = write!(out, " (standalone agent: {alone_name}: {alone_note})");
        }
        out.push_str(" |\n");
    }
    out.push_str("| any other field | refused | unknown to Kubernetes |\n");
    out
}
