//! The check of a callback URL: an http(s) URL whose host, or every address
//! its name resolves to ([`resolve`](super::resolve)), passes the address
//! rule ([`rule`](super::rule)).

use std::net::IpAddr;

use url::{Host, Url};

use super::{Allowlist, SsrfError, parse_callback_url, resolve::resolve_checked, rule::check_address};

/// Check that `url` may be called back: [`parse_callback_url`], then
/// [`check_url`]. Returns the normalised URL that was checked.
///
/// Ingest calls it when a command is submitted and answers `422` with the
/// error's `Display` text; the notifier calls it again before every delivery
/// attempt. `Err(SsrfError::Unresolvable)` may be transient (see
/// [`SsrfError::is_transient`]); every other error is final for that URL.
///
/// ```no_run
/// # async fn example() {
/// use onceflow_webhook::{Allowlist, SsrfError, check_callback_url};
/// let allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
/// assert!(check_callback_url("http://127.0.0.1:9000/hook", &allowlist).await.is_ok());
/// assert!(matches!(
///     check_callback_url("http://169.254.169.254/latest/meta-data", &allowlist).await,
///     Err(SsrfError::Forbidden { .. })
/// ));
/// # }
/// ```
pub async fn check_callback_url(url: &str, allowlist: &Allowlist) -> Result<Url, SsrfError> {
    let parsed = parse_callback_url(url)?;
    check_url(&parsed, allowlist).await?;
    Ok(parsed)
}

/// The SSRF check of a parsed callback URL: its host is permitted by
/// `allowlist` on the URL's port, or resolves (now, within
/// [`RESOLVE_TIMEOUT`](super::RESOLVE_TIMEOUT)) only to addresses that are public or permitted on
/// that port; never to a cloud-metadata or link-local address.
pub async fn check_url(url: &Url, allowlist: &Allowlist) -> Result<(), SsrfError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SsrfError::UnsupportedScheme(url.scheme().to_owned()));
    }
    let port = url.port_or_known_default().unwrap_or(443);
    match url.host().ok_or(SsrfError::MissingHost)? {
        Host::Ipv4(address) => check_address(&address.to_string(), IpAddr::V4(address), Some(port), allowlist),
        Host::Ipv6(address) => check_address(&address.to_string(), IpAddr::V6(address), Some(port), allowlist),
        Host::Domain(name) => resolve_checked(name, port, Some(port), allowlist).await.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssrf::AddressClass;

    async fn refused(url: &str, allowlist: &Allowlist) -> (IpAddr, AddressClass) {
        match check_callback_url(url, allowlist).await {
            Err(SsrfError::Forbidden { address, class, .. }) => (address, class),
            other => panic!("{url}: expected a refusal, got {other:?}"),
        }
    }

    fn none() -> Allowlist {
        Allowlist::default()
    }

    #[tokio::test]
    async fn refuses_every_internal_address_class() {
        use AddressClass::*;
        let cases = [
            ("http://0.0.0.0/", Unspecified),
            ("http://0.1.2.3/", Unspecified),
            ("http://[::]/", Unspecified),
            ("http://127.0.0.1:8080/hook", Loopback),
            ("http://127.254.0.9/", Loopback),
            ("http://[::1]:8080/hook", Loopback),
            ("http://10.0.0.5/", Private),
            ("http://172.16.0.1/", Private),
            ("http://172.31.255.255/", Private),
            ("http://192.168.1.10/", Private),
            ("http://[fec0::1]/", Private),
            ("http://169.254.1.1/", LinkLocal),
            ("http://[fe80::1]/", LinkLocal),
            ("http://[fd12:3456::1]/", UniqueLocal),
            ("http://[fc00::1]/", UniqueLocal),
            ("http://100.64.0.1/", SharedCgnat),
            ("http://100.127.255.254/", SharedCgnat),
            ("http://224.0.0.1/", Multicast),
            ("http://239.255.255.250/", Multicast),
            ("http://[ff02::1]/", Multicast),
            ("http://255.255.255.255/", Broadcast),
            ("http://169.254.169.254/latest/meta-data/", CloudMetadata),
            ("http://169.254.170.2/v2/credentials", CloudMetadata),
            ("http://168.63.129.16/machine?comp=goalstate", CloudMetadata),
            ("http://100.100.100.200/latest/meta-data", CloudMetadata),
            ("http://192.0.0.192/opc/v2/instance", CloudMetadata),
            ("http://[fd00:ec2::254]/latest/meta-data", CloudMetadata),
            ("http://192.0.2.1/", Documentation),
            ("http://[2001:db8::1]/", Documentation),
            ("http://198.18.0.1/", Reserved),
            ("http://240.0.0.1/", Reserved),
            ("http://[2001::1]/", Reserved),
            ("http://[100::1]/", Reserved),
        ];
        for (url, class) in cases {
            assert_eq!(refused(url, &none()).await.1, class, "{url}");
        }
    }

    #[tokio::test]
    async fn sees_through_ipv4_hidden_in_ipv6_and_odd_ipv4_spellings() {
        use AddressClass::*;
        let cases = [
            ("http://[::ffff:127.0.0.1]/", Loopback),
            ("http://[::ffff:7f00:1]/", Loopback),
            ("http://[::ffff:169.254.169.254]/", CloudMetadata),
            ("http://[::ffff:10.1.2.3]/", Private),
            ("http://[::127.0.0.1]/", Loopback),
            ("http://[64:ff9b::a9fe:a9fe]/", CloudMetadata),
            ("http://[64:ff9b::10.0.0.1]/", Private),
            ("http://[2002:7f00:1::]/", Loopback),
            ("http://[2002:c0a8:0101::1]/", Private),
            // The URL standard reads these as 127.0.0.1.
            ("http://2130706433/", Loopback),
            ("http://0x7f000001/", Loopback),
            ("http://0177.0.0.1/", Loopback),
            ("http://127.1/", Loopback),
        ];
        for (url, class) in cases {
            assert_eq!(refused(url, &none()).await.1, class, "{url}");
        }
    }

    #[tokio::test]
    async fn a_host_name_resolving_to_loopback_is_refused_unless_permitted() {
        // `localhost` resolves through /etc/hosts, no DNS server needed.
        let (address, class) = refused("http://localhost:9000/hook", &none()).await;
        assert!(address.is_loopback(), "{address}");
        assert_eq!(class, AddressClass::Loopback);
        let by_name = Allowlist::new(["LocalHost."]).unwrap();
        check_callback_url("http://localhost:9000/hook", &by_name).await.unwrap();
        let by_address = Allowlist::new(["127.0.0.1", "::1"]).unwrap();
        check_callback_url("http://localhost:9000/hook", &by_address).await.unwrap();
        let by_domain = Allowlist::new(["*.internal"]).unwrap();
        refused("http://localhost:9000/hook", &by_domain).await;
    }

    #[tokio::test]
    async fn the_allowlist_permits_exactly_what_it_names() {
        let list = Allowlist::new(["127.0.0.1", "10.20.0.0/16", "::1"]).unwrap();
        for url in ["http://127.0.0.1:1234/", "http://10.20.9.9/", "http://[::1]:80/", "http://[::ffff:127.0.0.1]/"] {
            check_callback_url(url, &list).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for url in ["http://127.0.0.2/", "http://10.21.0.1/", "http://169.254.169.254/"] {
            refused(url, &list).await;
        }
        assert!(list.permits_address("10.20.255.1".parse().unwrap(), Some(80)));
        let names = Allowlist::new(["hooks.internal", "*.corp.example"]).unwrap();
        assert!(names.permits_host("HOOKS.internal.", Some(80)));
        assert!(names.permits_host("a.b.corp.example", None));
        assert!(!names.permits_host("corp.example", Some(80)));
        assert!(!names.permits_host("evilcorp.example", Some(80)));
        assert!(!names.permits_host("hooks.internal.evil.example", Some(80)));
    }

    #[tokio::test]
    async fn public_addresses_pass_and_bad_urls_say_why() {
        for url in ["https://93.184.215.14/hook", "http://8.8.8.8:8080/", "https://[2606:4700::1111]/x"] {
            check_callback_url(url, &none()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        assert!(matches!(check_callback_url("not a url", &none()).await, Err(SsrfError::InvalidUrl(_))));
        assert_eq!(
            check_callback_url("ftp://8.8.8.8/x", &none()).await,
            Err(SsrfError::UnsupportedScheme("ftp".to_owned()))
        );
        assert!(matches!(
            check_callback_url("file:///etc/passwd", &none()).await,
            Err(SsrfError::UnsupportedScheme(_))
        ));
        let unresolvable = check_callback_url("https://no-such-host.invalid/hook", &none()).await.unwrap_err();
        assert!(matches!(unresolvable, SsrfError::Unresolvable { .. }), "{unresolvable:?}");
        assert!(unresolvable.is_transient());
        let forbidden = refused("http://10.0.0.1/", &none()).await;
        let message = SsrfError::Forbidden { host: "10.0.0.1".to_owned(), address: forbidden.0, class: forbidden.1 };
        assert_eq!(
            message.to_string(),
            "the host `10.0.0.1` of callback_url resolves to 10.0.0.1, a private address, which callbacks may not reach"
        );
        assert!(!message.is_transient());
    }

    #[tokio::test]
    async fn an_entry_with_a_port_permits_that_port_only() {
        let list = Allowlist::new(["127.0.0.1:8099", "[::1]:8099", "10.0.0.0/8:443", "localhost:7000"]).unwrap();
        for url in ["http://127.0.0.1:8099/hook", "http://[::1]:8099/", "https://10.1.2.3/x", "http://localhost:7000/h"]
        {
            check_callback_url(url, &list).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for (url, port) in
            [("http://127.0.0.1:8098/hook", 8098), ("http://127.0.0.1/hook", 80), ("http://10.1.2.3:5432/", 5432)]
        {
            let error = check_callback_url(url, &list).await.unwrap_err();
            assert!(matches!(error, SsrfError::PortNotPermitted { port: p, .. } if p == port), "{url}: {error:?}");
        }
        // `localhost` on another port is judged by its addresses, which only
        // entries with a port permit: not through a name.
        for url in ["http://localhost:5432/", "http://localhost:8099/"] {
            let error = check_callback_url(url, &list).await.unwrap_err();
            assert!(matches!(error, SsrfError::PortRestrictedAddressByName { .. }), "{url}: {error:?}");
        }
        // The connection-time resolver knows no port: an address entry with a
        // port permits nothing there, a host-name entry still does.
        assert!(!list.permits_address("127.0.0.1".parse().unwrap(), None));
        assert!(list.permits_host("localhost", None));
    }
}
