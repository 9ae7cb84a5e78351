//! A strict, local Azure IoT Hub emulator.
//!
//! Exists because the Azure broker must be tested without internet access, and passing
//! against this emulator has to mean working against Azure: SAS tokens are validated exactly
//! (reference §1), bodies, status codes and error formats follow Azure (§3–§7), and limits are
//! enforced. Everything the emulator chooses where Azure's behaviour is unconfirmed is
//! documented in the module that makes the choice.
//!
//! The Event Hub-compatible endpoint (AMQP 1.0 over TLS, reference §8) is in `amqp.rs` and
//! `eventhub.rs`.
//!
//! The binary (`src/main.rs`) offers `serve` (the hub) and `device` (a device simulator).

#![warn(missing_docs)]

pub mod amqp;
pub mod client;
pub mod device_sim;
pub mod error;
pub mod eventhub;
pub mod faults;
pub mod hub;
pub mod ids;
pub mod query;
pub mod sas;
pub mod server;
pub mod timefmt;
pub mod tls;
pub mod twin;
