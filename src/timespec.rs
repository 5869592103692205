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
    if let Ok(n) = num.parse::<i64>() {
        let d = match unit {
            "s" => Some(Duration::seconds(n)),
            "m" | "min" => Some(Duration::minutes(n)),
            "h" => Some(Duration::hours(n)),
            "d" => Some(Duration::days(n)),
            "w" => Some(Duration::weeks(n)),
            _ => None,
        };
        if let Some(d) = d {
            return Ok(now - d);
        }
    }
    Err(format!(
        "`{s}` is not a time: use RFC 3339 (2026-11-20T10:00:00Z), a local date (2026-11-20) or an age (30m, 2h, 7d, 2w)"
    ))
}

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
    }
}
