'use strict';
/**
 * Loads the orchestrator's contracts from the repository's `protos/` tree at run time.
 *
 * There is deliberately no copy of any .proto file under clients/node: the Python stubs
 * and this client read the same source of truth, so a contract change reaches both.
 */
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The `protos/` directory of this checkout (override with $CUGA_PROTO_DIR). */
const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');

/**
 * How proto-loader turns messages into plain objects. `longs: Number` is safe because
 * the only 64-bit fields a client sees are sequence numbers and counters far below 2^53;
 * enums come as their names (`LIFECYCLE_STAGE_PLAN`), and a oneof's chosen field name is
 * set on the object (`event.payload === 'plan'`).
 */
const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

/**
 * Load the coordinator contract (and, through its imports, cuga.common.v1).
 *
 * @param {string} [protoRoot] directory holding `cuga/<service>/v1/*.proto`.
 * @returns {{coordinator: object, common: object, protoRoot: string}} the loaded packages.
 */
function loadContracts(protoRoot = process.env.CUGA_PROTO_DIR || DEFAULT_PROTO_ROOT) {
  const definition = protoLoader.loadSync('cuga/coordinator/v1/coordinator.proto', {
    ...LOADER_OPTIONS,
    includeDirs: [protoRoot],
  });
  const loaded = grpc.loadPackageDefinition(definition);
  return {
    coordinator: loaded.cuga.coordinator.v1,
    common: loaded.cuga.common.v1,
    protoRoot,
  };
}

module.exports = { DEFAULT_PROTO_ROOT, LOADER_OPTIONS, loadContracts };
