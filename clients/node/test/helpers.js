'use strict';
/** Shared set-up: the live coordinator the Python harness started. */
const { CoordinatorClient } = require('..');

/**
 * The coordinator under test. These tests run against live services: the harness
 * (tests/integration/test_node_client.py) starts all six and sets this variable.
 */
function coordinatorAddress() {
  const address = process.env.CUGA_COORDINATOR_ADDRESS;
  if (!address) {
    throw new Error(
      'CUGA_COORDINATOR_ADDRESS is not set: run these tests through ' +
        '`pytest tests/integration/test_node_client.py` (or point it at a running coordinator)',
    );
  }
  return address;
}

function newClient() {
  // Auth is on by default: the harness passes the client token in CUGA_TOKEN.
  return new CoordinatorClient(coordinatorAddress(), {
    timeoutMs: 10000,
    token: process.env.CUGA_TOKEN || undefined,
  });
}

/** Collect a stream's events. */
async function collect(stream) {
  const events = [];
  for await (const event of stream) events.push(event);
  return events;
}

module.exports = { collect, coordinatorAddress, newClient };
