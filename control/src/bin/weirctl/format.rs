//! Pure formatting shared by the printers: kubectl's ages, tables,
//! label lists and timestamps.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// kubectl's `HumanDuration` (k8s.io/apimachinery duration): `45s`, `3m2s`,
/// `15m`, `5h3m`, `2d3h`, `400d`, `2y10d`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_owned();
    }
    if seconds < 0 {
        return "0s".to_owned();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// The current time (whole seconds, as object timestamps are).
pub fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Parses an RFC 3339 timestamp field.
pub fn timestamp(v: &Value) -> Option<Timestamp> {
    v.as_str()?.parse().ok()
}

/// The age of an RFC 3339 timestamp at `now`, or `<unknown>`.
pub fn age(v: &Value, now: Timestamp) -> String {
    match timestamp(v) {
        Some(t) => human_duration(now.duration_since(t).as_secs()),
        None => "<unknown>".to_owned(),
    }
}

/// A timestamp as `kubectl describe` prints it: `Mon, 02 Jan 2006 15:04:05 +0000`.
pub fn describe_time(v: &Value) -> String {
    match timestamp(v) {
        Some(t) => t.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string(),
        None => "<unset>".to_owned(),
    }
}

/// `a=b,c=d` from a string map (`<none>` when empty), keys sorted.
pub fn labels_inline(v: &Value) -> String {
    let list = label_pairs(v);
    if list.is_empty() {
        "<none>".to_owned()
    } else {
        list.join(",")
    }
}

/// `k=v` of a string map, keys sorted.
pub fn label_pairs(v: &Value) -> Vec<String> {
    let Some(map) = v.as_object() else {
        return Vec::new();
    };
    let mut pairs: Vec<(&String, &Value)> = map.iter().collect();
    pairs.sort_by_key(|(k, _)| *k);
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect()
}

/// A label selector (`matchLabels` plus `matchExpressions`) in kubectl's
/// text form (`app=web,tier in (a,b)`); `<none>` if empty.
pub fn selector_text(sel: &Value) -> String {
    let mut parts = label_pairs(&sel["matchLabels"]);
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let text = match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other} ({})", values.join(",")),
        };
        parts.push(text);
    }
    if parts.is_empty() {
        "<none>".to_owned()
    } else {
        parts.join(",")
    }
}

/// A string field or a placeholder.
pub fn or<'a>(v: &'a Value, placeholder: &'a str) -> &'a str {
    match v.as_str() {
        Some(s) if !s.is_empty() => s,
        _ => placeholder,
    }
}

/// An integer field, 0 if unset.
pub fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_default()
}

/// A table printed the kubectl way: columns left-aligned, three spaces
/// apart, no trailing spaces.
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// Column headers.
    pub header: Vec<String>,
    /// Cells, one row per object.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Column widths (the widest cell of each column, header included).
    pub fn widths(&self) -> Vec<usize> {
        (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain(std::iter::once(&self.header[i]))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The whole table (header included), one line per row.
    pub fn render(&self, with_header: bool) -> String {
        let widths = self.widths();
        let mut out = String::new();
        if with_header {
            let _ = writeln!(out, "{}", line(&self.header, &widths));
        }
        for r in &self.rows {
            let _ = writeln!(out, "{}", line(r, &widths));
        }
        out
    }
}

/// One row with the given column widths (cells wider than their column
/// push the rest right, as in a watch after the first table).
pub fn line(cells: &[String], widths: &[usize]) -> String {
    let mut out = String::new();
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push_str("   ");
        }
        out.push_str(c);
        if i + 1 < cells.len() {
            let w = widths.get(i).copied().unwrap_or(0);
            let n = c.chars().count();
            out.extend(std::iter::repeat_n(' ', w.saturating_sub(n)));
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 180, "5h3m"),
            (30 * 3600, "30h"),
            (50 * 3600, "2d2h"),
            (48 * 3600, "2d"),
            (400 * 86400, "400d"),
            (3 * 365 * 86400 + 10 * 86400, "3y10d"),
            (9 * 365 * 86400, "9y"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }

    #[test]
    fn ages_and_times() {
        let now: Timestamp = "2024-01-01T00:10:00Z".parse().expect("ts");
        assert_eq!(age(&json!("2024-01-01T00:00:00Z"), now), "10m");
        assert_eq!(age(&Value::Null, now), "<unknown>");
        assert_eq!(
            describe_time(&json!("2024-01-01T00:00:00Z")),
            "Mon, 01 Jan 2024 00:00:00 +0000"
        );
    }

    #[test]
    fn tables_align_columns_three_spaces_apart() {
        let mut t = Table::new(&["NAME", "READY", "STATUS"]);
        t.rows
            .push(vec!["web-abcde".into(), "1/1".into(), "Running".into()]);
        t.rows.push(vec!["x".into(), "0/1".into(), String::new()]);
        assert_eq!(
            t.render(true),
            "NAME        READY   STATUS\nweb-abcde   1/1     Running\nx           0/1\n"
        );
    }

    #[test]
    fn selectors_and_labels_print_sorted() {
        let sel = json!({"matchLabels": {"b": "2", "a": "1"},
            "matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]},
                                 {"key": "u", "operator": "DoesNotExist"}]});
        assert_eq!(selector_text(&sel), "a=1,b=2,t in (x,y),!u");
        assert_eq!(selector_text(&json!({})), "<none>");
        assert_eq!(labels_inline(&json!({"z": "1", "k": "v"})), "k=v,z=1");
    }
}
