//! Byte quantities as people read them.

const UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// `1GiB`, `1.5GiB`, `512MiB`, `0`: the largest binary unit the value reaches, with at most
/// two decimals (trailing zeros dropped) — exact values read exactly.
pub fn bytes(n: i64) -> String {
    if n == 0 {
        return "0".into();
    }
    let sign = if n < 0 { "-" } else { "" };
    let v = n.unsigned_abs();
    let (unit, size) = UNITS
        .iter()
        .copied()
        .find(|(_, size)| v >= *size)
        .unwrap_or(("B", 1));
    if v.is_multiple_of(size) {
        return format!("{sign}{}{unit}", v / size);
    }
    let text = format!("{:.2}", v as f64 / size as f64);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{sign}{text}{unit}")
}

/// Parses `1073741824`, `1GiB`, `512MiB`, `4KiB`, `1G`, `1.5GiB` (binary units only).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "T" | "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use KiB, MiB, GiB, TiB)"
            ));
        }
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(factor)
            .ok_or_else(|| format!("{text:?} is too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a byte quantity"))?;
    if !f.is_finite() || f < 0.0 {
        return Err(format!("{text:?} is not a byte quantity"));
    }
    Ok((f * factor as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exact_and_fractional_sizes() {
        assert_eq!(bytes(0), "0");
        assert_eq!(bytes(1 << 30), "1GiB");
        assert_eq!(bytes(3 << 29), "1.5GiB");
        assert_eq!(bytes(4 << 20), "4MiB");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(-(2 << 20)), "-2MiB");
        assert_eq!(bytes(100), "100B");
    }

    #[test]
    fn parses_binary_units() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert!(parse_bytes("1GB").is_err());
        assert!(parse_bytes("lots").is_err());
    }
}
