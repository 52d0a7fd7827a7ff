// The executor: plans buffers once, then runs each op's kernel in order (im2col + GEMM for Conv2d).
#include "quant/runtime/executor.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace lowbit::quant::runtime {

namespace {

constexpr int64_t kChunkRows = 1024;  // GEMM rows (output positions) per chunk: its accumulators stay in L2
// Below this many multiply-adds (or bytes, for the memory-bound ops) per thread, an op runs on one thread:
// starting and joining a parallel region costs microseconds, and on a busy machine a descheduled worker
// turns every join into a scheduler tick — the batch-1 latency tail.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 19;
constexpr int64_t kMinImagesPerSlice = 8;  // smaller batches split each op over the threads instead

bool is_weighted(const Op& op) { return op.kind == OpKind::Conv2d || op.kind == OpKind::Linear; }

}  // namespace

Executor::Executor(const Graph& graph, int threads, Kernels kernels)
    : graph_(graph), threads_(std::max(threads, 1)), fast_(kernels == Kernels::Fastest && cpu_has_avx2()) {
  validate(graph_);
  shapes_ = output_shapes(graph_);
  packed_.resize(graph_.ops.size());
  outputs_.resize(graph_.ops.size());
  if (fast_) {
    for (size_t i = 0; i < graph_.ops.size(); ++i) {
      const Op& op = graph_.ops[i];
      if (is_weighted(op)) packed_[i] = pack_weights(op.weight, op.weight_bits, weight_row_length(op), op.out_channels);
    }
  }
}

int Executor::threads_for(int64_t work, int max_threads) const {
  return static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, max_threads));
}

// A batch of at least kMinImagesPerSlice images per thread is split into one slice per thread.
int Executor::slices(int64_t batch) const {
  return static_cast<int>(std::clamp<int64_t>(batch / kMinImagesPerSlice, 1, threads_));
}

int64_t Executor::num_classes() const { return shapes_.back().size(); }

std::span<const int8_t> Executor::op_output(size_t op_index) const {
  return {outputs_.at(op_index).data(), static_cast<size_t>(batch_ * shapes_[op_index].size())};
}

Shape Executor::input_shape(size_t op_index) const {
  return op_index == 0 ? Shape{graph_.in_channels, graph_.in_height, graph_.in_width} : shapes_[op_index - 1];
}

int64_t Executor::images_per_chunk(size_t op_index) const {
  const Shape& out = shapes_[op_index];
  return std::max<int64_t>(1, kChunkRows / (out.h * out.w));
}

// Each thread gets its own scratch, sized for the largest chunk any slice of any batch up to this one
// can run (a chunk is at most kChunkRows GEMM rows, so this stays small).
void Executor::plan(int64_t batch) {
  if (batch <= capacity_) return;
  size_t cols = 0, acc = 0, workspace = 0, planes = 0;
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    outputs_[i].resize(static_cast<size_t>(batch * shapes_[i].size()));
    if (!is_weighted(op)) continue;
    const int64_t images = std::min(batch, images_per_chunk(i)), rows = images * shapes_[i].h * shapes_[i].w;
    const Shape in = input_shape(i);
    if (op.kind == OpKind::Conv2d && fast_) {
      planes = std::max(planes, im2col_packed_planes_size(images, in.c, in.h, in.w, op.padding));
    } else if (op.kind == OpKind::Conv2d) {
      cols = std::max(cols, static_cast<size_t>(rows * weight_row_length(op)));
    }
    acc = std::max(acc, static_cast<size_t>(rows * op.out_channels));
    if (fast_ && op.kind == OpKind::Conv2d) {  // one block of packed rows per thread
      workspace =
          std::max(workspace, static_cast<size_t>(threads_) * qgemm_packed_workspace_size(kPackedRowBlock, packed_[i]));
    } else if (fast_) {
      workspace = std::max(workspace, qgemm_packed_workspace_size(rows, packed_[i]));
    }
  }
  scratch_.resize(static_cast<size_t>(threads_));
  for (Scratch& sc : scratch_) {
    sc.cols.resize(cols);
    sc.acc.resize(acc);
    sc.workspace.resize(workspace);
    sc.planes.resize(planes);
  }
  capacity_ = batch;
}

// Conv2d / Linear on chunks of images: (im2col →) GEMM to int32 (eq. 5) → requantize to (N, OUT, HO, WO) (eq. 6).
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
    if (fast_ && op.kind == OpKind::Conv2d) {
      // The windows go straight into the GEMM's packed layout (no int8 cols buffer, no second packing).
      // Blocks of kPackedRowBlock rows are packed and multiplied while they are in L1; thread t takes
      // blocks t, t + threads, ... with its own part of the workspace.
      const PackedWeights& pw = packed_[op_index];
      im2col_planes(xs, op.input_zero_point, pw.bits, sc.planes, images, in.c, in.h, in.w, op.padding, threads);
      const int64_t blocks = (rows + kPackedRowBlock - 1) / kPackedRowBlock;
      const size_t block_units = qgemm_packed_workspace_size(kPackedRowBlock, pw);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
      for (int t = 0; t < threads; ++t) {
        const std::span<int32_t> xp(sc.workspace.data() + static_cast<size_t>(t) * block_units, block_units);
        for (int64_t b = t; b < blocks; b += threads) {
          const int64_t first = b * kPackedRowBlock, count = std::min(kPackedRowBlock, rows - first);
          im2col_packed_rows(sc.planes, pw, xp, first, count, in.c, in.h, in.w, op.kernel, op.stride, op.padding);
          qgemm_prepacked(
              xp, op.input_zero_point, pw, op.bias,
              acc.subspan(static_cast<size_t>(first * op.out_channels), static_cast<size_t>(count * op.out_channels)),
              count, 1);
        }
      }
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
    if (fast_) {
      requantize_to_nchw(acc, op.requant, yc, images, positions, op.out_channels, threads);
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
  if (count == 1) {
    run_images(images.data(), 0, batch, scratch_[0], threads_);  // the kernels split each op over threads
  } else {
    // One parallel region per call: each thread runs every op on its own images, with one-thread kernels.
    // Images are independent, so the codes are those of any other split.
#pragma omp parallel for num_threads(count) schedule(static)
    for (int s = 0; s < count; ++s) {
      const int64_t first = batch * s / count, last = batch * (s + 1) / count;
      run_images(images.data(), first, last - first, scratch_[static_cast<size_t>(s)], 1);
    }
  }
  return op_output(graph_.ops.size() - 1);
}

// Images [first, first + batch) of the call through every op, in order.
void Executor::run_images(const uint8_t* pixels, int64_t first, int64_t batch, Scratch& sc, int max_threads) {
  const Shape in{graph_.in_channels, graph_.in_height, graph_.in_width};
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    const Shape x_shape = input_shape(i);
    const int8_t* x = i == 0 ? nullptr : outputs_[i - 1].data() + first * x_shape.size();
    int8_t* y = outputs_[i].data() + first * shapes_[i].size();
    const auto y_size = static_cast<size_t>(batch * shapes_[i].size());
    const auto x_size = static_cast<size_t>(batch * x_shape.size());
    const int threads = threads_for(static_cast<int64_t>(x_size + y_size), max_threads);
    switch (op.kind) {
      case OpKind::Input:
        input_lookup({pixels + first * in.size(), static_cast<size_t>(batch * in.size())}, op.input_table, {y, y_size},
                     threads);
        break;
      case OpKind::Conv2d:
      case OpKind::Linear:
        run_weighted(i, x, y, batch, sc, max_threads);
        break;
      case OpKind::MaxPool2d:
        maxpool2d({x, x_size}, {y, y_size}, batch, x_shape.c, x_shape.h, x_shape.w, op.kernel, op.stride, op.padding,
                  threads);
        break;
      case OpKind::AvgPool2d:
        avgpool2d({x, x_size}, op.input_zero_point, {y, y_size}, batch, x_shape.c, x_shape.h, x_shape.w, op.kernel,
                  op.stride, op.padding, threads);
        break;
      case OpKind::Flatten:
        if (y_size > 0) std::memcpy(y, x, y_size);  // (N, C, H, W) and (N, C·H·W) are the same bytes
        break;
    }
  }
}

}  // namespace lowbit::quant::runtime
