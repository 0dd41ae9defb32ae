//! Byte sizes on the command line, as users type them: `4096`, `64K`, `2MiB`, `1.5GiB`,
//! `0.5M`, `3 GB`, `1TiB`.
//!
//! The suffixes follow `dd(1)` and numactl: a bare letter (`K`, `M`, `G`, `T`) and the IEC
//! names (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024; `kB`/`KB`, `MB`, `GB`, `TB` are
//! powers of 1000; `B` or nothing is bytes. Case does not matter (`1gib`, `64k`), and a
//! space may stand between the number and the suffix. A fraction must come to a whole
//! number of bytes.

/// What the suffixes mean, for `--help` and errors.
pub const HELP: &str = "Sizes: a number of bytes, or a number (a fraction too: 1.5GiB, 0.5M) with a suffix: \
K, M, G, T and KiB, MiB, GiB, TiB are powers of 1024 (M = MiB = 1048576 bytes, as numactl and dd take them); \
kB/KB, MB, GB, TB are powers of 1000 (MB = 1000000 bytes); B is bytes. Any case; a space may come before the suffix.";

/// The multiplier of a suffix (lowercased), or `None` for an unknown one.
fn multiplier(unit: &str) -> Option<u128> {
    Some(match unit {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Parses a size ([`HELP`]).
pub fn parse(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let not_a_size = || format!("{text:?} is not a size (e.g. 4096, 64K, 2MiB, 1.5GiB). {HELP}");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(not_a_size());
    }
    let mult =
        multiplier(&unit.to_ascii_lowercase()).ok_or_else(|| format!("{text:?}: unknown unit {unit:?}. {HELP}"))?;
    let too_large = || format!("{text:?} is too large: the most is {} bytes (16 EiB less one)", usize::MAX);
    // Digits beyond 2^128 overflow the arithmetic below, and any size that long is too large.
    if whole.trim_start_matches('0').len() > 30 {
        return Err(too_large());
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| not_a_size())? };
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 24 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    let (numerator, denominator) = if fraction.is_empty() {
        (0, 1)
    } else {
        (fraction.parse::<u128>().map_err(|_| not_a_size())?, 10u128.pow(fraction.len() as u32))
    };
    let part = numerator * mult;
    if part % denominator != 0 {
        return Err(format!(
            "{text:?} is {}.{} bytes, not a whole number of bytes",
            whole * mult + part / denominator,
            {
                // The fractional digits of the byte count, trailing zeros dropped.
                let digits = format!("{:0width$}", part % denominator, width = fraction.len());
                digits.trim_end_matches('0').to_string()
            }
        ));
    }
    let bytes = whole.checked_mul(mult).and_then(|b| b.checked_add(part / denominator)).ok_or_else(too_large)?;
    usize::try_from(bytes).map_err(|_| too_large())
}

/// Formats a byte count with the largest exact binary unit.
pub fn format(bytes: usize) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_suffixes_are_powers_of_1024() {
        assert_eq!(parse("4KiB"), Ok(4096));
        assert_eq!(parse("2MiB"), Ok(2 << 20));
        assert_eq!(parse("1GiB"), Ok(1 << 30));
        assert_eq!(parse("1TiB"), Ok(1 << 40));
        assert_eq!(parse("64k"), Ok(65536));
        assert_eq!(parse("64K"), Ok(65536));
        assert_eq!(parse("3M"), Ok(3 << 20));
        assert_eq!(parse("2g"), Ok(2 << 30));
        assert_eq!(parse("1T"), Ok(1 << 40));
        assert_eq!(parse("1gib"), Ok(1 << 30));
        assert_eq!(parse("1 GiB"), Ok(1 << 30));
        assert_eq!(parse(" 16 mib "), Ok(16 << 20));
    }

    #[test]
    fn decimal_suffixes_are_powers_of_1000() {
        assert_eq!(parse("1kB"), Ok(1000));
        assert_eq!(parse("1KB"), Ok(1000));
        assert_eq!(parse("1kb"), Ok(1000));
        assert_eq!(parse("5MB"), Ok(5_000_000));
        assert_eq!(parse("2 GB"), Ok(2_000_000_000));
        assert_eq!(parse("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse("123"), Ok(123));
        assert_eq!(parse("123B"), Ok(123));
        assert_eq!(parse("123 b"), Ok(123));
    }

    #[test]
    fn fractions_that_are_whole_bytes() {
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse("0.5M"), Ok(1 << 19));
        assert_eq!(parse(".5M"), Ok(1 << 19));
        assert_eq!(parse("2.MiB"), Ok(2 << 20));
        assert_eq!(parse("1.25KiB"), Ok(1280));
        assert_eq!(parse("1.5kB"), Ok(1500));
        assert_eq!(parse("0.001MB"), Ok(1000));
        assert_eq!(parse("1.50000GiB"), Ok(3 << 29));
        assert_eq!(parse("4096.0"), Ok(4096));
        let e = parse("1.3KiB").unwrap_err();
        assert!(e.contains("1331.2 bytes") && e.contains("not a whole number"), "{e}");
        assert!(parse("0.5").unwrap_err().contains("0.5 bytes"));
        assert!(parse("1.0000001kB").unwrap_err().contains("not a whole number"));
    }

    #[test]
    fn nonsense_and_overflow_are_refused_plainly() {
        for bad in ["", ".", "-1", "1..5M", "1.2.3K", "M", "1e6", "0x10"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse("2XiB").unwrap_err();
        assert!(e.contains("unknown unit \"XiB\"") && e.contains("powers of 1024"), "{e}");
        assert!(parse("16777216TiB").unwrap_err().contains("too large"));
        assert!(parse("18446744073709551616").unwrap_err().contains("too large"));
        assert!(parse("99999999999999999999999999999999999999999999").unwrap_err().contains("too large"));
        assert_eq!(parse("18446744073709551615"), Ok(usize::MAX));
        assert_eq!(parse("16777215TiB"), Ok(16777215 << 40));
    }

    #[test]
    fn formats_with_the_largest_exact_unit() {
        assert_eq!(format(2 << 20), "2MiB");
        assert_eq!(format(12288), "12KiB");
        assert_eq!(format(100), "100B");
        assert_eq!(format(3 << 40), "3TiB");
    }
}
