//! The envelope on Kafka records: written as headers, read back from them.

use onceflow_contracts::Envelope;
use rdkafka::{
    Message,
    message::{Header, Headers as _, OwnedHeaders},
};

use crate::{Error, Result};

/// The envelope as Kafka record headers.
pub fn headers(envelope: &Envelope) -> OwnedHeaders {
    envelope.to_headers().iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header { key, value: Some(value.as_bytes()) })
    })
}

/// Read the envelope from a consumed record's headers.
pub fn envelope_of(message: &impl Message) -> Result<Envelope> {
    let pairs = header_pairs(message)?;
    Ok(Envelope::from_headers(pairs.iter().map(|(name, value)| (name.as_str(), value.as_deref())))?)
}

/// Every header of `message`, in order, as (name, value) pairs.
///
/// rdkafka panics on a header name that is not UTF-8 (it unwraps the
/// conversion); a hostile producer must not be able to kill a consumer, so the
/// panic is caught here and the record reported as malformed instead.
pub fn header_pairs(message: &impl Message) -> Result<Vec<(String, Option<Vec<u8>>)>> {
    let Some(headers) = message.headers() else { return Ok(Vec::new()) };
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        headers.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect::<Vec<_>>()
    }));
    read.map_err(|_| {
        Error::Contract(onceflow_contracts::ContractError::InvalidHeader {
            name: "unknown",
            reason: "a header name is not UTF-8".to_owned(),
        })
    })
}
