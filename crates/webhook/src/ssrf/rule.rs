//! The SSRF rule for addresses: an address is refused when it is internal
//! (loopback, private, link-local, metadata…) unless the allowlist permits
//! it, and cloud-metadata and link-local addresses always; a host name's
//! resolved addresses are judged together. Used by the submission check
//! ([`check_url`](super::check_url)) and the connection-time resolver alike.

use std::net::{IpAddr, SocketAddr};

use super::{Allowlist, SsrfError, classify};

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

/// The rule for the `addresses` a host name resolved to: none may be
/// cloud-metadata or link-local; unless the name is permitted on `port`,
/// every one must pass [`check_address`].
pub(super) fn check_resolved(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
