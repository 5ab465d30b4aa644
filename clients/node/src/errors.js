'use strict';
/**
 * Typed errors: a failed call becomes a CugaError carrying the status code, the
 * google.rpc.ErrorInfo the server attached (reason, domain, metadata) and the failure
 * mode, so callers branch on `err.failureMode` / `err.retryable` instead of parsing text.
 */
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');

/**
 * The status -> FailureMode table of the design (services/cuga/shared/errors.py holds
 * the authoritative copy; this mirrors it for callers in JavaScript).
 */
const STATUS_FAILURE_MODES = Object.freeze({
  [grpc.status.DEADLINE_EXCEEDED]: 'RESOURCE',
  [grpc.status.RESOURCE_EXHAUSTED]: 'RESOURCE',
  [grpc.status.UNAVAILABLE]: 'SYSTEM',
  [grpc.status.ABORTED]: 'SYSTEM',
  [grpc.status.INTERNAL]: 'AGENT',
  [grpc.status.UNKNOWN]: 'AGENT',
  [grpc.status.INVALID_ARGUMENT]: 'USER',
  [grpc.status.NOT_FOUND]: 'USER',
  [grpc.status.OUT_OF_RANGE]: 'USER',
  [grpc.status.FAILED_PRECONDITION]: 'USER',
  [grpc.status.ALREADY_EXISTS]: 'USER',
  [grpc.status.PERMISSION_DENIED]: 'POLICY',
  [grpc.status.UNAUTHENTICATED]: 'POLICY',
});
const RETRYABLE_MODES = new Set(['AGENT', 'SYSTEM', 'RESOURCE']);
const FAILURE_MODES = new Set(['AGENT', 'SYSTEM', 'RESOURCE', 'POLICY', 'USER']);
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
const DETAILS_KEY = 'grpc-status-details-bin';
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

// google.rpc.Status and ErrorInfo are Google's public wire types (not our contract, so
// not under protos/); three fields each, declared here instead of vendoring googleapis.
const RPC_TYPES = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const StatusType = RPC_TYPES.lookupType('google.rpc.Status');
const ErrorInfoType = RPC_TYPES.lookupType('google.rpc.ErrorInfo');

/** A failed call to the orchestrator. */
class CugaError extends Error {
  /**
   * @param {object} fields
   * @param {number} fields.code gRPC status code (`grpc.status.*`).
   * @param {string} fields.message the server's message (names the field at fault).
   * @param {string} [fields.reason] ErrorInfo reason: a failure mode or an UPPER_SNAKE reason.
   * @param {string} [fields.domain] ErrorInfo domain, e.g. `cuga.coordinator`.
   * @param {Object<string,string>} [fields.metadata] ErrorInfo metadata (e.g. `field`).
   */
  constructor({ code, message, reason = '', domain = '', metadata = {} }) {
    super(message);
    this.name = 'CugaError';
    this.code = code;
    this.codeName = STATUS_NAMES[code] || `STATUS_${code}`;
    this.reason = reason;
    this.domain = domain;
    this.metadata = metadata;
    this.field = metadata.field || '';
    this.failureMode = FAILURE_MODES.has(reason) ? reason : STATUS_FAILURE_MODES[code] || 'UNSPECIFIED';
    this.retryable = RETRYABLE_MODES.has(this.failureMode);
  }
}

function errorInfoFrom(metadata) {
  const raw = metadata && typeof metadata.get === 'function' ? metadata.get(DETAILS_KEY) : [];
  for (const value of raw) {
    try {
      const status = StatusType.decode(Buffer.from(value));
      for (const detail of status.details) {
        if (detail.type_url === ERROR_INFO_URL) {
          return ErrorInfoType.toObject(ErrorInfoType.decode(detail.value), { defaults: true });
        }
      }
    } catch {
      // A malformed details header must not hide the status itself.
    }
  }
  return null;
}

/**
 * Turn a grpc-js ServiceError into a CugaError (anything else is returned unchanged).
 *
 * @param {Error & {code?: number, details?: string, metadata?: grpc.Metadata}} err
 * @returns {Error}
 */
function toCugaError(err) {
  if (err instanceof CugaError || typeof err?.code !== 'number') return err;
  const info = errorInfoFrom(err.metadata);
  return new CugaError({
    code: err.code,
    message: err.details || err.message,
    reason: info?.reason || '',
    domain: info?.domain || '',
    metadata: info?.metadata || {},
  });
}

module.exports = { CugaError, STATUS_FAILURE_MODES, toCugaError };
