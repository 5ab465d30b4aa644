'use strict';
/**
 * Verify the audit log from Node.js: a second-language check of what the audit service
 * proves, written from the specifications, sharing no code with the service.
 *
 * - Leaf data: RFC 8785 canonical JSON (the `canonicalize` package) of a record's
 *   {actor, chainIndex → chain_index, kind, payload, profile, record_id, run_id,
 *   timestamp (protobuf JSON form, RFC 3339 UTC), trace_id}; leaf hash
 *   SHA-256(0x00 || data), node hash SHA-256(0x01 || left || right) (RFC 9162 2.1).
 * - Inclusion and consistency proofs: RFC 9162 2.1.3.2 and 2.1.4.2.
 * - Checkpoints: C2SP signed notes, Ed25519, key hash SHA-256(origin || "\n" || 0x01 ||
 *   key)[:4]; the public key is base64url of its 32 raw bytes (pin it).
 *
 *   const { AuditClient, openCheckpoint, verifyInclusion, recordLeafHash } = require('@cuga/client');
 */
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { DEFAULT_PROTO_ROOT, LOADER_OPTIONS } = require('./contracts');
const { toCugaError } = require('./errors');
const { fromStruct } = require('./values');

/** A check that does not hold: the log or its answer is not what was signed. */
class ProofError extends Error {}

let canonicalizeModule;
/** RFC 8785 canonical JSON text (the `canonicalize` package is an ES module). */
async function canonicalJson(value) {
  canonicalizeModule = canonicalizeModule || (await import('canonicalize')).default;
  return canonicalizeModule(value);
}

function sha256(...parts) {
  const hash = crypto.createHash('sha256');
  for (const part of parts) hash.update(part);
  return hash.digest();
}

const LEAF = Buffer.from([0]);
const NODE = Buffer.from([1]);

/** RFC 9162 leaf hash of leaf data. */
function leafHash(data) {
  return sha256(LEAF, Buffer.from(data));
}

/** RFC 9162 interior node hash. */
function nodeHash(left, right) {
  return sha256(NODE, left, right);
}

/** A google.protobuf.Timestamp ({seconds, nanos}) in its protobuf JSON form. */
function timestampJson({ seconds, nanos }) {
  const base = new Date(Number(seconds) * 1000).toISOString().slice(0, 19);
  const n = Number(nanos || 0);
  let fraction = '';
  if (n % 1e9 !== 0) {
    const digits = String(n).padStart(9, '0');
    if (n % 1e6 === 0) fraction = `.${digits.slice(0, 3)}`;
    else if (n % 1e3 === 0) fraction = `.${digits.slice(0, 6)}`;
    else fraction = `.${digits}`;
  }
  return `${base}${fraction}Z`;
}

/** The leaf data (UTF-8 bytes) of an AuditRecord as the audit client returns it. */
async function recordLeafData(record) {
  const content = {
    actor: record.actor,
    chain_index: Number(record.chainIndex),
    kind: record.kind,
    payload: fromStruct(record.payload),
    profile: record.profile,
    record_id: record.recordId,
    run_id: record.runId,
    timestamp: timestampJson(record.timestamp),
    trace_id: record.traceId,
  };
  return Buffer.from(await canonicalJson(content), 'utf8');
}

/** A record's leaf hash, from its content (never from its `hash` field). */
async function recordLeafHash(record) {
  return leafHash(await recordLeafData(record));
}

function checkHashes(proof) {
  const out = proof.map((h) => Buffer.from(h));
  if (out.some((h) => h.length !== 32)) throw new ProofError('a proof hash is not 32 bytes');
  return out;
}

/** RFC 9162 2.1.3.2: `leaf` is leaf `index` of the tree of `size` leaves with `root`. */
function verifyInclusion(leaf, index, size, proof, root) {
  const path = checkHashes(proof);
  if (!(index >= 0 && index < size)) throw new ProofError(`leaf ${index} is outside ${size}`);
  let fn = BigInt(index);
  let sn = BigInt(size - 1);
  let r = Buffer.from(leaf);
  for (const p of path) {
    if (sn === 0n) throw new ProofError('inclusion proof too long');
    if ((fn & 1n) === 1n || fn === sn) {
      r = nodeHash(p, r);
      if ((fn & 1n) === 0n) {
        while (fn !== 0n && (fn & 1n) === 0n) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      r = nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new ProofError('inclusion proof too short');
  if (!r.equals(Buffer.from(root))) throw new ProofError(`leaf ${index} is not in that tree`);
}

/** RFC 9162 2.1.4.2: the tree (oldSize, oldRoot) is a prefix of (newSize, newRoot). */
function verifyConsistency(oldSize, newSize, proof, oldRoot, newRoot) {
  let path = checkHashes(proof);
  const first = Buffer.from(oldRoot);
  const second = Buffer.from(newRoot);
  if (!(oldSize >= 0 && oldSize <= newSize)) throw new ProofError('tree size went down');
  if (oldSize === newSize) {
    if (path.length || !first.equals(second)) throw new ProofError('equal sizes, other roots');
    return;
  }
  if (oldSize === 0) {
    if (path.length) throw new ProofError('a proof from the empty tree is empty');
    return;
  }
  if (!path.length) throw new ProofError('empty consistency proof');
  if ((oldSize & (oldSize - 1)) === 0) path = [first, ...path];
  let fn = BigInt(oldSize - 1);
  let sn = BigInt(newSize - 1);
  while ((fn & 1n) === 1n) {
    fn >>= 1n;
    sn >>= 1n;
  }
  let fr = path[0];
  let sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0n) throw new ProofError('consistency proof too long');
    if ((fn & 1n) === 1n || fn === sn) {
      fr = nodeHash(c, fr);
      sr = nodeHash(c, sr);
      if ((fn & 1n) === 0n) {
        while (fn !== 0n && (fn & 1n) === 0n) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      sr = nodeHash(sr, c);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new ProofError('consistency proof too short');
  if (!fr.equals(first)) throw new ProofError('the old tree is not a prefix of the new one');
  if (!sr.equals(second)) throw new ProofError('the proof does not lead to the new root');
}

/**
 * Check a checkpoint (signed note) with a pinned key and read it.
 *
 * @param {string} note the signed note.
 * @param {string} publicKey base64url of the raw 32-byte Ed25519 key.
 * @returns {{origin: string, treeSize: number, rootHash: Buffer, time: string}}
 */
function openCheckpoint(note, publicKey) {
  const cut = note.indexOf('\n\n');
  if (cut < 0) throw new ProofError('not a signed note');
  const body = note.slice(0, cut + 1);
  const lines = body.split('\n');
  const [origin, sizeText, rootText] = lines;
  if (!/^[0-9]{1,20}$/.test(sizeText || '')) throw new ProofError('bad tree size');
  const rootHash = Buffer.from(rootText || '', 'base64');
  if (rootHash.length !== 32) throw new ProofError('bad root hash');
  const raw = Buffer.from(publicKey, 'base64url');
  if (raw.length !== 32) throw new ProofError('a public key is 32 bytes');
  const key = crypto.createPublicKey({
    key: { kty: 'OKP', crv: 'Ed25519', x: publicKey },
    format: 'jwk',
  });
  const keyHash = sha256(Buffer.from(`${origin}\n`), Buffer.from([1]), raw).subarray(0, 4);
  for (const line of note.slice(cut + 2).split('\n')) {
    const [dash, name, blob] = line.split(' ');
    if (dash !== '\u2014' || name !== origin || !blob) continue;
    const sig = Buffer.from(blob, 'base64');
    if (sig.length !== 68 || !sig.subarray(0, 4).equals(keyHash)) continue;
    if (!crypto.verify(null, Buffer.from(body, 'utf8'), key, sig.subarray(4))) {
      throw new ProofError('checkpoint signature does not verify');
    }
    const time = (lines.find((l) => l.startsWith('time ')) || '').slice(5);
    return { origin, treeSize: Number(sizeText), rootHash, time };
  }
  throw new ProofError('checkpoint is not signed by the pinned key');
}

/** A small client of cuga.audit.v1.AuditService for auditors. */
class AuditClient {
  /**
   * @param {string} address host:port of the audit service.
   * @param {{credentials?: object, token?: string, timeoutMs?: number, protoRoot?: string}} [options]
   */
  constructor(address, { credentials, token, timeoutMs = 30000, protoRoot } = {}) {
    const definition = protoLoader.loadSync('cuga/audit/v1/audit.proto', {
      ...LOADER_OPTIONS,
      includeDirs: [protoRoot || process.env.CUGA_PROTO_DIR || DEFAULT_PROTO_ROOT],
    });
    const audit = grpc.loadPackageDefinition(definition).cuga.audit.v1;
    this._stub = new audit.AuditService(address, credentials || grpc.credentials.createInsecure());
    this._token = token || '';
    this._timeoutMs = timeoutMs;
  }

  _unary(method, request) {
    const metadata = new grpc.Metadata();
    if (this._token) metadata.set('authorization', `Bearer ${this._token}`);
    const deadline = Date.now() + this._timeoutMs;
    return new Promise((resolve, reject) => {
      this._stub[method](request, metadata, { deadline }, (err, response) => {
        if (err) reject(toCugaError(err));
        else resolve(response);
      });
    });
  }

  /** @returns {Promise<{checkpoint: object, publicKey: string}>} */
  getCheckpoint() {
    return this._unary('GetCheckpoint', {});
  }

  getInclusionProof(recordId, treeSize = 0) {
    return this._unary('GetInclusionProof', { recordId, treeSize });
  }

  getConsistencyProof(oldSize, newSize = 0) {
    return this._unary('GetConsistencyProof', { oldSize, newSize });
  }

  query(request = {}) {
    return this._unary('Query', request);
  }

  listEntries(request = {}) {
    return this._unary('ListEntries', request);
  }

  close() {
    this._stub.close();
  }
}

module.exports = {
  AuditClient,
  ProofError,
  canonicalJson,
  leafHash,
  nodeHash,
  openCheckpoint,
  recordLeafData,
  recordLeafHash,
  timestampJson,
  verifyConsistency,
  verifyInclusion,
};
