// ONNX models written as protobuf bytes, for the timing scripts (time_ort.js, time_gemm.js): a few one-node
// models are all they need, so no protobuf library. Field numbers are onnx.proto's. A message or a string is a
// length-delimited field (wire type 2), an integer a varint (wire type 0).
'use strict';

const varint = n => {
  const b = [];
  while (n > 127) { b.push((n % 128) | 128); n = Math.floor(n / 128); }
  b.push(n);
  return Buffer.from(b);
};
const field = (number, bytes) => Buffer.concat([varint(number * 8 + 2), varint(bytes.length), bytes]);
const int = (number, n) => Buffer.concat([varint(number * 8), varint(n)]);
const str = (number, text) => field(number, Buffer.from(text));
const kUint8 = 2, kInt8 = 3, kInt32 = 6;  // TensorProto.DataType

// ValueInfoProto of a tensor; a dim is a number (dim_value) or a name (dim_param, e.g. the batch 'N').
function valueInfo(name, type, dims) {
  const dim = d => field(1, typeof d === 'string' ? str(2, d) : int(1, d));  // TensorShapeProto.dim
  const shape = Buffer.concat(dims.map(dim));
  return Buffer.concat([str(1, name), field(2, field(1, Buffer.concat([int(1, type), field(2, shape)])))]);
}

// TensorProto with raw_data.
function initializer(name, type, dims, bytes) {
  return Buffer.concat([...dims.map(d => int(1, d)), int(2, type), str(8, name), field(9, bytes)]);
}

// {name, nodes: [[op_type, inputs, outputs]], initializers, inputs, outputs} → ModelProto bytes (IR 7, opset 13).
function model({name, nodes, initializers = [], inputs, outputs}) {
  const node = ([op, ins, outs]) =>
    field(1, Buffer.concat([...ins.map(n => str(1, n)), ...outs.map(n => str(2, n)), str(3, op), str(4, op)]));
  const graph = Buffer.concat([...nodes.map(node), str(2, name), ...initializers.map(t => field(5, t)),
                               ...inputs.map(v => field(11, v)), ...outputs.map(v => field(12, v))]);
  return new Uint8Array(Buffer.concat([int(1, 7 /* ir_version */), field(7, graph), field(8, int(2, 13))]));
}

// The median of a list of numbers (the upper one of the middle two for an even count).
const median = values => { const s = [...values].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

module.exports = {kUint8, kInt8, kInt32, valueInfo, initializer, model, median};
