// Times ONNX Runtime (npm onnxruntime-node, CPU kernels: MLAS) on models exported by `export --format onnx`:
// the median latency of batch-1 calls and the images/s of batch-256 calls, one JSON line per model, after one line
// for a model that only returns its input (what a call costs without any kernel).
//
//   node tools/ort/time_ort.js --threads T [--shape C,H,W] [--b1-calls N] [--b256-reps N] MODEL.onnx...
//
// Every model takes "image", uint8 (N, C, H, W) (default shape 1,28,28: the built-in models). Runs are sequential,
// with T intra-op threads and one inter-op thread; warm-up calls are not timed. tools/bench.py calls this.
'use strict';
const ort = require('onnxruntime-node');
const {kUint8, valueInfo, model, median} = require('./onnx_bytes');

function usage(message) {
  console.error(`time_ort.js: error: ${message}`);
  console.error('usage: node tools/ort/time_ort.js --threads T [--shape C,H,W] [--b1-calls N] [--b256-reps N] MODEL.onnx...');
  process.exit(2);
}

function parseArgs(argv) {
  const args = {threads: 0, shape: [1, 28, 28], b1Calls: 3000, b256Reps: 20, models: []};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
    if (a === '--threads') args.threads = parseInt(value(), 10);
    else if (a === '--shape') args.shape = value().split(',').map(v => parseInt(v, 10));
    else if (a === '--b1-calls') args.b1Calls = parseInt(value(), 10);
    else if (a === '--b256-reps') args.b256Reps = parseInt(value(), 10);
    else if (a.startsWith('--')) usage(`unknown option ${a}`);
    else args.models.push(a);
  }
  if (!(args.threads >= 1)) usage('--threads must be at least 1');
  if (args.shape.length !== 3 || args.shape.some(v => !(v >= 1))) usage('--shape is C,H,W');
  if (args.models.length === 0) usage('no model given');
  return args;
}

// A model that returns its input ("image" → Identity → "y"): timing it measures what every call costs before any
// kernel runs (the Node.js binding, tensor wrapping, the session's bookkeeping).
function identityModel([c, h, w]) {
  const value = name => valueInfo(name, kUint8, ['N', c, h, w]);
  return model({name: 'identity', nodes: [['Identity', ['image'], ['y']]], inputs: [value('image')],
                outputs: [value('y')]});
}

const nowUs = () => Number(process.hrtime.bigint()) / 1e3;

async function time(model, args) {
  const session = await ort.InferenceSession.create(model, {
    intraOpNumThreads: args.threads, interOpNumThreads: 1, graphOptimizationLevel: 'all', executionMode: 'sequential'});
  const [c, h, w] = args.shape;
  const feed = n => ({image: new ort.Tensor('uint8', Uint8Array.from({length: n * c * h * w}, (_, i) => (i * 37) & 255),
                                            [n, c, h, w])});
  const one = feed(1), batch = feed(256);
  for (let i = 0; i < 200; i++) await session.run(one);
  const latencies = [];
  for (let i = 0; i < args.b1Calls; i++) {
    const t = nowUs();
    await session.run(one);
    latencies.push(nowUs() - t);
  }
  for (let i = 0; i < 3; i++) await session.run(batch);
  const batchTimes = [];
  for (let i = 0; i < args.b256Reps; i++) {
    const t = nowUs();
    await session.run(batch);
    batchTimes.push(nowUs() - t);
  }
  return {model: typeof model === 'string' ? model : 'identity (the call overhead)', threads: args.threads, b1_median_us: +median(latencies).toFixed(2),
          b256_images_per_s: Math.round(256 / (median(batchTimes) / 1e6)), b1_calls: args.b1Calls,
          b256_reps: args.b256Reps, onnxruntime: ort.env.versions ? ort.env.versions.common : undefined};
}

(async () => {
  const args = parseArgs(process.argv.slice(2));
  console.log(JSON.stringify(await time(identityModel(args.shape), args)));
  for (const path of args.models) console.log(JSON.stringify(await time(path, args)));
})().catch(e => { console.error(`time_ort.js: error: ${e.message}`); process.exit(1); });
