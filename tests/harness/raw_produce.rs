//! A record put on a topic by speaking the Kafka protocol by hand, for what
//! no client library lets a test send.

/// Put one record on `topic`'s partition 0 by speaking the Kafka protocol by
/// hand (Produce v3, record batch v2): the only way to give a header a name
/// that is not UTF-8, which no Rust client API allows but the protocol and
/// other clients do.
pub async fn produce_by_hand(brokers: &str, topic: &str, key: &[u8], headers: &[(&[u8], &[u8])], value: &[u8]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    fn varint(out: &mut Vec<u8>, value: usize) {
        // Zig-zag of a non-negative length is twice it.
        let mut rest = u64::try_from(value).expect("a length") << 1;
        loop {
            let byte = u8::try_from(rest & 0x7f).expect("seven bits");
            rest >>= 7;
            if rest == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn crc32c(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            }
        }
        !crc
    }
    let len32 = |len: usize| i32::try_from(len).expect("a length").to_be_bytes();
    let len16 = |len: usize| i16::try_from(len).expect("a length").to_be_bytes();

    // attributes, timestamp delta, offset delta (the varint 0 is one byte 0).
    let mut record = vec![0, 0, 0];
    varint(&mut record, key.len());
    record.extend_from_slice(key);
    varint(&mut record, value.len());
    record.extend_from_slice(value);
    varint(&mut record, headers.len());
    for (name, header_value) in headers {
        varint(&mut record, name.len());
        record.extend_from_slice(name);
        varint(&mut record, header_value.len());
        record.extend_from_slice(header_value);
    }
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("a clock");
    let now = i64::try_from(since_epoch.as_millis()).expect("milliseconds").to_be_bytes();
    // What the CRC covers: attributes to the end of the batch.
    let mut checked = Vec::new();
    checked.extend(0i16.to_be_bytes()); // attributes
    checked.extend(0i32.to_be_bytes()); // last offset delta
    checked.extend(now); // first timestamp
    checked.extend(now); // max timestamp
    checked.extend((-1i64).to_be_bytes()); // producer id
    checked.extend((-1i16).to_be_bytes()); // producer epoch
    checked.extend((-1i32).to_be_bytes()); // base sequence
    checked.extend(1i32.to_be_bytes()); // one record
    varint(&mut checked, record.len());
    checked.extend(record);
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset
    batch.extend(len32(4 + 1 + 4 + checked.len())); // leader epoch, magic, crc, the rest
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&checked).to_be_bytes());
    batch.extend(checked);

    let client = b"onceflow-test";
    let mut request = Vec::new();
    request.extend(0i16.to_be_bytes()); // Produce
    request.extend(3i16.to_be_bytes()); // version 3
    request.extend(7i32.to_be_bytes()); // correlation id
    request.extend(len16(client.len()));
    request.extend(client);
    request.extend((-1i16).to_be_bytes()); // no transactional id
    request.extend(1i16.to_be_bytes()); // acks: the leader
    request.extend(30_000i32.to_be_bytes()); // timeout
    request.extend(1i32.to_be_bytes()); // one topic
    request.extend(len16(topic.len()));
    request.extend(topic.as_bytes());
    request.extend(1i32.to_be_bytes()); // one partition
    request.extend(0i32.to_be_bytes()); // partition 0
    request.extend(len32(batch.len()));
    request.extend(batch);

    let broker = brokers.split(',').next().expect("a broker");
    let mut stream = tokio::net::TcpStream::connect(broker).await.expect("connect to the broker");
    stream.write_all(&len32(request.len())).await.expect("send the request");
    stream.write_all(&request).await.expect("send the request");
    let size = usize::try_from(stream.read_i32().await.expect("the response size")).expect("a size");
    let mut response = vec![0; size];
    stream.read_exact(&mut response).await.expect("the response");
    // correlation id, topic count, topic name, partition count, partition index, then the error code.
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    let error = i16::from_be_bytes([response[at], response[at + 1]]);
    assert_eq!(error, 0, "the broker refused the hand-made record");
}
