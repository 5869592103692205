//! Claude Code specifics: where the credential comes from, and the
//! stream-json events `claude -p --output-format stream-json --verbose` prints.
//! Nothing here runs a container or audits; no secret leaves [`credentials`]
//! except as the container's first stdin line.

pub mod credentials;
pub mod pricing;
pub mod stream;

/// `text` on one line, at most `max` characters, with anything that looks
/// like a credential (`sk-ant-…`, a bearer token) replaced by `[redacted]`:
/// for showing Claude Code's own error text, which may quote a header.
pub fn one_line_redacted(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    let mut rest = text;
    while !rest.is_empty() {
        let next = ["sk-ant-", "Bearer ", "bearer "]
            .iter()
            .filter_map(|m| rest.find(m).map(|i| (i, m.len())))
            .min();
        match next {
            Some((i, len)) => {
                out.push_str(&rest[..i]);
                out.push_str(&rest[i..i + len]);
                let after = &rest[i + len..];
                let secret = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.~+/=".contains(c)))
                    .unwrap_or(after.len());
                if secret > 0 {
                    out.push_str("[redacted]");
                }
                rest = &after[secret..];
            }
            None => {
                out.push_str(rest);
                break;
            }
        }
    }
    let flat: String = out
        .split(|c: char| c.is_control())
        .filter(|s| !s.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_are_redacted_and_lines_joined() {
        let t = "API Error: 401 {\"error\":\"invalid x-api-key sk-ant-api03-AbC_d-9\"}\n  Bearer eyJhbGci.x\r\nend";
        assert_eq!(
            super::one_line_redacted(t, 200),
            "API Error: 401 {\"error\":\"invalid x-api-key sk-ant-[redacted]\"} Bearer [redacted] end"
        );
        assert_eq!(super::one_line_redacted("abcdef", 4), "abc…");
    }
}
