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
//!
//! The pieces, each in a module of its own and re-exported here: `class`
//! (why an address is not public), `allowlist` (the exemptions),
//! `callback_url` (the URL's syntax), `check` (the rule applied to a URL and
//! its addresses) and `resolve` (DNS, at submission and at connection time).

mod allowlist;
mod callback_url;
mod check;
mod class;
mod resolve;
mod rule;

pub use allowlist::{Allowlist, AllowlistError};
pub use callback_url::{MAX_CALLBACK_URL_LEN, parse_callback_url};
pub use check::{check_callback_url, check_url};
pub use class::{AddressClass, classify};
pub use resolve::{RESOLVE_TIMEOUT, SsrfResolver};
pub use rule::check_address;

use std::net::IpAddr;

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
