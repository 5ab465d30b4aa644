'use strict';
/**
 * A small typed client of cuga.coordinator.v1.CoordinatorService.
 *
 * Streams (`orchestrate`, `resume`, `watch`) are async iterables of OrchestrationEvent
 * objects, one event at a time in seq order, however many each stream message carried
 * (`events`: several when several were ready at once; a coordinator of before batching
 * sent one, in `event`); leaving the loop (break/return/throw) or calling `cancel()` drops
 * the stream, which does not cancel the run — `watch(runId, afterSeq)` re-attaches. Unary
 * calls carry a deadline (never unset) and are retried on UNAVAILABLE by the channel's
 * service config.
 */
const grpc = require('@grpc/grpc-js');
const { loadContracts } = require('./contracts');
const { toCugaError } = require('./errors');

const SERVICE = 'cuga.coordinator.v1.CoordinatorService';
const TERMINAL_STAGES = new Set([
  'LIFECYCLE_STAGE_COMPLETE',
  'LIFECYCLE_STAGE_FAILED',
  'LIFECYCLE_STAGE_CANCELLED',
]);

/** Transport retries for the unary RPCs (every RPC of the contract is idempotent). */
const SERVICE_CONFIG = JSON.stringify({
  methodConfig: [
    {
      name: [
        { service: SERVICE, method: 'GetRun' },
        { service: SERVICE, method: 'ListRuns' },
        { service: SERVICE, method: 'CancelRun' },
      ],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: '0.05s',
        maxBackoff: '1s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
});

/** Whether an event ends its run's stream (COMPLETE, FAILED or CANCELLED). */
function isTerminal(event) {
  return TERMINAL_STAGES.has(event?.stage);
}

/** `LIFECYCLE_STAGE_EXECUTE` -> `EXECUTE`. */
function stageName(stage) {
  return String(stage).replace(/^LIFECYCLE_STAGE_/, '');
}

/**
 * The events one stream message carries, in seq order: its `events`, or (a coordinator of
 * before batching) its single `event`.
 */
function eventsOf(response) {
  if (response.events && response.events.length) return response.events;
  return response.event ? [response.event] : [];
}

/** One server stream of OrchestrationEvents. */
class EventStream {
  constructor(call) {
    this._call = call;
    this._cancelled = false;
    this._ended = false;
  }

  /** Drop the stream on purpose (the run goes on); iteration then ends without error. */
  cancel() {
    this._cancelled = true;
    if (!this._ended) this._call.cancel();
  }

  async *[Symbol.asyncIterator]() {
    try {
      for await (const response of this._call) yield* eventsOf(response);
      this._ended = true;
    } catch (err) {
      this._ended = true;
      if (this._cancelled && err.code === grpc.status.CANCELLED) return;
      throw toCugaError(err);
    } finally {
      // Leaving the loop early is a deliberate disconnect.
      if (!this._ended) this.cancel();
    }
  }
}

/** Client of the coordinator: the one service an application calls. */
class CoordinatorClient {
  /**
   * @param {string} address host:port of the coordinator.
   * @param {object} [options]
   * @param {grpc.ChannelCredentials} [options.credentials] default: insecure (plaintext).
   * @param {string} [options.token] bearer token sent as `authorization` metadata.
   * @param {number} [options.timeoutMs=30000] deadline of unary calls.
   * @param {string} [options.protoRoot] where the .proto files are (default: the repo's protos/).
   * @param {object} [options.channelOptions] extra grpc-js channel options.
   */
  constructor(address, { credentials, token, timeoutMs = 30000, protoRoot, channelOptions } = {}) {
    if (!address) throw new TypeError('address is required (host:port)');
    if (!(timeoutMs > 0)) throw new TypeError('timeoutMs must be > 0');
    const { coordinator } = loadContracts(protoRoot);
    this._stub = new coordinator.CoordinatorService(
      address,
      credentials || grpc.credentials.createInsecure(),
      {
        'grpc.service_config': SERVICE_CONFIG,
        'grpc.max_receive_message_length': 4 * 1024 * 1024,
        ...channelOptions,
      },
    );
    this._token = token || '';
    this._timeoutMs = timeoutMs;
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this._token) metadata.set('authorization', `Bearer ${this._token}`);
    return metadata;
  }

  _stream(method, request, deadlineMs) {
    const options = deadlineMs ? { deadline: Date.now() + deadlineMs } : {};
    return new EventStream(this._stub[method](request, this._metadata(), options));
  }

  _unary(method, request, timeoutMs) {
    const deadline = Date.now() + (timeoutMs || this._timeoutMs);
    return new Promise((resolve, reject) => {
      this._stub[method](request, this._metadata(), { deadline }, (err, response) => {
        if (err) reject(toCugaError(err));
        else resolve(response);
      });
    });
  }

  /**
   * Start a run and stream its events until the terminal one.
   *
   * @param {object} request an OrchestrateRequest (`goal`, `steps`, `errorStrategy`, ...).
   * @param {{deadlineMs?: number}} [options] optional deadline of the whole stream.
   * @returns {EventStream}
   */
  orchestrate(request, { deadlineMs } = {}) {
    return this._stream('Orchestrate', request, deadlineMs);
  }

  /**
   * Continue a FAILED or INTERRUPTED run.
   *
   * @param {object} request a ResumeRequest (`runId` or `partial`).
   * @param {{deadlineMs?: number}} [options]
   * @returns {EventStream}
   */
  resume(request, { deadlineMs } = {}) {
    return this._stream('Resume', request, deadlineMs);
  }

  /**
   * Re-attach to a run: replay its stored events after `afterSeq`, then follow live ones.
   *
   * @param {string} runId
   * @param {number} [afterSeq=0]
   * @param {{deadlineMs?: number}} [options]
   * @returns {EventStream}
   */
  watch(runId, afterSeq = 0, { deadlineMs } = {}) {
    return this._stream('Watch', { runId, afterSeq }, deadlineMs);
  }

  /** @returns {Promise<object>} the Run. */
  async getRun(runId, { timeoutMs } = {}) {
    return (await this._unary('GetRun', { runId }, timeoutMs)).run;
  }

  /** @returns {Promise<{runs: object[], nextPageToken: string}>} */
  listRuns(request = {}, { timeoutMs } = {}) {
    return this._unary('ListRuns', request, timeoutMs);
  }

  /** @returns {Promise<object>} the Run after cancellation. */
  async cancelRun(runId, { reason = '', requestId = '', timeoutMs } = {}) {
    return (await this._unary('CancelRun', { runId, reason, requestId }, timeoutMs)).run;
  }

  /**
   * Resolve once the channel is connected (or reject after `timeoutMs`).
   *
   * @param {number} [timeoutMs]
   */
  waitForReady(timeoutMs = this._timeoutMs) {
    return new Promise((resolve, reject) => {
      this._stub.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve()));
    });
  }

  /** Close the channel. */
  close() {
    this._stub.close();
  }
}

module.exports = {
  CoordinatorClient,
  EventStream,
  eventsOf,
  isTerminal,
  stageName,
  TERMINAL_STAGES,
};
