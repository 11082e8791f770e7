//! Summary statistics and the table every scenario prints. Pure: no I/O but `print`.

/// n, median, p95, min and max of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
}

/// The `q`-quantile (0..=1) by the nearest-rank method: the smallest sample with at least
/// `q * n` samples at or below it (so p95 of fewer than 20 samples is the maximum).
pub fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    // ceil(q * n) as a 1-based rank, clamped to 1..=n.
    let rank = (q * n as f64).ceil().clamp(1.0, n as f64);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let idx = rank as usize - 1;
    sorted.get(idx).copied()
}

/// Median (mean of the two middle samples for an even n), p95 (nearest rank), min, max.
/// None for an empty sample; NaNs are ignored.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        median,
        p95: nearest_rank(&v, 0.95)?,
        min: v[0],
        max: v[n - 1],
    })
}

/// One row of a result table: a label, the samples, their unit, and a free note (target).
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub samples: Vec<f64>,
    pub note: String,
}

impl Row {
    pub fn new(label: impl Into<String>, samples: Vec<f64>, note: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            samples,
            note: note.into(),
        }
    }
}

fn fmt_num(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}")
}

/// Renders a Markdown table: label | n | median | p95 | min | max | note, values with `unit`.
pub fn render_table(unit: &str, decimals: usize, rows: &[Row]) -> String {
    let mut s = format!(
        "| measure | n | median ({unit}) | p95 ({unit}) | min ({unit}) | max ({unit}) | note |\n| --- | --: | --: | --: | --: | --: | --- |\n"
    );
    for r in rows {
        match summarize(&r.samples) {
            Some(m) => s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.label,
                m.n,
                fmt_num(m.median, decimals),
                fmt_num(m.p95, decimals),
                fmt_num(m.min, decimals),
                fmt_num(m.max, decimals),
                r.note
            )),
            None => s.push_str(&format!(
                "| {} | 0 | - | - | - | - | {} |\n",
                r.label, r.note
            )),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_medians() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[f64::NAN]).is_none());
    }

    #[test]
    fn p95_is_nearest_rank() {
        // 1..=20: rank ceil(0.95*20) = 19 -> 19.
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(summarize(&v).unwrap().p95, 19.0);
        // 1..=100: rank 95.
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(summarize(&v).unwrap().p95, 95.0);
        // Fewer than 20 samples: p95 is the maximum.
        assert_eq!(summarize(&[5.0, 1.0, 9.0]).unwrap().p95, 9.0);
        assert_eq!(nearest_rank(&[7.0], 0.95), Some(7.0));
        assert_eq!(nearest_rank(&[1.0, 2.0], 0.0), Some(1.0));
    }

    #[test]
    fn table_has_one_line_per_row() {
        let t = render_table(
            "ms",
            1,
            &[
                Row::new("a", vec![1.0, 2.0, 3.0], "x"),
                Row::new("b", vec![], "skipped"),
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "| a | 3 | 2.0 | 3.0 | 1.0 | 3.0 | x |");
        assert_eq!(lines[3], "| b | 0 | - | - | - | - | skipped |");
    }
}
