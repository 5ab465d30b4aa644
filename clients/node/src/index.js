'use strict';
/**
 * @cuga/client: call the cuga orchestrator from Node.js.
 *
 *   const { CoordinatorClient, toStruct } = require('@cuga/client');
 *   const client = new CoordinatorClient('127.0.0.1:50051');
 *   for await (const event of client.orchestrate({ goal: 'add', steps: [...] })) { ... }
 *
 * Auditors verify the audit log with AuditClient, openCheckpoint, recordLeafHash,
 * verifyInclusion and verifyConsistency (src/audit.js).
 */
const {
  AuditClient,
  ProofError,
  openCheckpoint,
  recordLeafHash,
  verifyConsistency,
  verifyInclusion,
} = require('./audit');
const { CoordinatorClient, EventStream, eventsOf, isTerminal, stageName } = require('./client');
const { DEFAULT_PROTO_ROOT, loadContracts } = require('./contracts');
const { CugaError, STATUS_FAILURE_MODES } = require('./errors');
const { describeEvent } = require('./describe');
const { fromStruct, fromValue, toDate, toStruct, toValue } = require('./values');

module.exports = {
  AuditClient,
  CoordinatorClient,
  CugaError,
  DEFAULT_PROTO_ROOT,
  EventStream,
  STATUS_FAILURE_MODES,
  describeEvent,
  eventsOf,
  fromStruct,
  fromValue,
  isTerminal,
  loadContracts,
  openCheckpoint,
  ProofError,
  recordLeafHash,
  stageName,
  toDate,
  toStruct,
  toValue,
  verifyConsistency,
  verifyInclusion,
};
