'use strict';
/**
 * The audit log verified from Node against the live audit service: a checkpoint's
 * signature with the pinned key, every record's leaf hash and inclusion proof, and the
 * consistency proof from an older checkpoint. The harness
 * (tests/integration/test_node_client.py) writes the records and passes the key, an older
 * checkpoint and the auditor token in CUGA_AUDIT_*.
 */
const assert = require('node:assert/strict');
const { after, before, test } = require('node:test');
const {
  AuditClient,
  ProofError,
  openCheckpoint,
  recordLeafHash,
  verifyConsistency,
  verifyInclusion,
} = require('..');

const TIMEOUT = { timeout: 20000 };
const KEY = process.env.CUGA_AUDIT_PUBLIC_KEY;
let client;

before(() => {
  for (const name of ['CUGA_AUDIT_ADDRESS', 'CUGA_AUDIT_PUBLIC_KEY', 'CUGA_AUDIT_OLD_CHECKPOINT']) {
    if (!process.env[name]) {
      throw new Error(`${name} is not set: run through pytest tests/integration/test_node_client.py`);
    }
  }
  client = new AuditClient(process.env.CUGA_AUDIT_ADDRESS, {
    token: process.env.CUGA_AUDITOR_TOKEN,
    timeoutMs: 10000,
  });
});
after(() => client.close());

/** Every record of the harness's traces, then a checkpoint covering them. */
async function recordsAndCheckpoint() {
  const records = [];
  for (const traceId of process.env.CUGA_AUDIT_TRACES.split(',')) {
    const page = await client.query({ filter: { traceId }, pageSize: 1000 });
    records.push(...page.records);
  }
  const { checkpoint } = await client.getCheckpoint();
  return { records, checkpoint: openCheckpoint(checkpoint.note, KEY), note: checkpoint.note };
}

test('a checkpoint verifies with the pinned key, and nothing else does', TIMEOUT, async () => {
  const { checkpoint, note } = await recordsAndCheckpoint();
  assert.ok(checkpoint.treeSize >= 12);
  assert.match(checkpoint.origin, /^cuga-audit\//);
  const forged = note.replace(`\n${checkpoint.treeSize}\n`, `\n${checkpoint.treeSize + 1}\n`);
  assert.throws(() => openCheckpoint(forged, KEY), ProofError);
  const other = Buffer.alloc(32, 7).toString('base64url');
  assert.throws(() => openCheckpoint(note, other), ProofError);
});

test('every record is included: leaf hashes recomputed, proofs checked', TIMEOUT, async () => {
  const { records, checkpoint } = await recordsAndCheckpoint();
  assert.ok(records.length >= 12);
  for (const record of records) {
    const leaf = await recordLeafHash(record);
    assert.equal(leaf.toString('hex'), record.hash, record.recordId);
    const proof = await client.getInclusionProof(record.recordId, checkpoint.treeSize);
    assert.equal(proof.leafIndex, record.leafIndex);
    verifyInclusion(leaf, proof.leafIndex, checkpoint.treeSize, proof.hashes, checkpoint.rootHash);
  }
  // A changed record no longer proves.
  const [first] = records;
  const proof = await client.getInclusionProof(first.recordId, checkpoint.treeSize);
  const edited = { ...first, actor: 'mallory' };
  const leaf = await recordLeafHash(edited);
  assert.throws(
    () => verifyInclusion(leaf, proof.leafIndex, checkpoint.treeSize, proof.hashes, checkpoint.rootHash),
    ProofError,
  );
});

test('the log is consistent with an older checkpoint', TIMEOUT, async () => {
  const old = openCheckpoint(process.env.CUGA_AUDIT_OLD_CHECKPOINT, KEY);
  const { checkpoint } = await recordsAndCheckpoint();
  assert.ok(checkpoint.treeSize > old.treeSize);
  const proof = await client.getConsistencyProof(old.treeSize, checkpoint.treeSize);
  verifyConsistency(old.treeSize, checkpoint.treeSize, proof.hashes, old.rootHash, checkpoint.rootHash);
  const wrong = Buffer.from(old.rootHash);
  wrong[0] ^= 1;
  assert.throws(
    () => verifyConsistency(old.treeSize, checkpoint.treeSize, proof.hashes, wrong, checkpoint.rootHash),
    ProofError,
  );
});
