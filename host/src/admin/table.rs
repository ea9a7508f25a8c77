//! How the operator commands print for people: aligned tables with a
//! header row, relative times (`2 min ago`) and `-` for what is unknown.
//! Every command's table goes through here, so they all read alike.

use std::fmt;

use crate::message::now_ms;

/// Longest a cell may be before it is cut short with `…`: a long topic
/// list or reason must not push every other column off the screen.
const WIDEST: usize = 40;

/// Spaces between columns; cells never hold two spaces in a row, so a
/// script can still split a row on them.
const GAP: &str = "  ";

/// A table: a header row and rows of text, columns as wide as their
/// widest cell (up to [`WIDEST`]).
pub struct Table {
    headers: Vec<String>,
    /// Columns aligned to the right (numbers).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, every column aligned left.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            right: vec![false; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Aligns the columns with these headers to the right, as numbers are.
    pub fn numbers(mut self, headers: &[&str]) -> Self {
        for (i, header) in self.headers.iter().enumerate() {
            if headers.contains(&header.as_str()) {
                self.right[i] = true;
            }
        }
        self
    }

    /// Adds a row; an empty cell shows as `-`.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "one cell per column");
        self.rows.push(
            cells
                .into_iter()
                .map(|cell| match fit(&cell) {
                    fitted if fitted.is_empty() => "-".to_string(),
                    fitted => fitted,
                })
                .collect(),
        );
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|column| {
                std::iter::once(&self.headers[column])
                    .chain(self.rows.iter().map(|row| &row[column]))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column > 0 {
                    line.push_str(GAP);
                }
                let pad = " ".repeat(widths[column] - cell.chars().count());
                if self.right[column] {
                    line.push_str(&pad);
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&pad);
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `text` on one line, runs of whitespace made one space and other control
/// characters (a terminal's escapes) `�`, cut to [`WIDEST`] characters with
/// `…` where longer.
fn fit(text: &str) -> String {
    let one_line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if one_line.chars().count() <= WIDEST {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(WIDEST - 1).collect();
    cut.push('…');
    cut
}

/// How long ago `at_ms` (milliseconds since the epoch) was, as people say
/// it: `just now`, `40 s ago`, `2 min ago`, `3 h ago`, `2 d ago`; `-` for
/// never (`None` or 0).
pub fn ago(at_ms: Option<u64>) -> String {
    match at_ms {
        None | Some(0) => "-".into(),
        Some(at) => ago_from(at, now_ms()),
    }
}

fn ago_from(at_ms: u64, now_ms: u64) -> String {
    // A time ahead of this clock (another host's clock) is as good as now.
    let seconds = now_ms.saturating_sub(at_ms) / 1000;
    match seconds {
        0..5 => "just now".into(),
        5..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86400),
    }
}

/// A count the answer may not have (the backend could not say): `-` then.
pub fn count(value: &serde_json::Value) -> String {
    value
        .as_u64()
        .or_else(|| value.as_i64().map(|n| n.max(0) as u64))
        .map_or_else(|| "-".into(), |n| n.to_string())
}

/// A rate in messages a second, to one decimal; `-` where unknown.
pub fn rate(per_second: Option<f64>) -> String {
    match per_second {
        Some(r) if r.is_finite() => format!("{r:.1}"),
        _ => "-".into(),
    }
}

/// The first 12 hex digits of a version's hash, as versions are named.
pub fn short_hash(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// Prints `value` as one JSON document, for scripts.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_headers() {
        let mut table = Table::new(&["ROUTE", "COUNT", "TOPICS"]).numbers(&["COUNT"]);
        table.row(vec!["a".into(), "7".into(), "x, y".into()]);
        table.row(vec!["longer-name".into(), "1234".into(), String::new()]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ROUTE        COUNT  TOPICS");
        assert_eq!(lines[1], "a                7  x, y");
        assert_eq!(lines[2], "longer-name   1234  -");
    }

    #[test]
    fn long_cells_are_cut_and_stay_on_one_line() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec!["x".repeat(100), "two\nlines\u{1b}[2J".into()]);
        let text = table.to_string();
        let row = text.lines().nth(1).unwrap();
        assert!(
            row.starts_with(&format!("{}…", "x".repeat(WIDEST - 1))),
            "{row}"
        );
        assert!(row.ends_with("two lines\u{fffd}[2J"), "{row}");
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn times_read_as_people_say_them() {
        let now = 1_000_000_000;
        assert_eq!(ago_from(now - 1_000, now), "just now");
        assert_eq!(ago_from(now + 60_000, now), "just now");
        assert_eq!(ago_from(now - 42_000, now), "42 s ago");
        assert_eq!(ago_from(now - 150_000, now), "2 min ago");
        assert_eq!(ago_from(now - 3 * 3_600_000 - 5, now), "3 h ago");
        assert_eq!(ago_from(now - 2 * 86_400_000, now), "2 d ago");
        assert_eq!(ago(None), "-");
        assert_eq!(ago(Some(0)), "-");
    }

    #[test]
    fn unknown_counts_and_rates_show_as_a_dash() {
        assert_eq!(count(&serde_json::json!(5)), "5");
        assert_eq!(count(&serde_json::Value::Null), "-");
        assert_eq!(rate(Some(12.34)), "12.3");
        assert_eq!(rate(None), "-");
    }
}
