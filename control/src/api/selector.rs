//! Kubernetes label selectors in their string form: comma-separated
//! requirements, equality-based (`a=b`, `a==b`, `a!=b`), existence (`a`,
//! `!a`) and set-based (`a in (x,y)`, `a notin (x)`). All requirements must
//! hold (AND).

use std::collections::BTreeMap;

/// Why a selector string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    /// The whole selector as given.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One requirement on one label key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// The label exists (`a`).
    Exists(String),
    /// The label does not exist (`!a`).
    NotExists(String),
    /// The label has one of these values (`a=b`, `a in (x,y)`).
    In(String, Vec<String>),
    /// The label is absent or has none of these values (`a!=b`, `a notin (x)`).
    NotIn(String, Vec<String>),
}

/// A parsed label selector; the empty one matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses `text`; empty (or blank) text is the selector that matches all.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let fail = |reason: String| SelectorError {
            selector: text.to_owned(),
            reason,
        };
        let mut requirements = Vec::new();
        for part in split_top_level(text).map_err(&fail)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(fail("empty requirement".to_owned()));
            }
            requirements.push(parse_requirement(part).map_err(&fail)?);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }

    /// Whether this selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Splits on commas that are not inside a `( … )` value set.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested '('".to_owned()),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("unbalanced ')'".to_owned()),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed '('".to_owned());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::NotExists(check_key(key.trim())?));
    }
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(Requirement::NotIn(
            check_key(key.trim())?,
            vec![check_value(value.trim())?],
        ));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::In(
            check_key(key.trim())?,
            vec![check_value(value.trim())?],
        ));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let Some(inner) = part[open + 1..].trim_end().strip_suffix(')') else {
            return Err(format!("{part:?}: expected ')' at the end"));
        };
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("{part:?}: expected `<key> in (…)` or `<key> notin (…)`"))?;
        let key = check_key(key.trim())?;
        let values = inner
            .split(',')
            .map(|v| check_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if values.iter().all(String::is_empty) {
            return Err(format!("{part:?}: a value set must not be empty"));
        }
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            other => Err(format!(
                "{part:?}: unknown operator {other:?} (expected in or notin)"
            )),
        };
    }
    Ok(Requirement::Exists(check_key(part)?))
}

/// A label key: an optional DNS prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_`, `.`, beginning and ending alphanumeric.
fn check_key(key: &str) -> Result<String, String> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            let ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !ok {
                return Err(format!("label key {key:?}: invalid prefix {prefix:?}"));
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err(format!("label key {key:?}: name must not be empty"));
    }
    if !is_label_name(name) {
        return Err(format!(
            "label key {key:?}: name must be at most 63 alphanumerics, '-', '_' or '.', \
             beginning and ending with an alphanumeric"
        ));
    }
    Ok(key.to_owned())
}

/// A label value: empty, or a label name.
fn check_value(value: &str) -> Result<String, String> {
    if value.is_empty() || is_label_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "label value {value:?}: must be at most 63 alphanumerics, '-', '_' or '.', \
             beginning and ending with an alphanumeric"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sel(text: &str) -> Selector {
        Selector::parse(text).unwrap()
    }

    #[test]
    fn empty_matches_everything() {
        assert!(sel("").is_empty());
        assert!(sel("  ").matches(&labels(&[])));
        assert!(sel("").matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn equality_based() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(sel("app=web").matches(&l));
        assert!(sel("app==web").matches(&l));
        assert!(!sel("app=db").matches(&l));
        assert!(sel("app!=db").matches(&l));
        assert!(!sel("app!=web").matches(&l));
        // `!=` matches objects without the label, as in Kubernetes.
        assert!(sel("env!=prod").matches(&l));
        assert!(sel("app=web, tier = front").matches(&l));
        assert!(!sel("app=web,tier=back").matches(&l));
    }

    #[test]
    fn existence() {
        let l = labels(&[("app", "web")]);
        assert!(sel("app").matches(&l));
        assert!(!sel("!app").matches(&l));
        assert!(sel("!env").matches(&l));
        assert!(!sel("env").matches(&l));
    }

    #[test]
    fn set_based() {
        let l = labels(&[("app", "web"), ("example.com/team", "a")]);
        assert!(sel("app in (web,db)").matches(&l));
        assert!(sel("app in ( db , web )").matches(&l));
        assert!(!sel("app in (db)").matches(&l));
        assert!(sel("app notin (db)").matches(&l));
        assert!(!sel("app notin (db,web)").matches(&l));
        assert!(sel("env notin (prod)").matches(&l));
        assert!(!sel("env in (prod)").matches(&l));
        assert!(sel("app in (web,db),example.com/team=a,!env").matches(&l));
    }

    #[test]
    fn empty_value_is_allowed() {
        assert!(sel("app=").matches(&labels(&[("app", "")])));
        assert!(!sel("app=").matches(&labels(&[("app", "x")])));
    }

    #[test]
    fn invalid_selectors_name_the_selector() {
        for bad in [
            "app in (web",
            "app in web)",
            "app=we b",
            "app=web,",
            "-app=web",
            "app in ()",
            "app within (x)",
            "in (x)",
            "app=(x)",
            "/app",
            "a,,b",
        ] {
            let err = Selector::parse(bad).unwrap_err();
            assert_eq!(err.selector, bad);
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
    }
}
