//! Parse `--since` values: RFC 3339 times, local dates, or ages like `2h`.

use chrono::{DateTime, Duration, Local, NaiveDate, TimeZone, Utc};

/// Parse `s` relative to `now`: `2026-11-20T10:00:00Z`, `2026-11-20`
/// (local midnight), or an age: `90s`, `30m`, `2h`, `7d`, `2w`.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        let naive = d.and_hms_opt(0, 0, 0).expect("midnight exists");
        if let Some(dt) = Local.from_local_datetime(&naive).earliest() {
            return Ok(dt.with_timezone(&Utc));
        }
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let secs_per = match unit {
        "s" => Some(1),
        "m" | "min" => Some(60),
        "h" => Some(3_600),
        "d" => Some(86_400),
        "w" => Some(7 * 86_400),
        _ => None,
    };
    if let (Some(per), false) = (secs_per, num.is_empty()) {
        // Digits only, so a parse failure means it does not fit in 64 bits.
        let secs = num.parse::<i64>().ok().and_then(|n| n.checked_mul(per));
        let then = secs
            .filter(|s| *s <= MAX_AGE_SECS)
            .and_then(|s| now.checked_sub_signed(Duration::seconds(s)));
        return match then {
            Some(then) => Ok(then),
            None => Err(format!(
                "`{s}` is too far back: an age goes up to {} days ({}w)",
                MAX_AGE_SECS / 86_400,
                MAX_AGE_SECS / (7 * 86_400)
            )),
        };
    }
    Err(format!(
        "`{s}` is not a time: use RFC 3339 (2026-11-20T10:00:00Z), a local date (2026-11-20) or an age (30m, 2h, 7d, 2w)"
    ))
}

/// The longest age `--since` takes: 100 years, far more than any log holds
/// and far inside what a timestamp can represent.
pub const MAX_AGE_SECS: i64 = 36_500 * 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
        assert_eq!(parse_since("2h", now).unwrap(), now - Duration::hours(2));
        assert_eq!(parse_since("7d", now).unwrap(), now - Duration::days(7));
        assert!(parse_since("2026-11-20T10:00:00Z", now).is_ok());
        assert!(parse_since("2026-11-20", now).is_ok());
        assert!(parse_since("yesterday", now).is_err());
        assert_eq!(parse_since("36500d", now).unwrap(), now - Duration::days(36_500));
        for huge in ["36501d", "100000000w", "99999999999999999999s", "9223372036854775807w"] {
            assert!(
                parse_since(huge, now).unwrap_err().contains("up to 36500 days"),
                "{huge}"
            );
        }
    }
}
