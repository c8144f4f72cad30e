//! Human-readable status strings shared by the operator and the agents.

/// Formats a rate for the `Throughput` printer column: binary units, three
/// significant digits at most, e.g. `0 B/s`, `512 B/s`, `1.50 KiB/s`,
/// `118 MiB/s`, `2.00 GiB/s`.
pub fn format_bytes_per_second(bytes_per_second: u64) -> String {
    format!("{}/s", format_bytes(bytes_per_second))
}

/// Formats a byte count with binary units, e.g. `40.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // Rounding can reach 1024 (e.g. 1023.9 KiB): carry into the next unit.
    if format!("{value:.0}") == "1024" && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 99.95 {
        0
    } else if value >= 9.995 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// Whole-percent progress for the `Progress` printer column, rounded down so
/// that `100%` means done: `progress_string(999, 1000) == "99%"`. An unknown
/// total (0) reads `0%`; `done` beyond `total` reads `100%`.
pub fn progress_string(done: u64, total: u64) -> String {
    format!("{}%", progress_percent(done, total))
}

/// The whole percentage behind [`progress_string`].
pub fn progress_percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    let done = done.min(total);
    // u128: `done * 100` overflows u64 for content beyond 184 PB.
    (u128::from(done) * 100 / u128::from(total)) as u64
}

/// `done/total` for the `Ready` printer column, e.g. `7/10`.
pub fn ready_string(done: u32, total: u32) -> String {
    format!("{done}/{total}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let cases = [
            (0, "0 B/s"),
            (512, "512 B/s"),
            (1023, "1023 B/s"),
            (1024, "1.00 KiB/s"),
            (1536, "1.50 KiB/s"),
            (10 * 1024, "10.0 KiB/s"),
            (118 * 1024 * 1024, "118 MiB/s"),
            (1024 * 1024 - 1, "1.00 MiB/s"),
            (2 * 1024 * 1024 * 1024, "2.00 GiB/s"),
            (u64::MAX, "16.0 EiB/s"),
        ];
        for (rate, text) in cases {
            assert_eq!(format_bytes_per_second(rate), text, "{rate}");
        }
        assert_eq!(format_bytes(40 * 1024 * 1024 * 1024), "40.0 GiB");
    }

    #[test]
    fn progress() {
        assert_eq!(progress_string(0, 0), "0%");
        assert_eq!(progress_string(0, 10), "0%");
        assert_eq!(progress_string(42, 100), "42%");
        assert_eq!(progress_string(999, 1000), "99%");
        assert_eq!(progress_string(1000, 1000), "100%");
        assert_eq!(progress_string(2000, 1000), "100%");
        assert_eq!(progress_string(u64::MAX - 1, u64::MAX), "99%");
        assert_eq!(progress_string(u64::MAX, u64::MAX), "100%");
    }

    #[test]
    fn ready() {
        assert_eq!(ready_string(7, 10), "7/10");
        assert_eq!(ready_string(0, 0), "0/0");
    }
}
