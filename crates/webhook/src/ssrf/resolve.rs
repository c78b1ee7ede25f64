//! DNS resolution under the SSRF rule: a host name is resolved and every
//! address checked, at submission ([`check_url`](super::check_url)) and
//! again at connection time ([`SsrfResolver`]), so DNS that changes after
//! the check cannot slip through.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{Allowlist, SsrfError, rule::check_resolved};

/// How long [`check_callback_url`](super::check_callback_url) waits for DNS before giving up.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolve `host` (looking up `lookup_port`, which ends up in the returned
/// addresses) and check every address for a connection to `port` (see
/// [`check_address`](super::check_address)); the addresses, if all pass.
pub(super) async fn resolve_checked(
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

/// A DNS resolver for `reqwest` that refuses forbidden addresses, so the
/// connection a delivery really makes obeys the same rules as
/// [`check_callback_url`](super::check_callback_url) (which may have seen other DNS answers).
/// `reqwest` does not consult the resolver for URLs with an IP address as
/// host: check those with [`check_callback_url`](super::check_callback_url) before sending.
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
        let error = client(Allowlist::default()).post(&url).send().await.unwrap_err();
        let chain = format!("{error:?}");
        assert!(chain.contains("Forbidden") && chain.contains("Loopback"), "{chain}");
        let response = client(Allowlist::new(["127.0.0.1"]).unwrap()).post(&url).send().await.unwrap();
        assert_eq!(response.status(), 204);
        assert_eq!(server.await.unwrap(), 1, "only the permitted request reached the server");
    }
}
