'use strict';
const assert = require('node:assert/strict');
const { after, before, test } = require('node:test');
const grpc = require('@grpc/grpc-js');
const { CugaError, eventsOf, fromValue, isTerminal, stageName, toStruct } = require('..');
const { collect, newClient } = require('./helpers');

const TIMEOUT = { timeout: 20000 };
let client;

before(async () => {
  client = newClient();
  await client.waitForReady();
});
after(() => client.close());

function plan(expression = '40 + 2') {
  return [
    { stepId: 'add', tool: 'calculator', input: toStruct({ expression }) },
    { stepId: 'say', tool: 'echo', input: toStruct({ text: 'hi' }) },
    {
      stepId: 'report',
      tool: 'echo',
      dependsOn: ['add', 'say'],
      input: toStruct({ total: '{{steps.add.output.result}}' }),
    },
  ];
}

test('Orchestrate streams the lifecycle of a run in order', TIMEOUT, async () => {
  const events = await collect(client.orchestrate({ goal: 'add and report', steps: plan() }));
  const stages = events.map((e) => stageName(e.stage));
  assert.deepEqual(stages.slice(0, 2), ['INITIALIZE', 'PLAN']);
  assert.deepEqual(stages.slice(-2), ['AGGREGATE', 'COMPLETE']);
  assert.deepEqual(
    events.map((e) => e.seq),
    events.map((_, i) => i + 1),
  );
  assert.equal(new Set(events.map((e) => e.runId)).size, 1);
  assert.match(events[0].traceId, /^[0-9a-f]{32}$/);
  assert.equal(events[1].payload, 'plan');
  assert.equal(events[1].plan.steps.length, 3);
  const report = events.find((e) => e.stepId === 'report' && e.payload === 'stepResult');
  assert.equal(fromValue(report.stepResult.output).total, 42);
  const summary = events.at(-1).summary;
  assert.equal(summary.completedSteps, 3);
  assert.equal(summary.partialSuccess, false);

  const run = await client.getRun(events[0].runId);
  assert.equal(run.state, 'RUN_STATE_COMPLETED');
  assert.equal(run.lastSeq, events.length);
  const listed = await client.listRuns({ pageSize: 1000 });
  assert.ok(listed.runs.some((r) => r.runId === run.runId));
});

test('a dropped stream does not stop the run; Watch re-attaches after a seq', TIMEOUT, async () => {
  const seen = [];
  for await (const event of client.orchestrate({ goal: 'drop and watch', steps: plan() })) {
    seen.push(event);
    if (event.seq === 2) break; // deliberate disconnect after PLAN
  }
  assert.deepEqual(seen.map((e) => e.seq), [1, 2]);
  const runId = seen[0].runId;
  const rest = await collect(client.watch(runId, 2));
  assert.ok(rest.length > 0);
  assert.deepEqual(
    rest.map((e) => e.seq),
    rest.map((_, i) => i + 3),
  );
  assert.ok(isTerminal(rest.at(-1)));
  assert.equal(stageName(rest.at(-1).stage), 'COMPLETE');
  // Watch from 0 replays the whole, identical log.
  const replay = await collect(client.watch(runId, 0));
  assert.deepEqual(replay, [...seen, ...rest]);
});

test('a message carries the events ready at once; the stream yields each', TIMEOUT, async () => {
  const events = await collect(client.orchestrate({ goal: 'replay at once', steps: plan() }));
  const runId = events[0].runId;
  // The raw stub shows the messages as the coordinator wrote them: a replay's stored
  // events are all ready at once, so they come together.
  const messages = await new Promise((resolve, reject) => {
    const got = [];
    const deadline = Date.now() + 10000;
    const call = client._stub.Watch({ runId, afterSeq: 0 }, client._metadata(), { deadline });
    call.on('data', (message) => got.push(message));
    call.on('error', reject);
    call.on('end', () => resolve(got));
  });
  assert.ok(messages.length < events.length, `${messages.length} messages, ${events.length} events`);
  assert.ok(messages.every((m) => m.events.length > 0 && !m.event));
  assert.deepEqual(messages.flatMap(eventsOf), events);
  assert.deepEqual(await collect(client.watch(runId, 0)), events);
  // A message in the shape of before batching (one `event`) still reads.
  assert.deepEqual(eventsOf({ events: [], event: events[0] }), [events[0]]);
});

test('a failing step ends the run FAILED with a partial result', TIMEOUT, async () => {
  const events = await collect(client.orchestrate({ goal: 'divide by zero', steps: plan('1 / 0') }));
  const last = events.at(-1);
  assert.equal(stageName(last.stage), 'FAILED');
  assert.equal(last.payload, 'partial');
  assert.equal(last.partial.failedStep, 'add');
  assert.equal(last.partial.failureMode, 'FAILURE_MODE_USER');
  assert.equal((await client.getRun(last.runId)).state, 'RUN_STATE_FAILED');
});

test('bad input is refused with a typed error naming the field', TIMEOUT, async () => {
  await assert.rejects(
    collect(client.orchestrate({ goal: '', steps: plan() })),
    (err) => {
      assert.ok(err instanceof CugaError, err);
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      assert.equal(err.codeName, 'INVALID_ARGUMENT');
      assert.equal(err.failureMode, 'USER');
      assert.equal(err.retryable, false);
      assert.match(err.message, /goal/);
      return true;
    },
  );
  await assert.rejects(client.getRun('no-such-run'), (err) => {
    assert.ok(err instanceof CugaError);
    assert.equal(err.codeName, 'NOT_FOUND');
    assert.equal(err.domain, 'cuga.coordinator');
    return true;
  });
});
