#!/usr/bin/env python3
"""Read onceflow's results topic from outside Rust, with standard Avro tooling.

Every value on the topic is Avro single-object encoded: the bytes C3 01, the
8-byte CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form,
then the Avro datum. This consumer fingerprints every schema file in
schemas/ and schemas/history/ (every released version), finds each value's
writer schema by its fingerprint, and decodes it with schema resolution to the
newest schema (schemas/result.avsc), so it reads what older and newer
onceflow versions wrote alike. No schema registry is involved.

It prints one JSON object per result event on standard output: the Avro
fields, UUIDs as strings and `occurred_at` in milliseconds since the Unix
epoch, as onceflow's own JSON has them. A value it cannot decode is reported
on standard error and skipped; so are records of onceflow versions before
single-object encoding (bare datums, which only onceflow's services still read).

    pip install -r examples/python/requirements.txt
    python examples/python/results_consumer.py --bootstrap-servers 127.0.0.1:9092

Without --group-id it reads every partition from the beginning, as kcat -C
does; with one it joins that consumer group and resumes where the group left
off. --count and --idle-timeout make it stop (for scripts); otherwise it runs
until interrupted.

Exit status: 0, or 1 when --count results were not read before the idle
timeout, or 2 when a value could not be decoded.
"""

import argparse
import datetime
import io
import json
import pathlib
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from fastavro import schemaless_reader
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

# The single-object encoding's marker and the length of marker + fingerprint.
MARKER = b"\xc3\x01"
HEADER_LENGTH = 10
REPO_SCHEMAS = pathlib.Path(__file__).resolve().parents[2] / "schemas"
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def wire_fingerprint(schema: dict) -> str:
    """CRC-64-AVRO of the schema's Parsing Canonical Form, as the hex of the
    8 bytes that follow the marker on the wire."""
    return fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")


def full_name(schema: dict) -> str:
    namespace = schema.get("namespace")
    return f"{namespace}.{schema['name']}" if namespace else schema["name"]


class Schemas:
    """The reader schema and every released writer schema of its record, by fingerprint."""

    def __init__(self, directory: pathlib.Path):
        with open(directory / "result.avsc", encoding="utf-8") as file:
            reader = json.load(file)
        self.name = full_name(reader)
        self.reader = parse_schema(reader)
        # Versions that differ only in what the canonical form strips (doc,
        # defaults, logical types) share a fingerprint and decode alike.
        self.writers = {}
        self.files = {}
        for path in sorted(directory.glob("*.avsc")) + sorted(directory.glob("history/*/*.avsc")):
            with open(path, encoding="utf-8") as file:
                schema = json.load(file)
            if full_name(schema) != self.name:
                continue
            written_with = wire_fingerprint(schema)
            self.writers[written_with] = parse_schema(schema)
            self.files.setdefault(written_with, []).append(str(path.relative_to(directory)))

    def decode(self, value: bytes) -> dict:
        """The result event in `value`; ValueError if it is not one."""
        if value is None or not value.startswith(MARKER):
            raise ValueError("not an Avro single-object encoded value (no C3 01 marker)")
        if len(value) < HEADER_LENGTH:
            raise ValueError("not an Avro single-object encoded value (no room for a fingerprint)")
        written_with = value[len(MARKER) : HEADER_LENGTH].hex()
        writer = self.writers.get(written_with)
        if writer is None:
            raise ValueError(f"unknown writer schema: fingerprint {written_with}")
        body = io.BytesIO(value[HEADER_LENGTH:])
        record = schemaless_reader(body, writer, self.reader)
        if body.tell() != len(value) - HEADER_LENGTH:
            raise ValueError("trailing bytes after the datum")
        return record


def to_json(value):
    """json.dumps' fallback for the logical types fastavro decodes."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(milliseconds=1)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def consumer(args) -> Consumer:
    config = {
        "bootstrap.servers": args.bootstrap_servers,
        # Required by the client even when partitions are assigned directly.
        "group.id": args.group_id or f"onceflow-results-example-{uuid.uuid4()}",
        "enable.auto.commit": bool(args.group_id),
        "auto.offset.reset": "earliest",
    }
    kafka = Consumer(config)
    if args.group_id:
        kafka.subscribe([args.topic])
        return kafka
    metadata = kafka.list_topics(args.topic, timeout=30)
    topic = metadata.topics.get(args.topic)
    if topic is None or topic.error is not None:
        raise SystemExit(f"topic {args.topic}: {topic.error if topic else 'not found'}")
    kafka.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in sorted(topic.partitions)])
    return kafka


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="onceflow.results")
    parser.add_argument("--group-id", help="join this consumer group instead of reading every partition from the start")
    parser.add_argument("--schemas", type=pathlib.Path, default=REPO_SCHEMAS, help="onceflow's schemas/ directory")
    parser.add_argument("--count", type=int, help="stop after this many results")
    parser.add_argument("--idle-timeout", type=float, help="stop when no record arrived for this many seconds")
    parser.add_argument("--list-schemas", action="store_true", help="print the known writer schemas and exit")
    args = parser.parse_args()

    schemas = Schemas(args.schemas)
    if args.list_schemas:
        for written_with, files in schemas.files.items():
            print(json.dumps({"name": schemas.name, "fingerprint": written_with, "files": files}))
        return 0

    kafka = consumer(args)
    read = undecodable = 0
    last_arrival = time.monotonic()
    try:
        while args.count is None or read < args.count:
            if args.idle_timeout is not None and time.monotonic() - last_arrival > args.idle_timeout:
                break
            message = kafka.poll(0.5)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            last_arrival = time.monotonic()
            try:
                event = schemas.decode(message.value())
            # Whatever the decoder raises (a bad header, a truncated or
            # corrupt datum) means this one value cannot be read.
            except Exception as error:  # noqa: BLE001
                undecodable += 1
                where = f"{message.topic()}/{message.partition()}@{message.offset()}"
                print(f"results_consumer: skipped {where}: {error}", file=sys.stderr)
                continue
            print(json.dumps(event, default=to_json), flush=True)
            read += 1
    except KeyboardInterrupt:
        pass
    finally:
        kafka.close()
    if undecodable:
        return 2
    if args.count is not None and read < args.count:
        print(f"results_consumer: read {read} of {args.count} results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
