// Drives the Node.js client kit for the Python tests: one JSON request per line on
// standard input, one JSON answer per line on standard output. Every request builds a
// new LicenseClient, so all that carries over between calls is the state file, as
// between two starts of an application. An error answers {"error": name, "message"}.
import { createInterface } from 'node:readline';

import {
  CODES,
  LicenseClient,
  MESSAGES,
  RELEASE_MESSAGES,
  VALID_CODES,
  machineFingerprint,
  machineId,
  machineLabel,
} from '../clients/node/licensed-client.mjs';

async function run(args) {
  if (args.op === 'machine-id') {
    return {
      fingerprint: machineFingerprint(),
      ids: args.pairs.map(([salt, fingerprint]) => machineId(salt, fingerprint ?? undefined)),
    };
  }
  if (args.op === 'codes') {
    return {
      codes: CODES,
      valid: VALID_CODES,
      messages: MESSAGES,
      releaseMessages: RELEASE_MESSAGES,
    };
  }
  if (args.op === 'machine-label') return { labels: args.texts.map((t) => machineLabel(t ?? undefined)) };
  const client = new LicenseClient({
    serverUrl: args.serverUrl,
    jwks: args.jwks,
    statePath: args.statePath,
    keyPrefix: args.keyPrefix,
    product: args.product ?? null,
    issuer: args.issuer ?? null,
    machineId: args.machineId ?? null,
    now: () => args.now,
    timeoutMs: 5000,
    persistJwks: Boolean(args.persistJwks),
    label: args.label ?? null,
  });
  switch (args.op) {
    case 'activate':
      return client.activate(args.key, args.activateMachineId ?? null);
    case 'validate':
      return client.validate();
    case 'deactivate':
      return client.deactivate();
    case 'offline':
      return client.checkOffline();
    case 'machines':
      return client.machines(args.key ?? null);
    case 'release':
      return client.release(args.machine, args.key ?? null);
    default:
      throw new Error(`unknown op ${args.op}`);
  }
}

for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  let answer;
  try {
    answer = { ok: await run(JSON.parse(line)) };
  } catch (err) {
    answer = { error: err.name, message: err.message };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
