'use strict';
/**
 * Conversions between plain JavaScript values and the google.protobuf.Struct / Value /
 * Timestamp objects proto-loader produces (step inputs and outputs are Structs/Values).
 */

/**
 * A JavaScript value as a google.protobuf.Value object.
 *
 * @param {*} value null, boolean, finite number, string, array or plain object.
 * @returns {object}
 */
function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new TypeError(`cannot encode ${value} as a protobuf Value`);
    return { numberValue: value };
  }
  if (typeof value === 'string') return { stringValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === 'object') return { structValue: toStruct(value) };
  throw new TypeError(`cannot encode a ${typeof value} as a protobuf Value`);
}

/**
 * A plain object as a google.protobuf.Struct object.
 *
 * @param {Object<string, *>} object
 * @returns {{fields: Object<string, object>}}
 */
function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object || {})) fields[key] = toValue(value);
  return { fields };
}

/**
 * A google.protobuf.Value object as a plain JavaScript value.
 *
 * @param {object|null|undefined} value
 * @returns {*}
 */
function fromValue(value) {
  if (!value) return null;
  switch (value.kind) {
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue.values || []).map(fromValue);
    default:
      return null;
  }
}

/**
 * A google.protobuf.Struct object as a plain object.
 *
 * @param {{fields?: Object<string, object>}|null|undefined} struct
 * @returns {Object<string, *>}
 */
function fromStruct(struct) {
  const out = {};
  for (const [key, value] of Object.entries(struct?.fields || {})) out[key] = fromValue(value);
  return out;
}

/**
 * A google.protobuf.Timestamp object as a Date (null when unset).
 *
 * @param {{seconds: number, nanos: number}|null|undefined} timestamp
 * @returns {Date|null}
 */
function toDate(timestamp) {
  if (!timestamp) return null;
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6));
}

module.exports = { fromStruct, fromValue, toDate, toStruct, toValue };
