//! RFC 3339 times ↔ milliseconds since the Unix epoch (what Kafka record timestamps are),
//! without a date-time dependency: `sync-engine replay --to-datetime` takes them, and
//! prints them back.

/// RFC 3339 (`2026-11-27T10:00:00Z`, `2026-11-27T11:00:00.250+01:00`; `t`, `z` and a space
/// for `T` are accepted) → milliseconds since the Unix epoch. Fractions finer than a
/// millisecond are truncated; leap seconds and times before 1970 are refused.
pub fn parse_datetime(text: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("expected an RFC 3339 time like 2026-11-27T10:00:00Z, got {text:?}: {why}");
    let b = text.trim().as_bytes();
    let digits = |from: usize, len: usize| -> Result<i64, String> {
        let slice = b.get(from..from + len).ok_or_else(|| bad("too short"))?;
        if !slice.iter().all(u8::is_ascii_digit) {
            return Err(bad("a digit is missing"));
        }
        Ok(slice.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let expect = |at: usize, what: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if what.contains(c) => Ok(()),
            _ => Err(bad(&format!(
                "expected {:?} at position {}",
                what.iter().map(|c| *c as char).collect::<String>(),
                at + 1
            ))),
        }
    };
    let year = digits(0, 4)?;
    expect(4, b"-")?;
    let month = digits(5, 2)?;
    expect(7, b"-")?;
    let day = digits(8, 2)?;
    expect(10, b"Tt ")?;
    let hour = digits(11, 2)?;
    expect(13, b":")?;
    let minute = digits(14, 2)?;
    expect(16, b":")?;
    let second = digits(17, 2)?;
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return Err(bad("no digits after the decimal point"));
        }
        let fraction = &b[start..at.min(start + 3)];
        millis = fraction.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')) * 10_i64.pow(3 - fraction.len() as u32);
    }
    let offset_minutes = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let hours = digits(at + 1, 2)?;
            expect(at + 3, b":")?;
            let minutes = digits(at + 4, 2)?;
            if hours > 23 || minutes > 59 {
                return Err(bad("the UTC offset is out of range"));
            }
            at += 6;
            (hours * 60 + minutes) * if *sign == b'-' { -1 } else { 1 }
        }
        _ => return Err(bad("the UTC offset (Z or ±HH:MM) is missing")),
    };
    if at != b.len() {
        return Err(bad("unexpected text after the time"));
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("the time of day is out of range"));
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    let ms = seconds * 1000 + millis;
    if ms < 0 {
        return Err(bad("before 1970-01-01T00:00:00Z"));
    }
    Ok(ms)
}

/// Milliseconds since the epoch → `2026-11-27T10:00:00.000Z`.
pub fn format_datetime(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60);
    let (second, millis) = (ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_parse_as_rfc_3339() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_datetime("2026-11-27T10:00:00Z").unwrap(), 1_795_773_600_000);
        assert_eq!(parse_datetime("2026-11-27T11:00:00+01:00").unwrap(), 1_795_773_600_000);
        assert_eq!(parse_datetime("2026-11-27t09:30:00.5-00:30").unwrap(), 1_795_773_600_500);
        assert_eq!(parse_datetime("2026-11-27 10:00:00.123456789z").unwrap(), 1_795_773_600_123);
        assert_eq!(parse_datetime("2024-02-29T00:00:00Z").unwrap(), 1_709_164_800_000);
        for bad in [
            "2026-11-27",
            "2026-11-27T10:00:00",
            "2026-11-27T10:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T10:00:60Z",
            "2026-11-27T10:00:00.Z",
            "2026-11-27T10:00:00+1:00",
            "2026-11-27T10:00:00Zjunk",
            "1969-12-31T23:59:59Z",
            "1700000000",
        ] {
            assert!(parse_datetime(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn datetimes_format_back_to_what_they_parse_from() {
        for ms in [0, 1_795_773_600_123, 1_709_164_800_000, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_datetime(&format_datetime(ms)).unwrap(), ms, "{}", format_datetime(ms));
        }
        assert_eq!(format_datetime(1_795_773_600_000), "2026-11-27T10:00:00.000Z");
    }
}
