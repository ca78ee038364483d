//! IRC formatting codes → Matrix HTML (`format: org.matrix.custom.html`), as
//! matrix-appservice-irc renders them: bold, italic, underline, strikethrough, monospace, colours
//! (mIRC's 16), reverse and reset.

/// mIRC's palette, colours 00–15.
const PALETTE: [&str; 16] = [
    "#FFFFFF", "#000000", "#00007F", "#009300", "#FF0000", "#7F0000", "#9C009C", "#FC7F00", "#FFFF00",
    "#00FC00", "#009393", "#00FFFF", "#0000FC", "#FF00FF", "#7F7F7F", "#D2D2D2",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Bold,
    Italic,
    Underline,
    Strike,
    Mono,
}

impl Style {
    fn tags(self) -> (&'static str, &'static str) {
        match self {
            Style::Bold => ("<b>", "</b>"),
            Style::Italic => ("<i>", "</i>"),
            Style::Underline => ("<u>", "</u>"),
            Style::Strike => ("<del>", "</del>"),
            Style::Mono => ("<code>", "</code>"),
        }
    }
}

/// What is in effect at a point of the text.
#[derive(Clone, Default)]
struct State {
    /// In the order they were switched on (the HTML nests them that way).
    styles: Vec<Style>,
    /// Foreground and background palette indexes.
    color: Option<(Option<usize>, Option<usize>)>,
}

impl State {
    fn open(&self, html: &mut String) {
        if let Some((fg, bg)) = self.color {
            html.push_str("<font");
            if let Some(fg) = fg {
                html.push_str(&format!(" color=\"{}\"", PALETTE[fg]));
            }
            if let Some(bg) = bg {
                html.push_str(&format!(" data-mx-bg-color=\"{}\"", PALETTE[bg]));
            }
            html.push('>');
        }
        for style in &self.styles {
            html.push_str(style.tags().0);
        }
    }

    fn close(&self, html: &mut String) {
        for style in self.styles.iter().rev() {
            html.push_str(style.tags().1);
        }
        if self.color.is_some() {
            html.push_str("</font>");
        }
    }

    /// Closes what is open, applies `change`, opens the new state: the HTML stays well formed.
    fn change(&mut self, html: &mut String, change: impl FnOnce(&mut State)) {
        self.close(html);
        change(self);
        self.open(html);
    }
}

/// The text without formatting codes (the `body`), and HTML (the `formatted_body`) if the text
/// had any formatting.
pub fn irc_to_matrix(text: &str) -> (String, Option<String>) {
    let mut plain = String::new();
    let mut html = String::new();
    let mut state = State::default();
    let mut formatted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let style = match c {
            '\u{2}' => Some(Style::Bold),
            '\u{1d}' => Some(Style::Italic),
            '\u{1f}' => Some(Style::Underline),
            '\u{1e}' => Some(Style::Strike),
            '\u{11}' => Some(Style::Mono),
            _ => None,
        };
        if let Some(style) = style {
            formatted = true;
            match state.styles.iter().position(|s| *s == style) {
                // Switching off the innermost style just closes it.
                Some(i) if i + 1 == state.styles.len() => {
                    state.styles.pop();
                    html.push_str(style.tags().1);
                }
                Some(i) => state.change(&mut html, |s| {
                    s.styles.remove(i);
                }),
                None => {
                    state.styles.push(style);
                    html.push_str(style.tags().0);
                }
            }
            continue;
        }
        match c {
            '\u{3}' => {
                formatted = true;
                let fg = read_number(&mut chars);
                let mut bg = None;
                if fg.is_some() && chars.peek() == Some(&',') {
                    let mut ahead = chars.clone();
                    ahead.next();
                    if ahead.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                        bg = read_number(&mut chars);
                    }
                }
                state.change(&mut html, |s| {
                    // 16–98 are mIRC's extended colours and 99 is "default": shown uncoloured
                    // rather than as an unrelated palette entry.
                    let basic = |n: usize| (n < PALETTE.len()).then_some(n);
                    s.color = fg
                        .map(|fg| (basic(fg), bg.and_then(basic)))
                        .filter(|(fg, bg)| fg.is_some() || bg.is_some())
                });
            }
            '\u{16}' => {
                // Reverse: swap foreground and background (default black on white).
                formatted = true;
                state.change(&mut html, |s| {
                    let (fg, bg) = s.color.unwrap_or((Some(1), Some(0)));
                    s.color = Some((bg.or(Some(0)), fg.or(Some(1))));
                });
            }
            '\u{f}' => {
                formatted = true;
                state.change(&mut html, |s| *s = State::default());
            }
            c if (c as u32) < 0x20 && c != '\t' => {}
            c => {
                plain.push(c);
                match c {
                    '<' => html.push_str("&lt;"),
                    '>' => html.push_str("&gt;"),
                    '&' => html.push_str("&amp;"),
                    '"' => html.push_str("&quot;"),
                    c => html.push(c),
                }
            }
        }
    }
    state.close(&mut html);
    (plain, formatted.then(|| without_empty_elements(html)))
}

/// Removes elements that enclose nothing (`<b></b>`, `<font …></font>`), left by codes that
/// were switched on and off again.
fn without_empty_elements(mut html: String) -> String {
    loop {
        let before = html.len();
        for tag in ["b", "i", "u", "del", "code", "font"] {
            let close = format!("</{tag}>");
            let open = format!("<{tag}");
            let mut from = 0;
            while let Some(at) = html[from..].find(&close).map(|i| i + from) {
                let start = html[..at].rfind(&open);
                match start {
                    Some(start) if html[start..at].ends_with('>') && !html[start + 1..at].contains('<') => {
                        html.replace_range(start..at + close.len(), "");
                        from = start;
                    }
                    _ => from = at + close.len(),
                }
            }
        }
        if html.len() == before {
            return html;
        }
    }
}

fn read_number(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<usize> {
    let mut digits = String::new();
    while digits.len() < 2 && chars.peek().is_some_and(char::is_ascii_digit) {
        digits.extend(chars.next());
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_stays_plain() {
        assert_eq!(irc_to_matrix("hello <world>"), ("hello <world>".to_owned(), None));
    }

    #[test]
    fn styles_become_html() {
        let (plain, html) = irc_to_matrix("a \u{2}bold\u{2} and \u{1d}italic\u{f} end");
        assert_eq!(plain, "a bold and italic end");
        assert_eq!(html.as_deref(), Some("a <b>bold</b> and <i>italic</i> end"));
        let (_, html) = irc_to_matrix("\u{2}b\u{1f}bu\u{2}u");
        assert_eq!(
            html.as_deref(),
            Some("<b>b<u>bu</u></b><u>u</u>"),
            "nesting stays well formed"
        );
        let (_, html) = irc_to_matrix("\u{2}unclosed <tag>");
        assert_eq!(html.as_deref(), Some("<b>unclosed &lt;tag&gt;</b>"));
    }

    #[test]
    fn colours_use_the_mirc_palette() {
        let (plain, html) = irc_to_matrix("\u{3}4red\u{3} \u{3}04,12both\u{3}");
        assert_eq!(plain, "red both");
        assert_eq!(
            html.as_deref(),
            Some(
                "<font color=\"#FF0000\">red</font> <font color=\"#FF0000\" data-mx-bg-color=\"#0000FC\">both</font>"
            )
        );
        let (plain, _) = irc_to_matrix("\u{3}3,x");
        assert_eq!(plain, ",x", "a comma without a background colour is text");
        let (_, html) = irc_to_matrix("\u{3}99default \u{3}99,4red behind");
        assert_eq!(
            html.as_deref(),
            Some("default <font data-mx-bg-color=\"#FF0000\">red behind</font>"),
            "99 is the default colour, not colour 3"
        );
    }
}
