//! Byte sizes on the command line: `4096`, `4KiB`, `2MiB`, `1GiB`, `64K`, `1G`.

/// Parses a size with an optional binary suffix.
pub fn parse(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("{text:?} is not a size (e.g. 4096, 4KiB, 2MiB, 1GiB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (accepted: B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

/// Formats a byte count with the largest exact binary unit.
pub fn format(bytes: usize) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
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
    fn sizes() {
        assert_eq!(parse("4KiB"), Ok(4096));
        assert_eq!(parse("2MiB"), Ok(2 << 20));
        assert_eq!(parse("1GiB"), Ok(1 << 30));
        assert_eq!(parse("64k"), Ok(65536));
        assert_eq!(parse("123"), Ok(123));
        assert!(parse("2XiB").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1").is_err());
        assert_eq!(format(2 << 20), "2MiB");
        assert_eq!(format(12288), "12KiB");
        assert_eq!(format(100), "100B");
    }
}
