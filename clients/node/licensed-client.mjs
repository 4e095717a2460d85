// Client kit for a licensed server: drop this one module into a Node.js application
// (a DashCaddy server, an Electron app). Needs Node.js 20+ and `jose`.
//
//   activate(key, machineId)  takes a seat for this machine; stores the key and the lease
//   validate()                asks the server again (at start-up and periodically); stores a
//                             renewed key or a fresh lease; falls back to the stored lease
//                             when the server cannot be reached
//   deactivate()              frees this machine's seat so the license can move
//   machines(key?)            lists the machines holding the license's seats, with their labels
//   release(id, key?)         frees the seat of another machine (dead, reinstalled) by its id
//                             from that list, so that a new machine can activate
//   checkOffline()            judges the stored key and lease with the public keys alone
//
// The rule when the server cannot be reached: licensed until the stored lease's `exp`,
// and not one second longer. A lease is trusted only after its EdDSA signature verifies
// against the JWKS, its `mid` equals SHA-256 of this machine's id and its `sub` names the
// stored key's license. A "valid" answer from the server is believed only with such a
// lease; a "not valid" answer is believed at once and drops the stored lease, so a
// revoked license stops at the next online check.

import { createHash, createHmac, randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { hostname, networkInterfaces } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { createLocalJWKSet, decodeProtectedHeader, errors as joseErrors, jwtVerify } from 'jose';

export const VERSION = '0.1.0';

export const CODES = Object.freeze([
  'VALID',
  'GRACE_PERIOD',
  'EXPIRED',
  'REVOKED',
  'SUSPENDED',
  'INVALID_KEY',
  'NOT_FOUND',
  'PRODUCT_MISMATCH',
  'TOO_MANY_MACHINES',
  'DEACTIVATED',
  'MACHINE_NOT_ACTIVATED',
]);
export const VALID_CODES = Object.freeze(['VALID', 'GRACE_PERIOD']);

/** What release() says for its own two outcomes (other codes: MESSAGES). */
export const RELEASE_MESSAGES = Object.freeze({
  DEACTIVATED: 'The machine has been released: its seat is free for another machine.',
  MACHINE_NOT_ACTIVATED: 'That machine holds no seat any more (it may have been released already).',
});

/** What an application may show its user for each code. */
export const MESSAGES = Object.freeze({
  VALID: 'Your license is active.',
  GRACE_PERIOD:
    'Your last payment did not go through. The license keeps working for a few days: ' +
    'please update your payment method.',
  EXPIRED: 'Your license has expired. Renew it to keep using the product.',
  REVOKED: 'This license has been revoked. Please contact support.',
  SUSPENDED:
    'This license is suspended for now (payment dispute, paused subscription or on hold). ' +
    'Please contact support.',
  INVALID_KEY: 'This license key is not valid. Check that it was copied completely.',
  NOT_FOUND: 'This license key is not known to the license server.',
  PRODUCT_MISMATCH: 'This license key belongs to another product.',
  TOO_MANY_MACHINES:
    'This license is in use on as many machines as it allows. Deactivate it on another machine first.',
  DEACTIVATED: 'This machine has been deactivated. The license can now be activated on another machine.',
  MACHINE_NOT_ACTIVATED: 'This machine is not activated. Enter your license key to activate it.',
});

const ALGORITHM = 'EdDSA';
const MAX_TOKEN_LENGTH = 8192;
const MAX_ANSWER_BYTES = 1 << 20;
const STATE_FORMAT = 1;
const MAX_LABEL_LENGTH = 64;
// Codes a server answer leaves in the state file: the offline check repeats them.
const DENIALS = new Set([
  'EXPIRED',
  'REVOKED',
  'SUSPENDED',
  'INVALID_KEY',
  'NOT_FOUND',
  'PRODUCT_MISMATCH',
  'TOO_MANY_MACHINES',
]);

// --- errors and results -------------------------------------------------------------

export class LicenseClientError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** No usable answer: network down, timeout, 429, 5xx, or an answer that does not verify. */
export class ServerUnreachable extends LicenseClientError {}

/** The server refused the request itself (4xx with its error body): a bug or a misconfiguration. */
export class ServerError extends LicenseClientError {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.serverMessage = message;
  }
}

class Refused extends Error {
  constructor(code, reason) {
    super(reason);
    this.code = code;
    this.reason = reason;
  }
}

function result(code, valid, online, license = null, extra = {}) {
  return {
    code,
    valid,
    online,
    license,
    leaseExpiresAt: extra.leaseExpiresAt ?? null,
    features: extra.features ?? [],
    reason: extra.reason ?? '',
    message: extra.message || (MESSAGES[code] ?? code),
  };
}

// --- machine id ---------------------------------------------------------------------

/**
 * A stable fact about this OS installation (never sent anywhere as is).
 * Linux and the BSDs: /etc/machine-id (or D-Bus's copy); macOS: the IOPlatformUUID;
 * Windows: the MachineGuid in the registry. Elsewhere the host name and a hardware address.
 */
export function machineFingerprint() {
  if (process.platform === 'win32') {
    const found = tryRun('reg', ['query', 'HKLM\\SOFTWARE\\Microsoft\\Cryptography', '/v', 'MachineGuid']);
    const match = found && /MachineGuid\s+REG_SZ\s+(\S+)/i.exec(found);
    if (match) return match[1];
  } else if (process.platform === 'darwin') {
    const found = tryRun('/usr/sbin/ioreg', ['-rd1', '-c', 'IOPlatformExpertDevice']);
    const match = found && /"IOPlatformUUID"\s*=\s*"([^"]+)"/.exec(found);
    if (match) return match[1];
  }
  for (const source of ['/etc/machine-id', '/var/lib/dbus/machine-id']) {
    try {
      const text = trimAscii(readFileSync(source, 'utf8'));
      if (text) return text;
    } catch {
      // next source
    }
  }
  const macs = Object.values(networkInterfaces())
    .flat()
    .filter((i) => i && !i.internal && i.mac && i.mac !== '00:00:00:00:00:00')
    .map((i) => i.mac.replaceAll(':', ''))
    .sort();
  return `host:${hostname()}:${macs[0] ?? ''}`;
}

function tryRun(command, args) {
  try {
    return execFileSync(command, args, { encoding: 'utf8', timeout: 5000, stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    return null;
  }
}

/**
 * This machine's id for one application: HMAC-SHA256(salt, OS fingerprint), hex.
 * The salt (a constant of the application) keeps ids of different products unlinkable;
 * the raw fingerprint never leaves the machine. The Python kit derives the same id.
 */
export function machineId(salt, fingerprint = undefined) {
  if (typeof salt !== 'string' || !salt) throw new TypeError('machineId needs an application-specific salt');
  const raw = fingerprint === undefined ? machineFingerprint() : fingerprint;
  return createHmac('sha256', Buffer.from(salt, 'utf8')).update(trimAscii(raw), 'utf8').digest('hex');
}

// Spaces, tabs and line breaks at the ends, exactly these, in both kits (String.trim does more).
function trimAscii(value) {
  return String(value).replace(/^[ \t\r\n]+|[ \t\r\n]+$/g, '');
}

/** SHA-256 of a machine id, hex: what a lease's `mid` holds for a canonical id. */
export function machineHash(id) {
  return createHash('sha256').update(id, 'utf8').digest('hex');
}

// The `mid` a lease for this machine may carry. The server hashes the id trimmed of white
// space at its ends and NFC-normalised ("host-A " and "host-A" are one machine); leases it
// issued before it did that hash the id as sent. (Python's strip and String.trim differ only
// on characters the server refuses in a machine id.)
function leaseMids(id) {
  return [machineHash(id.trim().normalize('NFC')), machineHash(id)];
}

// What the server refuses in a label: controls, invisible format and separator characters,
// private use, lone surrogates. The Python kit uses the same class.
const UNPRINTABLE =
  /[\x00-\x1f\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ud800-\udfff\ue000-\uf8ff\ufeff\ufff9-\ufffb]+/gu;

/**
 * A label the server accepts, made from `text` (by default this host's name).
 * The label is what the customer sees for this machine in the machines list, so it names
 * the machine the way its owner does; it is never the machine id. Characters the server
 * refuses become a space, spaces at the ends go, and the rest is cut to 64 characters
 * (code points). null when nothing is left (or no host name).
 */
export function machineLabel(text = undefined) {
  let raw = text;
  if (raw === undefined || raw === null) {
    try {
      raw = hostname();
    } catch {
      return null;
    }
  }
  if (typeof raw !== 'string') throw new TypeError('a label is text');
  const cleaned = trimSpaces(raw.replace(UNPRINTABLE, ' '));
  return trimSpaces(Array.from(cleaned).slice(0, MAX_LABEL_LENGTH).join('')) || null;
}

function trimSpaces(value) {
  return value.replace(/^ +| +$/g, '');
}

// --- the client ---------------------------------------------------------------------

/** The Ed25519 signing keys of a JWKS, by kid; other kinds of key are ignored. */
function parseJwks(jwks) {
  const data = typeof jwks === 'string' ? JSON.parse(jwks) : jwks;
  if (!data || typeof data !== 'object' || !Array.isArray(data.keys)) {
    throw new TypeError('a JWKS is an object with a list of keys');
  }
  const found = new Map();
  for (const entry of data.keys) {
    if (
      entry &&
      typeof entry === 'object' &&
      entry.kty === 'OKP' &&
      entry.crv === 'Ed25519' &&
      (entry.alg ?? ALGORITHM) === ALGORITHM &&
      (entry.use ?? 'sig') === 'sig' &&
      typeof entry.kid === 'string' &&
      typeof entry.x === 'string'
    ) {
      found.set(entry.kid, { kty: 'OKP', crv: 'Ed25519', kid: entry.kid, x: entry.x, alg: ALGORITHM, use: 'sig' });
    }
  }
  return found;
}

/**
 * One application's license on one machine.
 *
 * `jwks` is the server's JWKS as shipped with the application (an object or its JSON text);
 * `keyPrefix` the product's key prefix ('DC'); `product` its id (checked against the key's
 * `prod` and sent to the server); `issuer` the server's APP_BASE_URL (checked against `iss`
 * when given). `machineId` should be machineId(salt) of this machine: with it, a state file
 * copied to another machine is worthless there. `now` returns epoch seconds; tests move it.
 *
 * `label` is what the customer sees for this machine in the machines list (machines(), the
 * account page): left out (or null), it is this host's name; give the name your users know
 * the installation by, or '' to send none. It goes with every activation and validation (a
 * renamed host shows its new name once the server next records the machine, at most hourly),
 * cleaned by machineLabel().
 *
 * Keys fetched from /.well-known/jwks.json are trusted for the life of the object.
 * `persistJwks: true` also keeps them in the state file and trusts them after a restart,
 * which carries offline use across a signing-key rotation, but lets whoever can edit the
 * state file add a key of their own: use it only where that file is out of the user's reach.
 */
export class LicenseClient {
  constructor({
    serverUrl,
    jwks,
    statePath,
    keyPrefix,
    product = null,
    issuer = null,
    machineId = null,
    now = () => Date.now() / 1000,
    timeoutMs = 10000,
    persistJwks = false,
    label = null,
  }) {
    const url = new URL(serverUrl);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TypeError(`serverUrl must be http(s), not ${serverUrl}`);
    }
    if (typeof keyPrefix !== 'string' || !keyPrefix || keyPrefix.includes('-')) {
      throw new TypeError("keyPrefix is the product's prefix, e.g. 'DC'");
    }
    if (!statePath) throw new TypeError('statePath is required');
    this.serverUrl = serverUrl.replace(/\/+$/, '');
    this.statePath = statePath;
    this.keyPrefix = keyPrefix;
    this.product = product;
    this.issuer = issuer;
    this.machineId = machineId;
    this.now = now;
    this.timeoutMs = timeoutMs;
    this.persistJwks = persistJwks;
    this.label = label === '' ? null : machineLabel(label);
    if (this.label !== null && this.label === machineId) {
      throw new TypeError('the label is shown to the customer: name the machine, not its machine id');
    }
    this.bundled = parseJwks(jwks);
    if (this.bundled.size === 0) throw new TypeError('the JWKS holds no Ed25519 key');
    this.fetched = new Map();
    this.fetchedJwks = null;
    this.cachedLoaded = !persistJwks;
    this.keySet = null;
  }

  // --- the calls ----------------------------------------------------------------------

  /**
   * Take a seat for this machine; on success the key and lease are stored.
   * Needs the server: throws ServerUnreachable when it cannot be reached. A refusal
   * (e.g. TOO_MANY_MACHINES) leaves the state file as it was.
   */
  async activate(key, machineId = null) {
    const machine = machineId || this.machineId;
    if (!machine) throw new TypeError('activate needs a machine id (see machineId())');
    const trimmed = String(key).trim();
    const answer = await this.request('POST', '/api/license/activate', this.body(trimmed, machine, true));
    const code = answerCode(answer);
    if (!VALID_CODES.includes(code)) {
      return result(code, false, true, licenseOf(answer), { reason: 'refused by the server' });
    }
    const outcome = await this.accept(answer, trimmed, machine, kept(await this.readState()));
    this.machineId = machine;
    return outcome;
  }

  /** Check with the server; when it cannot be reached, judge the stored lease. */
  async validate() {
    const state = await this.readState();
    const key = text(state, 'key');
    const machine = this.machineId || text(state, 'machine_id');
    if (!key || !machine) return this.judge(state, false);
    let answer;
    let code;
    try {
      answer = await this.request('POST', '/api/license/validate', this.body(key, machine, true));
      code = answerCode(answer);
      if (VALID_CODES.includes(code)) return await this.accept(answer, key, machine, state);
    } catch (err) {
      if (err instanceof ServerUnreachable) return this.judge(state, false, `server not reached: ${err.message}`);
      throw err;
    }
    Object.assign(state, { code, lease: null, license: licenseOf(answer), checked_at: Math.floor(this.now()) });
    await this.writeState(state);
    return result(code, false, true, licenseOf(answer), { reason: 'refused by the server' });
  }

  /**
   * Free this machine's seat and forget the key and lease here.
   * Needs the server (throws ServerUnreachable): a seat freed only locally would stay taken.
   */
  async deactivate() {
    const state = await this.readState();
    const key = text(state, 'key');
    const machine = this.machineId || text(state, 'machine_id');
    if (!key || !machine) return this.judge(state, false);
    const answer = await this.request('POST', '/api/license/deactivate', this.body(key, machine));
    const code = answerCode(answer);
    await this.writeState({ ...kept(state), code, checked_at: Math.floor(this.now()) });
    return result(code, false, true, licenseOf(answer), { reason: 'key and lease forgotten here' });
  }

  /**
   * The machines holding the license's seats, oldest activation first:
   * `{code, valid, online, machines: [{id, label, activatedAt, lastSeenAt}], reason, message}`.
   * `code` is null when the server took the key (`valid` then says whether the license is in
   * good standing), else why not (INVALID_KEY, NOT_FOUND, PRODUCT_MISMATCH, or
   * MACHINE_NOT_ACTIVATED when no key was given or stored), with no machines. `id` is opaque
   * (mch_…), never the machine id; `label` is null for a machine that sent none; times are
   * epoch seconds.
   * `key` defaults to the stored one; pass the key the user entered on a machine that has none
   * yet (refused with TOO_MANY_MACHINES: a seat is held by a machine that is gone). Needs the
   * server: throws ServerUnreachable when it cannot be reached. The state file is not touched.
   */
  async machines(key = null) {
    const presented = key !== null && key !== undefined ? String(key).trim() : text(await this.readState(), 'key');
    if (!presented) {
      return listing('MACHINE_NOT_ACTIVATED', false, false, [], 'no license key given or stored');
    }
    const answer = await this.request('POST', '/api/license/machines', this.body(presented));
    const code = answerCode(answer);
    if (typeof answer.valid !== 'boolean' || !Array.isArray(answer.machines)) {
      throw new ServerUnreachable('the machines answer is not a machines list');
    }
    const machines = answer.machines.map(machineOf);
    const refused = ['INVALID_KEY', 'NOT_FOUND', 'PRODUCT_MISMATCH'].includes(code);
    return listing(code, answer.valid, true, machines, refused ? 'refused by the server' : '');
  }

  /**
   * Free the seat of another machine, named by its `id` from machines(): for a machine that
   * cannot deactivate itself (dead, reinstalled, out of reach). `code` is DEACTIVATED when the
   * seat was freed (activate the new machine next), MACHINE_NOT_ACTIVATED when no machine with
   * that id holds a seat (already released), or the key's refusal. `valid` is the license's
   * standing: this machine's own state is not touched (a machine that releases itself gets its
   * seat back at its next validation, if one is free). `key` as for machines(). Needs the
   * server (throws ServerUnreachable).
   */
  async release(machine, key = null) {
    if (typeof machine !== 'string' || !machine) throw new TypeError("release needs a machine's id from machines()");
    const presented = key !== null && key !== undefined ? String(key).trim() : text(await this.readState(), 'key');
    if (!presented) return result('MACHINE_NOT_ACTIVATED', false, false, null, { reason: 'no license key given or stored' });
    const answer = await this.request('POST', '/api/license/deactivate', { ...this.body(presented), machine });
    const code = answerCode(answer);
    const reasons = {
      DEACTIVATED: `machine ${machine} released`,
      MACHINE_NOT_ACTIVATED: `no seat is held by machine ${machine}`,
    };
    return result(code, answer.valid === true, true, licenseOf(answer), {
      reason: reasons[code] ?? 'refused by the server',
      message: RELEASE_MESSAGES[code],
    });
  }

  /** Judge the stored key and lease with the public keys alone, no network. */
  async checkOffline() {
    return this.judge(await this.readState(), false);
  }

  /** Fetch the server's current public keys; returns how many are usable. */
  async refreshJwks() {
    const answer = await this.request('GET', '/.well-known/jwks.json', null);
    let fetched;
    try {
      fetched = parseJwks(answer);
    } catch (err) {
      throw new ServerUnreachable(`the JWKS answer is not a JWKS: ${err.message}`);
    }
    this.fetched = fetched;
    this.fetchedJwks = answer;
    this.keySet = null;
    if (this.persistJwks) await this.writeState(await this.readState());
    return fetched.size;
  }

  // --- answers ------------------------------------------------------------------------

  body(key, machine = null, labelled = false) {
    const body = { key };
    if (machine !== null) body.machine_id = machine;
    if (this.product) body.product = this.product;
    if (labelled && this.label !== null && this.label !== machine) body.label = this.label;
    return body;
  }

  /** Store a "valid" answer, but only once its key and lease verify. */
  async accept(answer, key, machine, state) {
    const newKey = typeof answer.key === 'string' ? answer.key : key;
    const lease = answer.lease;
    try {
      const keyClaims = await this.verifyKey(newKey, true);
      if (typeof lease !== 'string') throw new Refused('INVALID_KEY', 'the answer carries no lease');
      await this.verifyLease(lease, machine, keyClaims, true);
    } catch (err) {
      if (err instanceof Refused) {
        throw new ServerUnreachable(`the server's answer does not verify: ${err.reason}`);
      }
      throw err;
    }
    Object.assign(state, {
      format: STATE_FORMAT,
      key: newKey,
      lease,
      machine_id: machine,
      code: answerCode(answer),
      license: licenseOf(answer),
      checked_at: Math.floor(this.now()),
    });
    await this.writeState(state);
    return this.judge(state, true);
  }

  /** The verdict of the stored key and lease at now(); never touches the network. */
  async judge(state, online, note = '') {
    const license = state.license && typeof state.license === 'object' ? state.license : null;
    const last = state.code;
    const key = text(state, 'key');
    if (!key) {
      const code = last === 'DEACTIVATED' ? 'DEACTIVATED' : 'MACHINE_NOT_ACTIVATED';
      return result(code, false, online, null, { reason: note || 'no license key stored' });
    }
    const lease = text(state, 'lease');
    const machine = this.machineId || text(state, 'machine_id');
    let claims;
    try {
      const keyClaims = await this.verifyKey(key, false);
      if (!lease || !machine) {
        throw new Refused(DENIALS.has(last) ? last : 'MACHINE_NOT_ACTIVATED', 'no lease stored');
      }
      claims = await this.verifyLease(lease, machine, keyClaims, false);
    } catch (err) {
      if (err instanceof Refused) return result(err.code, false, online, license, { reason: joinReasons(note, err.reason) });
      throw err;
    }
    return result(VALID_CODES.includes(last) ? last : 'VALID', true, online, license, {
      leaseExpiresAt: claims.exp,
      features: Array.isArray(claims.ent) ? claims.ent.filter((f) => typeof f === 'string') : [],
      reason: note,
    });
  }

  // --- verification -------------------------------------------------------------------

  keys() {
    if (!this.keySet) {
      const all = new Map([...this.fetched, ...this.bundled]);
      this.keySet = createLocalJWKSet({ keys: [...all.values()] });
    }
    return this.keySet;
  }

  loadCachedKeys(state) {
    if (this.cachedLoaded) return;
    this.cachedLoaded = true;
    if (state.jwks && typeof state.jwks === 'object') {
      try {
        this.fetched = parseJwks(state.jwks);
        this.fetchedJwks = state.jwks;
        this.keySet = null;
      } catch {
        // a broken cache is no cache
      }
    }
  }

  /** Signature, pinned algorithm and claim types; `exp` judged against now(). */
  async decode(token, what, refresh) {
    if (typeof token !== 'string' || token.length > MAX_TOKEN_LENGTH) {
      throw new Refused('INVALID_KEY', `${what} too long`);
    }
    let header;
    try {
      header = decodeProtectedHeader(token);
    } catch {
      throw new Refused('INVALID_KEY', `${what} is not a JWT`);
    }
    if (header.alg !== ALGORITHM) throw new Refused('INVALID_KEY', `${what} algorithm ${header.alg} not allowed`);
    if (typeof header.kid !== 'string') throw new Refused('INVALID_KEY', `${what} names no key`);
    if (refresh && !this.bundled.has(header.kid) && !this.fetched.has(header.kid)) {
      try {
        await this.refreshJwks();
      } catch (err) {
        if (!(err instanceof LicenseClientError)) throw err;
      }
    }
    if (!this.bundled.has(header.kid) && !this.fetched.has(header.kid)) {
      throw new Refused('INVALID_KEY', `${what} signed by an unknown key ${header.kid}`);
    }
    let payload;
    try {
      ({ payload } = await jwtVerify(token, this.keys(), {
        algorithms: [ALGORITHM],
        requiredClaims: ['exp', 'iat', 'sub'],
        currentDate: new Date(this.now() * 1000),
      }));
    } catch (err) {
      if (err instanceof joseErrors.JWTExpired) throw new Refused('EXPIRED', `${what} expired at ${err.payload?.exp}`);
      if (err instanceof joseErrors.JOSEError) throw new Refused('INVALID_KEY', `${what} does not verify: ${err.code}`);
      throw err;
    }
    if (!Number.isInteger(payload.exp)) throw new Refused('INVALID_KEY', `${what} has no integer exp`);
    if (typeof payload.sub !== 'string' || !payload.sub) throw new Refused('INVALID_KEY', `${what} has no sub`);
    if (this.issuer !== null && payload.iss !== this.issuer) {
      throw new Refused('INVALID_KEY', `${what} issued by ${JSON.stringify(payload.iss)}`);
    }
    if (this.product !== null && (payload.prod ?? this.product) !== this.product) {
      throw new Refused('PRODUCT_MISMATCH', `${what} is for product ${JSON.stringify(payload.prod)}`);
    }
    // jose compares whole seconds; the rule is "valid while now < exp" to the fraction.
    if (this.now() >= payload.exp) throw new Refused('EXPIRED', `${what} expired at ${payload.exp}`);
    return payload;
  }

  /** A license key: <PREFIX>-<TIER>-<JWS>, the exact prefix stripped (base64url has '-'). */
  async verifyKey(key, refresh) {
    const prefix = `${this.keyPrefix}-`;
    if (typeof key !== 'string' || !key.startsWith(prefix)) {
      throw new Refused('INVALID_KEY', `key does not start with ${prefix}`);
    }
    const rest = key.slice(prefix.length);
    const dash = rest.indexOf('-');
    if (dash <= 0) throw new Refused('INVALID_KEY', 'key has no tier');
    const tier = rest.slice(0, dash);
    const claims = await this.decode(rest.slice(dash + 1), 'key', refresh);
    if (claims.tier !== tier) throw new Refused('INVALID_KEY', 'key text does not match its tier claim');
    return claims;
  }

  async verifyLease(lease, machine, keyClaims, refresh) {
    const claims = await this.decode(lease, 'lease', refresh);
    if (!leaseMids(machine).includes(claims.mid)) throw new Refused('MACHINE_NOT_ACTIVATED', 'lease is for another machine');
    if (claims.sub !== keyClaims.sub) throw new Refused('MACHINE_NOT_ACTIVATED', 'lease is for another license');
    return claims;
  }

  // --- HTTP ---------------------------------------------------------------------------

  /**
   * One JSON exchange. Anything but a JSON object from a 2xx is ServerUnreachable,
   * except a 4xx error body (other than 429), which is a ServerError.
   */
  async request(method, path, body) {
    let response;
    let raw;
    try {
      response = await fetch(this.serverUrl + path, {
        method,
        headers: {
          Accept: 'application/json',
          'Content-Type': 'application/json',
          'User-Agent': `licensed-client-node/${VERSION}`,
        },
        body: body === null ? undefined : JSON.stringify(body),
        redirect: 'error',
        signal: AbortSignal.timeout(this.timeoutMs),
      });
      raw = await response.text();
    } catch (err) {
      throw new ServerUnreachable(err.cause?.code ?? err.message);
    }
    if (raw.length > MAX_ANSWER_BYTES) throw new ServerUnreachable('answer too large');
    const answer = jsonObject(raw);
    if (response.status === 429 || response.status >= 500) {
      throw new ServerUnreachable(`server answered ${response.status}`);
    }
    if (response.status >= 400) {
      const error = answer?.error;
      if (error && typeof error === 'object') throw new ServerError(response.status, String(error.code), String(error.message));
      throw new ServerError(response.status, 'HTTP_ERROR', `server answered ${response.status}`);
    }
    if (!answer) throw new ServerUnreachable('answer is not a JSON object');
    return answer;
  }

  // --- the state file -----------------------------------------------------------------

  async readState() {
    let raw;
    try {
      raw = await readFile(this.statePath, 'utf8');
    } catch (err) {
      if (err.code === 'ENOENT') {
        this.cachedLoaded = true;
        return {};
      }
      throw new LicenseClientError(`cannot read ${this.statePath}: ${err.message}`);
    }
    const state = jsonObject(raw) ?? {};
    this.loadCachedKeys(state);
    return state;
  }

  /** Write-then-rename: a crash leaves the old file or the new one, never half of one. */
  async writeState(state) {
    const folder = dirname(this.statePath);
    await mkdir(folder, { recursive: true });
    const full = this.persistJwks && this.fetchedJwks ? { ...state, jwks: this.fetchedJwks } : state;
    const clean = Object.fromEntries(
      Object.entries(full)
        .filter(([, v]) => v !== null && v !== undefined)
        .sort(([a], [b]) => (a < b ? -1 : 1)),
    );
    const tmp = join(folder, `.${basename(this.statePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
    const handle = await open(tmp, 'wx', 0o600);
    try {
      await handle.writeFile(`${JSON.stringify(clean, null, 2)}\n`, 'utf8');
      await handle.sync();
    } finally {
      await handle.close();
    }
    try {
      await rename(tmp, this.statePath);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    if (process.platform !== 'win32') {
      const dir = await open(folder, 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
    }
  }
}

function answerCode(answer) {
  if (!CODES.includes(answer.code)) throw new ServerUnreachable(`unexpected answer code ${JSON.stringify(answer.code)}`);
  return answer.code;
}

function listing(code, valid, online, machines, reason) {
  return { code, valid, online, machines, reason, message: code ? (MESSAGES[code] ?? code) : '' };
}

/** One entry of the machines list, checked: anything else means the answer is not usable. */
function machineOf(entry) {
  if (!entry || typeof entry !== 'object' || typeof entry.id !== 'string' || !entry.id) {
    throw new ServerUnreachable('a machines list entry has no id');
  }
  if (entry.label !== null && entry.label !== undefined && typeof entry.label !== 'string') {
    throw new ServerUnreachable('a machines list entry has a label that is not text');
  }
  return {
    id: entry.id,
    label: entry.label ?? null,
    activatedAt: epochOf(entry.activated_at),
    lastSeenAt: epochOf(entry.last_seen_at),
  };
}

/** An ISO 8601 UTC time of the server (2027-01-15T08:00:00Z) as epoch seconds. */
function epochOf(value) {
  const ms = typeof value === 'string' && /(Z|[+-]\d\d:\d\d)$/.test(value) ? Date.parse(value) : NaN;
  if (!Number.isFinite(ms)) throw new ServerUnreachable(`the machines list has a time that is not one: ${JSON.stringify(value)}`);
  return Math.floor(ms / 1000);
}

function jsonObject(raw) {
  try {
    const value = JSON.parse(raw);
    return value && typeof value === 'object' && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

function text(state, name) {
  const value = state[name];
  return typeof value === 'string' && value ? value : null;
}

function licenseOf(answer) {
  return answer.license && typeof answer.license === 'object' ? answer.license : null;
}

/** What survives a new activation or a deactivation: the format and cached keys. */
function kept(state) {
  const out = { format: STATE_FORMAT };
  if (state.jwks && typeof state.jwks === 'object') out.jwks = state.jwks;
  return out;
}

function joinReasons(...parts) {
  return parts.filter(Boolean).join('; ');
}
