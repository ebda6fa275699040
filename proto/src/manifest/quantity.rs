//! Kubernetes resource quantities (`500m`, `0.25`, `64Mi`, `129e6`, `1k`)
//! turned into whole millicores or bytes, exactly (no floating point).

const SYNTAX: &str = "expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, ...)";

/// A non-negative quantity: `digits × 10^exp10 × 2^exp2`.
struct Quantity {
    digits: u128,
    exp10: i32,
    exp2: u32,
}

/// Parses a CPU quantity into millicores, rounding up a finer precision like
/// Kubernetes does (`1u` is 1m).
pub fn parse_cpu_millis(q: &str) -> Result<u64, String> {
    let v = parse(q)?;
    let (num, den) = v.scaled(3).ok_or_else(|| too_large(q))?;
    u64::try_from(num.div_ceil(den)).map_err(|_| too_large(q))
}

/// Parses a memory quantity into bytes. A fraction of a byte is refused:
/// it is almost always `m` (milli) written for `M` (mega).
pub fn parse_memory_bytes(q: &str) -> Result<u64, String> {
    let v = parse(q)?;
    let (num, den) = v.scaled(0).ok_or_else(|| too_large(q))?;
    if num % den != 0 {
        return Err(format!(
            "invalid quantity {q:?}: memory must be a whole number of bytes (did you mean M or Mi rather than m?)"
        ));
    }
    u64::try_from(num / den).map_err(|_| too_large(q))
}

fn too_large(q: &str) -> String {
    format!("invalid quantity {q:?}: too large")
}

fn invalid(q: &str) -> String {
    format!("invalid quantity {q:?}: {SYNTAX}")
}

fn parse(q: &str) -> Result<Quantity, String> {
    let body = match q.as_bytes().first() {
        None => return Err(format!("invalid quantity \"\": {SYNTAX}")),
        Some(b'-') => return Err(format!("invalid quantity {q:?}: must not be negative")),
        Some(b'+') => &q[1..],
        Some(_) => q,
    };
    let number_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_end);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() || frac_part.contains('.') {
        return Err(invalid(q));
    }
    let (exp10, exp2) = suffix_exponents(suffix).ok_or_else(|| invalid(q))?;

    // Significant digits only, so long spellings of small numbers still fit.
    let all = format!("{int_part}{frac_part}");
    let trimmed = all.trim_start_matches('0');
    let significant = trimmed.trim_end_matches('0');
    let trailing_zeros =
        i32::try_from(trimmed.len() - significant.len()).map_err(|_| too_large(q))?;
    let frac_len = i32::try_from(frac_part.len()).map_err(|_| too_large(q))?;
    let digits = if significant.is_empty() {
        0
    } else {
        significant.parse::<u128>().map_err(|_| too_large(q))?
    };
    Ok(Quantity {
        digits,
        exp10: exp10
            .checked_add(trailing_zeros)
            .and_then(|e| e.checked_sub(frac_len))
            .ok_or_else(|| too_large(q))?,
        exp2,
    })
}

/// The powers of ten and of two a suffix stands for.
fn suffix_exponents(suffix: &str) -> Option<(i32, u32)> {
    let e = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let unsigned = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (exp.parse::<i32>().ok()?, 0)
        }
    };
    Some(e)
}

impl Quantity {
    /// The value times `10^pow10` as a fraction `(numerator, denominator)`;
    /// `None` when it does not fit in `u128`.
    fn scaled(&self, pow10: i32) -> Option<(u128, u128)> {
        if self.digits == 0 {
            return Some((0, 1));
        }
        let num = self.digits.checked_mul(1u128.checked_shl(self.exp2)?)?;
        let exp = self.exp10.checked_add(pow10)?;
        if exp >= 0 {
            let scale = 10u128.checked_pow(exp.unsigned_abs())?;
            Some((num.checked_mul(scale)?, 1))
        } else {
            // 10^39 and above overflow, but any u128 over them is below one:
            // keep it a fraction (denominator above the numerator).
            let den = 10u128
                .checked_pow(exp.unsigned_abs())
                .unwrap_or_else(|| num.saturating_add(1));
            Some((num, den))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        for (q, m) in [
            ("500m", 500),
            ("1", 1000),
            ("0.25", 250),
            ("2.5", 2500),
            ("+2", 2000),
            (".5", 500),
            ("1.", 1000),
            ("0", 0),
            ("100", 100_000),
            ("1u", 1),
            ("1500000u", 1500),
            ("0.0001", 1),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("2k", 2_000_000),
            ("007", 7000),
        ] {
            assert_eq!(parse_cpu_millis(q), Ok(m), "{q}");
        }
    }

    #[test]
    fn memory() {
        for (q, b) in [
            ("64Mi", 64 << 20),
            ("1G", 1_000_000_000),
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("129E6", 129_000_000),
            ("123Mi", 128_974_848),
            ("1k", 1000),
            ("1Ki", 1024),
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            ("1Ei", 1 << 60),
            ("8E", 8_000_000_000_000_000_000),
            ("18446744073709551615", u64::MAX),
            ("1000m", 1),
            ("0", 0),
        ] {
            assert_eq!(parse_memory_bytes(q), Ok(b), "{q}");
        }
    }

    #[test]
    fn refused() {
        for q in [
            "", "lots", "-1", "-500m", "1K", "1 Mi", " 1", "1Mi ", "1.2.3", ".", "e3", "1e", "1e+",
            "Mi", "1mi", "1iB", "0x10", "1_000", "1e3Mi", "NaN",
        ] {
            assert!(parse_cpu_millis(q).is_err(), "cpu {q:?}");
            assert!(parse_memory_bytes(q).is_err(), "memory {q:?}");
        }
        assert!(parse_memory_bytes("16Ei").is_err(), "above u64");
        assert!(parse_memory_bytes("18446744073709551616").is_err());
        assert!(parse_cpu_millis("1e30").is_err());
        assert!(parse_memory_bytes("1e99999999999").is_err());
        assert!(parse_memory_bytes("500m").is_err(), "half a byte");
        assert!(
            parse_memory_bytes("1e-400").is_err(),
            "a tiny fraction of a byte"
        );
        assert_eq!(
            parse_cpu_millis("1e-400"),
            Ok(1),
            "rounded up like Kubernetes"
        );
    }

    #[test]
    fn messages() {
        assert_eq!(
            parse_cpu_millis("lots").unwrap_err(),
            "invalid quantity \"lots\": expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, ...)"
        );
        assert_eq!(
            parse_memory_bytes("-1Gi").unwrap_err(),
            "invalid quantity \"-1Gi\": must not be negative"
        );
        assert_eq!(
            parse_memory_bytes("16Ei").unwrap_err(),
            "invalid quantity \"16Ei\": too large"
        );
    }
}
