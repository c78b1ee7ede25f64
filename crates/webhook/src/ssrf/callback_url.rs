//! The syntax of a callback URL: bounded, free of control characters, an
//! absolute `http`/`https` URL whose host names no cloud metadata service,
//! checked without any network request.

use url::{Host, Url};

use super::SsrfError;

/// The longest `callback_url` accepted, in bytes, as given and once normalised
/// (browsers and proxies commonly cap URLs near 2 KiB; a callback needs far less).
pub const MAX_CALLBACK_URL_LEN: usize = 2048;

/// Host names of cloud metadata services: refused by name, at the door, even
/// where they do not resolve (they resolve inside the cloud they belong to).
const METADATA_NAMES: [&str; 7] = [
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "metadata.azure.internal",
];

/// Whether `name` (a URL's host, lower-case) names a cloud metadata service.
fn is_metadata_name(name: &str) -> bool {
    METADATA_NAMES.contains(&name.trim_end_matches('.'))
}

/// Check the syntax of a client's `callback_url` and return it normalised:
/// at most [`MAX_CALLBACK_URL_LEN`] bytes (as given and once normalised), no
/// control characters (NUL, CR, LF, DEL, C1 …, which the URL parser would
/// otherwise drop or encode silently), an absolute `http`/`https` URL with a
/// host that names no cloud metadata service. Makes no network request;
/// [`check_url`](super::check_url) does the SSRF check.
pub fn parse_callback_url(raw: &str) -> Result<Url, SsrfError> {
    if raw.len() > MAX_CALLBACK_URL_LEN {
        return Err(SsrfError::TooLong);
    }
    if let Some((at, _)) = raw.char_indices().find(|(_, c)| c.is_control()) {
        return Err(SsrfError::ControlCharacter(at));
    }
    let parsed = Url::parse(raw).map_err(|e| SsrfError::InvalidUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SsrfError::UnsupportedScheme(parsed.scheme().to_owned()));
    }
    match parsed.host() {
        None => return Err(SsrfError::MissingHost),
        Some(Host::Domain(name)) if is_metadata_name(name) => return Err(SsrfError::MetadataHost(name.to_owned())),
        Some(_) => {}
    }
    if parsed.as_str().len() > MAX_CALLBACK_URL_LEN {
        return Err(SsrfError::TooLong);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssrf::{Allowlist, check_callback_url};

    #[test]
    fn metadata_host_names_are_refused_at_the_door() {
        for url in [
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./x",
            "http://metadata/computeMetadata/v1/",
            "https://instance-data.ec2.internal/latest/meta-data/",
            "http://metadata.tencentyun.com/latest/meta-data/",
        ] {
            assert!(matches!(parse_callback_url(url), Err(SsrfError::MetadataHost(_))), "{url}");
        }
        assert!(parse_callback_url("http://metadata.example.com/hook").is_ok(), "only the services' own names");
    }

    #[tokio::test]
    async fn callback_urls_are_bounded_free_of_control_characters_and_normalised() {
        for (raw, control_at) in [
            ("http://127.0.0.1:9/h\u{0}x", 20),
            ("http://127.0.0.1:9/h\r\nx", 20),
            ("http://example.com/\tx", 19),
            ("http://example.com/\u{7f}", 19),
            ("http://example.com/\u{85}", 19),
            ("\nhttp://example.com/", 0),
        ] {
            assert_eq!(parse_callback_url(raw), Err(SsrfError::ControlCharacter(control_at)), "{raw:?}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_CALLBACK_URL_LEN));
        assert_eq!(parse_callback_url(&long), Err(SsrfError::TooLong));
        // Short enough as given, too long once non-ASCII is percent-encoded.
        let grows = format!("https://example.com/{}", "é".repeat(MAX_CALLBACK_URL_LEN / 2 - 20));
        assert!(grows.len() <= MAX_CALLBACK_URL_LEN);
        assert_eq!(parse_callback_url(&grows), Err(SsrfError::TooLong));
        assert!(
            matches!(parse_callback_url("javascript:alert(1)"), Err(SsrfError::UnsupportedScheme(s)) if s == "javascript")
        );
        assert!(matches!(parse_callback_url("/relative/path"), Err(SsrfError::InvalidUrl(_))));
        assert!(matches!(parse_callback_url("https://"), Err(SsrfError::InvalidUrl(_) | SsrfError::MissingHost)));
        let normalised = parse_callback_url("HTTP://Example.COM:80/a/../b/ c?q=1").unwrap();
        assert_eq!(normalised.as_str(), "http://example.com/b/%20c?q=1");
        let checked = check_callback_url("http://127.0.0.1:80/./hook", &Allowlist::new(["127.0.0.1"]).unwrap()).await;
        assert_eq!(checked.unwrap().as_str(), "http://127.0.0.1/hook");
    }
}
