// Verifies licensed's license keys and leases with jose, knowing only the JWKS.
//
// stdin: {"jwks": {...}, "tokens": ["eyJ…", …], "issuer": "http://…", "now": <epoch seconds>}
// stdout: one result per token, in order:
//   {"ok": true, "header": {...}, "payload": {...}} or {"ok": false, "code": "ERR_…", "message": "…"}
import { readFileSync } from 'node:fs';
import { createLocalJWKSet, jwtVerify } from 'jose';

const input = JSON.parse(readFileSync(0, 'utf8'));
const keySet = createLocalJWKSet(input.jwks);
const results = [];
for (const token of input.tokens) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token, keySet, {
      algorithms: ['EdDSA'],
      issuer: input.issuer,
      currentDate: new Date(input.now * 1000),
      requiredClaims: ['exp', 'iat', 'sub'],
    });
    results.push({ ok: true, header: protectedHeader, payload });
  } catch (err) {
    results.push({ ok: false, code: err.code ?? err.name, message: String(err.message) });
  }
}
process.stdout.write(JSON.stringify(results));
