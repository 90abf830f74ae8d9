//! Plain aligned tables for humans.

/// Renders rows under headers, columns padded to their widest cell.
pub(super) fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

/// "3m ago" style age of a unix timestamp.
pub(super) fn ago(unix: Option<i64>, now: i64) -> String {
    let Some(t) = unix else { return "-".into() };
    let d = (now - t).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(
            &["ID", "STATUS"],
            &[vec!["r-1".into(), "online".into()], vec!["r-long".into(), "x".into()]],
        );
        assert_eq!(t, "ID      STATUS\nr-1     online\nr-long  x");
        assert_eq!(ago(Some(100), 100 + 125), "2m ago");
        assert_eq!(ago(None, 0), "-");
    }
}
