// Runs an ONNX model exported by `export --format onnx` in ONNX Runtime (npm onnxruntime-node, CPU) on images,
// writes its logits in the format of `eval --logits`, and compares them with a reference written the same way.
//
//   node tools/ort/check.js MODEL.onnx IMAGES [--reference FILE] [--out FILE] [--count N] [--threads T]
//
// IMAGES is an IDX file of uint8 images, (N, H, W) or (N, C, H, W), gzipped or not (Fashion-MNIST's
// t10k-images-idx3-ubyte.gz). An integer model's logits are its int8 "logit_codes"; a float model's are its
// float32 "logits". The reference has one line per image, "image I: L0 L1 ... class C" (eval --logits writes
// it for integer models). Prints one JSON line: images, identical predictions, the largest logit difference
// (in LSB for integer models) and how many logits differ.
'use strict';
const fs = require('fs');
const zlib = require('zlib');
const ort = require('onnxruntime-node');

function usage(message) {
  console.error(`check.js: error: ${message}`);
  console.error('usage: node tools/ort/check.js MODEL.onnx IMAGES [--reference FILE] [--out FILE] [--count N] [--threads T]');
  process.exit(2);
}

function parseArgs(argv) {
  const args = {positional: [], reference: null, out: null, count: Infinity, threads: 1, batch: 256};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
    if (a === '--reference') args.reference = value();
    else if (a === '--out') args.out = value();
    else if (a === '--count') args.count = parseInt(value(), 10);
    else if (a === '--threads') args.threads = parseInt(value(), 10);
    else if (a.startsWith('--')) usage(`unknown option ${a}`);
    else args.positional.push(a);
  }
  if (args.positional.length !== 2) usage('expected MODEL.onnx and IMAGES');
  return args;
}

// An IDX file of unsigned bytes: magic 0x0000 08 D (D dimensions), D big-endian uint32 sizes, then the data.
function readIdxImages(path) {
  let bytes = fs.readFileSync(path);
  if (bytes[0] === 0x1f && bytes[1] === 0x8b) bytes = zlib.gunzipSync(bytes);
  if (bytes.length < 4 || bytes[0] !== 0 || bytes[1] !== 0 || bytes[2] !== 0x08 || (bytes[3] !== 3 && bytes[3] !== 4))
    throw new Error(`${path}: not an IDX file of uint8 images (expected magic 0x00000803 or 0x00000804)`);
  const rank = bytes[3];
  const dims = [];
  for (let d = 0; d < rank; d++) dims.push(bytes.readUInt32BE(4 + 4 * d));
  const shape = rank === 3 ? [dims[0], 1, dims[1], dims[2]] : dims;  // (N, C, H, W)
  const data = bytes.subarray(4 + 4 * rank);
  if (data.length !== shape.reduce((a, b) => a * b, 1)) throw new Error(`${path}: the data does not match the sizes`);
  return {shape, data};
}

// "image I: L0 L1 ... class C" lines → {logits: [[...]], classes: [...]}.
function readLogits(path) {
  const logits = [], classes = [];
  for (const line of fs.readFileSync(path, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    const m = /^image (\d+):((?: \S+)+) class (\d+)$/.exec(line);
    if (!m) throw new Error(`${path}: cannot read the line '${line}'`);
    logits.push(m[2].trim().split(' ').map(Number));
    classes.push(parseInt(m[3], 10));
  }
  return {logits, classes};
}

// The class: the first maximum (the lowest index on ties), as lowbit picks it.
function argmax(row) {
  let best = 0;
  for (let c = 1; c < row.length; c++) if (row[c] > row[best]) best = c;
  return best;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const [modelPath, imagesPath] = args.positional;
  const images = readIdxImages(imagesPath);
  const session = await ort.InferenceSession.create(modelPath, {
    intraOpNumThreads: args.threads, interOpNumThreads: 1, graphOptimizationLevel: 'all', executionMode: 'sequential'});
  const integer = session.outputNames.includes('logit_codes');
  const outputName = integer ? 'logit_codes' : 'logits';
  const [n, c, h, w] = images.shape;
  const count = Math.min(n, args.count);
  const imageBytes = c * h * w;
  const logits = [];
  for (let first = 0; first < count; first += args.batch) {
    const b = Math.min(args.batch, count - first);
    const x = new ort.Tensor('uint8', images.data.subarray(first * imageBytes, (first + b) * imageBytes), [b, c, h, w]);
    const y = (await session.run({image: x}))[outputName];
    const classes = y.dims[1];
    for (let i = 0; i < b; i++) logits.push(Array.from(y.data.subarray(i * classes, (i + 1) * classes)));
  }
  const format = integer ? v => String(v) : v => v.toPrecision(9);
  if (args.out) {
    const lines = logits.map((row, i) => `image ${i}: ${row.map(format).join(' ')} class ${argmax(row)}\n`);
    fs.writeFileSync(args.out, lines.join(''));
  }
  const summary = {model: modelPath, kind: integer ? 'integer' : 'float', images: count, threads: args.threads};
  if (args.reference) {
    const ref = readLogits(args.reference);
    if (ref.logits.length < count) throw new Error(`${args.reference}: ${ref.logits.length} images, ${count} needed`);
    let same = 0, maxDiff = 0, differing = 0;
    for (let i = 0; i < count; i++) {
      if (argmax(logits[i]) === ref.classes[i]) same++;
      if (ref.logits[i].length !== logits[i].length) throw new Error(`image ${i}: ${ref.logits[i].length} reference logits, ${logits[i].length} from ONNX Runtime`);
      for (let k = 0; k < logits[i].length; k++) {
        const d = Math.abs(logits[i][k] - ref.logits[i][k]);
        if (d > 0) differing++;
        if (d > maxDiff) maxDiff = d;
      }
    }
    Object.assign(summary, {identical_predictions: same, agreement: same / count, max_logit_diff: maxDiff,
                            differing_logits: differing, logits: count * logits[0].length});
  }
  console.log(JSON.stringify(summary));
}

main().catch(e => { console.error(`check.js: error: ${e.message}`); process.exit(1); });
