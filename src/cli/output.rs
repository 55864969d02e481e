//! How results are printed: tables for people, JSON for programs, colours only on a
//! terminal and never under `NO_COLOR`, progress bars only when standard output is a
//! terminal.

use std::io::{IsTerminal as _, Write as _};

use super::args::Output;

/// Where and how a command prints.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) format: Output,
    color: bool,
    tty: bool,
}

impl Out {
    pub(crate) fn new(format: Output) -> Self {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            format,
            color: tty && !no_color,
            tty,
        }
    }

    pub(crate) fn json(&self) -> bool {
        self.format == Output::Json
    }

    /// Prints a JSON document on standard output.
    pub(crate) fn print_json(&self, value: &serde_json::Value) {
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", json_visible(&text));
    }

    /// `text` in an ANSI colour (31 red, 32 green, 33 yellow, 2 dim), if colours are on.
    pub(crate) fn paint(&self, code: u8, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// A progress bar on standard error for `len` items, drawn only when standard
    /// output is a terminal.
    pub(crate) fn progress(&self, len: u64, what: &'static str) -> indicatif::ProgressBar {
        if !self.tty || len < 1000 {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(len),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what);
        bar
    }
}

impl Out {
    /// A spinner on standard error for one long step of unknown length (a large
    /// export, a restore), drawn only when standard output is a terminal.
    pub(crate) fn spinner(&self, what: &'static str) -> indicatif::ProgressBar {
        if !self.tty {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new_spinner().with_message(what);
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar
    }
}

/// Prints a line on standard output; a closed pipe (`| head`) is not an error.
pub(crate) fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", visible(text));
}

/// `text` as a terminal shows it as written: every control character but line breaks
/// and tabs (an escape sequence from a server's answer or a key's field, which could
/// clear the screen or retitle the window), and every character that does not show
/// or reorders text (`U+202E`), spelled out, as `\u{1b}`.
pub(crate) fn visible(text: &str) -> std::borrow::Cow<'_, str> {
    spelled_out(text, |c, out| out.extend(c.escape_unicode()))
}

/// JSON text as a terminal shows it: what [`visible`] spells out, as JSON's own
/// `\uXXXX` escapes (serde leaves `U+202E` or `U+2028` as they are; they stand only
/// inside strings, where the escape means the same character), so the document
/// still parses.
fn json_visible(text: &str) -> std::borrow::Cow<'_, str> {
    spelled_out(text, |c, out| {
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{unit:04x}"));
        }
    })
}

/// `text` with every character that does not show (line breaks and tabs aside)
/// written out by `spell`.
fn spelled_out(text: &str, spell: fn(char, &mut String)) -> std::borrow::Cow<'_, str> {
    let shown = |c: char| !crate::key::invisible(c) || c == '\n' || c == '\t';
    if text.chars().all(shown) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if shown(c) {
            out.push(c);
        } else {
            spell(c, &mut out);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `text` on one line, as [`visible`] shows it: line breaks as spaces.
pub(crate) fn one_line(text: &str) -> String {
    visible(&text.replace(['\n', '\r', '\t'], " ")).into_owned()
}

/// Prints rows under headers, in aligned columns.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| one_line(cell).into()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut push = |cells: &mut dyn Iterator<Item = &str>| {
        let mut first = true;
        let mut row = String::new();
        for (cell, w) in cells.zip(&widths) {
            if !first {
                row.push_str("  ");
            }
            first = false;
            row.push_str(cell);
            row.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        text.push_str(row.trim_end());
        text.push('\n');
    };
    push(&mut headers.iter().copied());
    for row in &rows {
        push(&mut row.iter().map(|cell| &**cell));
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_spelled_out_and_lines_kept_where_they_belong() {
        assert!(matches!(
            visible("plain\nentry\t1"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(visible("a\u{1b}[2Jb\u{7}"), "a\\u{1b}[2Jb\\u{7}");
        assert_eq!(visible("é\r"), "é\\u{d}");
        assert_eq!(visible("a\u{202e}live"), "a\\u{202e}live");
        // JSON keeps parsing, with the same strings.
        let value = serde_json::json!({"description": "soft\u{ad}hy\u{2028}phen \u{e0041} \u{202e}x\u{7f}"});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let shown = json_visible(&text);
        assert!(
            !shown.chars().any(|c| crate::key::invisible(c) && c != '\n'),
            "{shown}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&shown).unwrap(),
            value
        );
        assert_eq!(
            one_line("title:\r\n\u{1b}]0;x\u{7}\tdone"),
            "title:  \\u{1b}]0;x\\u{7} done"
        );
    }
}
