//! Integration tests: each starts the real binary on a loopback port.

#[allow(dead_code)] // `rss_kib` is for the benchmark, which shares the harness
mod harness;

mod accounts;
mod appservice;
mod backup;
mod durability;
mod encrypted_services;
mod ephemeral;
mod fake_as;
mod federation;
mod federation_edus;
mod federation_media;
mod http;
mod input;
mod keys;
mod media;
mod ops;
mod peers;
mod port;
mod profile;
mod push;
mod rooms;
mod sdk;
mod sliding_sync;
mod sync;
