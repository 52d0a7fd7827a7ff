// Times ONNX Runtime's exact integer GEMM (npm onnxruntime-node, CPU kernels: MLAS): a model of one MatMulInteger
// node, uint8 A (M, K) × int8 B (K, N) → int32 Y (M, N), B a constant initializer, per shape: one JSON line each.
//
//   node tools/ort/time_gemm.js --threads T [--seconds S] [--no-zero-point] [--no-check] MxKxN...
//
// Before timing, ORT's Y is compared with a plain-loop reference on full-range random codes (A in 0..255, B in
// -128..127, a_zero_point 131); any difference stops the script with exit 1. Then, after warm-up, it times calls until
// they add up to S seconds (default 0.5, at least 5 calls), each three ways: the wall time of session.run in
// JavaScript, ORT's own time for the run (its profiler's model_run) and the MatMulInteger kernel's alone (its
// profiler's node time). The medians, and GOP/s = 2·M·K·N / median of each. The difference between the first two
// is the Node.js binding (wrapping A, allocating Y and copying it out: milliseconds at 1024×1024). T intra-op threads,
// one inter-op thread, all graph optimizations. tools/bench.py --gemm calls this.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const ort = require('onnxruntime-node');
const {kUint8, kInt8, kInt32, valueInfo, initializer, model, median} = require('./onnx_bytes');

const kZeroPoint = 131;  // a_zero_point: any value in 0..255; not 0 or 128, so that a wrong sign shows up

function usage(message) {
  console.error(`time_gemm.js: error: ${message}`);
  console.error('usage: node tools/ort/time_gemm.js --threads T [--seconds S] [--no-zero-point] [--no-check] MxKxN...');
  process.exit(2);
}

function parseArgs(argv) {
  const args = {threads: 0, seconds: 0.5, zeroPoint: true, check: true, shapes: []};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
    if (a === '--threads') args.threads = parseInt(value(), 10);
    else if (a === '--seconds') args.seconds = parseFloat(value());
    else if (a === '--no-zero-point') args.zeroPoint = false;
    else if (a === '--no-check') args.check = false;
    else if (a.startsWith('--')) usage(`unknown option ${a}`);
    else {
      const dims = a.split('x').map(v => parseInt(v, 10));
      if (dims.length !== 3 || dims.some(d => !(d >= 1))) usage(`a shape is MxKxN (for example 1024x1024x1024), not '${a}'`);
      args.shapes.push(dims);
    }
  }
  if (!(args.threads >= 1)) usage('--threads must be at least 1');
  if (!(args.seconds > 0)) usage('--seconds must be positive');
  if (args.shapes.length === 0) usage('no shape given');
  return args;
}

// ---- The model ---------------------------------------------------------------------------------------------------
// Y = MatMulInteger(A, B[, a_zero_point]): A uint8 (M, K) input, B int8 (K, N) and a_zero_point initializers.
function gemmModel(m, k, n, b, zeroPoint) {
  const initializers = [initializer('B', kInt8, [k, n], Buffer.from(b.buffer, b.byteOffset, b.byteLength))];
  const ins = ['A', 'B'];
  if (zeroPoint !== null) {
    initializers.push(initializer('a_zero_point', kUint8, [], Buffer.from([zeroPoint])));
    ins.push('a_zero_point');
  }
  return model({name: 'gemm', nodes: [['MatMulInteger', ins, ['Y']]], initializers, inputs: [valueInfo('A', kUint8, [m, k])],
                outputs: [valueInfo('Y', kInt32, [m, n])]});
}

// ---- The reference, and the data --------------------------------------------------------------------------------
// Y[i][j] = sum over p of (A[i][p] − zero_point) · B[p][j], exact: |Y| ≤ 255 · 128 · K fits int32 for K < 65794.
function gemmReference(a, b, m, k, n, zeroPoint) {
  const bt = new Int32Array(n * k);  // B transposed, so that the inner loop reads both operands in order
  for (let p = 0; p < k; p++) for (let j = 0; j < n; j++) bt[j * k + p] = b[p * n + j];
  const row = new Int32Array(k), y = new Int32Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let p = 0; p < k; p++) row[p] = a[i * k + p] - zeroPoint;
    for (let j = 0; j < n; j++) {
      let sum = 0;
      for (let p = 0, q = j * k; p < k; p++, q++) sum += row[p] * bt[q];
      y[i * n + j] = sum;
    }
  }
  return y;
}

// mulberry32: a seeded 32-bit generator; the codes only need to look random and to be the same on every run.
function random(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), seed | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

// ---- Timing -----------------------------------------------------------------------------------------------------
const nowS = () => Number(process.hrtime.bigint()) / 1e9;

// Wall seconds of each session.run(feeds): warm-up calls for at least 0.1 s (3 or more), then calls until they add up
// to `seconds` (5 or more).
async function timeCalls(session, feeds, seconds) {
  for (let i = 0, start = nowS(); i < 3 || nowS() - start < 0.1; i++) await session.run(feeds);
  const times = [];
  for (let total = 0; times.length < 5 || total < seconds;) {
    const t = nowS();
    await session.run(feeds);
    times.push(nowS() - t);
    total += times[times.length - 1];
  }
  return times;
}

// The durations in seconds of the profiler's events called `name` (in run order), from the file endProfiling wrote.
function profiledSeconds(dir, name) {
  const files = fs.readdirSync(dir).filter(f => f.endsWith('.json'));
  if (files.length !== 1) throw new Error(`expected one profile in ${dir}, found ${files.length}`);
  const events = JSON.parse(fs.readFileSync(path.join(dir, files[0]), 'utf8'));
  return events.filter(e => e.name === name).map(e => e.dur / 1e6);
}

async function timeShape([m, k, n], args) {
  const next = random(m * 1000003 + k * 1009 + n);
  const a = Uint8Array.from({length: m * k}, () => next() & 255);
  const b = Int8Array.from({length: k * n}, () => (next() & 255) - 128);
  const zeroPoint = args.zeroPoint ? kZeroPoint : null;
  const profileDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lowbit-ort-gemm-'));
  try {
    const session = await ort.InferenceSession.create(gemmModel(m, k, n, b, zeroPoint), {
      intraOpNumThreads: args.threads, interOpNumThreads: 1, graphOptimizationLevel: 'all', executionMode: 'sequential',
      enableProfiling: true, profileFilePrefix: path.join(profileDir, 'gemm')});
    const feeds = {A: new ort.Tensor('uint8', a, [m, k])};
    const line = {m, k, n, ops: 2 * m * k * n, a_zero_point: zeroPoint, threads: args.threads};
    if (args.check) {
      const y = (await session.run(feeds)).Y;
      if (y.type !== 'int32' || y.dims.join() !== [m, n].join())
        throw new Error(`${m}x${k}x${n}: ONNX Runtime returned ${y.type} [${y.dims}], expected int32 [${m},${n}]`);
      const ref = gemmReference(a, b, m, k, n, zeroPoint ?? 0);
      let differing = 0, first = -1;
      for (let i = 0; i < ref.length; i++) if (y.data[i] !== ref[i]) { differing++; if (first < 0) first = i; }
      if (differing > 0)
        throw new Error(`${m}x${k}x${n}: ONNX Runtime's MatMulInteger is not exact: ${differing} of ${ref.length} ` +
                        `outputs differ from the reference; the first at row ${Math.floor(first / n)}, column ` +
                        `${first % n}: ${y.data[first]} instead of ${ref[first]}`);
      line.exact = true;  // every output equal to the reference's
    }
    const wall = await timeCalls(session, feeds, args.seconds);
    session.endProfiling();
    // The profile holds every run, warm-up and check included: the timed ones are the last.
    const [run, kernel] = ['model_run', 'MatMulInteger_kernel_time'].map(name => {
      const all = profiledSeconds(profileDir, name);
      if (all.length < wall.length) throw new Error(`the profile has ${all.length} '${name}' events, ${wall.length} runs were timed`);
      return all.slice(all.length - wall.length);
    });
    const gops = s => +(line.ops / s / 1e9).toFixed(2);
    Object.assign(line, {calls: wall.length, wall_median_s: median(wall), wall_best_s: Math.min(...wall),
                         run_median_s: median(run), kernel_median_s: median(kernel), kernel_best_s: Math.min(...kernel),
                         binding_median_s: median(wall.map((w, i) => w - run[i]))});
    Object.assign(line, {gops_wall: gops(line.wall_median_s), gops_run: gops(line.run_median_s),
                         gops_kernel: gops(line.kernel_median_s), gops_kernel_best: gops(line.kernel_best_s)});
    line.onnxruntime = ort.env.versions ? ort.env.versions.common : undefined;
    return line;
  } finally {
    fs.rmSync(profileDir, {recursive: true, force: true});
  }
}

(async () => {
  const args = parseArgs(process.argv.slice(2));
  for (const shape of args.shapes) console.log(JSON.stringify(await timeShape(shape, args)));
})().catch(e => { console.error(`time_gemm.js: error: ${e.message}`); process.exit(1); });
