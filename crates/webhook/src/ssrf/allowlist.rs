//! The allowlist: hosts, domains and networks exempt from the SSRF rules,
//! parsed from configuration entries.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

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
/// The connection-time [`SsrfResolver`](super::SsrfResolver) does not see the port, so an address
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

    pub(super) fn networks_containing(&self, address: IpAddr) -> impl Iterator<Item = Option<u16>> + '_ {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
