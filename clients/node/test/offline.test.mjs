// Offline verification of the Node.js kit, no server: keys and leases are signed here
// with a freshly generated Ed25519 key, the way a licensed server signs them.
// Run: node --test test/offline.test.mjs (from clients/node)
import assert from 'node:assert/strict';
import { createHash, createHmac, generateKeyPairSync } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { exportJWK, SignJWT } from 'jose';

import { LicenseClient, MESSAGES, machineHash, machineId, machineLabel } from '../licensed-client.mjs';

const NOW = 1_800_000_000;
const DAY = 86400;
const ISSUER = 'https://licenses.example';
const MACHINE = machineId('unit-test', 'fingerprint-a');

// Every fixture's folder, removed once the file's tests are done (passed or failed).
const folders = [];
after(() => Promise.all(folders.map((dir) => rm(dir, { recursive: true, force: true }))));

function signer(kid) {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return { kid, privateKey, publicKey };
}

async function jwkOf(key) {
  return { ...(await exportJWK(key.publicKey)), kid: key.kid, alg: 'EdDSA', use: 'sig' };
}

async function sign(key, claims) {
  return new SignJWT(claims).setProtectedHeader({ alg: 'EdDSA', typ: 'JWT', kid: key.kid }).sign(key.privateKey);
}

function b64json(value) {
  return Buffer.from(JSON.stringify(value)).toString('base64url');
}

function claimsOf(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
}

async function fixture({
  sub = 'lic_test',
  tier = 'PRO',
  leaseExp = NOW + 7 * DAY,
  keyExp = NOW + 37 * DAY,
  machine = MACHINE,
  mid = machineHash(MACHINE),
} = {}) {
  const key = signer('k1');
  const jwks = { keys: [await jwkOf(key)] };
  const base = { iss: ISSUER, sub, prod: 'dashcaddy', tier, ent: ['sso'], iat: NOW };
  const token = await sign(key, { ...base, max: 1, exp: keyExp });
  const licenseKey = `DC-${tier}-${token}`;
  const lease = await sign(key, { ...base, mid, exp: leaseExp });
  const dir = await mkdtemp(join(tmpdir(), 'licensed-client-'));
  folders.push(dir);
  const statePath = join(dir, 'license.json');
  const state = { format: 1, key: licenseKey, lease, machine_id: machine, code: 'VALID' };
  await writeFile(statePath, JSON.stringify(state));
  let now = NOW;
  const client = (options = {}) =>
    new LicenseClient({
      serverUrl: 'http://127.0.0.1:9',
      jwks,
      statePath,
      keyPrefix: 'DC',
      product: 'dashcaddy',
      issuer: ISSUER,
      machineId: machine,
      now: () => now,
      ...options,
    });
  return {
    key,
    jwks,
    licenseKey,
    lease,
    state,
    statePath,
    dir,
    client,
    base,
    setNow: (value) => {
      now = value;
    },
    write: (changes) => writeFile(statePath, JSON.stringify({ ...state, ...changes })),
  };
}

describe('offline verification', () => {
  it('accepts the stored key and lease until the lease expires, then refuses', async () => {
    const f = await fixture();
    const ok = await f.client().checkOffline();
    assert.equal(ok.code, 'VALID');
    assert.equal(ok.valid, true);
    assert.equal(ok.online, false);
    assert.equal(ok.leaseExpiresAt, NOW + 7 * DAY);
    assert.deepEqual(ok.features, ['sso']);
    f.setNow(NOW + 7 * DAY - 0.5);
    assert.equal((await f.client().checkOffline()).valid, true);
    f.setNow(NOW + 7 * DAY);
    const late = await f.client().checkOffline();
    assert.equal(late.code, 'EXPIRED');
    assert.equal(late.valid, false);
    assert.equal(late.message, MESSAGES.EXPIRED);
  });

  it('strips the exact prefix: a JWS full of "-" still parses', async () => {
    let withDash = 0;
    for (let i = 0; i < 40; i += 1) {
      const f = await fixture({ sub: `lic_${i}~~~>>>???` });
      if (f.licenseKey.slice('DC-PRO-'.length).includes('-')) withDash += 1;
      const result = await f.client().checkOffline();
      assert.equal(result.valid, true, result.reason);
    }
    assert.ok(withDash > 0, 'no key had a "-" in its JWS');
  });

  it('falls back offline when the server cannot be reached', async () => {
    const f = await fixture();
    const result = await f.client({ timeoutMs: 2000 }).validate();
    assert.equal(result.valid, true);
    assert.equal(result.online, false);
    assert.match(result.reason, /not reached/);
  });

  const tampers = {
    'lease claims changed': async (f) => ({
      lease: f.lease.replace(/\.[^.]+\./, `.${b64json({ ...claimsOf(f.lease), exp: NOW + 999 * DAY })}.`),
    }),
    'lease alg none': async (f) => ({
      lease: `${b64json({ alg: 'none', typ: 'JWT', kid: 'k1' })}.${b64json({ ...claimsOf(f.lease), exp: NOW + 999 * DAY })}.`,
    }),
    'lease HS256 keyed with the public key': async (f) => {
      const head = b64json({ alg: 'HS256', typ: 'JWT', kid: 'k1' });
      const body = b64json({ ...claimsOf(f.lease), exp: NOW + 999 * DAY });
      const mac = createHmac('sha256', f.jwks.keys[0].x).update(`${head}.${body}`).digest('base64url');
      return { lease: `${head}.${body}.${mac}` };
    },
    'lease signed by another key with the same kid': async (f) => ({
      lease: await sign(signer('k1'), { ...claimsOf(f.lease), exp: NOW + 999 * DAY }),
    }),
    'lease signed by an unknown kid': async (f) => ({ lease: await sign(signer('k9'), claimsOf(f.lease)) }),
    'lease without exp': async (f) => {
      const { exp, ...rest } = claimsOf(f.lease);
      return { lease: await sign(f.key, rest) };
    },
    'lease from another issuer': async (f) => ({ lease: await sign(f.key, { ...claimsOf(f.lease), iss: 'https://x' }) }),
    'key tier text changed': async (f) => ({ key: f.licenseKey.replace('DC-PRO-', 'DC-TEAM-') }),
    'key prefix changed': async (f) => ({ key: f.licenseKey.replace('DC-', 'DT-') }),
    'key claims changed': async (f) => {
      const token = f.licenseKey.slice('DC-PRO-'.length);
      const forged = token.replace(/\.[^.]+\./, `.${b64json({ ...claimsOf(token), exp: NOW + 999 * DAY })}.`);
      return { key: `DC-PRO-${forged}` };
    },
  };
  for (const [name, change] of Object.entries(tampers)) {
    it(`refuses a tampered state file: ${name}`, async () => {
      const f = await fixture();
      await f.write(await change(f));
      const result = await f.client().checkOffline();
      assert.equal(result.valid, false);
      assert.equal(result.code, 'INVALID_KEY', result.reason);
    });
  }

  it('refuses a lease of another machine or another license', async () => {
    const f = await fixture();
    await f.write({ lease: await sign(f.key, { ...claimsOf(f.lease), mid: machineHash('elsewhere') }) });
    assert.equal((await f.client().checkOffline()).code, 'MACHINE_NOT_ACTIVATED');
    await f.write({ lease: await sign(f.key, { ...claimsOf(f.lease), sub: 'lic_other' }) });
    assert.equal((await f.client().checkOffline()).code, 'MACHINE_NOT_ACTIVATED');
    await f.write({});
    assert.equal((await f.client({ machineId: machineId('unit-test', 'fingerprint-b') }).checkOffline()).code, 'MACHINE_NOT_ACTIVATED');
  });

  it('takes a lease for the machine id as the server hashes it: trimmed, NFC', async () => {
    const spelled = '  Ce\u0301line-box ';
    for (const mid of [machineHash('C\u00e9line-box'), machineHash(spelled)]) {
      const f = await fixture({ machine: spelled, mid });
      assert.equal((await f.client().checkOffline()).valid, true);
    }
    const other = await fixture({ machine: spelled, mid: machineHash('Celine-box') });
    assert.equal((await other.client().checkOffline()).code, 'MACHINE_NOT_ACTIVATED');
  });

  it('refuses a key of another product', async () => {
    const f = await fixture();
    const result = await f.client({ product: 'desktop' }).checkOffline();
    assert.equal(result.code, 'PRODUCT_MISMATCH');
  });

  it('repeats a denial the server gave, and needs a key to be activated', async () => {
    const f = await fixture();
    await f.write({ lease: undefined, code: 'REVOKED' });
    assert.equal((await f.client().checkOffline()).code, 'REVOKED');
    await f.write({ key: undefined, lease: undefined, code: 'DEACTIVATED' });
    assert.equal((await f.client().checkOffline()).code, 'DEACTIVATED');
    await writeFile(f.statePath, '{not json');
    assert.equal((await f.client().checkOffline()).code, 'MACHINE_NOT_ACTIVATED');
  });

  it('writes the state file atomically, readable by its owner only', async () => {
    const f = await fixture();
    const client = f.client();
    await client.writeState({ ...f.state, code: 'GRACE_PERIOD', lease: null });
    const stored = JSON.parse(await readFile(f.statePath, 'utf8'));
    assert.equal(stored.code, 'GRACE_PERIOD');
    assert.equal('lease' in stored, false);
    assert.deepEqual(await readdir(f.dir), ['license.json']);
    if (process.platform !== 'win32') {
      const { stat } = await import('node:fs/promises');
      assert.equal((await stat(f.statePath)).mode & 0o777, 0o600);
    }
  });
});

describe('machine id', () => {
  it('is HMAC-SHA256 of the trimmed fingerprint keyed with the salt', () => {
    const expected = createHmac('sha256', 'app').update('abc').digest('hex');
    assert.equal(machineId('app', ' abc\n'), expected);
    assert.notEqual(machineId('other', 'abc'), expected);
    assert.match(machineId('app'), /^[0-9a-f]{64}$/);
    assert.equal(machineId('app'), machineId('app'));
    assert.equal(machineHash('m'), createHash('sha256').update('m').digest('hex'));
    assert.throws(() => machineId(''), /salt/);
  });
});

describe('machine label', () => {
  it('is the host name by default, cleaned and cut to 64 characters', () => {
    assert.equal(machineLabel(), machineLabel(hostname()));
    assert.equal(machineLabel(' web-1\t(old)\u200b\n'), 'web-1 (old)');
    assert.equal(machineLabel('\u202e\u0000 '), null);
    const long = machineLabel(`${'\u{1F5A5}'.repeat(70)}`);
    assert.equal(Array.from(long).length, 64);
    assert.throws(() => machineLabel(42), /text/);
  });

  it('is sent on activation, never as the machine id', () => {
    const base = { serverUrl: 'http://127.0.0.1:9', jwks: { keys: [] }, statePath: '/nonexistent/x', keyPrefix: 'DC' };
    const jwks = { keys: [{ kty: 'OKP', crv: 'Ed25519', kid: 'k', x: 'AAAA' }] };
    const named = new LicenseClient({ ...base, jwks, machineId: MACHINE, label: 'nas' });
    assert.deepEqual(named.body('DC-PRO-x', MACHINE, true), { key: 'DC-PRO-x', machine_id: MACHINE, label: 'nas' });
    assert.deepEqual(named.body('DC-PRO-x', MACHINE), { key: 'DC-PRO-x', machine_id: MACHINE });
    assert.equal(new LicenseClient({ ...base, jwks }).label, machineLabel());
    assert.equal(new LicenseClient({ ...base, jwks, label: '' }).label, null);
    assert.throws(() => new LicenseClient({ ...base, jwks, machineId: MACHINE, label: MACHINE }), /machine id/);
  });
});
