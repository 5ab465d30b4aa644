'use strict';
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const path = require('node:path');
const { test } = require('node:test');
const { coordinatorAddress } = require('./helpers');

const EXAMPLE = path.join(__dirname, '..', 'examples', 'run.js');

/** Run the example as a user would; resolve with its exit code and output. */
function runExample(args) {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [EXAMPLE, '--address', coordinatorAddress(), ...args],
      { timeout: 20000 },
      (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout, stderr }),
    );
  });
}

test('the example re-attaches after its disconnect and exits 0 on COMPLETE', { timeout: 25000 }, async () => {
  const { code, stdout, stderr } = await runExample(['--disconnect-after', '3']);
  assert.equal(code, 0, stderr);
  const lines = stdout.trim().split('\n');
  assert.match(lines[0], /^#1 +INITIALIZE/);
  const marker = lines.findIndex((l) => l.startsWith('-- disconnected after #3; re-attaching with Watch('));
  assert.equal(marker, 3, stdout);
  assert.match(lines[marker + 1], /^#4 /);
  assert.match(lines.at(-1), /COMPLETE +3 completed, 0 failed, 0 skipped/);
});

test('the example exits non-zero on FAILED', { timeout: 25000 }, async () => {
  const { code, stdout } = await runExample(['--fail']);
  assert.equal(code, 1, stdout);
  assert.match(stdout.trim().split('\n').at(-1), /FAILED +add failed step add: .*division by zero/);
});

test('the example refuses bad arguments', { timeout: 25000 }, async () => {
  const { code } = await runExample(['--disconnect-after', 'zero']);
  assert.equal(code, 64);
});
