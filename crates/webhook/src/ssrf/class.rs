//! Address classification: why an IP address is not a public unicast
//! address, IPv4 carried inside IPv6 judged as the IPv4 address it carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
