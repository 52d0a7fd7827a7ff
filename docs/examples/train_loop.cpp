// A custom training loop over the library: an MLP on Fashion-MNIST, Adam, cross-entropy, test accuracy.
// Usage: train_loop [max_batches_per_epoch] [data_dir]   (0 = whole epochs; the Debian data set by default)
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "core/ops.h"
#include "core/threads.h"
#include "data/loader.h"
#include "data/mnist.h"
#include "nn/graph.h"
#include "optim/optimizer.h"

using namespace lowbit;

int main(int argc, char** argv) try {
  shorten_openmp_waits(argv);  // first: OpenMP threads that do not spin for long on a busy machine (core/threads.h)
  const int64_t max_batches = argc > 1 ? std::atoll(argv[1]) : 0;
  const data::MnistData mnist = data::load_mnist(argc > 2 ? argv[2] : data::kDefaultDataDir);
  manual_seed(0);  // the weight initialisation
  auto model = nn::build_model("mlp");
  optim::Adam adam(model->parameters(), {.lr = 1e-3f});
  data::DataLoader train(mnist.train, {}, {.batch_size = 64, .seed = 0, .norm = data::kFashionMnistNormalization});
  data::DataLoader test(mnist.test, {},
                        {.batch_size = 500, .shuffle = false, .norm = data::kFashionMnistNormalization});
  data::Batch batch;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    model->train();
    train.start_epoch(epoch);
    double loss_sum = 0;
    int64_t steps = 0, correct = 0, seen = 0;
    while (train.next(batch) && (max_batches == 0 || steps < max_batches)) {
      Tensor loss = ops::cross_entropy(model->forward(batch.images), batch.labels);
      adam.zero_grad();
      loss.backward();
      adam.step();
      loss_sum += loss.item();
      ++steps;
    }

    model->eval();  // evaluate on the whole test set: no graph, count the argmax hits
    NoGradGuard no_grad;
    test.start_epoch(0);
    while (test.next(batch)) {
      const Tensor logits = model->forward(batch.images);  // (N, 10)
      seen += batch.size();
      for (int64_t i = 0; i < batch.size(); ++i) {
        const float* row = logits.data() + i * 10;
        int64_t best = 0;
        for (int64_t c = 1; c < 10; ++c) best = row[c] > row[best] ? c : best;
        correct += best == batch.labels[i];
      }
    }
    std::printf("epoch %lld: train loss %.4f, test accuracy %.2f%% (%lld images)\n", static_cast<long long>(epoch + 1),
                loss_sum / static_cast<double>(steps), 100.0 * correct / seen, static_cast<long long>(seen));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_loop: %s\n", e.what());
  return 1;
}
