//! Kubernetes resource quantities (`"2"`, `"1500m"`, `"8Gi"`, `"1e3"`) as
//! integers: cpu in millicores, everything else in units, rounded up as
//! Kubernetes' `MilliValue`/`Value` do.

/// The quantity in thousandths of a unit (millicores for cpu), rounded up;
/// `None` if it is not a valid quantity.
pub fn parse_milli(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (number, suffix) = split_number(text);
    let (negative, digits) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // mantissa = digits as an integer, scaled by 10^-frac_len.
    let mantissa: i128 = format!("{int_part}{frac_part}").parse().ok()?;
    let frac_len = i32::try_from(frac_part.len()).ok()?;
    // The value in milli-units is mantissa * base^exp * 1000 / 10^frac_len.
    let (num, den) = scale(suffix)?;
    let mut numerator = mantissa.checked_mul(num)?.checked_mul(1000)?;
    let mut denominator = den;
    let mut shift = frac_len;
    while shift > 0 {
        denominator = denominator.checked_mul(10)?;
        shift -= 1;
    }
    if negative {
        numerator = -numerator;
    }
    let value = div_ceil(numerator, denominator);
    i64::try_from(value).ok()
}

/// The quantity in whole units, rounded up (bytes for memory).
pub fn parse_units(text: &str) -> Option<i64> {
    parse_milli(text)
        .map(|m| div_ceil(i128::from(m), 1000))
        .and_then(|v| i64::try_from(v).ok())
}

fn div_ceil(n: i128, d: i128) -> i128 {
    let q = n / d;
    if n % d > 0 { q + 1 } else { q }
}

/// Splits `"1.5Gi"` into `("1.5", "Gi")`; an exponent (`"1e3"`) stays a
/// suffix (`"e3"`).
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || (*i == 0 && (*c == '-' || *c == '+'))))
        .map_or(text.len(), |(i, _)| i);
    (&text[..end], &text[end..])
}

/// The multiplier of a suffix as a fraction `num/den`.
fn scale(suffix: &str) -> Option<(i128, i128)> {
    let binary = |p: u32| Some((1i128 << (10 * p), 1));
    let decimal = |p: u32| Some((10i128.pow(p), 1));
    match suffix {
        "" => decimal(0),
        "m" => Some((1, 1000)),
        "u" => Some((1, 1_000_000)),
        "n" => Some((1, 1_000_000_000)),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        exp => {
            let digits = exp.strip_prefix('e').or_else(|| exp.strip_prefix('E'))?;
            let (negative, digits) = match digits.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, digits.strip_prefix('+').unwrap_or(digits)),
            };
            let power: u32 = digits.parse().ok()?;
            if power > 18 {
                return None;
            }
            if negative {
                Some((1, 10i128.pow(power)))
            } else {
                decimal(power)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_in_millicores() {
        assert_eq!(parse_milli("2"), Some(2000));
        assert_eq!(parse_milli("1500m"), Some(1500));
        assert_eq!(parse_milli("0.5"), Some(500));
        assert_eq!(parse_milli(".1"), Some(100));
        assert_eq!(parse_milli("100u"), Some(1), "rounded up like MilliValue");
        assert_eq!(parse_milli("abc"), None);
        assert_eq!(parse_milli(""), None);
        assert_eq!(parse_milli("1x"), None);
    }

    #[test]
    fn memory_quantities_in_bytes() {
        assert_eq!(parse_units("8Gi"), Some(8 << 30));
        assert_eq!(parse_units("128Mi"), Some(128 << 20));
        assert_eq!(parse_units("1G"), Some(1_000_000_000));
        assert_eq!(parse_units("1e3"), Some(1000));
        assert_eq!(parse_units("1.5Ki"), Some(1536));
        assert_eq!(parse_units("8589934592"), Some(8_589_934_592));
        assert_eq!(parse_units("110"), Some(110));
    }
}
