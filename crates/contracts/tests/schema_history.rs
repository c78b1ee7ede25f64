//! The released writer schemas (`schemas/history/`): every one is still there
//! and unchanged, the current schemas are the newest of them, and every pair
//! of versions of a family is backward and forward compatible, so a reader on
//! any version reads what any other version wrote.
//!
//! Releasing a new version of `schemas/<family>.avsc`: add
//! `schemas/history/<family>/v<N+1>.avsc`, copy it over `schemas/<family>.avsc`,
//! add it to `RELEASES` in `src/schema.rs`, and add the line these tests print
//! to `schemas/history/fingerprints.txt`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use apache_avro::schema_compatibility::SchemaCompatibility;
use onceflow_contracts::schema::{self, RELEASES};
use sha2::{Digest, Sha256};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `.avsc` files directly in `dir`, by name without the extension.
fn avsc_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| name.strip_suffix(".avsc").map(str::to_owned))
        .collect()
}

/// `schemas/history/fingerprints.txt`: path → (wire fingerprint, SHA-256 of the file).
fn committed() -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(schemas_dir().join("history/fingerprints.txt")).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            [path, fingerprint, sha256] => (path.to_owned(), (fingerprint.to_owned(), sha256.to_owned())),
            _ => panic!("fingerprints.txt: `{line}` is not `<path> <fingerprint> <sha256>`"),
        })
        .collect()
}

#[test]
fn every_file_in_history_is_a_release_and_versions_count_up_from_one() {
    let history = schemas_dir().join("history");
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(&history).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            let family = entry.file_name().into_string().unwrap();
            on_disk.extend(avsc_files(&entry.path()).into_iter().map(|version| format!("{family}/{version}.avsc")));
        }
    }
    let compiled_in: BTreeSet<String> = RELEASES.iter().map(|r| r.path()).collect();
    assert_eq!(on_disk, compiled_in, "the files in schemas/history/ and RELEASES in src/schema.rs differ");

    let mut versions: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for release in RELEASES {
        versions.entry(release.family).or_default().push(release.version);
    }
    for (family, versions) in versions {
        let expected: Vec<u32> = (1..=versions.len() as u32).collect();
        assert_eq!(versions, expected, "{family}: RELEASES lists v1, v2, ... in order, none missing");
    }
}

#[test]
fn no_released_schema_changed_or_went_missing() {
    let committed = committed();
    let mut problems = Vec::new();
    for release in RELEASES {
        let path = release.path();
        let fingerprint = hex(release.parse().fingerprint());
        let sha256 = hex(&Sha256::digest(release.text));
        match committed.get(&path) {
            None => problems.push(format!(
                "{path} is not in fingerprints.txt; if it is a new release, add the line\n    {path} {fingerprint} {sha256}"
            )),
            Some((want_fingerprint, want_sha256)) if (want_fingerprint, want_sha256) != (&fingerprint, &sha256) => {
                problems.push(format!(
                    "{path} changed after its release (fingerprint {fingerprint}, sha256 {sha256}; released as \
                     {want_fingerprint}, {want_sha256}): a released schema never changes, since values written \
                     with it are read with it; restore it and release the change as a new version"
                ));
            }
            Some(_) => {}
        }
    }
    for path in committed.keys() {
        if !RELEASES.iter().any(|r| &r.path() == path) {
            problems.push(format!("{path} was released and is gone: readers need it for the values it wrote"));
        }
    }
    assert!(problems.is_empty(), "schemas/history:\n{}", problems.join("\n"));
}

#[test]
fn the_current_schemas_are_the_newest_releases() {
    let current = [
        ("command", schema::COMMAND_AVSC),
        ("result", schema::RESULT_AVSC),
        ("webhook-endpoint-state", onceflow_contracts::endpoint::ENDPOINT_STATE_AVSC),
    ];
    let families: BTreeSet<&str> = RELEASES.iter().map(|r| r.family).collect();
    assert_eq!(families, current.iter().map(|(family, _)| *family).collect());
    assert_eq!(avsc_files(&schemas_dir()), families.iter().map(|f| (*f).to_owned()).collect());
    for (family, text) in current {
        let newest = RELEASES.iter().filter(|r| r.family == family).max_by_key(|r| r.version).unwrap();
        assert!(
            text == newest.text,
            "schemas/{family}.avsc differs from its newest release, schemas/history/{}: change a schema by \
             releasing a new version and copying it to schemas/{family}.avsc",
            newest.path()
        );
    }
}

/// Reader versions not checked here against later writers, per family:
/// (family, oldest reader checked against every writer, first writer
/// version it matters for). `result` v3 added the status `cancelled`:
/// - a v2 reader reads it as `processing`, its enum's default, which
///   apache-avro's resolution applies (`result::tests::
///   a_reader_of_version_2_reads_cancelled_as_processing` in
///   `src/result.rs` shows it) but its static checker here does not, since it
///   asks every writer symbol to be a reader symbol;
/// - a v1 reader cannot read it at all: v1's enum has no default (v2 added
///   it so that statuses could be added). Consumers on v1 must move to v2
///   before a producer writes v3; every v1 reader still reads v1 and v2.
const OLDEST_FORWARD_READER: &[(&str, u32, u32)] = &[("result", 3, 3)];

/// Whether a `reader` release must read what `writer` wrote.
fn must_read(reader: &schema::Release, writer: &schema::Release) -> bool {
    match OLDEST_FORWARD_READER.iter().find(|(family, _, _)| *family == reader.family) {
        Some((_, oldest, needed_from)) => reader.version >= *oldest || writer.version < *needed_from,
        None => true,
    }
}

#[test]
fn every_pair_of_versions_is_backward_and_forward_compatible() {
    let parsed: Vec<_> = RELEASES.iter().map(|release| (release, release.parse())).collect();
    let mut pairs = 0;
    for (writer, written) in &parsed {
        for (reader, reads) in parsed.iter().filter(|(r, _)| r.family == writer.family && must_read(r, writer)) {
            if let Err(error) = SchemaCompatibility::can_read(&written.schema, &reads.schema) {
                panic!("a {} reader cannot read what {} wrote: {error}", reader.path(), writer.path());
            }
            pairs += 1;
        }
    }
    assert!(pairs >= RELEASES.len(), "every release was checked, at least against itself");
}
