//! The Chorus system tests, one test binary with a module per area. Every test runs the real
//! parts (nats-server processes, SoftHSM2, rsyslog, headless Chromium, the `chorus` binary)
//! through `chorus-testkit`.

mod aaa;
mod agent;
mod backup;
mod broker;
mod choria;
mod cli;
mod conformance;
mod dashboard;
mod docs;
mod durability;
mod floors;
mod fuzz;
mod governor;
mod identity;
mod issuer;
mod manual;
mod metrics;
mod packages;
mod provision;
mod react;
mod replicate;
mod security;
mod siem;
mod streams;
mod targeting;
mod tenants;
mod up;
mod views;
