//! The IRC message format (RFC 1459/2812, as servers speak it today): one line of at most 512
//! bytes with CRLF, `[:prefix] COMMAND params… [:trailing]`.

use std::fmt;

/// The longest line IRC allows, CRLF included.
pub const MAX_LINE: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `nick!user@host` or a server name.
    pub prefix: Option<String>,
    /// Upper-cased command or three-digit numeric.
    pub command: String,
    pub params: Vec<String>,
}

impl Message {
    pub fn new(command: &str, params: &[&str]) -> Self {
        Self {
            prefix: None,
            command: command.to_owned(),
            params: params.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    /// Parses one line (without CRLF); `None` for an empty or malformed one.
    pub fn parse(line: &str) -> Option<Self> {
        let mut rest = line.trim_end_matches(['\r', '\n']);
        // IRCv3 message tags are not asked for; skip them if a server sends some anyway.
        if let Some(tagged) = rest.strip_prefix('@') {
            rest = tagged.split_once(' ')?.1;
        }
        let prefix = match rest.strip_prefix(':') {
            Some(prefixed) => {
                let (prefix, after) = prefixed.split_once(' ')?;
                rest = after;
                Some(prefix.to_owned())
            }
            None => None,
        };
        rest = rest.trim_start_matches(' ');
        let (command, mut rest) = match rest.split_once(' ') {
            Some((command, after)) => (command, after),
            None => (rest, ""),
        };
        if command.is_empty() {
            return None;
        }
        let mut params = Vec::new();
        loop {
            rest = rest.trim_start_matches(' ');
            if rest.is_empty() {
                break;
            }
            if let Some(trailing) = rest.strip_prefix(':') {
                params.push(trailing.to_owned());
                break;
            }
            match rest.split_once(' ') {
                Some((param, after)) => {
                    params.push(param.to_owned());
                    rest = after;
                }
                None => {
                    params.push(rest.to_owned());
                    break;
                }
            }
        }
        Some(Self {
            prefix,
            command: command.to_ascii_uppercase(),
            params,
        })
    }

    /// The nick of a `nick!user@host` prefix.
    pub fn source_nick(&self) -> Option<&str> {
        let prefix = self.prefix.as_deref()?;
        Some(prefix.split_once('!').map_or(prefix, |(nick, _)| nick))
    }

    pub fn param(&self, index: usize) -> Option<&str> {
        self.params.get(index).map(String::as_str)
    }
}

impl fmt::Display for Message {
    /// The wire form without CRLF. The last parameter is sent as trailing (`:…`) when it needs
    /// to be (empty, contains a space, or starts with `:`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(prefix) = &self.prefix {
            write!(f, ":{prefix} ")?;
        }
        f.write_str(&self.command)?;
        let count = self.params.len();
        for (i, param) in self.params.iter().enumerate() {
            let last = i + 1 == count;
            if last && (param.is_empty() || param.contains(' ') || param.starts_with(':')) {
                write!(f, " :{param}")?;
            } else {
                write!(f, " {param}")?;
            }
        }
        Ok(())
    }
}

/// A CTCP `ACTION` (`/me`) body, if the text is one.
pub fn ctcp_action(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('\u{1}')?;
    let inner = inner.strip_suffix('\u{1}').unwrap_or(inner);
    inner
        .strip_prefix("ACTION ")
        .or_else(|| (inner == "ACTION").then_some(""))
}

/// IRC's case folding (`rfc1459`: `[]\~` are the upper case of `{}|^`), for comparing nicks and
/// channels the way servers do.
pub fn fold_case(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '[' => '{',
            ']' => '}',
            '\\' => '|',
            '~' => '^',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Splits text into pieces that fit a `PRIVMSG`/`NOTICE` to `target` whose whole line, with the
/// server-added `:nick!user@host` prefix, stays within [`MAX_LINE`]. Splits on line breaks, then
/// between words where possible, never inside a UTF-8 character.
pub fn split_message(text: &str, command: &str, target: &str, source_prefix_len: usize) -> Vec<String> {
    // ":<prefix> <COMMAND> <target> :<text>\r\n"
    let overhead = 1 + source_prefix_len + 1 + command.len() + 1 + target.len() + 2 + 2;
    let budget = MAX_LINE.saturating_sub(overhead).max(16);
    let mut out = Vec::new();
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.is_empty() {
            continue;
        }
        let mut rest = line;
        while rest.len() > budget {
            let mut cut = budget;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            // Prefer the last space within the budget.
            if let Some(space) = rest[..cut].rfind(' ').filter(|s| *s > budget / 2) {
                cut = space;
            }
            out.push(rest[..cut].to_owned());
            rest = rest[cut..].trim_start_matches(' ');
        }
        if !rest.is_empty() {
            out.push(rest.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_print_back() {
        let m = Message::parse(":alice!a@host PRIVMSG #rust :hello there\r\n").expect("parses");
        assert_eq!(m.prefix.as_deref(), Some("alice!a@host"));
        assert_eq!(m.source_nick(), Some("alice"));
        assert_eq!(m.command, "PRIVMSG");
        assert_eq!(m.params, ["#rust", "hello there"]);
        assert_eq!(m.to_string(), ":alice!a@host PRIVMSG #rust :hello there");

        let ping = Message::parse("PING :irc.example.org").expect("parses");
        assert_eq!(
            (ping.command.as_str(), ping.param(0)),
            ("PING", Some("irc.example.org"))
        );
        let numeric = Message::parse(":srv 001 bot :Welcome to IRC").expect("parses");
        assert_eq!(numeric.params, ["bot", "Welcome to IRC"]);
        let tagged = Message::parse("@time=x :n!u@h JOIN #a").expect("tags are skipped");
        assert_eq!((tagged.command.as_str(), tagged.param(0)), ("JOIN", Some("#a")));
        assert_eq!(Message::new("JOIN", &["#a"]).to_string(), "JOIN #a");
        assert_eq!(Message::new("PRIVMSG", &["#a", ""]).to_string(), "PRIVMSG #a :");
        assert!(Message::parse("").is_none());
    }

    #[test]
    fn actions_and_case_folding() {
        assert_eq!(ctcp_action("\u{1}ACTION waves\u{1}"), Some("waves"));
        assert_eq!(ctcp_action("plain"), None);
        assert_eq!(fold_case("Nick[A]"), fold_case("nick{a}"));
    }

    #[test]
    fn long_and_multi_line_messages_fit_the_line_limit() {
        let long = "word ".repeat(200);
        let parts = split_message(&format!("first\n\n{long}"), "PRIVMSG", "#rust", 30);
        assert_eq!(parts[0], "first");
        assert!(parts.len() > 2);
        for part in &parts {
            let line = format!(":{} PRIVMSG #rust :{part}\r\n", "x".repeat(30));
            assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        }
        let joined: String = parts[1..].join(" ");
        assert_eq!(joined.split_whitespace().count(), 200, "no word lost");
        let wide = "é".repeat(400);
        for part in split_message(&wide, "PRIVMSG", "#a", 10) {
            assert!(part.chars().all(|c| c == 'é'), "split on character boundaries");
        }
    }
}
