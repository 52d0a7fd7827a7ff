// train: trains a model in float32, optionally fine-tunes it through fake-quant (--qat) and
// converts it to the integer graph. Checkpoints after every epoch; --resume continues one.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "apps/common.h"
#include "core/conv_direct.h"
#include "core/error.h"
#include "core/threads.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "quant/convert.h"

using namespace lowbit;

namespace {

struct Settings {
  std::string model = "lenet5", data = data::kDefaultDataDir, out, resume, from, log, optimizer = "adam",
              schedule = "cosine", bits = "w8a8", observer = "ema";
  int64_t epochs = 10, batch_size = 64, qat_epochs = 1, keep_first_last = 0, classes = 0;
  float lr = 1e-3f, qat_lr = 0.f, weight_decay = 0.f, momentum = 0.9f, clip = 0.f, mean = -1.f, std = -1.f;
  double val_split = 0.0, freeze_bn_after = 0.5, freeze_observers_after = 0.75;
  uint64_t seed = 0;
  int threads = 0;
  bool qat = false, lsq = false, dry_run = false, summary = false;
};

constexpr int64_t kDryRunBatches = 3;

std::unique_ptr<optim::Optimizer> make_optimizer(const Settings& s, const std::vector<Tensor>& params, float lr) {
  if (s.optimizer == "adam")
    return std::make_unique<optim::Adam>(params, optim::Adam::Options{.lr = lr, .weight_decay = s.weight_decay});
  if (s.optimizer == "adamw")
    return std::make_unique<optim::AdamW>(
        params, optim::AdamW::Options{.lr = lr, .weight_decay = s.weight_decay > 0 ? s.weight_decay : 1e-2f});
  if (s.optimizer == "sgd")
    return std::make_unique<optim::SGD>(
        params, optim::SGD::Options{.lr = lr, .momentum = s.momentum, .weight_decay = s.weight_decay});
  fail("unknown --optimizer '{}' (choose adam, adamw or sgd)", s.optimizer);
}

std::string rng_state_string() {
  const auto st = global_rng().state();
  return fmt::format("{},{},{},{}", st[0], st[1], st[2], st[3]);
}

void restore_rng(const std::string& text, const std::string& path) {
  Rng::State st{};
  size_t pos = 0;
  for (auto& word : st) {
    const size_t comma = text.find(',', pos);
    try {
      word = std::stoull(text.substr(pos, comma - pos));
    } catch (const std::exception&) {
      fail("{}: metadata 'rng_state' is corrupt", path);
    }
    pos = comma == std::string::npos ? text.size() : comma + 1;
  }
  global_rng().set_state(st);
}

// Puts the optimizer state ("optim.*" tensors) and the RNG of a --resume checkpoint back.
void restore_training_state(const nn::Checkpoint& resume, optim::Optimizer& optimizer) {
  nn::NamedTensors state;
  for (auto& [name, st] : resume.file.tensors)
    if (name.starts_with("optim.")) state.emplace_back(name, resume.tensor(name));
  optimizer.load_state(state, apps::meta_integer(resume, "steps"));
  restore_rng(resume.meta("rng_state"), resume.path);
}

// One phase of training (float, or QAT through fake-quant): epochs [first, last).
struct Phase {
  std::string name;  // "fp32" or "qat"
  nn::Module& model;
  optim::Optimizer& optimizer;
  optim::LrSchedule schedule;
  int64_t first_epoch, epochs;
  std::string checkpoint_path;
  const quant::QConfig* qconfig;                 // QAT only
  const quant::QatModel* qat;                    // QAT only: its observers and switches are saved too
  std::map<std::string, std::string> meta = {};  // more metadata for its checkpoints
};

class Trainer {
 public:
  Trainer(const Settings& s, const data::MnistData& data, Normalization norm, nn::Description description,
          std::vector<int64_t> train_idx, std::vector<int64_t> val_idx)
      : s_(s),
        data_(data),
        norm_(norm),
        description_(std::move(description)),
        train_idx_(std::move(train_idx)),
        val_idx_(std::move(val_idx)) {
    if (!s_.log.empty()) {
      log_.open(s_.log, std::ios::app);
      if (!log_) fail("cannot open --log file '{}' for writing (check the folder)", s_.log);
    }
  }

  const data::Dataset& eval_set() {
    if (val_idx_.empty()) return data_.test;
    if (val_set_.size() == 0) {  // materialise the validation examples once
      const int64_t pixels = data_.train.images.image_size();
      val_set_.images = {0, data_.train.images.rows, data_.train.images.cols, {}, data_.train.images.channels};
      val_set_.images.count = static_cast<int64_t>(val_idx_.size());
      for (int64_t i : val_idx_) {
        auto begin = data_.train.images.pixels.begin() + i * pixels;
        val_set_.images.pixels.insert(val_set_.images.pixels.end(), begin, begin + pixels);
        val_set_.labels.push_back(data_.train.labels[static_cast<size_t>(i)]);
      }
    }
    return val_set_;
  }

  double evaluate(nn::Module& model) {
    const data::Dataset& set = eval_set();
    if (!s_.dry_run) return apps::evaluate_model(model, set, norm_, 500).accuracy();
    const data::Dataset small = data::first_images(set, 500);
    return apps::evaluate_model(model, small, norm_, 500).accuracy();
  }

  // step_hook(step_in_phase) runs before every optimizer step (QAT freezing).
  void run(Phase& p, const std::function<void(int64_t)>& step_hook = {}) {
    data::DataLoader loader(
        data_.train, train_idx_,
        {.batch_size = s_.batch_size, .shuffle = true, .drop_last = false, .seed = s_.seed, .norm = norm_});
    const bool tty = isatty(2);
    const int64_t batches =
        s_.dry_run ? std::min(kDryRunBatches, loader.batches_per_epoch()) : loader.batches_per_epoch();
    data::Batch batch;
    for (int64_t epoch = p.first_epoch; epoch < p.epochs; ++epoch) {
      p.model.train();
      p.optimizer.set_lr(p.schedule.lr_at(epoch));
      loader.start_epoch(epoch);
      const auto t0 = std::chrono::steady_clock::now();
      double loss_sum = 0;
      int64_t seen = 0, correct = 0;
      for (int64_t b = 0; b < batches && loader.next(batch); ++b) {
        if (step_hook) step_hook(epoch * batches + b);
        Tensor logits = p.model.forward(batch.images);
        Tensor loss = ops::cross_entropy(logits, batch.labels);
        const float value = loss.item();
        if (!std::isfinite(value))
          fail("{} training: the loss became {} at epoch {}, batch {} (lower --lr{})", p.name, value, epoch + 1, b + 1,
               p.name == "qat" ? " or --qat-lr" : "");
        p.optimizer.zero_grad();
        loss.backward();
        if (s_.clip > 0) optim::clip_grad_norm(p.optimizer.params(), s_.clip);
        p.optimizer.step();
        loss_sum += static_cast<double>(value) * static_cast<double>(batch.size());
        seen += batch.size();
        for (int64_t i = 0; i < batch.size(); ++i) {
          const float* row = logits.data() + i * logits.size(1);
          correct += (std::max_element(row, row + logits.size(1)) - row) == batch.labels[static_cast<size_t>(i)];
        }
        if (tty) {
          const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          const double rate = static_cast<double>(seen) / std::max(dt, 1e-9);
          const double eta =
              static_cast<double>(batches - b - 1) * static_cast<double>(s_.batch_size) / std::max(rate, 1e-9);
          std::cerr << fmt::format("\r{} epoch {}/{} [{:>4}/{}] loss {:.4f} {:.0f} img/s ETA {:.0f}s   ", p.name,
                                   epoch + 1, p.epochs, b + 1, batches, loss_sum / static_cast<double>(seen), rate, eta)
                    << std::flush;
        }
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (tty) std::cerr << "\r" << std::string(90, ' ') << "\r";
      const double eval_acc = evaluate(p.model);
      const double train_loss = loss_sum / static_cast<double>(std::max<int64_t>(seen, 1));
      const double train_acc = static_cast<double>(correct) / static_cast<double>(std::max<int64_t>(seen, 1));
      std::cerr << fmt::format(
          "{} epoch {}/{}: train loss {:.4f}, train acc {:.2f}%, {} acc {:.2f}%, {:.1f}s ({:.0f} img/s)\n", p.name,
          epoch + 1, p.epochs, train_loss, 100 * train_acc, val_idx_.empty() ? "test" : "val", 100 * eval_acc, seconds,
          static_cast<double>(seen) / seconds);
      if (log_.is_open()) {
        nlohmann::json j{{"phase", p.name},
                         {"epoch", epoch + 1},
                         {"train_loss", train_loss},
                         {"train_accuracy", train_acc},
                         {val_idx_.empty() ? "test_accuracy" : "val_accuracy", eval_acc},
                         {"seconds", seconds},
                         {"images_per_second", static_cast<double>(seen) / seconds},
                         {"lr", p.optimizer.lr()}};
        log_ << j.dump() << "\n" << std::flush;
      }
      save(p, epoch + 1);
    }
  }

  void save(Phase& p, int64_t epochs_done) {
    auto meta = apps::model_metadata(description_, norm_, p.qconfig);
    meta["phase"] = p.name;
    meta["epoch"] = std::to_string(epochs_done);
    meta["epochs"] = std::to_string(p.epochs);
    meta["steps"] = std::to_string(p.optimizer.steps());
    meta["optimizer"] = s_.optimizer;
    meta["seed"] = std::to_string(s_.seed);
    meta["rng_state"] = rng_state_string();
    meta.insert(p.meta.begin(), p.meta.end());
    nn::NamedTensors extra = p.optimizer.state();
    if (p.qat)
      for (auto& named : quant::qat_state(*p.qat)) extra.push_back(std::move(named));
    nn::save_checkpoint(p.checkpoint_path, p.model, meta, extra);
  }

 private:
  const Settings& s_;
  const data::MnistData& data_;
  Normalization norm_;
  nn::Description description_;
  std::vector<int64_t> train_idx_, val_idx_;
  data::Dataset val_set_;
  std::ofstream log_;
};

optim::LrSchedule make_schedule(const Settings& s, float lr, int64_t epochs) {
  return optim::LrSchedule({.kind = optim::parse_schedule_kind(s.schedule),
                            .base_lr = lr,
                            .step_size = std::max<int64_t>(1, epochs / 3),
                            .gamma = 0.1f,
                            .t_max = std::max<int64_t>(1, epochs),
                            .eta_min = 0.f,
                            .warmup = 0});
}

int64_t count_blocks(const nn::Model& model) {
  int64_t n = 0;
  for (size_t i = 0; i < model.layers->size(); ++i)
    n += std::dynamic_pointer_cast<nn::Conv2d>(model.layers->at(i)) ||
         std::dynamic_pointer_cast<nn::Linear>(model.layers->at(i));
  return n;
}

void run(Settings s, bool model_given) {
  if (s.epochs < 1 && s.from.empty())
    fail("--epochs must be >= 1, got {} (to fine-tune a trained model without float training, use --qat --from FILE)",
         s.epochs);
  if (s.qat_epochs < 1 && s.qat) fail("--qat-epochs must be >= 1, got {}", s.qat_epochs);
  if (!(s.lr > 0)) fail("--lr must be > 0, got {}", s.lr);
  if (s.batch_size < 1) fail("--batch-size must be >= 1, got {}", s.batch_size);
  if (s.qat_lr == 0.f) s.qat_lr = s.lr / 10;
  if (!(s.qat_lr > 0)) fail("--qat-lr must be > 0, got {}", s.qat_lr);
  if (s.dry_run) s.epochs = std::min<int64_t>(s.epochs, 1), s.qat_epochs = 1;
  if (s.out.empty()) {
    const std::string stem = s.model.ends_with(".json") ? std::filesystem::path(s.model).stem().string() : s.model;
    s.out = stem + (s.qat ? ".qat" : "") + ".safetensors";
  }
  apps::check_output_path(s.out);
  if (s.threads > 0) set_num_threads(s.threads);
  manual_seed(s.seed);

  quant::QConfig qconfig = quant::parse_bits(s.bits);
  qconfig.activation_observer = quant::parse_observer_kind(s.observer);
  qconfig.learn_scale = s.lsq;

  // ---- model description (before the data, so a bad file fails fast)
  nn::Description description;
  nn::Checkpoint resume;
  std::string resume_phase;
  int64_t resume_epoch = 0;
  Normalization norm{s.mean, s.std};
  if (!s.resume.empty()) {
    resume = nn::read_checkpoint(s.resume);
    resume_phase = resume.meta("phase");
    resume_epoch = apps::meta_integer(resume, "epoch");
    description = apps::checkpoint_description(resume);
    if (model_given && s.model != description.name)
      fail("--model {} contradicts --resume {}, which trains '{}' (leave --model out when resuming)", s.model, s.resume,
           description.name);
    norm = {apps::meta_number(resume, "norm_mean"), apps::meta_number(resume, "norm_std")};
    if (resume.meta("optimizer") != s.optimizer)
      fail("{}: was trained with --optimizer {}, not {} (pass the same flags to --resume)", s.resume,
           resume.meta("optimizer"), s.optimizer);
    const int64_t planned = resume_phase == "qat" ? s.qat_epochs : s.epochs;
    if (resume_epoch >= planned && (resume_phase == "qat" || !s.qat)) {
      std::cerr << fmt::format(
          "{}: the run is complete ({} of {} {} epochs): nothing to resume, nothing written (raise --{}epochs to "
          "train more)\n",
          s.resume, resume_epoch, planned, resume_phase, resume_phase == "qat" ? "qat-" : "");
      return;
    }
  } else {
    description = nn::find_description(s.model);
  }
  std::shared_ptr<nn::Model> model;
  if (!s.from.empty()) {
    auto from = apps::load_model_file(s.from);
    if (from.kind != "float") fail("--from '{}' must be a float checkpoint, it is a {} model", s.from, from.kind);
    if (!s.qat) fail("--from only makes sense with --qat (fine-tune a trained float model)");
    model = from.float_model;
    description = model->description;
    norm = from.norm;
    s.epochs = 0;
  }

  // ---- data, then the model for its image size and classes
  const data::MnistData data = data::load_mnist(s.data, s.classes);
  const data::IdxImages& images = data.train.images;
  description = nn::with_data_shape(description, images.channels, images.rows, images.cols, data.classes);
  if (!model) model = nn::build_model(description);  // initialised from the seed
  if (s.summary) std::cout << nn::format_summary(nn::summarize(*model));
  if (s.qat) quant::prepare_qat(*model, qconfig);  // a model QAT cannot prepare fails now, not after float training
  if (norm.std <= 0) norm = data::compute_normalization(data.train.images);
  std::vector<int64_t> train_idx, val_idx;
  if (s.val_split > 0) std::tie(train_idx, val_idx) = data::split_validation(data.train.size(), s.val_split, s.seed);
  Trainer trainer(s, data, norm, description, train_idx, val_idx);
  std::cerr << fmt::format("{}: {} parameters; {} training images (normalisation mean {:.4f}, std {:.4f}); {}\n",
                           description.name, model->parameter_count(),
                           train_idx.empty() ? data.train.size() : static_cast<int64_t>(train_idx.size()), norm.mean,
                           norm.std, blas_description() + "; " + ops::detail::direct_conv_description());

  // ---- float phase
  const std::string float_path = s.qat ? apps::sibling_path(s.out, "fp32") : s.out;
  if (resume_phase != "qat" && s.epochs > 0) {
    auto optimizer = make_optimizer(s, model->parameters(), s.lr);
    int64_t first = 0;
    if (resume_phase == "fp32") {
      nn::load_weights(*model, resume);
      restore_training_state(resume, *optimizer);
      first = resume_epoch;
    }
    Phase phase{"fp32",  *model,  *optimizer, make_schedule(s, s.lr, s.epochs), first, s.epochs, float_path,
                nullptr, nullptr, {}};
    trainer.run(phase);
    if (first == s.epochs) trainer.save(phase, s.epochs);
  }
  if (!s.qat) {
    std::cout << fmt::format("wrote {}\n", s.out);
    return;
  }

  // ---- QAT phase
  model->eval();
  // The float model's test accuracy before QAT; a resumed QAT run has no float model and reads it
  // from the checkpoint.
  double float_acc = 0;
  if (resume_phase != "qat") float_acc = apps::evaluate_model(*model, data.test, norm, 500).accuracy();
  if (s.keep_first_last) {
    const int64_t blocks = count_blocks(*model);
    qconfig.block_weight_bits[0] = static_cast<int>(s.keep_first_last);
    qconfig.block_weight_bits[static_cast<int>(blocks - 1)] = static_cast<int>(s.keep_first_last);
  }
  auto qat = quant::prepare_qat(*model, qconfig);
  auto optimizer = make_optimizer(s, qat->parameters(), s.qat_lr);
  int64_t first = 0;
  if (resume_phase == "qat") {
    if (!quant::has_qat_state(resume))
      fail(
          "{}: this QAT checkpoint has no observer statistics (written by an older lowbit), so it cannot resume "
          "bit for bit; start QAT again from the float checkpoint with --qat --from",
          s.resume);
    qat = apps::qat_model_from_checkpoint(resume);
    float_acc = apps::meta_number(resume, "float_accuracy");
    optimizer = make_optimizer(s, qat->parameters(), s.qat_lr);
    restore_training_state(resume, *optimizer);
    first = resume_epoch;
  }
  {
    // Calibrate once on float activations so the first QAT step starts from sensible ranges.
    if (first == 0) {
      apps::calibrate(*qat, data.train, norm, 1000);
      std::cerr << fmt::format("post-training quantization (calibrated on 1000 images, before QAT): {} acc {:.2f}%\n",
                               val_idx.empty() ? "test" : "val", 100 * trainer.evaluate(*qat));
    }
    qat->train();
    data::DataLoader probe(data.train, train_idx, {.batch_size = s.batch_size});
    const int64_t batches = s.dry_run ? std::min(kDryRunBatches, probe.batches_per_epoch()) : probe.batches_per_epoch();
    const auto total = static_cast<double>(batches * s.qat_epochs);
    const auto freeze_bn = static_cast<int64_t>(s.freeze_bn_after * total);
    const auto freeze_obs = static_cast<int64_t>(s.freeze_observers_after * total);
    Phase phase{"qat", *qat,     *optimizer, make_schedule(s, s.qat_lr, s.qat_epochs),          first, s.qat_epochs,
                s.out, &qconfig, qat.get(),  {{"float_accuracy", fmt::format("{}", float_acc)}}};
    trainer.run(phase, [&](int64_t step) {
      if (step >= freeze_bn) qat->freeze_bn_stats();
      qat->set_observing(step < freeze_obs);
    });
    qat->set_observing(false);
    trainer.save(phase, s.qat_epochs);
  }

  // ---- convert and compare
  qat->eval();
  const quant::IntModel int_model =
      quant::convert(*qat, norm, {data.test.images.channels, data.test.images.rows, data.test.images.cols});
  const std::string int_path = apps::sibling_path(s.out, int_model.mode);
  quant::save_int_model(int_path, int_model);
  const apps::EvalResult fq = apps::evaluate_model(*qat, data.test, norm, 500, apps::int_output_qparams(int_model));
  const apps::EvalResult iq = apps::evaluate_int(int_model, data.test, 256, std::max(1, num_threads()));
  const apps::Agreement agree = apps::agreement(fq, iq);
  std::cout << fmt::format("float accuracy      {:.2f}%\n", 100 * float_acc);
  std::cout << fmt::format("fake-quant accuracy {:.2f}%\n", 100 * fq.accuracy());
  std::cout << fmt::format("{} accuracy {:>6}{:.2f}%\n", int_model.mode, "", 100 * iq.accuracy());
  std::cout << fmt::format("agreement fake-quant vs integer: {:.4f}% of predictions, max logit difference {} LSB\n",
                           100 * agree.fraction, agree.max_logit_diff_lsb);
  std::cout << fmt::format("wrote {} (QAT checkpoint) and {} (integer model, {} bytes)\n", s.out, int_path,
                           quant::int_model_file_bytes(int_path));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"train: train an image classifier in float32, optionally quantization-aware (--qat)", "train"};
  Settings s;
  auto* model_option =
      app.add_option("--model", s.model,
                     "a built-in model (mlp, lenet5, convbn, resnet8, dsconv) or a description file .json")
          ->capture_default_str();
  app.add_option("--classes", s.classes, "number of classes (default: the largest label + 1)")
      ->check(CLI::Range(2, 256));
  app.add_option("--data", s.data, "folder with the MNIST-style IDX files")->capture_default_str();
  app.add_option("--epochs", s.epochs, "float training epochs")->capture_default_str();
  app.add_option("--batch-size", s.batch_size, "images per step")->capture_default_str();
  app.add_option("--lr", s.lr, "learning rate")->capture_default_str();
  app.add_option("--optimizer", s.optimizer, "adam, adamw or sgd")->capture_default_str();
  app.add_option("--schedule", s.schedule, "constant, step or cosine (per epoch)")->capture_default_str();
  app.add_option("--weight-decay", s.weight_decay, "weight decay")->capture_default_str();
  app.add_option("--momentum", s.momentum, "SGD momentum")->capture_default_str();
  app.add_option("--clip", s.clip, "clip the gradient norm to this value (0: off)")->capture_default_str();
  app.add_option("--seed", s.seed, "random seed (initialisation, shuffling, dropout)")->capture_default_str();
  app.add_option("--threads", s.threads, "threads (0: all cores)")->check(CLI::Range(0, 256));
  app.add_option("--out", s.out, "checkpoint to write (default: MODEL.safetensors or MODEL.qat.safetensors)");
  app.add_option("--resume", s.resume,
                 "continue the run that wrote this checkpoint (same flags; a complete run is left as it is)");
  app.add_option("--val-split", s.val_split, "hold out this fraction of the training set for validation")
      ->check(CLI::Range(0.0, 0.9));
  app.add_option("--log", s.log, "append one JSON object per epoch to this file");
  app.add_option("--mean", s.mean, "normalisation mean (default: computed from the training images)");
  app.add_option("--std", s.std, "normalisation std (default: computed from the training images)");
  app.add_flag("--dry-run", s.dry_run, "run a few batches only");
  app.add_flag("--summary", s.summary, "print the layers with output shapes, parameters and MACs");
  app.add_flag("--qat", s.qat, "fine-tune through fake-quant, then convert to the integer graph");
  app.add_option("--from", s.from, "start QAT from this float checkpoint instead of training");
  app.add_option("--qat-epochs", s.qat_epochs, "QAT epochs")->capture_default_str();
  app.add_option("--qat-lr", s.qat_lr, "QAT learning rate (default: --lr / 10)");
  app.add_option("--bits", s.bits, "w8a8, w4a8, w4a4 (any wNaM, N, M in 2..8)")->capture_default_str();
  app.add_option("--observer", s.observer, "activation observer: minmax, ema, percentile or mse")
      ->capture_default_str();
  app.add_flag("--lsq", s.lsq, "learn the quantization step sizes (LSQ)");
  app.add_option("--keep-first-last", s.keep_first_last, "keep the first and last layer's weights at this many bits")
      ->check(CLI::Range(2, 8));
  app.add_option("--freeze-bn-after", s.freeze_bn_after, "freeze BatchNorm statistics after this fraction of QAT")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--freeze-observers-after", s.freeze_observers_after, "freeze observers after this fraction of QAT")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  return apps::run_main(app, argc, argv, [&] { run(s, model_option->count() > 0); });
}
