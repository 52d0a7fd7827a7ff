// Runs a validated integer graph on batches of uint8 images: int8 logits out, integer instructions only.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "quant/runtime/graph.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/memory_plan.h"

namespace lowbit::quant::runtime {

class Executor {
 public:
  // Fastest: kernel_path() (cpu.h: the best path the CPU has, unless LOWBIT_KERNELS or set_kernel_path chose
  // another); Reference: plain loops only.
  enum class Kernels { Fastest, Reference };

  // Validates the graph (throws RuntimeError) and re-lays the weights out for the fast kernels, once.
  explicit Executor(const Graph& graph, int threads = 1, Kernels kernels = Kernels::Fastest);
  // On the given path; throws RuntimeError if the CPU lacks it (cpu_supports).
  Executor(const Graph& graph, int threads, KernelPath path);

  // images is (N, C·H·W) uint8 pixels; returns (N, classes) int8 logits, a view into an internal buffer
  // valid until the next call. Buffers are planned on the first call and grow only with the batch:
  // later calls with a batch no larger allocate nothing.
  //
  // Activations live in arenas laid out by plan_graph_arena (memory_plan.h, the exporter's planner): an
  // op's output shares bytes with outputs that are dead by the time it is written; a Flatten shares its input's
  // bytes; an Add or Clamp writes over an input that dies with it. Each slice of the batch (one per thread)
  // runs its images a tile at a time: a tile of B images goes through every op before the next starts, in the
  // slice's arena of B · arena_bytes_per_image() bytes, op i's codes at offsets[i] · B. A tile is as many
  // images as fit in tile_images(): their activations stay in the core's L2 cache from op to op, where a
  // whole batch of 256 would stream through memory at every op.
  std::span<const int8_t> run(std::span<const uint8_t> images, int64_t batch);

  // Keep every op's output of the last run for op_output (inspection, tests): each op gets a buffer of its own
  // instead of the planned arena. Call before run().
  void keep_all_outputs(bool keep = true);
  // The buffer plan of one image (offsets in bytes, the arena and its lower bound), computed once.
  const ArenaPlan& memory_plan() const { return plan_; }
  // The peak activation memory the planned run needs per image: the arena of one image, in bytes.
  int64_t arena_bytes_per_image() const { return plan_.arena_bytes; }
  // The images of one tile: as many as kTileBytes of arena hold, at least 1.
  int64_t tile_images() const;

  int64_t num_classes() const;
  // The (N, C, H, W) codes that ops[op_index] produced in the last run, and its per-image shape. Needs
  // keep_all_outputs() for every op but the last (throws RuntimeError otherwise).
  // (The fast kernels keep activations channels last; this transposes them into a buffer of its own,
  // valid until the next call.)
  std::span<const int8_t> op_output(size_t op_index) const;
  // False for a Conv2d that the fast kernels fuse with the MaxPool2d after it: its codes are never stored
  // (op_output is then empty), the pool's are.
  bool stores_output(size_t op_index) const { return !pool_fused_.at(op_index); }
  const Shape& op_shape(size_t op_index) const { return shapes_[op_index]; }
  const Graph& graph() const { return graph_; }
  KernelPath kernel_path() const { return path_; }  // the path every op runs on

 private:
  Shape input_shape(size_t op_index) const;  // the shape of its (first) input
  ConvShape conv_shape(size_t op_index, int64_t images) const;
  Shape stored_shape(size_t op_index) const;
  int64_t images_per_chunk(size_t op_index) const;  // a weighted op runs on chunks of images
  // Scratch of one slice of the batch (one per thread): reused by every op, sized by plan().
  struct Scratch {
    std::vector<int8_t> cols;        // im2col rows of one chunk, (ROWS, C·K·K) (reference path)
    std::vector<int32_t> acc;        // int32 accumulators of one chunk, (ROWS, OUT)
    std::vector<int32_t> workspace;  // packed x of one chunk for qgemm_packed (Linear)
    std::vector<int16_t> planes;     // padded channels-last images of one chunk for qconv2d_rows
    std::vector<int8_t> arena;       // the activations of one tile (unless keep_all_outputs)
  };
  int threads_for(int64_t work, int max_threads) const;  // threads worth starting for this much work
  int slices(int64_t batch) const;                       // how many threads split the batch between them
  void plan(int64_t batch);
  void run_images(const uint8_t* pixels, int64_t first, int64_t batch, Scratch& sc, int max_threads);
  // Where op j's codes of images [first, first + batch) live: its own buffer (keep_all_outputs) or the arena
  // of the slice whose scratch is sc. batch is the tile's.
  int8_t* codes_at(size_t j, int64_t first, int64_t batch, Scratch& sc);
  void run_weighted(size_t op_index, const int8_t* x, int8_t* y, int64_t batch, Scratch& sc, int max_threads);

  Graph graph_;
  int threads_ = 1;
  KernelPath path_ = KernelPath::Ref;
  bool fast_ = false;                        // path_ != Ref: packed weights, channels-last activations
  std::vector<Shape> shapes_;                // output shape of ops[i]
  std::vector<PackedWeights> packed_;        // a Linear ops[i]'s weights for qgemm_packed (fast path)
  std::vector<PackedConv> conv_;             // a Conv2d ops[i]'s weights for qconv2d_rows (fast path)
  std::vector<GroupedConvWeights> grouped_;  // a grouped Conv2d ops[i]'s weights (both paths)
  std::vector<bool> pool_fused_;             // ops[i] is a Conv2d run together with the MaxPool2d ops[i + 1]
  int64_t capacity_ = 0;                     // the batch the buffers are sized for
  int64_t batch_ = 0;                        // the batch of the last run
  bool keep_outputs_ = false;                // keep_all_outputs(): outputs_ instead of the arenas
  ArenaPlan plan_;                           // plan_graph_arena of one image, with the fusions the kernels make
  // (N, shapes_[i]) codes of every op: (N, C, H, W) on the reference kernels, (N, H, W, C) on the fast ones
  std::vector<std::vector<int8_t>> outputs_;  // keep_all_outputs(): one buffer per op
  std::vector<int8_t> logits_;                // the last op's codes of every slice, gathered by run()
  mutable std::vector<int8_t> view_;          // op_output's channels-first copy
  std::vector<Scratch> scratch_;              // one per thread
};

}  // namespace lowbit::quant::runtime
