//! Application-service registration files: YAML → `Registration`, validated (what the homeserver
//! and every SDK service load at startup), then what the homeserver does with one.
//!
//! Properties: never a panic, hang or unbounded allocation; an accepted registration compiles
//! its namespaces again, and written back with `to_yaml` it parses to the same registration.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_appservice::registration::{self, Namespace, Registration};

fuzz_target!(|data: &[u8]| {
    // The loader reads files with `read_to_string`: non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = registration::parse(text, "fuzz.yaml") else {
        return;
    };
    let _ = registration::warnings(&parsed);
    let namespaces = &parsed.namespaces;
    for (kind, entries) in [
        ("users", &namespaces.users),
        ("aliases", &namespaces.aliases),
        ("rooms", &namespaces.rooms),
    ] {
        let compiled = Namespace::compile(entries, "fuzz.yaml", kind).expect("validated namespaces compile");
        for probe in [
            "@_irc_alice:example.org",
            "#_irc_#rust:example.org",
            "!room:example.org",
            parsed.sender_localpart.as_str(),
            "",
        ] {
            let exclusive = compiled.matches_exclusive(probe);
            assert!(!exclusive || compiled.matches(probe), "exclusive match is a match");
        }
    }
    // What `generate-registration` writes must read back as itself.
    let yaml = parsed.to_yaml();
    let again = registration::parse(&yaml, "again.yaml")
        .unwrap_or_else(|e| panic!("to_yaml output does not parse: {e}\n{yaml}"));
    assert_eq!(as_json(&parsed), as_json(&again), "to_yaml round trip\n{yaml}");
});

fn as_json(registration: &Registration) -> serde_json::Value {
    serde_json::to_value(registration).expect("a registration serialises")
}
