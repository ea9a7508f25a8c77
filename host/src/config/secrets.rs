//! Secrets kept out of the config file: `${VAR}` from the environment,
//! and a password read from a file into a URL's user part.

/// `url` with `password` (percent-encoded) in its user part. Errors never
/// show the URL, which may hold other secrets.
pub(super) fn with_password(url: &str, password: &str) -> std::result::Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("the URL has no `scheme://` to put a password after".into());
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => {
            return Err("the URL already holds a password; give it there or in \
                        `password_file`, not both"
                .into());
        }
        Some((user, host)) => (user, host),
        None => ("", authority),
    };
    let mut encoded = String::with_capacity(password.len());
    for byte in password.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
}

/// `text` with every `${VAR}` replaced by the environment variable `VAR`.
/// Errors never show the text, which may hold a secret already expanded.
pub(super) fn expand_variables(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("`${` without a closing `}`".into());
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{name}}}` is not a variable name (letters, digits and `_`)"
            ));
        }
        let value = env(name).ok_or_else(|| {
            format!("the environment variable `{name}` (in `${{{name}}}`) is not set")
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
