//! Wall-clock helpers: the one place that reads the system clock for timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Today's UTC date as YYYY-MM-DD, for result files (civil-from-days, after Howard Hinnant).
pub fn utc_date() -> String {
    let secs = now_ms() / 1000;
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_date_has_its_shape() {
        let d = super::utc_date();
        assert_eq!(d.len(), 10, "{d}");
        assert!(
            d.starts_with("20") && &d[4..5] == "-" && &d[7..8] == "-",
            "{d}"
        );
    }
}
