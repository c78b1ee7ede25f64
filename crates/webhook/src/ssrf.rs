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
//! local stacks allow their own receiver on 127.0.0.1), optionally on one port
//! only. Cloud-metadata and link-local addresses are refused always: no
//! allowlist entry, not even a permitted host name, lets a callback reach
//! them, because a host name is as easily pointed at them as anything else.
//!
//! Before any of that, [`parse_callback_url`] checks the URL's syntax: at most
//! [`MAX_CALLBACK_URL_LEN`] bytes, no control characters, an absolute
//! `http`/`https` URL with a host. Its result is the *normalised* URL (as the
//! `url` crate serialises it), which is what ingest stores and publishes, so
//! the URL that was checked is the URL that is called.
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

/// The longest `callback_url` accepted, in bytes, as given and once normalised
/// (browsers and proxies commonly cap URLs near 2 KiB; a callback needs far less).
pub const MAX_CALLBACK_URL_LEN: usize = 2048;

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
    /// (Oracle), `168.63.129.16` (Azure's WireServer), `fd00:ec2::254` (AWS
    /// IPv6).
    CloudMetadata,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// Everything else that is not global unicast: `192.0.0/24`,
    /// `192.88.99/24`, `198.18/15`, `240/4`, `2001::/23`, `100::/64`,
    /// `5f00::/16`, local-use NAT64, and IPv6 outside `2000::/3`.
    Reserved,
}

impl AddressClass {
    /// Classes no allowlist entry can permit: what answers there (instance
    /// credentials, router and host services) is never a webhook receiver.
    pub fn is_never_permitted(self) -> bool {
        matches!(self, Self::CloudMetadata | Self::LinkLocal)
    }
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
    #[error("callback_url is longer than {MAX_CALLBACK_URL_LEN} bytes")]
    TooLong,
    #[error("callback_url contains a control character (at byte {0})")]
    ControlCharacter(usize),
    #[error("callback_url is not a valid absolute URL: {0}")]
    InvalidUrl(String),
    #[error("callback_url must use http or https, not `{0}`")]
    UnsupportedScheme(String),
    #[error("callback_url has no host")]
    MissingHost,
    #[error("the host `{0}` of callback_url names a cloud metadata service, which callbacks may not reach")]
    MetadataHost(String),
    #[error("the host `{host}` of callback_url cannot be resolved: {reason}")]
    Unresolvable { host: String, reason: String },
    #[error(
        "the host `{host}` of callback_url resolves to {address}, a {class} address, which callbacks may not reach"
    )]
    Forbidden { host: String, address: IpAddr, class: AddressClass },
    #[error("callback_url may reach `{host}` only on the ports the allowlist names, not on port {port}")]
    PortNotPermitted { host: String, port: u16 },
    #[error(
        "the host `{host}` of callback_url resolves to {address}, which the allowlist permits on one port only, \
         and then only when callback_url names the address itself"
    )]
    PortRestrictedAddressByName { host: String, address: IpAddr },
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
#[error(
    "webhook allowlist entry `{0}` is neither an IP address, a CIDR network, a host name nor `*.domain` (each optionally with `:port`)"
)]
pub struct AllowlistError(pub String);

/// Hosts and addresses exempt from the SSRF rules. Entries are IP addresses
/// (`127.0.0.1`, `::1`), CIDR networks (`10.20.0.0/16`), host names
/// (`hooks.internal`, matched exactly, case-insensitively) or `*.domain`
/// (every name under `domain`, not `domain` itself), each optionally with a
/// port that is then the only one permitted: `127.0.0.1:8099`, `[::1]:8099`,
/// `10.20.0.0/16:443`, `hooks.internal:8443`. A permitted host name may
/// resolve to any address; otherwise every resolved address must be public or
/// inside a permitted network. Cloud-metadata and link-local addresses are
/// never permitted, whatever the entries say. Empty by default: production
/// permits nothing internal.
///
/// The connection-time [`SsrfResolver`] does not see the port, so an address
/// entry with a port permits that address only when the URL names it
/// (`http://127.0.0.1:8099/hook`), never through a host name resolving to it
/// (`http://localhost:8099/hook` is refused, at submission already); allowlist
/// the host name itself (`localhost:8099`) for that.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Allowlist {
    entries: Vec<String>,
    /// Networks, with the one port each permits (`None`: every port).
    networks: Vec<(IpNet, Option<u16>)>,
    hosts: Vec<(String, Option<u16>)>,
    /// `*.domain` entries, kept as `.domain`.
    suffixes: Vec<(String, Option<u16>)>,
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
            list.add(&entry).ok_or_else(|| AllowlistError(entry.clone()))?;
            list.entries.push(entry);
        }
        Ok(list)
    }

    /// Add one lower-cased entry; `None` if it is malformed.
    fn add(&mut self, entry: &str) -> Option<()> {
        if let Some(network) = parse_network(entry) {
            self.networks.push((network, None));
            return Some(());
        }
        if let Ok(socket) = entry.parse::<SocketAddr>() {
            (socket.port() != 0).then_some(())?;
            self.networks.push((IpNet::from(socket.ip()), Some(socket.port())));
            return Some(());
        }
        let (target, port) = match entry.rsplit_once(':') {
            Some((target, port)) => (target, Some(port.parse::<u16>().ok().filter(|p| *p != 0)?)),
            None => (entry, None),
        };
        if let Some(network) = port.and_then(|_| parse_network(target)) {
            self.networks.push((network, port));
        } else if let Some(domain) = target.strip_prefix("*.") {
            let domain = domain.trim_end_matches('.');
            is_host_name(domain).then_some(())?;
            self.suffixes.push((format!(".{domain}"), port));
        } else {
            let host = target.trim_end_matches('.');
            is_host_name(host).then_some(())?;
            self.hosts.push((host.to_owned(), port));
        }
        Some(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the host name `host` (any case, trailing dot or not) is
    /// permitted on `port`, or, for `None`, on at least one port.
    pub fn permits_host(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let port_ok = |allowed: &Option<u16>| port.is_none() || allowed.is_none() || *allowed == port;
        self.hosts.iter().any(|(name, allowed)| *name == host && port_ok(allowed))
            || self.suffixes.iter().any(|(suffix, allowed)| host.ends_with(suffix.as_str()) && port_ok(allowed))
    }

    /// Whether `address` (or the IPv4 address an IPv4-mapped one carries) is
    /// inside a network permitted on `port`, or, for `None`, on every port.
    pub fn permits_address(&self, address: IpAddr, port: Option<u16>) -> bool {
        self.networks_containing(address).any(|allowed| allowed.is_none() || allowed == port)
    }

    fn networks_containing(&self, address: IpAddr) -> impl Iterator<Item = Option<u16>> + '_ {
        let canonical = address.to_canonical();
        self.networks
            .iter()
            .filter(move |(network, _)| network.contains(&address) || network.contains(&canonical))
            .map(|(_, port)| *port)
    }
}

/// An IP address (as a one-address network) or a CIDR network.
fn parse_network(text: &str) -> Option<IpNet> {
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    bare.parse::<IpAddr>().map(IpNet::from).or_else(|_| bare.parse::<IpNet>().map(|n| n.trunc())).ok()
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
/// [`check_url`] does the SSRF check.
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
/// [`RESOLVE_TIMEOUT`]) only to addresses that are public or permitted on
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

/// Check one resolved `address` of `host` against the rules and `allowlist`,
/// for a connection to `port` (`None`: a port not known, so only entries
/// without a port can permit it).
pub fn check_address(host: &str, address: IpAddr, port: Option<u16>, allowlist: &Allowlist) -> Result<(), SsrfError> {
    let Some(class) = classify(address) else { return Ok(()) };
    let forbidden = || SsrfError::Forbidden { host: host.to_owned(), address, class };
    if class.is_never_permitted() {
        return Err(forbidden());
    }
    if allowlist.permits_address(address, port) {
        return Ok(());
    }
    match port {
        Some(port) if allowlist.networks_containing(address).next().is_some() => {
            Err(SsrfError::PortNotPermitted { host: host.to_owned(), port })
        }
        _ => Err(forbidden()),
    }
}

/// Resolve `host` (looking up `lookup_port`, which ends up in the returned
/// addresses) and check every address for a connection to `port` (see
/// [`check_address`]); the addresses, if all pass.
async fn resolve_checked(
    host: &str,
    lookup_port: u16,
    port: Option<u16>,
    allowlist: &Allowlist,
) -> Result<Vec<SocketAddr>, SsrfError> {
    let unresolvable = |reason: String| SsrfError::Unresolvable { host: host.to_owned(), reason };
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, lookup_port)))
        .await
        .map_err(|_| unresolvable(format!("no answer within {RESOLVE_TIMEOUT:?}")))?
        .map_err(|e| unresolvable(e.to_string()))?;
    let addresses: Vec<SocketAddr> = lookup.collect();
    if addresses.is_empty() {
        return Err(unresolvable("no addresses".to_owned()));
    }
    check_resolved(host, &addresses, port, allowlist)?;
    Ok(addresses)
}

/// The rule for the `addresses` a host name resolved to: none may be
/// cloud-metadata or link-local; unless the name is permitted on `port`,
/// every one must pass [`check_address`].
fn check_resolved(
    host: &str,
    addresses: &[SocketAddr],
    port: Option<u16>,
    allowlist: &Allowlist,
) -> Result<(), SsrfError> {
    let host_permitted = allowlist.permits_host(host, port);
    for address in addresses {
        let never = classify(address.ip()).filter(|class| class.is_never_permitted());
        if let Some(class) = never {
            return Err(SsrfError::Forbidden { host: host.to_owned(), address: address.ip(), class });
        }
        if !host_permitted {
            // A name reaches an address only through entries without a port:
            // the connection-time resolver cannot see the port, and the
            // submission check must not accept what delivery will refuse.
            check_address(host, address.ip(), None, allowlist).map_err(|error| {
                if allowlist.networks_containing(address.ip()).next().is_some() {
                    SsrfError::PortRestrictedAddressByName { host: host.to_owned(), address: address.ip() }
                } else {
                    error
                }
            })?;
        }
    }
    Ok(())
}

/// Why `address` is not a public unicast address, or `None` if it is.
pub fn classify(address: IpAddr) -> Option<AddressClass> {
    match address {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

const METADATA_V4: [Ipv4Addr; 5] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(192, 0, 0, 192),
    // Azure's WireServer (host agent), reachable from every Azure VM.
    Ipv4Addr::new(168, 63, 129, 16),
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
            // Port 0: reqwest puts the URL's port in. The port is unknown
            // here, so only port-less address entries permit an address
            // (check_callback_url, run before each delivery, checked the
            // URL's port against the entries).
            let addresses = resolve_checked(&host, 0, None, &allowlist).await?;
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

    #[test]
    fn allowlist_entries_are_validated_and_round_trip() {
        assert!(Allowlist::new(["not a host"]).is_err());
        assert!(Allowlist::new(["*."]).is_err());
        assert!(Allowlist::new(["10.0.0.0/33"]).is_err());
        let list: Allowlist = serde_json::from_str(r#"["127.0.0.1", "*.Example.com", "fd00::/8"]"#).unwrap();
        assert_eq!(serde_json::to_string(&list).unwrap(), r#"["127.0.0.1","*.example.com","fd00::/8"]"#);
        assert!(serde_json::from_str::<Allowlist>(r#"["http://x"]"#).is_err());
        for bad in ["127.0.0.1:0", "127.0.0.1:65536", "host:port", "[::1]:x", ":80"] {
            assert!(Allowlist::new([bad]).is_err(), "{bad}");
        }
        let ported: Allowlist =
            serde_json::from_str(r#"["127.0.0.1:8099", "[::1]:8099", "10.0.0.0/8:443", "Hooks.internal:8443"]"#)
                .unwrap();
        assert_eq!(
            serde_json::to_string(&ported).unwrap(),
            r#"["127.0.0.1:8099","[::1]:8099","10.0.0.0/8:443","hooks.internal:8443"]"#
        );
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

    #[test]
    fn metadata_and_link_local_addresses_are_never_permitted() {
        let list = Allowlist::new(["169.254.0.0/16", "fd00::/8", "fe80::/10", "metadata.internal", "*.corp"]).unwrap();
        for address in ["169.254.169.254", "169.254.1.1", "fd00:ec2::254", "fe80::1", "::ffff:169.254.169.254"] {
            let ip: IpAddr = address.parse().unwrap();
            assert!(
                matches!(check_address(address, ip, Some(80), &list), Err(SsrfError::Forbidden { .. })),
                "{address}"
            );
            for host in ["metadata.internal", "a.corp"] {
                let resolved = [SocketAddr::new(ip, 80), SocketAddr::new("8.8.8.8".parse().unwrap(), 80)];
                let error = check_resolved(host, &resolved, Some(80), &list).unwrap_err();
                assert!(matches!(error, SsrfError::Forbidden { class, .. } if class.is_never_permitted()), "{host}");
                assert!(check_resolved(host, &resolved, None, &list).is_err(), "{host} at connection time");
            }
        }
        // Other internal addresses behind a permitted name still pass.
        let loopback = [SocketAddr::new("127.0.0.1".parse().unwrap(), 80)];
        check_resolved("metadata.internal", &loopback, Some(80), &list).unwrap();
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
