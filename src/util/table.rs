//! Fixed-width tables in the manual's layout, which shell scripts parse.
//!
//! A header cell is centred the way Python's `str.center` does it (the
//! original was Python, and scripts in the field match its exact spacing);
//! data cells are left- or right-aligned per column; one space separates
//! columns; a cell wider than its column is printed whole, never cut.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

pub struct Column {
    pub title: &'static str,
    pub width: usize,
    pub align: Align,
}

pub const fn col(title: &'static str, width: usize, align: Align) -> Column {
    Column {
        title,
        width,
        align,
    }
}

/// Python's `s.center(width)`.
pub fn center(s: &str, width: usize) -> String {
    let len = s.chars().count();
    if len >= width {
        return s.to_string();
    }
    let pad = width - len;
    let left = pad / 2 + (pad & width & 1);
    format!("{}{}{}", " ".repeat(left), s, " ".repeat(pad - left))
}

fn cell(s: &str, width: usize, align: Align) -> String {
    match align {
        Align::Left => format!("{s:<width$}"),
        Align::Right => format!("{s:>width$}"),
    }
}

/// The header line, the dashes line, then one line per row.
pub fn render(cols: &[Column], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let header: Vec<String> = cols.iter().map(|c| center(c.title, c.width)).collect();
    out.push_str(&header.join(" "));
    out.push('\n');
    let dashes: Vec<String> = cols.iter().map(|c| "-".repeat(c.width)).collect();
    out.push_str(&dashes.join(" "));
    out.push('\n');
    for r in rows {
        let cells: Vec<String> = cols
            .iter()
            .zip(r)
            .map(|(c, v)| cell(v, c.width, c.align))
            .collect();
        out.push_str(&cells.join(" "));
        out.push('\n');
    }
    out
}

/// A table's title block: 19 spaces, the title, then a rule of 50.
pub fn title(name: &str, rule: char) -> String {
    format!(
        "{}{}\n{}\n",
        " ".repeat(19),
        name,
        rule.to_string().repeat(50)
    )
}

/// A list shown as Python shows it: `['a', 'b']`.
pub fn py_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_matches_python() {
        assert_eq!(center("state", 9), "  state  ");
        assert_eq!(center("read_vip", 17), "     read_vip    ");
        assert_eq!(center("write_vip", 17), "    write_vip    ");
        assert_eq!(center("state", 10), "  state   ");
        assert_eq!(center("host", 17), "       host      ");
        assert_eq!(center("lsn", 16), "      lsn       ");
        assert_eq!(center("toolongtitle", 4), "toolongtitle");
    }

    #[test]
    fn wide_cells_are_never_cut() {
        let t = render(&[col("a", 2, Align::Right)], &[vec!["12345".into()]]);
        assert_eq!(t, "a \n--\n12345\n");
    }
}
