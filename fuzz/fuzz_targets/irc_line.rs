//! The IRC bridge's protocol layers on what an IRC server (or a Matrix user) can send: lines as
//! the connection reads them (split at `\n`, non-UTF-8 made lossy), `Message::parse` and its
//! printing, CTCP `ACTION`, IRC formatting codes → Matrix HTML (`format::irc_to_matrix`), the
//! reversible Matrix names of nicks and channels, and splitting Matrix text into IRC lines.
//!
//! Properties: never a panic, hang or unbounded allocation; a parsed line prints back to a line
//! that parses to the same message; the HTML is well formed and says what the plain body says;
//! names map to IDs and back; split text fits IRC's line limit and loses nothing but spaces
//! and line breaks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_irc::{
    format::irc_to_matrix,
    names,
    proto::{self, MAX_LINE, Message},
};

fuzz_target!(|data: &[u8]| {
    // `conn.rs` reads up to each `\n` and decodes lossily.
    for line in data.split_inclusive(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        if let Some(message) = Message::parse(&line) {
            message_checks(&message);
        }
    }
});

fn message_checks(message: &Message) {
    assert!(!message.command.is_empty());
    // What the bridge takes from IRC: nicks, channels, text.
    let _ = message.source_nick();
    let printed = message.to_string();
    let clean = |s: &str| !s.contains(['\r', '\n']);
    // Lines as servers send them (no stray CR/LF inside, no leading space before the command)
    // print back to themselves.
    if message.prefix.as_deref().is_none_or(clean)
        && clean(&message.command)
        && !message.command.starts_with([':', '@'])
        && message.params.iter().all(|p| clean(p))
    {
        assert_eq!(Message::parse(&printed).as_ref(), Some(message), "printed as {printed:?}");
    }
    for text in &message.params {
        text_checks(text);
    }
    if let Some(nick) = message.source_nick() {
        name_checks(nick);
    }
}

fn text_checks(text: &str) {
    // `bridge.rs`'s `message_content`.
    let text = proto::ctcp_action(text).unwrap_or(text);
    let (plain, html) = irc_to_matrix(text);
    if let Some(html) = &html {
        assert_eq!(html_text(html), plain, "HTML {html:?} says what the body says");
    }
    // The same text coming from Matrix, to a channel.
    for (target, prefix_len) in [("#rust", 30), ("#a-channel-with-a-rather-long-name-to-fit", 100)] {
        let parts = proto::split_message(text, "PRIVMSG", target, prefix_len);
        for part in &parts {
            assert!(!part.is_empty() && !part.contains('\n'), "{part:?}");
            let line = format!(":{} PRIVMSG {target} :{part}\r\n", "x".repeat(prefix_len));
            assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        }
        // Only spaces and line breaks may go between pieces.
        let visible = |s: &str| s.replace([' ', '\n', '\r'], "");
        assert_eq!(visible(&parts.concat()), visible(text), "nothing lost: {text:?} → {parts:?}");
    }
}

fn name_checks(nick: &str) {
    let localpart = names::user_localpart("irc_", "libera", nick);
    if !nick.is_empty() {
        assert_eq!(
            names::nick_from_localpart("irc_", "libera", &localpart),
            Some(proto::fold_case(nick)),
            "nick {nick:?} → {localpart:?} and back"
        );
    }
    let channel = proto::fold_case(nick);
    if names::valid_channel(&channel) {
        let alias = names::alias_localpart("irc_", "libera", &channel);
        let networks = ["libera".to_owned(), "libera_chat".to_owned()];
        assert_eq!(
            names::channel_from_alias("irc_", &networks, &alias),
            Some(("libera", channel.clone())),
            "channel {channel:?} → {alias:?} and back"
        );
    }
    let chosen = names::nick_for(nick, "alice");
    assert!(
        names::valid_nick(&chosen) && chosen.chars().count() <= 16,
        "nick_for({nick:?}) = {chosen:?}"
    );
}

/// The text of the HTML `irc_to_matrix` writes, checking on the way that every element it
/// opens is closed in order.
fn html_text(html: &str) -> String {
    let mut open: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut rest = html;
    while let Some(c) = rest.chars().next() {
        if c == '<' {
            let end = rest.find('>').unwrap_or_else(|| panic!("unterminated tag in {html:?}"));
            let tag = &rest[1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop().as_deref(), Some(name), "misnested in {html:?}");
            } else {
                let name = tag.split(' ').next().unwrap_or_default();
                assert!(
                    ["b", "i", "u", "del", "code", "font"].contains(&name),
                    "unexpected element {tag:?} in {html:?}"
                );
                open.push(name.to_owned());
            }
            rest = &rest[end + 1..];
        } else if c == '&' {
            let end = rest.find(';').unwrap_or_else(|| panic!("unterminated entity in {html:?}"));
            text.push(match &rest[..=end] {
                "&lt;" => '<',
                "&gt;" => '>',
                "&amp;" => '&',
                "&quot;" => '"',
                other => panic!("unexpected entity {other:?} in {html:?}"),
            });
            rest = &rest[end + 1..];
        } else {
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    assert!(open.is_empty(), "unclosed {open:?} in {html:?}");
    text
}
