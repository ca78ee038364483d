//! Matrix IDs for IRC names, reversibly: `@irc_<network>_<nick>` for IRC people and
//! `#irc_<network>_<#channel>` for channels. IRC names are case-insensitive, Matrix localparts are
//! lower-case: names are folded (`rfc1459`), and characters a localpart cannot hold are written
//! `=xx` (their UTF-8 bytes in hex, heisenbridge's scheme), so every name maps to one ID and back.

use crate::proto::fold_case;

/// Characters kept as they are in user localparts (the spec's historical set minus `=`, which
/// escapes).
fn keeps_in_user(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || "-._/".contains(c)
}

/// Aliases may hold more, but `:` ends the localpart and some clients choke on spaces and `%`.
fn keeps_in_alias(c: char) -> bool {
    keeps_in_user(c) || c == '#'
}

fn escape(text: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::new();
    for c in fold_case(text).chars() {
        if keep(c) {
            out.push(c);
        } else {
            let mut bytes = [0u8; 4];
            for b in c.encode_utf8(&mut bytes).bytes() {
                out.push_str(&format!("={b:02x}"));
            }
        }
    }
    out
}

fn unescape(text: &str) -> Option<String> {
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'=' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The localpart of an IRC person's virtual user.
pub fn user_localpart(prefix: &str, network: &str, nick: &str) -> String {
    format!("{prefix}{network}_{}", escape(nick, keeps_in_user))
}

/// The nick behind a virtual user's localpart on `network`, if it is one.
pub fn nick_from_localpart(prefix: &str, network: &str, localpart: &str) -> Option<String> {
    unescape(
        localpart
            .strip_prefix(prefix)?
            .strip_prefix(network)?
            .strip_prefix('_')?,
    )
    .filter(|n| !n.is_empty())
}

/// The alias localpart of a channel.
pub fn alias_localpart(prefix: &str, network: &str, channel: &str) -> String {
    format!("{prefix}{network}_{}", escape(channel, keeps_in_alias))
}

/// The channel behind an alias localpart on one of `networks`: `(network, channel)`.
pub fn channel_from_alias<'a>(
    prefix: &str,
    networks: &'a [String],
    localpart: &str,
) -> Option<(&'a str, String)> {
    let rest = localpart.strip_prefix(prefix)?;
    // The longest network ID that matches, so `a_b` wins over `a` when both exist.
    let network = networks
        .iter()
        .filter(|n| rest.strip_prefix(n.as_str()).is_some_and(|r| r.starts_with('_')))
        .max_by_key(|n| n.len())?;
    let channel = unescape(&rest[network.len() + 1..])?;
    // Only the canonical form: the alias the bridge creates for this channel is exactly this.
    (valid_channel(&channel) && alias_localpart(prefix, network, &channel) == localpart)
        .then_some((network.as_str(), channel))
}

/// Whether a channel name is safe to put in a `JOIN`: no spaces, commas (lists; `0` parts all),
/// bells or control characters, at most 50 bytes.
pub fn valid_channel(channel: &str) -> bool {
    channel.starts_with(['#', '&', '+', '!'])
        && channel.len() > 1
        && channel.len() <= 50
        && !channel
            .chars()
            .any(|c| c == ' ' || c == ',' || c == '\u{7}' || c.is_control())
}

/// Whether a nick can be a message target: no spaces, commas, `!`/`@` (they end a nick in a
/// prefix) or control characters, not a channel.
pub fn valid_nick(nick: &str) -> bool {
    !nick.is_empty()
        && nick.len() <= 50
        && !nick.starts_with(['#', '&', '+', '!', ':'])
        && !nick.chars().any(|c| " ,!@*?".contains(c) || c.is_control())
}

/// An IRC nick for a Matrix user: their display name with what nicks cannot hold dropped (the
/// localpart if nothing is left), starting with a letter, at most 16 characters (every network
/// allows that many). A taken nick gets `_` appended when connecting.
pub fn nick_for(display_name: &str, localpart: &str) -> String {
    let allowed = |c: &char| c.is_ascii_alphanumeric() || "-_[]\\^{}|`".contains(*c);
    let mut nick: String = display_name.chars().filter(allowed).collect();
    if nick.is_empty() {
        nick = localpart.chars().filter(allowed).collect();
    }
    if !nick.starts_with(|c: char| c.is_ascii_alphabetic() || "[]\\^{}|`_".contains(c)) {
        nick.insert(0, 'M');
    }
    nick.chars().take(16).collect()
}

/// Percent-encodes a URL path segment.
pub fn percent(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicks_round_trip_through_user_ids() {
        for nick in ["alice", "Bob", "we[ir]d|nick^", "ünï"] {
            let localpart = user_localpart("irc_", "libera", nick);
            assert!(
                localpart.chars().all(|c| keeps_in_user(c) || c == '='),
                "{localpart}"
            );
            let back = nick_from_localpart("irc_", "libera", &localpart).expect("reverses");
            assert_eq!(back, fold_case(nick));
        }
        assert_eq!(
            user_localpart("irc_", "libera", "Bob[1]"),
            "irc_libera_bob=7b1=7d"
        );
        assert_eq!(nick_from_localpart("irc_", "oftc", "irc_libera_bob"), None);
    }

    #[test]
    fn channels_keep_their_hash_and_round_trip() {
        let networks = vec!["libera".to_owned(), "libera_test".to_owned()];
        let alias = alias_localpart("irc_", "libera", "#Rust");
        assert_eq!(alias, "irc_libera_#rust");
        assert_eq!(
            channel_from_alias("irc_", &networks, &alias),
            Some(("libera", "#rust".to_owned()))
        );
        let odd = alias_localpart("irc_", "libera_test", "#c++:x");
        assert_eq!(
            channel_from_alias("irc_", &networks, &odd),
            Some(("libera_test", "#c++:x".to_owned())),
            "the longer network wins; `+` and `:` are escaped"
        );
        assert!(!odd.contains(':'));
        assert_eq!(
            channel_from_alias("irc_", &networks, "irc_libera_#Rust"),
            None,
            "only the canonical (folded) alias"
        );
        let list = alias_localpart("irc_", "libera", "#x,0");
        assert_eq!(
            channel_from_alias("irc_", &networks, &list),
            None,
            "no channel lists"
        );
        assert!(valid_nick("carol") && !valid_nick("a,b") && !valid_nick("#c"));
        assert_eq!(
            channel_from_alias("irc_", &networks, "irc_libera_nochannel"),
            None
        );
        assert_eq!(channel_from_alias("irc_", &networks, "irc_oftc_#a"), None);
    }

    #[test]
    fn nicks_from_display_names() {
        assert_eq!(nick_for("Alice Liddell", "alice"), "AliceLiddell");
        assert_eq!(nick_for("🙂", "bob"), "bob");
        assert_eq!(nick_for("42", "x"), "M42");
        assert_eq!(nick_for("averyveryverylongdisplayname", "x").len(), 16);
    }
}
