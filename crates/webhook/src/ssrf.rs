//! Server-side request forgery (SSRF) protection of callback URLs.
//!
//! A `callback_url` is chosen by a client, but the request to it is made from
//! inside onceflow's network. Without a check, a client could make the
//! notifier POST to the cloud metadata service, a database's HTTP port or
//! anything else only reachable from the inside. So a callback may only reach
//! globally routable unicast addresses: loopback, private (RFC 1918),
//! link-local, unique-local, shared (CGNAT), multicast, broadcast,
//! unspecified, documentation, reserved and cloud-metadata addresses are
//! refused — including when they hide inside IPv6 (IPv4-mapped `::ffff:a.b.c.d`,
//! IPv4-compatible, NAT64 and 6to4 forms are judged by the IPv4 address they
//! carry) — unless an [`Allowlist`] permits the host or the address (tests and
//! local stacks allow their own receiver on 127.0.0.1).
//!
//! The check is made twice, because DNS answers can change between the two:
//!
//! 1. [`check_callback_url`] when a command is submitted (ingest answers `422`
//!    with the error's message) and again before each delivery attempt;
//! 2. [`SsrfResolver`], installed as the delivering HTTP client's resolver,
//!    applies the same rule to the addresses the connection is really made
//!    to, so a name that resolves to a public address for the check and to a
//!    private one a moment later (DNS rebinding) is still refused.
//!
//! Redirects must not be followed by the delivering client either (the
//! notifier disables them): a public receiver could otherwise redirect into
//! the internal network.
//!
//! A host resolving to several addresses is refused if any one of them is
//! forbidden: the client cannot choose which one a connection uses.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use url::{Host, Url};

/// How long [`check_callback_url`] waits for DNS before giving up.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address may not be called back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918: `10/8`, `172.16/12`, `192.168/16`; IPv6 site-local `fec0::/10`.
    Private,
    /// `169.254/16`, `fe80::/10`.
    LinkLocal,
    /// `fc00::/7`.
    UniqueLocal,
    /// Carrier-grade NAT, `100.64/10`.
    SharedCgnat,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// Instance metadata services: `169.254.169.254` (AWS, GCP, Azure, …),
    /// `169.254.170.2` (AWS ECS), `100.100.100.200` (Alibaba), `192.0.0.192`
    /// (Oracle), `fd00:ec2::254` (AWS IPv6).
    CloudMetadata,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// Everything else that is not global unicast: `192.0.0/24`,
    /// `192.88.99/24`, `198.18/15`, `240/4`, `2001::/23`, `100::/64`,
    /// `5f00::/16`, local-use NAT64, and IPv6 outside `2000::/3`.
    Reserved,
}

impl std::fmt::Display for AddressClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::UniqueLocal => "unique-local",
            Self::SharedCgnat => "shared (CGNAT)",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::CloudMetadata => "cloud metadata",
            Self::Documentation => "documentation",
            Self::Reserved => "reserved",
        })
    }
}

/// Why a callback URL is refused. The messages are meant for the client who
/// gave the URL (ingest puts them in its `422` problem's `detail`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsrfError {
    #[error("callback_url is not a valid absolute URL: {0}")]
    InvalidUrl(String),
    #[error("callback_url must use http or https, not `{0}`")]
    UnsupportedScheme(String),
    #[error("callback_url has no host")]
    MissingHost,
    #[error("the host `{host}` of callback_url cannot be resolved: {reason}")]
    Unresolvable { host: String, reason: String },
    #[error(
        "the host `{host}` of callback_url resolves to {address}, a {class} address, which callbacks may not reach"
    )]
    Forbidden { host: String, address: IpAddr, class: AddressClass },
}

impl SsrfError {
    /// Whether trying again later could succeed: only a failed DNS lookup
    /// can; a malformed or forbidden URL stays so.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unresolvable { .. })
    }
}

/// A malformed allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("webhook allowlist entry `{0}` is neither an IP address, a CIDR network, a host name nor `*.domain`")]
pub struct AllowlistError(pub String);

/// Hosts and addresses exempt from the SSRF rules. Entries are IP addresses
/// (`127.0.0.1`, `::1`), CIDR networks (`10.20.0.0/16`), host names
/// (`hooks.internal`, matched exactly, case-insensitively) or `*.domain`
/// (every name under `domain`, not `domain` itself). A permitted host name
/// may resolve to any address; otherwise every resolved address must be
/// public or inside a permitted network. Empty by default: production permits
/// nothing internal.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Allowlist {
    entries: Vec<String>,
    networks: Vec<IpNet>,
    hosts: Vec<String>,
    /// `*.domain` entries, kept as `.domain`.
    suffixes: Vec<String>,
}

impl Allowlist {
    /// Parse `entries` (see the type's documentation).
    pub fn new<I, S>(entries: I) -> Result<Self, AllowlistError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Self::default();
        for entry in entries {
            let entry = entry.as_ref().trim().to_ascii_lowercase();
            if let Ok(address) = entry.parse::<IpAddr>() {
                list.networks.push(IpNet::from(address));
            } else if let Ok(network) = entry.parse::<IpNet>() {
                list.networks.push(network.trunc());
            } else if let Some(domain) = entry.strip_prefix("*.") {
                let domain = domain.trim_end_matches('.');
                if !is_host_name(domain) {
                    return Err(AllowlistError(entry));
                }
                list.suffixes.push(format!(".{domain}"));
            } else {
                let host = entry.trim_end_matches('.');
                if !is_host_name(host) {
                    return Err(AllowlistError(entry));
                }
                list.hosts.push(host.to_owned());
            }
            list.entries.push(entry);
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the host name `host` (any case, trailing dot or not) is permitted.
    pub fn permits_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host) || self.suffixes.iter().any(|suffix| host.ends_with(suffix.as_str()))
    }

    /// Whether `address` (or the IPv4 address an IPv4-mapped one carries) is
    /// inside a permitted network.
    pub fn permits_address(&self, address: IpAddr) -> bool {
        let canonical = address.to_canonical();
        self.networks.iter().any(|network| network.contains(&address) || network.contains(&canonical))
    }
}

impl TryFrom<Vec<String>> for Allowlist {
    type Error = AllowlistError;
    fn try_from(entries: Vec<String>) -> Result<Self, Self::Error> {
        Self::new(entries)
    }
}

impl From<Allowlist> for Vec<String> {
    fn from(list: Allowlist) -> Self {
        list.entries
    }
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Check that `url` may be called back: an absolute `http`/`https` URL whose
/// host is permitted by `allowlist`, or resolves (now, within
/// [`RESOLVE_TIMEOUT`]) only to addresses that are public or permitted.
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
pub async fn check_callback_url(url: &str, allowlist: &Allowlist) -> Result<(), SsrfError> {
    let parsed = Url::parse(url).map_err(|e| SsrfError::InvalidUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SsrfError::UnsupportedScheme(parsed.scheme().to_owned()));
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    match parsed.host().ok_or(SsrfError::MissingHost)? {
        Host::Ipv4(address) => check_address(&address.to_string(), IpAddr::V4(address), allowlist),
        Host::Ipv6(address) => check_address(&address.to_string(), IpAddr::V6(address), allowlist),
        Host::Domain(name) => resolve_checked(name, port, allowlist).await.map(drop),
    }
}

/// Check one resolved `address` of `host` against the rules and `allowlist`.
pub fn check_address(host: &str, address: IpAddr, allowlist: &Allowlist) -> Result<(), SsrfError> {
    match classify(address) {
        Some(class) if !allowlist.permits_address(address) => {
            Err(SsrfError::Forbidden { host: host.to_owned(), address, class })
        }
        _ => Ok(()),
    }
}

/// Resolve `host` and check every address; the addresses, if all pass.
async fn resolve_checked(host: &str, port: u16, allowlist: &Allowlist) -> Result<Vec<SocketAddr>, SsrfError> {
    let unresolvable = |reason: String| SsrfError::Unresolvable { host: host.to_owned(), reason };
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| unresolvable(format!("no answer within {RESOLVE_TIMEOUT:?}")))?
        .map_err(|e| unresolvable(e.to_string()))?;
    let addresses: Vec<SocketAddr> = lookup.collect();
    if addresses.is_empty() {
        return Err(unresolvable("no addresses".to_owned()));
    }
    if !allowlist.permits_host(host) {
        for address in &addresses {
            check_address(host, address.ip(), allowlist)?;
        }
    }
    Ok(addresses)
}

/// Why `address` is not a public unicast address, or `None` if it is.
pub fn classify(address: IpAddr) -> Option<AddressClass> {
    match address {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(192, 0, 0, 192),
];
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)];

fn in_v4(address: Ipv4Addr, network: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(address) & mask == u32::from(Ipv4Addr::from(network)) & mask
}

fn in_v6(address: Ipv6Addr, network: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(address) & mask == u128::from(Ipv6Addr::from(network)) & mask
}

fn classify_v4(address: Ipv4Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let class = if METADATA_V4.contains(&address) {
        CloudMetadata
    } else if in_v4(address, [0, 0, 0, 0], 8) {
        Unspecified
    } else if address.is_loopback() {
        Loopback
    } else if address.is_private() {
        Private
    } else if address.is_link_local() {
        LinkLocal
    } else if in_v4(address, [100, 64, 0, 0], 10) {
        SharedCgnat
    } else if address.is_broadcast() {
        Broadcast
    } else if address.is_multicast() {
        Multicast
    } else if address.is_documentation() {
        Documentation
    } else if in_v4(address, [192, 0, 0, 0], 24)
        || in_v4(address, [192, 88, 99, 0], 24)
        || in_v4(address, [198, 18, 0, 0], 15)
        || in_v4(address, [240, 0, 0, 0], 4)
    {
        Reserved
    } else {
        return None;
    };
    Some(class)
}

fn classify_v6(address: Ipv6Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let embedded_v4 = |bits: u128| Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    let bits = u128::from(address);
    // IPv4 carried in IPv6 is judged as that IPv4 address: `::ffff:127.0.0.1`
    // reaches 127.0.0.1 on a dual-stack host.
    if let Some(v4) = address.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let class = if METADATA_V6.contains(&address) {
        CloudMetadata
    } else if address.is_unspecified() {
        Unspecified
    } else if address.is_loopback() {
        Loopback
    } else if in_v6(address, [0; 8], 96) {
        // Deprecated IPv4-compatible form `::a.b.c.d`.
        return classify_v4(embedded_v4(bits)).or(Some(Reserved));
    } else if in_v6(address, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        // NAT64: reaches the IPv4 address it carries.
        return classify_v4(embedded_v4(bits));
    } else if in_v6(address, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        // 6to4: the IPv4 address sits in bits 16..48.
        return classify_v4(embedded_v4(bits >> 80));
    } else if address.is_multicast() {
        Multicast
    } else if in_v6(address, [0xfe80, 0, 0, 0, 0, 0, 0, 0], 10) {
        LinkLocal
    } else if in_v6(address, [0xfec0, 0, 0, 0, 0, 0, 0, 0], 10) {
        Private
    } else if in_v6(address, [0xfc00, 0, 0, 0, 0, 0, 0, 0], 7) {
        UniqueLocal
    } else if in_v6(address, [0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32)
        || in_v6(address, [0x3fff, 0, 0, 0, 0, 0, 0, 0], 20)
    {
        Documentation
    } else if in_v6(address, [0x2001, 0, 0, 0, 0, 0, 0, 0], 23)
        || in_v6(address, [0x5f00, 0, 0, 0, 0, 0, 0, 0], 16)
        || !in_v6(address, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3)
    {
        // IETF protocol assignments (Teredo, benchmarking, ORCHID), SRv6,
        // and everything outside the global unicast range (local-use NAT64
        // and the discard prefix `100::/64` among them).
        Reserved
    } else {
        return None;
    };
    Some(class)
}

/// A DNS resolver for `reqwest` that refuses forbidden addresses, so the
/// connection a delivery really makes obeys the same rules as
/// [`check_callback_url`] (which may have seen other DNS answers).
/// `reqwest` does not consult the resolver for URLs with an IP address as
/// host: check those with [`check_callback_url`] before sending.
#[derive(Debug, Clone, Default)]
pub struct SsrfResolver {
    allowlist: Arc<Allowlist>,
}

impl SsrfResolver {
    pub fn new(allowlist: Allowlist) -> Self {
        Self { allowlist: Arc::new(allowlist) }
    }
}

impl reqwest::dns::Resolve for SsrfResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowlist = Arc::clone(&self.allowlist);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let addresses = resolve_checked(&host, 0, &allowlist).await?;
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(list.permits_address("10.20.255.1".parse().unwrap()));
        let names = Allowlist::new(["hooks.internal", "*.corp.example"]).unwrap();
        assert!(names.permits_host("HOOKS.internal."));
        assert!(names.permits_host("a.b.corp.example"));
        assert!(!names.permits_host("corp.example"));
        assert!(!names.permits_host("evilcorp.example"));
        assert!(!names.permits_host("hooks.internal.evil.example"));
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

    #[test]
    fn allowlist_entries_are_validated_and_round_trip() {
        assert!(Allowlist::new(["not a host"]).is_err());
        assert!(Allowlist::new(["*."]).is_err());
        assert!(Allowlist::new(["10.0.0.0/33"]).is_err());
        let list: Allowlist = serde_json::from_str(r#"["127.0.0.1", "*.Example.com", "fd00::/8"]"#).unwrap();
        assert_eq!(serde_json::to_string(&list).unwrap(), r#"["127.0.0.1","*.example.com","fd00::/8"]"#);
        assert!(serde_json::from_str::<Allowlist>(r#"["http://x"]"#).is_err());
    }

    /// The resolver refuses at connection time what the check refuses, and a
    /// real request through it to a refused name never reaches the server.
    #[tokio::test]
    async fn the_connection_resolver_refuses_what_the_check_refuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut served = 0;
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                let _ = socket.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await;
                served += 1;
                if served == 1 {
                    return served;
                }
            }
            served
        });
        let client = |allowlist: Allowlist| {
            reqwest::Client::builder().no_proxy().dns_resolver(Arc::new(SsrfResolver::new(allowlist))).build().unwrap()
        };
        let url = format!("http://localhost:{port}/hook");
        let error = client(none()).post(&url).send().await.unwrap_err();
        let chain = format!("{error:?}");
        assert!(chain.contains("Forbidden") && chain.contains("Loopback"), "{chain}");
        let response = client(Allowlist::new(["127.0.0.1"]).unwrap()).post(&url).send().await.unwrap();
        assert_eq!(response.status(), 204);
        assert_eq!(server.await.unwrap(), 1, "only the permitted request reached the server");
    }
}
