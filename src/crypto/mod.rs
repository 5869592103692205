//! Minimal node identity; replaced by the full key store.

pub mod keys;
