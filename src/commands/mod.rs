//! One module per `chorus` command.

pub mod aaa;
pub mod agent;
pub mod audit_export;
pub mod backup;
pub mod bench;
pub mod broker;
pub mod config;
pub mod credential;
pub mod dashboard;
pub mod discover;
pub mod events;
pub mod governor;
pub mod inventory;
pub mod keys;
pub mod kv;
pub mod manual;
pub mod plugin;
pub mod provision;
pub mod react;
pub mod replicate;
pub mod rpc;
pub mod scout;
pub mod simulate;
pub mod streams;
pub mod targeting;
pub mod up;
