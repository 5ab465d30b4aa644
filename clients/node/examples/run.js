#!/usr/bin/env node
'use strict';
/**
 * Start a run, print each lifecycle event as it streams, drop the stream on purpose after
 * a few events, re-attach with Watch(run_id, after_seq) and follow the run to its end.
 *
 *   node examples/run.js [--address HOST:PORT] [--disconnect-after N] [--fail] [GOAL]
 *
 * The address defaults to $CUGA_COORDINATOR_ADDRESS, then 127.0.0.1:50051; a bearer token
 * is read from $CUGA_TOKEN. Exit status: 0 COMPLETE, 1 FAILED, 2 CANCELLED, 3 the call
 * itself failed or the stream ended without a terminal event, 64 bad arguments.
 */
const { parseArgs } = require('node:util');
const { CoordinatorClient, describeEvent, isTerminal, stageName, toStruct } = require('..');

const EXIT = { COMPLETE: 0, FAILED: 1, CANCELLED: 2, ERROR: 3, USAGE: 64 };

/** A three-step plan: two independent steps and a report that uses the first's output. */
function samplePlan({ fail }) {
  return [
    { stepId: 'add', tool: 'calculator', input: toStruct({ expression: fail ? '1 / 0' : '40 + 2' }) },
    { stepId: 'say', tool: 'echo', input: toStruct({ text: 'hello from node' }) },
    {
      stepId: 'report',
      tool: 'echo',
      dependsOn: ['add', 'say'],
      input: toStruct({ total: '{{steps.add.output.result}}' }),
    },
  ];
}

async function main(argv) {
  let args;
  try {
    args = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        address: { type: 'string' },
        'disconnect-after': { type: 'string', default: '2' },
        fail: { type: 'boolean', default: false },
      },
    });
  } catch (err) {
    console.error(`usage error: ${err.message}`);
    return EXIT.USAGE;
  }
  const disconnectAfter = Number(args.values['disconnect-after']);
  if (!Number.isInteger(disconnectAfter) || disconnectAfter < 1) {
    console.error('usage error: --disconnect-after must be a positive integer');
    return EXIT.USAGE;
  }
  const address =
    args.values.address || process.env.CUGA_COORDINATOR_ADDRESS || '127.0.0.1:50051';
  const goal = args.positionals.join(' ') || 'add two numbers and report the total';
  const client = new CoordinatorClient(address, { token: process.env.CUGA_TOKEN });
  try {
    let last = null;
    const stream = client.orchestrate({
      goal,
      steps: samplePlan({ fail: args.values.fail }),
      errorStrategy: 'ERROR_PROPAGATION_FAIL_FAST',
    });
    for await (const event of stream) {
      console.log(describeEvent(event));
      last = event;
      if (isTerminal(event) || event.seq >= disconnectAfter) break; // break drops the stream
    }
    if (last && !isTerminal(last)) {
      console.log(`-- disconnected after #${last.seq}; re-attaching with Watch(${last.runId}, ${last.seq})`);
      for await (const event of client.watch(last.runId, last.seq)) {
        console.log(describeEvent(event));
        last = event;
        if (isTerminal(event)) break;
      }
    }
    if (!last || !isTerminal(last)) {
      console.error('the stream ended before the run did');
      return EXIT.ERROR;
    }
    return EXIT[stageName(last.stage)];
  } catch (err) {
    const detail = err.codeName ? `${err.codeName} (${err.failureMode})` : err.name;
    console.error(`error: ${detail}: ${err.message}`);
    return EXIT.ERROR;
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { EXIT, main, samplePlan };
