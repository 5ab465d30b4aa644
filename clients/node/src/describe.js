'use strict';
/** One human-readable line per OrchestrationEvent (what the example prints). */
const { fromValue } = require('./values');
const { stageName } = require('./client');

function short(value, limit = 80) {
  const text = JSON.stringify(value);
  return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
}

function payloadText(event) {
  switch (event.payload) {
    case 'context':
      return `run ${event.runId} trace ${event.traceId}`;
    case 'plan':
      return `plan ${event.plan.planId}: ${event.plan.steps.length} step(s)`;
    case 'decision':
      return event.decision.reasoning;
    case 'stepResult':
      return `ok on ${event.stepResult.workerId}: ${short(fromValue(event.stepResult.output))}`;
    case 'approval':
      return `${event.approval.status || ''} ${event.approval.approvalId}`.trim();
    case 'retry':
      return `attempt ${event.retry.attempt}/${event.retry.maxAttempts}`;
    case 'skipped':
      return `skipped (${event.skipped.reason}): ${event.skipped.message}`;
    case 'warning':
      return `warning ${event.warning.code}: ${event.warning.message}`;
    case 'partial':
      return `failed step ${event.partial.failedStep || '-'}: ${event.partial.error}`;
    case 'error':
      return `${event.error.reason || event.error.code}: ${event.error.message}`;
    case 'summary': {
      const s = event.summary;
      return `${s.completedSteps} completed, ${s.failedSteps} failed, ${s.skippedSteps} skipped`;
    }
    default:
      return '';
  }
}

/**
 * `#3   ROUTE      add  round_robin policy chose worker-1 ...`
 *
 * @param {object} event an OrchestrationEvent object.
 * @returns {string}
 */
function describeEvent(event) {
  const seq = `#${event.seq}`.padEnd(4);
  const stage = stageName(event.stage).padEnd(10);
  const step = event.stepId ? `${event.stepId} ` : '';
  return `${seq} ${stage} ${step}${payloadText(event)}`;
}

module.exports = { describeEvent };
