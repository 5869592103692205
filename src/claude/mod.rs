//! Claude Code specifics: where the credential comes from, and the
//! stream-json events `claude -p --output-format stream-json --verbose` prints.

pub mod credentials;
pub mod stream;
