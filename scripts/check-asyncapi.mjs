// Validates onceflow's AsyncAPI document with the official parser.
//
//   node scripts/check-asyncapi.mjs [asyncapi.yaml]
//
// The parser packages are not vendored: ONCEFLOW_ASYNCAPI_MODULES names the
// directory whose node_modules holds @asyncapi/parser and
// @asyncapi/avro-schema-parser (scripts/check-asyncapi.sh installs them there).
//
// Checks:
// 1. the document parses and validates as AsyncAPI, with the Avro schema
//    parser registered so `schemaFormat: application/vnd.apache.avro...`
//    payloads are resolved from their $ref'd .avsc files and validated too;
//    any error-severity diagnostic fails the check (warnings are printed);
// 2. every schemas/*.avsc is referenced by the document, every .avsc it
//    references exists, and each is a valid Avro schema, as is every released
//    version in schemas/history/<family>/ (which the document does not reference);
// 3. every Avro payload really was converted (its properties match the
//    record's fields), so a $ref that silently resolved to nothing is caught;
// 4. every message example conforms to the message's headers and payload
//    schemas (the parser does not check examples in AsyncAPI 3 documents).

import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..');
const documentPath = path.resolve(process.argv[2] ?? path.join(repoRoot, 'asyncapi.yaml'));
const modulesDir = process.env.ONCEFLOW_ASYNCAPI_MODULES;
if (!modulesDir) {
  console.error('ONCEFLOW_ASYNCAPI_MODULES is not set (run scripts/check-asyncapi.sh)');
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(modulesDir), 'package.json'));
const { Parser, fromFile, DiagnosticSeverity } = require('@asyncapi/parser');
const { AvroSchemaParser } = require('@asyncapi/avro-schema-parser');
const yaml = require('js-yaml');
const Ajv = require('ajv');
const addFormats = require('ajv-formats');

const AVRO_FORMAT = /^application\/vnd\.apache\.avro(\+json|\+yaml)?;version=/;
const severityName = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

let failures = 0;
const fail = (message) => {
  failures += 1;
  console.error(`error: ${message}`);
};

// 1. Parse and validate.
const parser = new Parser();
parser.registerSchemaParser(AvroSchemaParser());
const { document, diagnostics } = await fromFile(parser, documentPath).parse();
const relative = path.relative(process.cwd(), documentPath) || documentPath;
for (const d of diagnostics) {
  const where = d.range ? `${relative}:${d.range.start.line + 1}:${d.range.start.character + 1}` : relative;
  const at = d.path && d.path.length ? ` at ${d.path.join('.')}` : '';
  const line = `${where}: ${severityName[d.severity] ?? d.severity}: ${d.message}${at} [${d.code}]`;
  if (d.severity === DiagnosticSeverity.Error) {
    fail(line);
  } else {
    console.log(line);
  }
}
if (!document) {
  fail(`${relative} did not parse`);
}

// 2. Every .avsc in schemas/ is referenced, and every referenced one exists.
const raw = yaml.load(readFileSync(documentPath, 'utf8'));
const documentDir = path.dirname(documentPath);
const referenced = new Set();
(function walk(node) {
  if (Array.isArray(node)) {
    node.forEach(walk);
  } else if (node && typeof node === 'object') {
    for (const [key, value] of Object.entries(node)) {
      if (key === '$ref' && typeof value === 'string' && /\.avsc(#.*)?$/.test(value)) {
        referenced.add(path.resolve(documentDir, value.replace(/#.*$/, '')));
      } else {
        walk(value);
      }
    }
  }
})(raw);
const schemasDir = path.join(repoRoot, 'schemas');
const shipped = readdirSync(schemasDir)
  .filter((name) => name.endsWith('.avsc'))
  .map((name) => path.join(schemasDir, name));
if (shipped.length === 0) {
  fail(`no .avsc files in ${schemasDir}`);
}
const historyDir = path.join(schemasDir, 'history');
const released = readdirSync(historyDir, { withFileTypes: true })
  .filter((entry) => entry.isDirectory())
  .flatMap((family) =>
    readdirSync(path.join(historyDir, family.name))
      .filter((name) => name.endsWith('.avsc'))
      .map((name) => path.join(historyDir, family.name, name)),
  );
if (released.length < shipped.length) {
  fail(`${path.relative(repoRoot, historyDir)} holds fewer releases than schemas/ has schemas`);
}
for (const file of shipped) {
  if (!referenced.has(file)) {
    fail(`${path.relative(repoRoot, file)} is not referenced by ${relative}`);
  }
}
// The parser (3.x) runs a custom format's validate() only for AsyncAPI 2
// documents, so each Avro schema is validated here with the same Avro schema
// parser (avsc underneath).
const avroParser = AvroSchemaParser();
for (const file of new Set([...shipped, ...referenced, ...released])) {
  const name = path.relative(repoRoot, file);
  if (!existsSync(file)) {
    fail(`${relative} references ${name}, which does not exist`);
    continue;
  }
  let data;
  try {
    data = JSON.parse(readFileSync(file, 'utf8'));
  } catch (error) {
    fail(`${name}: not JSON: ${error.message}`);
    continue;
  }
  for (const problem of await avroParser.validate({ data, path: [name] })) {
    fail(`${name}: invalid Avro schema: ${problem.message}`);
  }
}

// 3. Each Avro payload was resolved and converted: its properties are the
//    fields of the record in the .avsc file it references.
let avroPayloads = 0;
if (document) {
  const rawMessages = raw?.components?.messages ?? {};
  for (const message of document.allMessages().all()) {
    if (!AVRO_FORMAT.test(message.schemaFormat() ?? '')) {
      continue;
    }
    avroPayloads += 1;
    const name = message.name() ?? message.id();
    const ref = rawMessages[message.id()]?.payload?.schema?.$ref;
    if (typeof ref !== 'string' || !/\.avsc$/.test(ref)) {
      fail(`message ${name}: expected components.messages.${message.id()}.payload.schema.$ref to name an .avsc file`);
      continue;
    }
    const avro = JSON.parse(readFileSync(path.resolve(documentDir, ref), 'utf8'));
    const fields = (avro.fields ?? []).map((f) => f.name).sort();
    const properties = Object.keys(message.payload()?.properties() ?? {}).sort();
    if (fields.length === 0) {
      fail(`message ${name}: ${ref} has no record fields`);
    } else if (JSON.stringify(fields) !== JSON.stringify(properties)) {
      fail(`message ${name}: converted payload properties [${properties}] differ from the fields of ${ref} [${fields}]`);
    }
  }
  if (avroPayloads === 0) {
    fail('no message has an Avro payload');
  }
}

// 4. Examples conform to their message's schemas.
let examplesChecked = 0;
if (document) {
  const ajv = new Ajv({ strict: false, allErrors: true });
  addFormats(ajv);
  const clean = (value) => JSON.parse(JSON.stringify(value, (key, v) => (key.startsWith('x-parser-') ? undefined : v)));
  for (const message of document.allMessages().all()) {
    const name = message.name() ?? message.id();
    // A multi-format schema ({schemaFormat, schema}) holds its converted
    // JSON Schema in `schema`.
    const unwrap = (json) => (json && json.schemaFormat !== undefined && json.schema !== undefined ? json.schema : json);
    const schemas = {
      headers: unwrap(message.headers()?.json()),
      payload: unwrap(message.payload()?.json()),
    };
    for (const example of message.examples().all()) {
      const label = `message ${name}, example ${example.name() ?? '(unnamed)'}`;
      for (const part of ['headers', 'payload']) {
        const value = part === 'headers' ? example.headers() : example.payload();
        if (value === undefined) {
          continue;
        }
        if (!schemas[part]) {
          fail(`${label}: has ${part} but the message defines no ${part} schema`);
          continue;
        }
        const validate = ajv.compile(clean(schemas[part]));
        examplesChecked += 1;
        if (!validate(value)) {
          for (const e of validate.errors) {
            fail(`${label}: ${part}${e.instancePath} ${e.message}`);
          }
        }
      }
    }
  }
}

if (failures > 0) {
  console.error(`${relative}: ${failures} error(s)`);
  process.exit(1);
}
console.log(
  `${relative}: valid AsyncAPI ${document.version()} — ${document.allChannels().length} channels, ` +
    `${document.allOperations().length} operations, ${document.allMessages().length} messages, ` +
    `${avroPayloads} Avro payloads from ${shipped.length} .avsc file(s) (${released.length} released versions valid), ` +
    `${examplesChecked} example part(s) conform`,
);
