//! Checks on the fields of a request: names (models) and numeric ranges,
//! refused as `invalid_field` with the range the field must be in.
//!
//! It must not read the database.

use super::handler::{reject, Fail};
use super::rules::MAX_NAME;
use crate::market::protocol::Reason;

pub fn check_name(field: &str, s: &str) -> Result<(), Fail> {
    let ok =
        !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if ok {
        Ok(())
    } else {
        reject(
            Reason::InvalidField,
            format!("`{field}` must be 1..={MAX_NAME} characters of [A-Za-z0-9-_.:/]"),
        )
    }
}

pub fn check_range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), Fail> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        reject(
            Reason::InvalidField,
            format!("`{field}` must be in {lo}..={hi}, got {v}"),
        )
    }
}
