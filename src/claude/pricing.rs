//! What a job cost when Claude Code could not say. An estimate only: it
//! must never replace a cost Claude Code reported.
//!
//! Claude Code reports `total_cost_usd` in its final `result` event, and that
//! figure is what the cost caps count. A job stopped before its result (a
//! cancel, a timeout, a kill at a cap, a crash) has only the token counts the
//! API already reported; its cost is estimated here from list prices per
//! million tokens, by model family, so stopping a job never escapes the cost
//! caps. An unknown model is priced as the most expensive family listed, so
//! the estimate errs high.

use super::stream::Usage;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Price {
    input: f64,
    output: f64,
    /// Writing the prompt cache (5-minute entries: 1.25 x input).
    cache_write: f64,
    /// Reading it (0.1 x input).
    cache_read: f64,
}

const fn price(input: f64, output: f64) -> Price {
    Price {
        input,
        output,
        cache_write: input * 1.25,
        cache_read: input * 0.1,
    }
}

/// Longest family name first, matched as a substring of the model id or alias.
const FAMILIES: &[(&str, Price)] = &[
    ("haiku", price(1.0, 5.0)),
    ("sonnet", price(3.0, 15.0)),
    ("opus", price(5.0, 25.0)),
];

/// What an unknown model is priced as: the dearest listed family.
const UNKNOWN: Price = price(5.0, 25.0);

/// Estimated USD for `usage` on `model` (an alias like `sonnet` or an id
/// like `claude-sonnet-4-5-20250929`).
pub fn estimate_usd(model: &str, usage: &Usage) -> f64 {
    let m = model.to_ascii_lowercase();
    let p = FAMILIES
        .iter()
        .find(|(name, _)| m.contains(name))
        .map(|(_, p)| *p)
        .unwrap_or(UNKNOWN);
    let per = |tokens: u64, usd: f64| tokens as f64 * usd / 1e6;
    per(usage.input_tokens, p.input)
        + per(usage.output_tokens, p.output)
        + per(usage.cache_creation_input_tokens, p.cache_write)
        + per(usage.cache_read_input_tokens, p.cache_read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_of_a_real_job_costs_about_five_cents_on_sonnet() {
        let u = Usage {
            input_tokens: 4,
            cache_creation_input_tokens: 12_000,
            cache_read_input_tokens: 9_000,
            output_tokens: 60,
        };
        let c = estimate_usd("claude-sonnet-4-5-20250929", &u);
        assert!((c - 0.048612).abs() < 1e-9, "{c}");
        assert!(estimate_usd("haiku", &u) < c);
        assert_eq!(estimate_usd("some-new-model", &u), estimate_usd("opus", &u));
    }
}
