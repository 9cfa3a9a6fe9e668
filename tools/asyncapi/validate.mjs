// Validates an AsyncAPI document with the official parser (@asyncapi/parser: the spec's
// JSON Schema, references, bindings and its spectral rules), then every message
// example against its payload schema (Ajv, draft 07 as AsyncAPI schemas are), which
// the parser does not do. Usage: node validate.mjs FILE. Prints one diagnostic a
// line; exits 1 on any error or warning.
import Ajv from "ajv";
import { Parser, fromFile } from "@asyncapi/parser";

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate.mjs FILE");
  process.exit(2);
}
const severities = ["error", "warning", "info", "hint"];
const { document, diagnostics } = await fromFile(new Parser(), file).parse();
let bad = 0;
for (const d of diagnostics) {
  if (d.severity <= 1) bad += 1;
  const where = d.path.join(".") || "(root)";
  console.log(`${severities[d.severity] ?? d.severity}: ${d.code}: ${d.message} at ${where}`);
}
if (!document) {
  console.log("invalid: the document could not be parsed");
  process.exit(1);
}
// Not strict: payload schemas carry descriptions, titles and the parser's x- keys.
const ajv = new Ajv({ strict: false, allErrors: true });
let examples = 0;
for (const message of document.allMessages()) {
  const validate = ajv.compile(message.payload().json());
  for (const example of message.examples()) {
    examples += 1;
    if (!validate(example.payload())) {
      bad += 1;
      const errors = ajv.errorsText(validate.errors);
      console.log(`error: example ${example.name()} of ${message.id()}: ${errors}`);
    }
  }
}
if (examples === 0) bad += 1;
console.log(
  bad
    ? `invalid: ${bad} problems`
    : `valid: AsyncAPI ${document.version()}, ${examples} examples match their payloads`,
);
process.exit(bad ? 1 : 0);
