//! The layout `kubectl describe` uses: indented lines of tab-separated
//! cells, aligned like Go's tabwriter (a column's width is set by the run of
//! consecutive lines that have a cell after it; two spaces of padding).

use serde_json::Value;

use crate::format::{label_pairs, or};

/// A describe document being built.
#[derive(Debug, Default)]
pub struct Doc {
    lines: Vec<Vec<String>>,
}

impl Doc {
    /// Adds one line at an indent `level` (two spaces each).
    pub fn line(&mut self, level: usize, cells: &[&str]) {
        let mut cells: Vec<String> = cells.iter().map(|c| (*c).to_owned()).collect();
        if let Some(first) = cells.first_mut() {
            *first = format!("{}{first}", "  ".repeat(level));
        }
        self.lines.push(cells);
    }

    /// `key:` and a value.
    pub fn kv(&mut self, level: usize, key: &str, value: &str) {
        self.line(level, &[&format!("{key}:"), value]);
    }

    /// `key:` then one string-map entry per line (`k=v` or `k: v`), or `<none>`.
    pub fn map(&mut self, level: usize, key: &str, map: &Value, sep: &str) {
        let pairs: Vec<String> = if sep == "=" {
            label_pairs(map)
        } else {
            label_pairs(map)
                .into_iter()
                .map(|p| p.replacen('=', sep, 1))
                .collect()
        };
        self.list(level, key, &pairs);
    }

    /// `key:` then one value per line (aligned after the key), or `<none>`.
    pub fn list(&mut self, level: usize, key: &str, values: &[String]) {
        match values.split_first() {
            None => self.kv(level, key, "<none>"),
            Some((first, rest)) => {
                self.kv(level, key, first);
                for v in rest {
                    self.line(level, &["", v]);
                }
            }
        }
    }

    /// A string field of `v` or `<none>`.
    pub fn field(&mut self, level: usize, key: &str, v: &Value) {
        self.kv(level, key, or(v, "<none>"));
    }

    /// The aligned text.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for (cells, w) in self.lines.iter().zip(&widths) {
            let mut line = String::new();
            for (i, c) in cells.iter().enumerate() {
                line.push_str(c);
                if i + 1 < cells.len() {
                    let pad = w[i].saturating_sub(c.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Per line, the padded width of each terminated cell.
    fn widths(&self) -> Vec<Vec<usize>> {
        let mut widths: Vec<Vec<usize>> = self
            .lines
            .iter()
            .map(|c| vec![0; c.len().saturating_sub(1)])
            .collect();
        let columns = self.lines.iter().map(Vec::len).max().unwrap_or(0);
        for col in 0..columns {
            let mut start = 0;
            while start < self.lines.len() {
                if self.lines[start].len() <= col + 1 {
                    start += 1;
                    continue;
                }
                let mut end = start;
                while end < self.lines.len() && self.lines[end].len() > col + 1 {
                    end += 1;
                }
                let w = self.lines[start..end]
                    .iter()
                    .map(|l| l[col].chars().count())
                    .max()
                    .unwrap_or(0)
                    + 2;
                for wl in &mut widths[start..end] {
                    wl[col] = w;
                }
                start = end;
            }
        }
        widths
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn aligns_runs_of_cells_like_tabwriter() {
        let mut d = Doc::default();
        d.kv(0, "Name", "web");
        d.map(0, "Labels", &json!({"app": "web", "tier": "x"}), "=");
        d.line(0, &["Conditions:"]);
        d.line(1, &["Type", "Status"]);
        d.line(1, &["PodScheduled", "True"]);
        d.kv(0, "Events", "<none>");
        assert_eq!(
            d.render(),
            "Name:    web\nLabels:  app=web\n         tier=x\nConditions:\n  Type          Status\n  PodScheduled  True\nEvents:         <none>\n"
        );
    }
}
