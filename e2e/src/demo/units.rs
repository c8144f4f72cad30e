//! Byte sizes and rates as people write and read them (`1GiB`, `32 MiB`,
//! `812.4 MiB/s`).

/// A size argument that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {why} (e.g. 1GiB, 512MiB, 4194304)")]
pub struct SizeError {
    input: String,
    why: &'static str,
}

/// Parses `1GiB`, `512MiB`, `64KiB`, `1G`, `4194304` (bytes). The units are
/// binary (`K`/`KiB` = 1024), as piece sizes and artifact sizes are.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |why| SizeError {
        input: input.to_owned(),
        why,
    };
    let s = input.trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let number: u64 = number
        .replace('_', "")
        .parse()
        .map_err(|_| err("no number"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(err("unknown unit")),
    };
    number.checked_mul(1u64 << shift).ok_or(err("too large"))
}

/// `1.00 GiB`, `812 MiB`, `512 B` (the printer columns' format).
pub use peerfill_crds::format_bytes as bytes;

/// A rate in MiB/s with one decimal, the unit every figure of the demo uses.
pub fn mib_per_s(bytes_per_second: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_second / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        for (input, expected) in [
            ("1GiB", 1 << 30),
            ("32MiB", 32 << 20),
            ("32 mib", 32 << 20),
            ("64KiB", 64 << 10),
            ("1G", 1 << 30),
            ("4194304", 4_194_304),
            ("1_048_576", 1 << 20),
            ("2TiB", 2 << 40),
            ("0", 0),
        ] {
            assert_eq!(parse_size(input), Ok(expected), "{input}");
        }
        for bad in ["", "GiB", "1.5GiB", "1 GB", "-1", "99999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rates_print_in_mib_per_second() {
        assert_eq!(mib_per_s(f64::from(300u32 << 20)), "300.0 MiB/s");
    }
}
