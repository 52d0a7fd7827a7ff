// The executor: plans buffers once, then runs each op's kernel in order (channels last on the fast kernels).
#include "quant/runtime/executor.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/parallel.h"
#include "quant/runtime/int4.h"

namespace lowbit::quant::runtime {

namespace {

constexpr int64_t kChunkRows = 1024;  // GEMM rows (output positions) per chunk: its accumulators stay in L2
// Below this many multiply-adds (or bytes, for the memory-bound ops) per thread, an op runs on one thread:
// starting and joining a parallel region costs microseconds, and on a busy machine a descheduled worker
// turns every join into a scheduler tick — the batch-1 latency tail.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 19;
constexpr int64_t kMinImagesPerSlice = 8;  // smaller batches split each op over the threads instead
// The arena bytes of one tile of images (Executor::run): a quarter of the Xeon's 2 MiB L2, leaving room for the
// weights and a conv's planes and accumulators. Measured at batch 256, tiles of 256 KiB to 1 MiB ran at the same
// speed: dsconv and convbn 8–20% faster than the whole batch op by op, resnet8 the same (docs/benchmarks.md).
constexpr int64_t kTileBytes = int64_t{1} << 19;

bool is_weighted(const Op& op) { return op.kind == OpKind::Conv2d || op.kind == OpKind::Linear; }

// The weights of a Linear whose (C, H, W) input arrives channels last: column (c, h, w) moves to (h, w, c),
// so that the product is the same. Same form as op.weight (int8 codes or packed int4 rows).
std::vector<int8_t> channels_last_columns(const Op& op, const Shape& in) {
  const int64_t length = in.size(), positions = in.h * in.w;
  const int64_t row_bytes = op.weight_bits == 8 ? length : static_cast<int64_t>(int4_packed_size(length));
  std::vector<int8_t> codes(static_cast<size_t>(length)), moved(static_cast<size_t>(length));
  std::vector<int8_t> weight(op.weight.size());
  for (int64_t o = 0; o < op.out_channels; ++o) {
    const std::span<const int8_t> row(op.weight.data() + o * row_bytes, static_cast<size_t>(row_bytes));
    const std::span<int8_t> dst(weight.data() + o * row_bytes, static_cast<size_t>(row_bytes));
    if (op.weight_bits == 8) {
      std::copy(row.begin(), row.end(), codes.begin());
    } else {
      unpack_int4(row, codes);
    }
    for (int64_t c = 0; c < in.c; ++c)
      for (int64_t p = 0; p < positions; ++p)
        moved[static_cast<size_t>(p * in.c + c)] = codes[static_cast<size_t>(c * positions + p)];
    if (op.weight_bits == 8) {
      std::copy(moved.begin(), moved.end(), dst.begin());
    } else {
      pack_int4(moved, dst);
    }
  }
  return weight;
}

}  // namespace

Executor::Executor(const Graph& graph, int threads, Kernels kernels)
    : Executor(graph, threads, kernels == Kernels::Fastest ? runtime::kernel_path() : KernelPath::Ref) {}

Executor::Executor(const Graph& graph, int threads, KernelPath path)
    : graph_(graph), threads_(std::max(threads, 1)), path_(path), fast_(path != KernelPath::Ref) {
  if (!cpu_supports(path)) (void)parse_kernel_path(kernel_path_name(path));  // throws, naming what the CPU has
  validate(graph_);
  shapes_ = output_shapes(graph_);
  packed_.resize(graph_.ops.size());
  conv_.resize(graph_.ops.size());
  pool_fused_.assign(graph_.ops.size(), false);
  outputs_.resize(graph_.ops.size());
  grouped_.resize(graph_.ops.size());
  const std::vector<std::vector<int>> reader_lists = readers(graph_);
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    if (fast_ && op.kind == OpKind::Conv2d && op.groups > 1)  // (the reference path reads op.weight)
      grouped_[i] = pack_grouped_conv(op.weight, op.weight_bits, conv_shape(i, 1));
  }
  for (size_t i = 0; fast_ && i < graph_.ops.size(); ++i) {  // the fast kernels' weights and fusions
    const Op& op = graph_.ops[i];
    const Shape in = i == 0 ? input_shape(0) : stored_shape(static_cast<size_t>(op.inputs[0]));
    if (op.kind == OpKind::Conv2d && op.groups == 1) {
      // Fused with the max pool after it when the pool is the conv's only reader.
      pool_fused_[i] = i + 1 < graph_.ops.size() && graph_.ops[i + 1].kind == OpKind::MaxPool2d &&
                       reader_lists[i] == std::vector<int>{static_cast<int>(i) + 1};
      conv_[i] = pack_conv_weights(op.weight, op.weight_bits, in.c, in.h, in.w, op.out_channels, op.kernel, op.stride,
                                   op.padding, path_);
    } else if (op.kind == OpKind::Linear && in.h * in.w > 1) {
      packed_[i] = pack_weights(channels_last_columns(op, in), op.weight_bits, in.size(), op.out_channels, path_);
    } else if (op.kind == OpKind::Linear) {
      packed_[i] = pack_weights(op.weight, op.weight_bits, in.size(), op.out_channels, path_);
    } else if (op.kind == OpKind::Add || op.kind == OpKind::Concat) {
      // Channels last, a flattened feature map keeps its (H, W, C) byte order (stored_shape): elementwise Add
      // and Concat are only right when every input's bytes follow its own shape's order.
      for (const int j : op.inputs) {
        const auto input = static_cast<size_t>(j);
        const bool reordered = stored_shape(input) != shapes_[input];
        if (reordered && (op.kind == OpKind::Concat || stored_shape(input) != stored_shape(op.inputs[0]))) {
          throw RuntimeError("runtime executor: op " + std::to_string(i) + " '" + op.name + "' (" +
                             to_string(op.kind) +
                             ") joins flattened feature maps of different shapes, which the channels-last "
                             "kernels cannot; join them before the Flatten, or run on the reference kernels");
        }
      }
    }
  }
  // One plan for every batch: a slice of B images lays its buffers out at B times the offsets of one image.
  plan_ = plan_graph_arena(graph_, pool_fused_);
}

void Executor::keep_all_outputs(bool keep) {
  if (keep != keep_outputs_) capacity_ = 0;  // re-plan on the next run
  keep_outputs_ = keep;
}

int8_t* Executor::codes_at(size_t j, int64_t first, int64_t batch, Scratch& sc) {
  if (keep_outputs_) return outputs_[j].data() + first * shapes_[j].size();
  if (plan_.offsets[j] < 0) return nullptr;  // a conv fused into its max pool: never stored
  return sc.arena.data() + plan_.offsets[j] * batch;
}

int64_t Executor::tile_images() const {
  return std::max<int64_t>(1, kTileBytes / std::max<int64_t>(plan_.arena_bytes, 1));
}

ConvShape Executor::conv_shape(size_t op_index, int64_t images) const {
  const Op& op = graph_.ops[op_index];
  const Shape in = input_shape(op_index);
  return {images, in.c, in.h, in.w, op.out_channels, op.kernel, op.stride, op.padding, op.groups};
}

int Executor::threads_for(int64_t work, int max_threads) const {
  return static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, max_threads));
}

// A batch of at least kMinImagesPerSlice images per thread is split into one slice per thread.
int Executor::slices(int64_t batch) const {
  return static_cast<int>(std::clamp<int64_t>(batch / kMinImagesPerSlice, 1, threads_));
}

int64_t Executor::num_classes() const { return shapes_.back().size(); }

// The (C, H, W) shape whose channels-last order ops[op_index]'s output bytes follow on the fast kernels:
// a Flatten keeps the bytes, and so the order, of its input.
// An Add or a Clamp keeps the order of its input's bytes too.
Shape Executor::stored_shape(size_t op_index) const {
  for (;;) {
    const OpKind kind = graph_.ops[op_index].kind;
    if (kind != OpKind::Flatten && kind != OpKind::Add && kind != OpKind::Clamp) return shapes_[op_index];
    op_index = static_cast<size_t>(graph_.ops[op_index].inputs[0]);
  }
}

std::span<const int8_t> Executor::op_output(size_t op_index) const {
  if (!stores_output(op_index)) return {};
  const bool last = op_index + 1 == graph_.ops.size();
  if (!keep_outputs_ && !last)
    throw RuntimeError("runtime executor: op_output(" + std::to_string(op_index) +
                       "): the planned arena keeps only the logits; call keep_all_outputs() before run()");
  const Shape s = stored_shape(op_index);
  const std::span<const int8_t> codes(keep_outputs_ ? outputs_[op_index].data() : logits_.data(),
                                      static_cast<size_t>(batch_ * s.size()));
  if (!fast_ || s.c == 1 || s.h * s.w == 1) return codes;  // the two layouts are the same bytes
  view_.resize(codes.size());                              // channels last → (N, C, H, W)
  for (int64_t i = 0; i < batch_; ++i)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t p = 0; p < s.h * s.w; ++p)
        view_[static_cast<size_t>((i * s.c + c) * s.h * s.w + p)] =
            codes[static_cast<size_t>((i * s.h * s.w + p) * s.c + c)];
  return view_;
}

Shape Executor::input_shape(size_t op_index) const {
  return op_index == 0 ? Shape{graph_.in_channels, graph_.in_height, graph_.in_width}
                       : shapes_[static_cast<size_t>(graph_.ops[op_index].inputs[0])];
}

int64_t Executor::images_per_chunk(size_t op_index) const {
  const Shape& out = shapes_[op_index];
  return std::max<int64_t>(1, kChunkRows / (out.h * out.w));
}

// Each thread gets its own scratch, sized for the largest chunk any slice of any batch up to this one
// can run (a chunk is at most kChunkRows GEMM rows, so this stays small).
void Executor::plan(int64_t batch) {
  if (batch <= capacity_) return;
  size_t cols = 0, acc = 0, workspace = 0, planes = 0, arena = 0;
  if (keep_outputs_) {
    for (size_t i = 0; i < graph_.ops.size(); ++i) outputs_[i].resize(static_cast<size_t>(batch * shapes_[i].size()));
  } else {
    outputs_.assign(graph_.ops.size(), {});
    arena = static_cast<size_t>(std::min(batch, tile_images()) * plan_.arena_bytes);  // a slice's tile
    logits_.resize(static_cast<size_t>(batch * shapes_.back().size()));
  }
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    if (!is_weighted(op)) continue;
    const int64_t images = std::min(batch, images_per_chunk(i)), rows = images * shapes_[i].h * shapes_[i].w;
    if (op.kind == OpKind::Conv2d && op.groups > 1) {
      // accumulators only
    } else if (op.kind == OpKind::Conv2d && fast_) {
      planes = std::max(planes, conv_planes_size(images, conv_[i]));
    } else if (op.kind == OpKind::Conv2d) {
      cols = std::max(cols, static_cast<size_t>(rows * weight_row_length(op)));
    } else if (fast_) {
      workspace = std::max(workspace, qgemm_packed_workspace_size(rows, packed_[i]));
    }
    acc = std::max(acc, static_cast<size_t>(rows * op.out_channels));
    if (pool_fused_[i] &&
        conv_pool_fusable(conv_[i], graph_.ops[i + 1].kernel, graph_.ops[i + 1].stride, graph_.ops[i + 1].padding)) {
      acc = std::max(acc, static_cast<size_t>(threads_) * conv_pool_scratch_size(conv_[i]));  // one per thread
    }
  }
  scratch_.resize(static_cast<size_t>(threads_));
  for (Scratch& sc : scratch_) {
    sc.cols.resize(cols);
    sc.acc.resize(acc);
    sc.workspace.resize(workspace);
    sc.planes.resize(planes);
    sc.arena.resize(arena);
  }
  capacity_ = batch;
}

// Conv2d / Linear on chunks of images: GEMM to int32 (eq. 5) → requantize (eq. 6), on the reference kernels via
// im2col and to (N, OUT, HO, WO); on the fast ones as an implicit GEMM, channels last, maybe with the max pool.
void Executor::run_weighted(size_t op_index, const int8_t* x, int8_t* y, int64_t batch, Scratch& sc, int max_threads) {
  const Op& op = graph_.ops[op_index];
  const Shape in = input_shape(op_index), out = shapes_[op_index];
  const int64_t positions = out.h * out.w, row_length = weight_row_length(op);
  const int64_t chunk = images_per_chunk(op_index);
  for (int64_t first = 0; first < batch; first += chunk) {
    const int64_t images = std::min(chunk, batch - first), rows = images * positions;
    const int8_t* xc = x + first * in.size();
    std::span<int32_t> acc(sc.acc.data(), static_cast<size_t>(rows * op.out_channels));
    const std::span<const int8_t> xs(xc, static_cast<size_t>(images * in.size()));
    const int threads = threads_for(rows * row_length * op.out_channels, max_threads);
    if (op.kind == OpKind::Conv2d && op.groups > 1) {
      const ConvShape s = conv_shape(op_index, images);
      if (fast_ && depthwise_in_one_pass(s, path_)) {
        qconv2d_depthwise_requantized(xs, op.input_zero_point, grouped_[op_index], op.bias, op.requant,
                                      {y + first * out.size(), static_cast<size_t>(images * out.size())}, s, threads,
                                      path_);
        continue;
      }
      // Grouped: direct loops to (ROWS, OUT) accumulators, requantized below.
      if (fast_) {
        qconv2d_grouped_nhwc(xs, op.input_zero_point, grouped_[op_index], op.bias, acc, conv_shape(op_index, images),
                             threads);
      } else {
        qconv2d_grouped_ref(xs, op.input_zero_point, op.weight, op.weight_bits, op.bias, acc,
                            conv_shape(op_index, images), threads);
      }
    } else if (fast_ && op.kind == OpKind::Conv2d) {
      // Channels last: the micro-kernel reads the windows straight from the padded images (an implicit
      // GEMM, no im2col). Thread t computes a contiguous range of the chunk's GEMM rows.
      const PackedConv& pc = conv_[op_index];
      conv_planes(xs, op.input_zero_point, pc, sc.planes, images, threads);
      if (pool_fused_[op_index]) {
        // Followed by a max pool: pool the accumulators, then requantize the K² times fewer maxima (equal
        // codes: requantization never decreases). y is the pool's output.
        const Op& pool = graph_.ops[op_index + 1];
        const int64_t pooled = shapes_[op_index + 1].size();
        if (conv_pool_fusable(pc, pool.kernel, pool.stride, pool.padding)) {  // 2 × 2: in one pass, per row pair
          const int64_t pooled_rows = images * shapes_[op_index + 1].h;
          const size_t scratch = conv_pool_scratch_size(pc);
          parallel_for(threads, threads, [&](int64_t t) {
            const int64_t begin = pooled_rows * t / threads, end = pooled_rows * (t + 1) / threads;
            qconv2d_rows_pooled(sc.planes, op.input_zero_point, pc, op.bias, op.requant,
                                std::span<int32_t>(sc.acc).subspan(static_cast<size_t>(t) * scratch, scratch),
                                {y + first * pooled, static_cast<size_t>(images * pooled)}, begin, end - begin);
          });
          continue;
        }
        parallel_for(threads, threads, [&](int64_t t) {
          const int64_t begin = rows * t / threads, end = rows * (t + 1) / threads;
          qconv2d_rows(sc.planes, op.input_zero_point, pc, op.bias,
                       acc.subspan(static_cast<size_t>(begin * op.out_channels)), begin, end - begin);
        });
        maxpool_requantize_nhwc(acc, op.requant, {y + first * pooled, static_cast<size_t>(images * pooled)}, images,
                                out.c, out.h, out.w, pool.kernel, pool.stride, pool.padding, threads, path_);
        continue;
      }
      const std::span<int8_t> yc(y + first * out.size(), static_cast<size_t>(images * out.size()));
      parallel_for(threads, threads, [&](int64_t t) {
        const int64_t begin = rows * t / threads, end = rows * (t + 1) / threads;
        qconv2d_rows_requantized(sc.planes, op.input_zero_point, pc, op.bias, op.requant,
                                 yc.subspan(static_cast<size_t>(begin * op.out_channels)), begin, end - begin);
      });
      continue;  // requantized as they were computed
    } else if (fast_) {
      qgemm_packed(xs, op.input_zero_point, packed_[op_index], op.bias, acc, rows, sc.workspace, threads);
    } else {
      std::span<const int8_t> gemm_x = xs;
      if (op.kind == OpKind::Conv2d) {
        std::span<int8_t> cols(sc.cols.data(), static_cast<size_t>(rows * row_length));
        im2col(xs, op.input_zero_point, cols, images, in.c, in.h, in.w, op.kernel, op.stride, op.padding, threads);
        gemm_x = cols;
      }
      if (op.weight_bits == 8) {
        qgemm_s8_ref(gemm_x, op.input_zero_point, op.weight, op.bias, acc, rows, row_length, op.out_channels, threads);
      } else {
        qgemm_s4_ref(gemm_x, op.input_zero_point, op.weight, op.bias, acc, rows, row_length, op.out_channels, threads);
      }
    }
    const std::span<int8_t> yc(y + first * out.size(), static_cast<size_t>(images * out.size()));
    if (fast_) {  // channels last: (ROWS, OUT) accumulators to (ROWS, OUT) codes
      requantize_to_nchw(acc, op.requant, yc, rows, 1, op.out_channels, threads, path_);
    } else {
      requantize_to_nchw_ref(acc, op.requant, yc, images, positions, op.out_channels, threads);
    }
  }
}

std::span<const int8_t> Executor::run(std::span<const uint8_t> images, int64_t batch) {
  const Shape in{graph_.in_channels, graph_.in_height, graph_.in_width};
  if (batch < 0 || static_cast<int64_t>(images.size()) != batch * in.size()) {
    throw RuntimeError("runtime executor: expected " + std::to_string(batch) + " images of " +
                       std::to_string(in.size()) + " pixels (C·H·W), found " + std::to_string(images.size()) +
                       " pixels");
  }
  plan(batch);
  batch_ = batch;
  const int count = slices(batch);
  const size_t output = graph_.ops.size() - 1;
  const int64_t tile = tile_images(), classes = shapes_[output].size();
  // Slice s, a tile at a time; the kernels split each op over max_threads.
  const auto run_slice = [&](int64_t s, int max_threads) {
    Scratch& sc = scratch_[static_cast<size_t>(s)];
    const int64_t last = batch * (s + 1) / count;
    for (int64_t first = batch * s / count; first < last; first += tile) {
      const int64_t n = std::min(tile, last - first);
      run_images(images.data(), first, n, sc, max_threads);
      if (keep_outputs_) continue;
      const int8_t* codes = codes_at(output, first, n, sc);  // the tile's logits, before the next tile
      std::copy(codes, codes + n * classes, logits_.begin() + first * classes);
    }
  };
  if (count == 1) {
    run_slice(0, threads_);
  } else {
    // One parallel region per call: each thread runs every op on its own images, with one-thread kernels.
    // Images are independent, so the codes are those of any other split.
    parallel_for(count, count, [&](int64_t s) { run_slice(s, 1); });
  }
  return op_output(output);
}

// Images [first, first + batch) of the call through every op, in order.
void Executor::run_images(const uint8_t* pixels, int64_t first, int64_t batch, Scratch& sc, int max_threads) {
  const Shape in{graph_.in_channels, graph_.in_height, graph_.in_width};
  // The codes of op j's output for these images.
  const auto codes_of = [&](int j) {
    const auto k = static_cast<size_t>(j);
    return std::span<const int8_t>(codes_at(k, first, batch, sc), static_cast<size_t>(batch * shapes_[k].size()));
  };
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    const Shape x_shape = input_shape(i);
    const int8_t* x = i == 0 ? nullptr : codes_of(op.inputs[0]).data();
    int8_t* y = codes_at(i, first, batch, sc);  // may be x's bytes (a Flatten; an Add or Clamp in place)
    const auto y_size = static_cast<size_t>(batch * shapes_[i].size());
    const auto x_size = static_cast<size_t>(batch * x_shape.size());
    const int threads = threads_for(static_cast<int64_t>(x_size + y_size), max_threads);
    switch (op.kind) {
      case OpKind::Input:
        if (fast_ && in.c > 1) {
          input_lookup_nhwc({pixels + first * in.size(), static_cast<size_t>(batch * in.size())}, op.input_table,
                            {y, y_size}, batch, in.c, in.h * in.w, threads);
        } else {
          input_lookup_fast({pixels + first * in.size(), static_cast<size_t>(batch * in.size())}, op.input_table,
                            {y, y_size}, path_, threads);
        }
        break;
      case OpKind::Conv2d:
      case OpKind::Linear:
        if (pool_fused_[i]) {  // writes the output of the max pool ops[i + 1], which is then done
          run_weighted(i, x, codes_at(i + 1, first, batch, sc), batch, sc, max_threads);
          ++i;
        } else {
          run_weighted(i, x, y, batch, sc, max_threads);
        }
        break;
      case OpKind::MaxPool2d:
        (fast_ ? maxpool2d_nhwc : maxpool2d)({x, x_size}, {y, y_size}, batch, x_shape.c, x_shape.h, x_shape.w,
                                             op.kernel, op.stride, op.padding, threads);
        break;
      case OpKind::AvgPool2d:
        (fast_ ? avgpool2d_nhwc : avgpool2d)({x, x_size}, op.input_zero_point, {y, y_size}, batch, x_shape.c, x_shape.h,
                                             x_shape.w, op.kernel, op.stride, op.padding, threads);
        break;
      case OpKind::GlobalAvgPool2d:
        global_avgpool({x, x_size}, op.input_zero_point, {y, y_size}, batch, x_shape.c, x_shape.h * x_shape.w, fast_,
                       threads);
        break;
      case OpKind::Flatten:
        // (N, C, H, W) and (N, C·H·W) are the same bytes: planned, they are the input's; kept, a copy
        if (y_size > 0 && y != x) std::memcpy(y, x, y_size);
        break;
      case OpKind::Clamp:
        clamp_codes({x, x_size}, op.requant.act_min, op.requant.act_max, {y, y_size}, threads);
        break;
      case OpKind::Add:
        qadd(codes_of(op.inputs[0]), codes_of(op.inputs[1]), op.rescale, op.requant, {y, y_size}, threads, path_);
        break;
      case OpKind::Concat: {
        std::vector<std::span<const int8_t>> parts;
        std::vector<int64_t> channels;
        for (const int j : op.inputs) {
          parts.push_back(codes_of(j));
          channels.push_back(shapes_[static_cast<size_t>(j)].c);
        }
        qconcat(parts, channels, shapes_[i].h * shapes_[i].w, batch, op.rescale, op.requant, {y, y_size}, fast_,
                threads);
        break;
      }
    }
  }
}

}  // namespace lowbit::quant::runtime
