//! Name syntax checks as Kubernetes does them (apimachinery's
//! `validation.IsDNS1123Label` and friends). Each returns the reason a
//! value is invalid.

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;
const IANA_SVC_NAME_MAX: usize = 15;

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` without the length check.
fn dns_label_syntax(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) => {
            lower_alnum(f) && lower_alnum(l) && b.iter().all(|&c| lower_alnum(c) || c == b'-')
        }
        _ => false,
    }
}

/// A DNS-1123 label: container names, namespaces.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > LABEL_MAX {
        return Err(format!("{s:?} is longer than {LABEL_MAX} characters"));
    }
    if !dns_label_syntax(s) {
        return Err(format!(
            "{s:?} is not a valid DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain: pod names, label key prefixes.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > SUBDOMAIN_MAX {
        return Err(format!("{s:?} is longer than {SUBDOMAIN_MAX} characters"));
    }
    if !s.split('.').all(dns_label_syntax) {
        return Err(format!(
            "{s:?} is not a valid DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters: label
/// values and the name part of qualified names.
fn label_value_syntax(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(f), Some(l)) => {
            s.len() <= LABEL_MAX
                && f.is_ascii_alphanumeric()
                && l.is_ascii_alphanumeric()
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A qualified name (`[prefix/]name`): label and annotation keys.
pub fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(format!("{s:?} has an empty prefix before '/'"));
        }
        dns1123_subdomain(prefix).map_err(|e| format!("the prefix of {s:?}: {e}"))?;
    }
    if !label_value_syntax(name) {
        return Err(format!(
            "{s:?} is not a valid qualified name: the name part must be at most {LABEL_MAX} characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit, with an optional DNS subdomain prefix and '/'"
        ));
    }
    Ok(())
}

/// A label value: empty, or like the name part of a qualified name.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() || label_value_syntax(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid label value: at most {LABEL_MAX} characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

/// An IANA service name: container port names.
pub fn iana_svc_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !s.is_empty()
        && s.len() <= IANA_SVC_NAME_MAX
        && b.iter().all(|&c| lower_alnum(c) || c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid port name: at most {IANA_SVC_NAME_MAX} lowercase letters, digits and '-', with at least one letter, no '-' at either end and no \"--\""
        ))
    }
}

/// An environment variable name: printable ASCII except '=' (Kubernetes'
/// relaxed rule, the default since 1.34).
pub fn env_var_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("required".to_owned());
    }
    if s.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'=') {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid environment variable name: printable ASCII characters except '='"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        assert!(dns1123_label("web-0").is_ok());
        assert!(dns1123_label(&"a".repeat(63)).is_ok());
        for bad in ["", "Web", "-web", "web-", "we_b", "web.x", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad:?}");
        }
        assert!(dns1123_subdomain("web.example-1.com").is_ok());
        for bad in ["", "web..x", ".web", "web.", "Web.com", &"a".repeat(254)] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn qualified_names_and_values() {
        for good in ["app", "app.kubernetes.io/name", "A_b.c-D", "example.com/x"] {
            assert!(qualified_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "/app",
            "app/",
            "a/b/c",
            "Example.com/x",
            "-app",
            "app_",
            &"a".repeat(64),
        ] {
            assert!(qualified_name(bad).is_err(), "{bad:?}");
        }
        for good in ["", "v1.2", "nginx", "A-b_c"] {
            assert!(label_value(good).is_ok(), "{good:?}");
        }
        for bad in ["-x", "x y", "a/b", &"a".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_and_env_names() {
        for good in ["http", "web-8080", "h2c", "a"] {
            assert!(iana_svc_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "8080",
            "HTTP",
            "-http",
            "http-",
            "ht--tp",
            "a-very-long-port-name",
        ] {
            assert!(iana_svc_name(bad).is_err(), "{bad:?}");
        }
        for good in ["PATH", "my.var-1", "1ABC", "a b"] {
            assert!(env_var_name(good).is_ok(), "{good:?}");
        }
        for bad in ["", "A=B", "caf\u{e9}", "tab\t"] {
            assert!(env_var_name(bad).is_err(), "{bad:?}");
        }
    }
}
