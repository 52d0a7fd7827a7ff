// inspect: what quantization does to a model, layer by layer — a self-contained HTML report
// (histograms, SQNR, sensitivity, agreement, accuracy against bit width, training curves), the
// same numbers as JSON, a bit-width sweep (--sweep) and one layer's quantization step by step (--layer).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "apps/common.h"
#include "core/error.h"
#include "core/threads.h"
#include "quant/analysis.h"
#include "quant/convert.h"

using namespace lowbit;
using nlohmann::json;

namespace {

struct Settings {
  std::string model, data = data::kDefaultDataDir, out, log, bits = "w8a8", observer = "minmax", layer;
  int64_t calib = 1000, images = 1000;
  int threads = 0, low_bits = 4, bins = 64;
  bool json = false, sweep = false;
};

constexpr int64_t kStatsImages = 500;          // calibration images whose activations the histograms show
constexpr int kSweepBits[] = {8, 6, 4, 3, 2};  // the bit widths of the accuracy-against-bit-width plot

// ---------------------------------------------------------------------------------------------
// inputs: the training log, the data subsets

// One line of a `train --log` file.
struct LogEntry {
  std::string phase;  // "fp32" or "qat"
  int64_t epoch = 0;
  double train_loss = 0, train_accuracy = 0, eval_accuracy = 0;
  std::string eval_name;  // "test" or "val"
};

std::vector<LogEntry> read_training_log(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("--log file '{}' does not exist or cannot be read (give the file 'train --log' wrote)", path);
  std::vector<LogEntry> entries;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      const json j = json::parse(line);
      LogEntry e{j.at("phase").get<std::string>(),
                 j.at("epoch").get<int64_t>(),
                 j.at("train_loss").get<double>(),
                 j.at("train_accuracy").get<double>(),
                 0,
                 j.contains("val_accuracy") ? "val" : "test"};
      e.eval_accuracy = j.at(e.eval_name + "_accuracy").get<double>();
      entries.push_back(e);
    } catch (const std::exception& e) {
      fail("{}:{}: not a training log line ({}); expected one JSON object per line as 'train --log' writes", path,
           number, e.what());
    }
  }
  if (entries.empty()) fail("--log file '{}' holds no epochs (train writes one line per epoch)", path);
  return entries;
}

// ---------------------------------------------------------------------------------------------
// what the report holds

struct Report {
  std::string model_path, model_name, kind, mode, observer;
  int64_t calib = 0, images = 0, stats_images = 0;
  std::vector<quant::LayerStats> layers;
  std::vector<quant::NodeStats> nodes;  // every node of the integer graph
  double float_accuracy = 0, fake_quant_accuracy = 0;
  std::optional<double> int_accuracy;
  std::optional<apps::Agreement> agree;
  std::string no_integer_reason;  // when the bit widths have no integer kernel
  std::vector<quant::BitWidthPoint> sweep;
  int64_t float_bytes = 0;
  int low_bits = 4;
  quant::SensitivityReport sensitivity;
  std::vector<LogEntry> log;
};

std::pair<double, double> range_of(std::pair<float, float> r) { return {r.first, r.second}; }

json histogram_json(const quant::Histogram& h) { return {{"lo", h.lo}, {"hi", h.hi}, {"counts", h.counts}}; }

json tensor_quant_json(const quant::TensorQuantStats& t) {
  json scales = json::array(), zero_points = json::array();
  for (const auto& p : t.qparams) {
    scales.push_back(p.scale);
    zero_points.push_back(p.zero_point);
  }
  return {{"bits", t.bits},
          {"scales", scales},
          {"zero_points", zero_points},
          {"codes", {t.codes.first, t.codes.second}},
          {"clamp", t.clamp},
          {"range", t.minmax},
          {"clipped_fraction", t.clipped_fraction},
          {"values", t.values}};
}

json node_json(const quant::NodeStats& n) {
  return {{"name", n.name},
          {"op", n.kind},
          {"inputs", n.inputs},
          {"batchnorm_folded", n.batchnorm_folded},
          {"weight", n.weight ? tensor_quant_json(*n.weight) : json(nullptr)},
          {"output", tensor_quant_json(n.output)},
          {"own_output_qparams", n.own_output_qparams}};
}

json to_json(const Report& r, const std::string& out) {
  json layers = json::array();
  for (const auto& s : r.layers) {
    json scales = json::array();
    for (const auto& p : s.weight_qparams) scales.push_back(p.scale);
    layers.push_back({{"layer", s.layer},
                      {"description", s.description},
                      {"weight_bits", s.weight_bits},
                      {"activation_bits", s.activation_bits},
                      {"weight_range", range_of(s.weight_minmax)},
                      {"weight_clip", range_of(s.weight_clip)},
                      {"weight_scales", scales},
                      {"weight_sqnr_db", s.weight_sqnr_db},
                      {"weight_histogram", histogram_json(s.weight_histogram)},
                      {"activation_range", range_of(s.activation_minmax)},
                      {"activation_clip", range_of(s.activation_clip)},
                      {"activation_scale", s.activation_qparams.scale},
                      {"activation_zero_point", s.activation_qparams.zero_point},
                      {"activation_sqnr_db", s.activation_sqnr_db},
                      {"activation_histogram", histogram_json(s.activation_histogram)}});
  }
  json nodes = json::array();
  for (const auto& n : r.nodes) nodes.push_back(node_json(n));
  json sweep = json::array();
  for (const auto& p : r.sweep)
    sweep.push_back({{"weight_bits", p.weight_bits},
                     {"activation_bits", p.activation_bits},
                     {"accuracy", p.accuracy},
                     {"parameter_bytes", p.parameter_bytes}});
  json sens = json::array();
  for (const auto& b : r.sensitivity.blocks)
    sens.push_back(
        {{"layer", b.block.layer}, {"weights", b.block.weights}, {"accuracy", b.accuracy}, {"drop", b.drop}});
  json log = json::array();
  for (const auto& e : r.log)
    log.push_back({{"phase", e.phase},
                   {"epoch", e.epoch},
                   {"train_loss", e.train_loss},
                   {"train_accuracy", e.train_accuracy},
                   {e.eval_name + "_accuracy", e.eval_accuracy}});
  return {{"model", r.model_path},
          {"architecture", r.model_name},
          {"kind", r.kind},
          {"mode", r.mode},
          {"observer", r.observer},
          {"calib", r.calib},
          {"images", r.images},
          {"layers", layers},
          {"nodes", nodes},
          {"float_accuracy", r.float_accuracy},
          {"fake_quant_accuracy", r.fake_quant_accuracy},
          {"int_accuracy", r.int_accuracy ? json(*r.int_accuracy) : json(nullptr)},
          {"agreement", r.agree ? json(r.agree->fraction) : json(nullptr)},
          {"max_logit_diff_lsb", r.agree ? json(r.agree->max_logit_diff_lsb) : json(nullptr)},
          {"float_model_bytes", r.float_bytes},
          {"bit_width_sweep", sweep},
          {"sensitivity",
           {{"low_bits", r.low_bits}, {"baseline_accuracy", r.sensitivity.baseline_accuracy}, {"layers", sens}}},
          {"training_log", log},
          {"out", out}};
}

// ---------------------------------------------------------------------------------------------
// HTML and SVG: a few small writers, no script, no external asset

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string num(double v, int digits = 4) { return fmt::format("{:.{}g}", v, digits); }
std::string percent(double v) { return fmt::format("{:.2f}%", 100 * v); }
std::string db(double v) { return std::isfinite(v) ? fmt::format("{:.1f} dB", v) : "exact"; }

std::string table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::string out = "<table><tr>";
  for (const auto& h : header) out += "<th>" + escape(h) + "</th>";
  out += "</tr>\n";
  for (const auto& row : rows) {
    out += "<tr>";
    for (const auto& cell : row) out += "<td>" + escape(cell) + "</td>";
    out += "</tr>\n";
  }
  return out + "</table>\n";
}

constexpr int kPlotW = 540, kPlotH = 220, kLeft = 64, kRight = 16, kTop = 28, kBottom = 38;

// Bars of log(1 + count) over the value axis, the clipping range [clip.first, clip.second] marked
// in red; everything outside it is clamped by the quantizer.
std::string histogram_svg(const quant::Histogram& h, std::pair<float, float> clip, const std::string& title) {
  const double w = kPlotW - kLeft - kRight, ht = kPlotH - kTop - kBottom;
  const double lo = h.lo, hi = h.hi;
  auto x_of = [&](double v) { return kLeft + (v - lo) / (hi - lo) * w; };
  const int64_t most = *std::max_element(h.counts.begin(), h.counts.end());
  const double top = std::log1p(static_cast<double>(most));
  std::string out = fmt::format(
      "<svg class=\"hist\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\">\n"
      "<text x=\"{}\" y=\"16\" class=\"title\">{}</text>\n",
      kPlotW, kPlotH, kPlotW, kPlotH, kLeft, escape(title));
  const double bar = w / static_cast<double>(h.counts.size());
  for (size_t i = 0; i < h.counts.size(); ++i) {
    if (h.counts[i] == 0) continue;
    const double bh = top > 0 ? std::log1p(static_cast<double>(h.counts[i])) / top * ht : 0;
    out += fmt::format("<rect class=\"bar\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.2f}\" height=\"{:.1f}\"/>\n",
                       kLeft + static_cast<double>(i) * bar, kTop + ht - bh, bar, bh);
  }
  const double y0 = kTop + ht;
  out += fmt::format("<line class=\"axis\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>\n", kLeft, y0,
                     kLeft + w, y0);
  for (double v : {lo, hi})
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"middle\">{}</text>\n", x_of(v),
                       y0 + 14, num(v, 3));
  const char* anchors[] = {"start", "end"};  // both labels inside the plot
  int k = 0;
  for (double c : {static_cast<double>(clip.first), static_cast<double>(clip.second)}) {
    const double x = x_of(c);
    out += fmt::format("<line class=\"clip\" x1=\"{:.1f}\" y1=\"{}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>\n", x, kTop, x, y0);
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"cliplabel\" text-anchor=\"{}\">{}</text>\n", x, y0 + 28,
                       anchors[k], num(c, 3));
    ++k;
  }
  // The y axis: counts 0, 1, 10, 100, ... and the tallest bar's, placed where log(1 + count) puts them.
  out += fmt::format("<line class=\"axis\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{:.1f}\"/>\n", kLeft, kTop, kLeft, y0);
  std::vector<int64_t> ticks{0};
  for (int64_t c = 1; c * 3 <= most; c *= 10) ticks.push_back(c);  // a power of ten well below the top
  if (most > 0) ticks.push_back(most);
  double last_y = 1e9;
  for (int64_t c : ticks) {
    const double y = y0 - (top > 0 ? std::log1p(static_cast<double>(c)) / top * ht : 0);
    if (last_y - y < 12 && c != most) continue;  // labels 12 px apart at least (the tallest bar's always shown)
    last_y = y;
    out += fmt::format(
        "<line class=\"axis\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\"/>"
        "<text x=\"{}\" y=\"{:.1f}\" class=\"tick count\" text-anchor=\"end\">{}</text>\n",
        kLeft - 3, y, kLeft, y, kLeft - 5, y + 4, c);
  }
  out += fmt::format(
      "<text x=\"12\" y=\"{:.1f}\" class=\"tick\" transform=\"rotate(-90 12 {:.1f})\" "
      "text-anchor=\"middle\">count (log scale)</text>\n</svg>\n",
      kTop + ht / 2, kTop + ht / 2);
  return out;
}

// Each output channel's weights as a vertical bar from their min to their max, and the clamp its own scale
// gives, [s·qmin, s·qmax] (eq. 1), as two red ticks: a weight beyond its channel's ticks is clipped.
std::string channel_ranges_svg(const quant::TensorQuantStats& w, const std::string& title) {
  const double width = kPlotW - kLeft - kRight, ht = kPlotH - kTop - kBottom;
  double lo = 0, hi = 0;
  for (size_t c = 0; c < w.minmax.size(); ++c) {
    lo = std::min({lo, double{w.minmax[c].first}, double{w.clamp[c].first}});
    hi = std::max({hi, double{w.minmax[c].second}, double{w.clamp[c].second}});
  }
  if (!(hi > lo)) hi = lo + 1;
  auto py = [&](double v) { return kTop + ht - (v - lo) / (hi - lo) * ht; };
  const double step = width / static_cast<double>(std::max<size_t>(1, w.minmax.size()));
  std::string out = fmt::format(
      "<svg class=\"channels\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\">\n"
      "<text x=\"{}\" y=\"16\" class=\"title\">{}</text>\n",
      kPlotW, kPlotH, kPlotW, kPlotH, kLeft, escape(title));
  for (size_t c = 0; c < w.minmax.size(); ++c) {
    const double x = kLeft + (static_cast<double>(c) + 0.5) * step, half = std::max(1.0, 0.35 * step);
    out += fmt::format(
        "<line class=\"chrange\" x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" "
        "stroke-width=\"{:.1f}\"/>\n",
        x, py(w.minmax[c].first), x, py(w.minmax[c].second), std::max(1.0, 0.5 * step));
    for (float v : {w.clamp[c].first, w.clamp[c].second})
      out += fmt::format("<line class=\"chclamp\" x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>\n",
                         x - half, py(v), x + half, py(v));
  }
  out += fmt::format("<line class=\"axis\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{:.1f}\"/>\n", kLeft, kTop, kLeft,
                     kTop + ht);
  out += fmt::format("<line class=\"axis\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>\n", kLeft, py(0),
                     kLeft + width, py(0));
  for (double v : {lo, 0.0, hi})
    out += fmt::format("<text x=\"{}\" y=\"{:.1f}\" class=\"tick ytick\" text-anchor=\"end\">{}</text>\n", kLeft - 5,
                       py(v) + 4, num(v, 3));
  out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">output channel 0 … {}</text>\n",
                     kLeft + width / 2, kPlotH - 8, w.minmax.size() - 1);
  return out + "</svg>\n";
}

struct Series {
  std::string name, css_class;
  std::vector<std::pair<double, double>> points;
  double width = 2;       // stroke width: drawn widest first, so that a line on top of another leaves it visible
  std::string dash = "";  // stroke-dasharray
};

// Lines through each series' points; x ticks at every x that occurs, y from y_lo to y_hi.
std::string line_plot_svg(const std::string& title, const std::vector<Series>& series, const std::string& x_label,
                          double y_lo, double y_hi) {
  std::vector<double> xs;
  for (const auto& s : series)
    for (auto [x, y] : s.points) xs.push_back(x);
  std::sort(xs.begin(), xs.end());
  xs.erase(std::unique(xs.begin(), xs.end()), xs.end());
  if (xs.empty()) xs = {0};
  const double x_lo = xs.front(), x_hi = xs.back() > xs.front() ? xs.back() : xs.front() + 1;
  if (!(y_hi > y_lo)) y_hi = y_lo + 1;
  const double w = kPlotW - kLeft - kRight - 120, ht = kPlotH - kTop - kBottom;  // 120: the legend
  auto px = [&](double x) { return kLeft + (x - x_lo) / (x_hi - x_lo) * w; };
  auto py = [&](double y) { return kTop + ht - (y - y_lo) / (y_hi - y_lo) * ht; };
  std::string out = fmt::format(
      "<svg class=\"plot\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\">\n"
      "<text x=\"{}\" y=\"16\" class=\"title\">{}</text>\n",
      kPlotW, kPlotH, kPlotW, kPlotH, kLeft, escape(title));
  out += fmt::format("<line class=\"axis\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>\n", kLeft, kTop + ht,
                     kLeft + w, kTop + ht);
  out += fmt::format("<line class=\"axis\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{:.1f}\"/>\n", kLeft, kTop, kLeft,
                     kTop + ht);
  for (double x : xs)
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"middle\">{}</text>\n", px(x),
                       kTop + ht + 14, num(x));
  for (double y : {y_lo, (y_lo + y_hi) / 2, y_hi})
    out += fmt::format("<text x=\"{}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">{}</text>\n", kLeft - 4,
                       py(y) + 4, num(y, 3));
  out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{}</text>\n", kLeft + w / 2,
                     kPlotH - 4, escape(x_label));
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    std::string points;
    for (auto [x, y] : s.points) points += fmt::format("{:.1f},{:.1f} ", px(x), py(y));
    const std::string stroke =
        fmt::format("stroke-width=\"{}\"{}", s.width, s.dash.empty() ? "" : " stroke-dasharray=\"" + s.dash + "\"");
    out += fmt::format("<polyline class=\"line {}\" points=\"{}\" {}/>\n", s.css_class, points, stroke);
    for (auto [x, y] : s.points)
      out += fmt::format("<circle class=\"dot {}\" cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"{}\"/>\n", s.css_class, px(x), py(y),
                         s.width + 1);
    const double ly = kTop + 12 + 18 * static_cast<double>(k);
    out += fmt::format(
        "<line class=\"line {}\" x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" {}/>"
        "<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\">{}</text>\n",
        s.css_class, kLeft + w + 12, ly, kLeft + w + 30, ly, stroke, kLeft + w + 34, ly + 4, escape(s.name));
  }
  return out + "</svg>\n";
}

// The graph of the integer ops, top to bottom: each node on the row one below its deepest input (a layered
// layout from the topological order), the nodes of a row side by side. An edge to the next row is a short
// straight arrow; an edge that skips rows (a residual connection) runs down a lane right of the
// nodes, drawn in magenta, so it is never hidden behind them.
std::string graph_svg(const std::vector<quant::NodeStats>& nodes) {
  constexpr double kBoxW = 330, kBoxH = 34, kRowH = 56, kGap = 40, kMargin = 16, kSkipLane = 22;
  std::vector<int> row(nodes.size(), 0), column(nodes.size(), 0);
  std::vector<int> row_size;
  for (size_t i = 0; i < nodes.size(); ++i) {
    for (int in : nodes[i].inputs)
      if (in >= 0) row[i] = std::max(row[i], row[static_cast<size_t>(in)] + 1);
    if (static_cast<size_t>(row[i]) >= row_size.size()) row_size.resize(static_cast<size_t>(row[i]) + 1, 0);
    column[i] = row_size[static_cast<size_t>(row[i])]++;
  }
  const int widest = row_size.empty() ? 1 : *std::max_element(row_size.begin(), row_size.end());
  int skips = 0;
  for (size_t i = 0; i < nodes.size(); ++i)
    for (int in : nodes[i].inputs) skips += in >= 0 && row[i] - row[static_cast<size_t>(in)] > 1;
  const double width = 2 * kMargin + widest * kBoxW + (widest - 1) * kGap + (skips + 1) * kSkipLane;
  const double height = 2 * kMargin + static_cast<double>(row_size.size()) * kRowH;
  auto left = [&](size_t i) { return kMargin + column[i] * (kBoxW + kGap); };
  auto top = [&](size_t i) { return kMargin + row[i] * kRowH; };
  std::string out =
      fmt::format("<svg class=\"graph\" width=\"{:.0f}\" height=\"{:.0f}\" viewBox=\"0 0 {:.0f} {:.0f}\">\n", width,
                  height, width, height);
  // Edges first, so that the boxes sit on top of their ends.
  int lane = 0;
  const double right_of_nodes = kMargin + widest * kBoxW + (widest - 1) * kGap;
  for (size_t i = 0; i < nodes.size(); ++i) {
    for (int in : nodes[i].inputs) {
      if (in < 0) continue;
      const auto j = static_cast<size_t>(in);
      if (row[i] - row[j] <= 1) {
        const double x1 = left(j) + kBoxW / 2, y1 = top(j) + kBoxH, x2 = left(i) + kBoxW / 2, y2 = top(i) - 6;
        out += fmt::format("<path class=\"edge\" d=\"M{:.1f},{:.1f} C{:.1f},{:.1f} {:.1f},{:.1f} {:.1f},{:.1f}\"/>\n",
                           x1, y1, x1, (y1 + y2) / 2, x2, (y1 + y2) / 2, x2, y2);
        out += fmt::format("<path class=\"arrow\" d=\"M{:.1f},{:.1f} l-5,-7 l10,0 z\"/>\n", x2, y2 + 6);
      } else {  // a skip: out of the source's right side, down a lane right of every node, into the target's side
        const double lane_x = right_of_nodes + kSkipLane * (++lane);
        const double x1 = left(j) + kBoxW, y1 = top(j) + kBoxH / 2, x2 = left(i) + kBoxW + 6, y2 = top(i) + kBoxH / 2;
        out += fmt::format(
            "<path class=\"edge skip\" d=\"M{:.1f},{:.1f} L{:.1f},{:.1f} L{:.1f},{:.1f} L{:.1f},{:.1f}\"/>\n", x1, y1,
            lane_x, y1, lane_x, y2, x2, y2);
        out += fmt::format("<path class=\"arrow skip\" d=\"M{:.1f},{:.1f} l7,-5 l0,10 z\"/>\n", x2 - 6, y2);
      }
    }
  }
  for (size_t i = 0; i < nodes.size(); ++i) {
    const quant::NodeStats& n = nodes[i];
    const char* kind = n.weight ? " weighted" : n.inputs.size() > 1 ? " join" : "";
    std::string op = n.kind.size() > 58 ? n.kind.substr(0, 55) + "..." : n.kind;
    out += fmt::format(
        "<g class=\"node{}\"><title>{}: {}</title><rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{}\" height=\"{}\" rx=\"5\"/>"
        "<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"nodename\">{}</text>"
        "<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"nodeop\">{}</text></g>\n",
        kind, escape(n.name), escape(n.kind), left(i), top(i), kBoxW, kBoxH, left(i) + 8, top(i) + 14, escape(n.name),
        left(i) + 8, top(i) + 28, escape(op));
  }
  return out + "</svg>\n";
}

// Scales as "s" or, per channel, "min … max" over the channels.
std::string scales_text(const std::vector<quant::QParams>& q) {
  const auto [lo, hi] = std::minmax_element(q.begin(), q.end(), [](auto a, auto b) { return a.scale < b.scale; });
  return q.size() == 1 ? num(lo->scale) : fmt::format("{} … {} ({} ch)", num(lo->scale), num(hi->scale), q.size());
}

// A clamp in real values: "[lo, hi]", or per channel the narrowest and widest "±a … ±b".
std::string clamp_text(const quant::TensorQuantStats& t) {
  if (t.clamp.size() == 1) return fmt::format("[{}, {}]", num(t.clamp[0].first), num(t.clamp[0].second));
  float lo = std::numeric_limits<float>::infinity(), hi = 0;
  for (const auto& range : t.clamp) {  // symmetric: [−a, a]
    lo = std::min(lo, range.second);
    hi = std::max(hi, range.second);
  }
  return fmt::format("±{} … ±{}", num(lo), num(hi));
}

// The table of every integer op: bits, scale, zero point, clamp and clipped fraction, weights and output.
std::string node_table(const std::vector<quant::NodeStats>& nodes) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& n : nodes) {
    std::string inputs;
    for (int in : n.inputs)
      inputs += (inputs.empty() ? "" : ", ") + (in < 0 ? std::string("image") : nodes[static_cast<size_t>(in)].name);
    std::vector<std::string> row{n.name, n.kind, inputs};
    if (n.weight) {
      const auto& w = *n.weight;
      row.insert(row.end(), {std::to_string(w.bits), scales_text(w.qparams), "0",
                             fmt::format("[{}, {}] = {}", w.codes.first, w.codes.second, clamp_text(w)),
                             percent(w.clipped_fraction)});
    } else {
      row.insert(row.end(), {"", "", "", "", ""});
    }
    const auto& o = n.output;
    row.insert(row.end(),
               {std::to_string(o.bits) + (n.own_output_qparams ? "" : " (its input's)"), num(o.qparams[0].scale),
                std::to_string(o.qparams[0].zero_point),
                fmt::format("[{}, {}] = {}", o.codes.first, o.codes.second, clamp_text(o)),
                fmt::format("[{}, {}]", num(o.minmax[0].first), num(o.minmax[0].second)), percent(o.clipped_fraction)});
    rows.push_back(row);
  }
  std::string t =
      table({"node", "op", "inputs", "w bits", "w scale", "w zero point", "w clamp: codes = real", "w clipped",
             "out bits", "out scale", "out zero point", "out clamp: codes = real", "out range", "out clipped"},
            rows);
  return "<div style=\"overflow-x: auto\">" + t.replace(0, 7, "<table class=\"nodes\">") + "</div>\n";
}

constexpr const char* kCss = R"(body { font: 14px/1.4 sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
.layer { display: inline-block; vertical-align: top; margin: 4px 12px 12px 0; }
svg { background: #fff; border: 1px solid #ddd; margin: 4px 8px 4px 0; }
.title { font-size: 13px; font-weight: bold; } .tick { font-size: 11px; fill: #444; }
.bar { fill: #4a78b0; } .axis { stroke: #444; stroke-width: 1; }
.clip { stroke: #d0312d; stroke-width: 2; stroke-dasharray: 5 3; } .cliplabel { font-size: 11px; fill: #d0312d; }
.line { fill: none; } .dot { stroke: none; }
.chrange { stroke: #4a78b0; } .chclamp { stroke: #d0312d; stroke-width: 1.5; }
.node rect { fill: #eef3fa; stroke: #4a78b0; } .node.weighted rect { fill: #dce8f6; } .node.join rect { fill: #fbeedd; stroke: #e08a1e; }
.nodename { font-size: 12px; font-weight: bold; } .nodeop { font-size: 10px; fill: #555; }
.edge { fill: none; stroke: #666; stroke-width: 1.3; } .edge.skip { stroke: #c2185b; stroke-width: 2; }
.arrow { fill: #666; } .arrow.skip { fill: #c2185b; }
table.nodes td { font-family: monospace; font-size: 12px; } table.nodes td:nth-child(-n+3) { text-align: left; }
.s0 { stroke: #4a78b0; fill: #4a78b0; } .s1 { stroke: #e08a1e; fill: #e08a1e; } .s2 { stroke: #3a9a4a; fill: #3a9a4a; }
polyline.s0, polyline.s1, polyline.s2, line.line { fill: none; }
.note { color: #666; })";

std::string sweep_series_name(int which) {
  return which == 0 ? "weights (a8)" : which == 1 ? "activations (w8)" : "both";
}

// The three curves of the sweep: weights only, activations only, both at the same width. At 8 bits all
// three meet, and where a width costs nothing the curves coincide: "both" is drawn widest and first,
// "activations" narrower on it, "weights" narrowest and dashed on top, so that none hides another.
std::vector<Series> sweep_series(const std::vector<quant::BitWidthPoint>& sweep) {
  std::vector<Series> out(3);
  const double widths[] = {2, 4.5, 7};
  const char* dashes[] = {"6 4", "", ""};
  for (int k = 0; k < 3; ++k)
    out[static_cast<size_t>(k)] = {sweep_series_name(k), fmt::format("s{}", k), {}, widths[k], dashes[k]};
  for (const auto& p : sweep) {
    if (p.activation_bits == 8) out[0].points.emplace_back(p.weight_bits, 100 * p.accuracy);
    if (p.weight_bits == 8) out[1].points.emplace_back(p.activation_bits, 100 * p.accuracy);
    if (p.weight_bits == p.activation_bits) out[2].points.emplace_back(p.weight_bits, 100 * p.accuracy);
  }
  for (auto& s : out) std::sort(s.points.begin(), s.points.end());
  std::reverse(out.begin(), out.end());  // drawn in order: "both" first
  return out;
}

// Where the qparams under inspection come from.
std::string qparams_origin(const Report& r) {
  if (r.kind == "qat") return fmt::format("qparams as trained, {} observer", r.observer);
  return fmt::format("{} observer, {} calibration images", r.observer, r.calib);
}

std::string html_report(const Report& r) {
  std::string h = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>lowbit inspect: " +
                  escape(r.model_path) + "</title>\n<style>\n" + kCss + "\n</style>\n</head>\n<body>\n";
  h += "<h1>lowbit inspect: " + escape(r.model_path) + "</h1>\n";
  h += fmt::format(
      "<p>{} {} checkpoint, quantized as <b>{}</b> ({}); accuracies on the first {} test images; histograms "
      "over the first {} calibration images; the bit-width sweep and the sensitivity table calibrate on {} "
      "images ({} observer).</p>\n",
      escape(r.model_name), escape(r.kind), escape(r.mode), escape(qparams_origin(r)), r.images, r.stats_images,
      r.calib, escape(r.observer));

  h += "<h2>Accuracy and fake-quant vs integer agreement</h2>\n";
  std::vector<std::vector<std::string>> acc{{"float32", percent(r.float_accuracy)},
                                            {"fake-quant", percent(r.fake_quant_accuracy)}};
  if (r.int_accuracy) acc.push_back({"integer graph", percent(*r.int_accuracy)});
  h += table({"model", "accuracy"}, acc);
  if (r.agree)
    h += fmt::format(
        "<p>Fake-quant and integer graph agree on {} of predictions; the largest logit difference is {} "
        "LSB.</p>\n",
        percent(r.agree->fraction), r.agree->max_logit_diff_lsb);
  else
    h += "<p class=\"note\">No integer graph: " + escape(r.no_integer_reason) + "</p>\n";

  h += "<h2>The model graph: the integer ops and what each reads</h2>\n";
  h += "<p class=\"note\">One box per op of the integer graph (fused: a convolution with its BatchNorm and ReLU is "
       "one op), top to bottom in execution order; a magenta edge skips rows (a residual connection).</p>\n";
  h += graph_svg(r.nodes);

  h += "<h2>Every node: bit widths, scales, zero points, clamps and clipped values</h2>\n";
  h += fmt::format(
      "<p class=\"note\">Codes q stand for r = s·(q − z) (eq. 1). Weights are symmetric per output channel (z = 0, one "
      "scale per channel: the smallest and largest are shown); outputs are per tensor. The clamp is the code range "
      "the op writes (a fused ReLU raises its floor to z) and the real values it stands for. Clipped: the fraction of "
      "values whose code round(r/s) + z falls outside the clamp (outputs over the first {} calibration images, "
      "measured with fake-quant off). Pools, Flatten and standalone ReLUs keep their input's scale and zero "
      "point.</p>\n",
      r.stats_images);
  h += node_table(r.nodes);

  h += "<h2>Layers: ranges and SQNR at the chosen bit widths</h2>\n";
  std::vector<std::vector<std::string>> rows;
  for (const auto& s : r.layers)
    rows.push_back({s.layer, s.description, std::to_string(s.weight_bits),
                    fmt::format("[{}, {}]", num(s.weight_minmax.first), num(s.weight_minmax.second)),
                    fmt::format("[{}, {}]", num(s.weight_clip.first), num(s.weight_clip.second)), db(s.weight_sqnr_db),
                    std::to_string(s.activation_bits),
                    fmt::format("[{}, {}]", num(s.activation_minmax.first), num(s.activation_minmax.second)),
                    fmt::format("[{}, {}]", num(s.activation_clip.first), num(s.activation_clip.second)),
                    db(s.activation_sqnr_db)});
  h += table({"layer", "block", "w bits", "weight range", "weight clip", "weight SQNR", "a bits", "output range",
              "output clip", "output SQNR"},
             rows);

  h += "<h2>Histograms and per-channel weight ranges</h2>\n";
  h += "<p class=\"note\">Weight histograms: all weights of the layer; the red dashed lines are the clamp of its "
       "widest channel (each channel has its own scale, so a channel's weights may be clipped inside these lines: "
       "the per-channel plot shows each channel's range in blue and its own clamp in red). Output histograms: the "
       "red dashed lines are the clamp of the output codes.</p>\n";
  std::vector<const quant::NodeStats*> weighted;  // the nodes with weights, in the order of r.layers
  for (const auto& n : r.nodes)
    if (n.weight) weighted.push_back(&n);
  for (size_t b = 0; b < r.layers.size(); ++b) {
    const auto& s = r.layers[b];
    const quant::NodeStats* n = b < weighted.size() ? weighted[b] : nullptr;
    const std::string weights = n && n->batchnorm_folded ? " weights (BatchNorm folded)" : " weights";
    h += "<div class=\"layer\">\n<h3>" + escape(s.layer + "  " + s.description) + "</h3>\n";
    h += histogram_svg(s.weight_histogram, s.weight_clip, s.layer + weights);
    h += histogram_svg(s.activation_histogram, s.activation_clip, s.layer + " output activations");
    if (n) h += channel_ranges_svg(*n->weight, s.layer + weights + " per output channel");
    h += "</div>\n";
  }

  h += "<h2>Accuracy against bit width (post-training quantization)</h2>\n";
  h += line_plot_svg("accuracy (%) against bits", sweep_series(r.sweep), "bits", 0, 100);
  rows.clear();
  for (const auto& p : r.sweep)
    rows.push_back({fmt::format("w{}a{}", p.weight_bits, p.activation_bits), percent(p.accuracy),
                    std::to_string(p.parameter_bytes)});
  h += table({"bits", "accuracy", "parameter bytes"}, rows);
  h += fmt::format(
      "<p class=\"note\">float32 weights: {} bytes. The logits always stay 8-bit; 2- and 3-bit weights "
      "are stored as int4.</p>\n",
      r.float_bytes);

  h += fmt::format("<h2>Sensitivity: one layer's weights at {} bits, the rest at the chosen widths</h2>\n", r.low_bits);
  rows.clear();
  for (const auto& b : r.sensitivity.blocks)
    rows.push_back(
        {b.block.layer, std::to_string(b.block.weights), percent(b.accuracy), fmt::format("{:.2f}", 100 * b.drop)});
  h += fmt::format("<p>Baseline (every layer at the chosen widths): {}.</p>\n",
                   percent(r.sensitivity.baseline_accuracy));
  h += table({"layer", "weights", "accuracy", "drop (points)"}, rows);

  h += "<h2>Training curves</h2>\n";
  if (r.log.empty()) {
    h += "<p class=\"note\">No training log given (pass --log FILE, the file 'train --log' wrote).</p>\n";
  } else {
    Series loss{"train loss", "s0", {}}, train_acc{"train", "s0", {}}, eval_acc{r.log.front().eval_name, "s1", {}};
    double max_loss = 0, min_acc = 100;
    for (size_t i = 0; i < r.log.size(); ++i) {
      const auto& e = r.log[i];
      const auto x = static_cast<double>(i + 1);
      loss.points.emplace_back(x, e.train_loss);
      train_acc.points.emplace_back(x, 100 * e.train_accuracy);
      eval_acc.points.emplace_back(x, 100 * e.eval_accuracy);
      max_loss = std::max(max_loss, e.train_loss);
      min_acc = std::min({min_acc, 100 * e.train_accuracy, 100 * e.eval_accuracy});
    }
    std::string phases;
    for (size_t i = 0; i < r.log.size(); ++i)
      phases += fmt::format("{}{}: {} epoch {}", i ? ", " : "", i + 1, r.log[i].phase, r.log[i].epoch);
    h += line_plot_svg("training loss", {loss}, "logged epoch", 0, max_loss);
    h += line_plot_svg("accuracy (%)", {train_acc, eval_acc}, "logged epoch", std::floor(min_acc), 100);
    h += "<p class=\"note\">Logged epochs: " + escape(phases) + ".</p>\n";
  }
  return h + "</body>\n</html>\n";
}

// Writes `text` to PATH.tmp-<pid>, then renames it over PATH: a reader never sees half a report.
void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = fmt::format("{}.tmp-{}", path, ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      fail("cannot write '{}' (check the folder's permissions and free disk space)", path);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail("cannot write '{}': renaming '{}' over it failed (check folder permissions)", path, tmp);
  }
}

// ---------------------------------------------------------------------------------------------
// the three modes

// --layer: one block's quantization step by step.
void print_layer(const quant::LayerStats& l, const std::string& observer, int64_t calib, int64_t stats_images) {
  const Tensor& weight = l.weight;
  std::cout << fmt::format("{}  {}  ({} observer)\n", l.layer, l.description, observer);
  const quant::QRange wr = quant::weight_range(l.weight_bits);
  std::cout << fmt::format(
      "weights: {} values in {} output channels; symmetric per channel, codes [{}, {}], "
      "scale = max|w| / {}\n",
      weight.numel(), l.weight_qparams.size(), wr.qmin, wr.qmax, wr.qmax);
  std::cout << fmt::format("  {:>7} {:>10} {:>10} {:>10} {:>11}\n", "channel", "min", "max", "scale", "zero point");
  const int64_t per = weight.numel() / static_cast<int64_t>(l.weight_qparams.size());
  const size_t shown = std::min<size_t>(4, l.weight_qparams.size());
  for (size_t c = 0; c < shown; ++c) {
    const float* row = weight.data() + static_cast<int64_t>(c) * per;
    const auto [lo, hi] = std::minmax_element(row, row + per);
    std::cout << fmt::format("  {:>7} {:>10.5f} {:>10.5f} {:>10.6f} {:>11}\n", c, *lo, *hi, l.weight_qparams[c].scale,
                             l.weight_qparams[c].zero_point);
  }
  if (shown < l.weight_qparams.size())
    std::cout << fmt::format("  ... {} more channels\n", l.weight_qparams.size() - shown);
  std::cout << "channel 0, first weights: float -> code q = round(w / s) -> dequantized s*q (error)\n";
  for (int64_t i = 0; i < std::min<int64_t>(5, per); ++i) {
    const float w = weight.data()[i];
    const int32_t q = quant::quantize(w, l.weight_qparams[0], wr);
    const float back = quant::dequantize(q, l.weight_qparams[0]);
    std::cout << fmt::format("  {:>10.6f} -> {:>4} -> {:>10.6f} ({:+.6f})\n", w, q, back, back - w);
  }
  std::cout << fmt::format("weight SQNR at {} bits: {}; by bit width:", l.weight_bits, db(l.weight_sqnr_db));
  for (int bits : kSweepBits) std::cout << fmt::format(" {}:{}", bits, db(quant::weight_sqnr_db(weight, bits)));
  std::cout << "\n";

  const quant::QRange ar = quant::activation_range(l.activation_bits);
  const quant::QParams ap = l.activation_qparams;
  std::cout << fmt::format("output activations: asymmetric per tensor, codes [{}, {}]\n", ar.qmin, ar.qmax);
  std::cout << fmt::format("  range over the first {} calibration images [{:.5f}, {:.5f}]\n", stats_images,
                           l.activation_minmax.first, l.activation_minmax.second);
  std::cout << fmt::format(
      "  clipping range from all {} calibration images [{:.5f}, {:.5f}]: scale {:.6f}, zero point {}\n", calib,
      l.activation_clip.first, l.activation_clip.second, ap.scale, ap.zero_point);
  std::cout << "  quantile: float -> code q = round(x / s) + z -> dequantized s*(q - z) (error)\n";
  for (size_t i = 0; i < l.activation_quantiles.size(); ++i) {
    const float x = l.activation_quantiles[i];
    const int32_t q = quant::quantize(x, ap, ar);
    const float back = quant::dequantize(q, ap);
    std::cout << fmt::format("  {:>8} {:>10.5f} -> {:>4} -> {:>10.5f} ({:+.5f})\n",
                             fmt::format("{}%", 100 * quant::kActivationQuantiles[i]), x, q, back, back - x);
  }
  std::cout << fmt::format("output SQNR at {} bits: {}\n", l.activation_bits, db(l.activation_sqnr_db));
}

void print_sweep(const std::vector<quant::BitWidthPoint>& sweep, int64_t float_bytes, const Settings& s, int64_t calib,
                 int64_t images) {
  std::cout << fmt::format("PTQ accuracy against bit width ({} observer, {} calibration images, {} test images)\n",
                           s.observer, calib, images);
  std::cout << fmt::format("  {:>4} {:>13} {:>16} {:>8} {:>16} {:>10}\n", "bits", "weights (a8)", "activations (w8)",
                           "both", "parameter bytes", "vs fp32");
  for (int bits : kSweepBits) {
    auto find = [&](int w, int a) {
      for (const auto& p : sweep)
        if (p.weight_bits == w && p.activation_bits == a) return p;
      fail("bit-width sweep: w{}a{} is missing", w, a);
    };
    const auto wonly = find(bits, 8), aonly = find(8, bits), both = find(bits, bits);
    std::cout << fmt::format("  {:>4} {:>12.2f}% {:>15.2f}% {:>7.2f}% {:>16} {:>9.2f}x\n", bits, 100 * wonly.accuracy,
                             100 * aonly.accuracy, 100 * both.accuracy, wonly.parameter_bytes,
                             static_cast<double>(float_bytes) / static_cast<double>(wonly.parameter_bytes));
  }
  std::cout << fmt::format(
      "float32 weights: {} bytes; the logits stay 8-bit; 2- and 3-bit weights are stored as int4\n", float_bytes);
}

void run(Settings s) {
  if (s.threads > 0) set_num_threads(s.threads);
  const bool report_mode = s.layer.empty() && !s.sweep;
  if (s.out.empty()) {
    const std::string suffix = ".safetensors";
    s.out = (s.model.ends_with(suffix) ? s.model.substr(0, s.model.size() - suffix.size()) : s.model) + ".report.html";
  }
  if (report_mode) apps::check_output_path(s.out);
  Report r;
  if (!s.log.empty()) r.log = read_training_log(s.log);  // a bad log fails before any work

  apps::LoadedModel m = apps::load_model_file(s.model);
  if (m.kind == "int")
    fail("{}: this is an integer model ({}); inspect takes the float or QAT checkpoint it was made from", s.model,
         m.int_model->mode);
  const data::MnistData data = data::load_mnist(s.data);

  // The quantized model under inspection: a QAT checkpoint as trained, or a float one calibrated (PTQ).
  std::shared_ptr<quant::QatModel> qat = m.qat_model;
  std::shared_ptr<nn::Model> float_model = m.float_model;
  quant::QConfig config = quant::parse_bits(s.bits);
  config.activation_observer = quant::parse_observer_kind(s.observer);
  if (qat) {
    float_model = quant::float_model_of(*qat);
    config.activation_observer = qat->config.activation_observer;
    s.observer = quant::to_string(qat->config.activation_observer);
  } else {
    qat = quant::prepare_qat(*float_model, config);
    apps::calibrate(*qat, data.train, m.norm, s.calib);
  }
  r.model_path = s.model;
  r.model_name = float_model->name;
  r.kind = m.kind;
  r.mode = qat->config.mode_name();
  r.observer = s.observer;
  r.calib = std::min(s.calib, data.train.size());
  r.stats_images = std::min(kStatsImages, r.calib);
  r.float_bytes = apps::float_weight_bytes(*float_model);
  const data::Dataset test = data::first_images(data.test, s.images);
  r.images = test.size();

  const std::vector<Tensor> stats_batches = apps::normalised_batches(data.train, m.norm, r.stats_images);
  r.layers = quant::layer_stats(*qat, stats_batches, s.bins);
  r.nodes = quant::node_stats(*qat, stats_batches);

  if (!s.layer.empty()) {
    for (const auto& l : r.layers)
      if (l.layer == s.layer) return print_layer(l, s.observer, r.calib, r.stats_images);
    std::string names;
    for (const auto& l : r.layers) names += (names.empty() ? "" : ", ") + l.layer;
    fail("--layer '{}' is not a quantized layer of {} (choose one of: {})", s.layer, r.model_name, names);
  }

  auto calibrate = [&](quant::QatModel& q) { apps::calibrate(q, data.train, m.norm, s.calib); };
  auto evaluate = [&](quant::QatModel& q) { return apps::evaluate_model(q, test, m.norm, 250).accuracy(); };
  std::vector<std::pair<int, int>> pairs;
  for (int bits : kSweepBits) {
    pairs.emplace_back(bits, 8);  // weights only
    if (bits == 8) continue;
    pairs.emplace_back(8, bits);     // activations only
    pairs.emplace_back(bits, bits);  // both
  }
  r.sweep = quant::bit_width_sweep(*float_model, config, pairs, calibrate, evaluate);
  if (s.sweep) {
    if (s.json) {
      std::cout << to_json(r, "")["bit_width_sweep"].dump() << "\n";
      return;
    }
    print_sweep(r.sweep, r.float_bytes, s, r.calib, r.images);
    return;
  }

  // The report: accuracies, agreement, sensitivity.
  r.float_accuracy = apps::evaluate_model(*float_model, test, m.norm, 250).accuracy();
  qat->eval();
  try {
    const quant::IntModel int_model =
        quant::convert(*qat, m.norm, {test.images.channels, test.images.rows, test.images.cols});
    const apps::EvalResult fq = apps::evaluate_model(*qat, test, m.norm, 250, apps::int_output_qparams(int_model));
    const apps::EvalResult iq = apps::evaluate_int(int_model, test, 250, std::max(1, num_threads()));
    r.fake_quant_accuracy = fq.accuracy();
    r.int_accuracy = iq.accuracy();
    r.agree = apps::agreement(fq, iq);
  } catch (const Error& e) {
    r.fake_quant_accuracy = apps::evaluate_model(*qat, test, m.norm, 250).accuracy();
    r.no_integer_reason = e.what();
  }
  r.low_bits = s.low_bits;
  r.sensitivity = quant::layer_sensitivity(*float_model, qat->config, s.low_bits, calibrate, evaluate);

  write_atomically(s.out, html_report(r));
  if (s.json) {
    std::cout << to_json(r, s.out).dump() << "\n";
    return;
  }
  std::cout << fmt::format("{}: {} {} checkpoint quantized as {} ({})\n", s.model, r.model_name, r.kind, r.mode,
                           qparams_origin(r));
  std::cout << fmt::format("ranges and SQNR: weights, and block outputs over the first {} calibration images\n",
                           r.stats_images);
  size_t name_width = 10;  // the longest layer name ("layers.b2_shortcut"), so that the columns line up
  for (const auto& l : r.layers) name_width = std::max(name_width, l.layer.size());
  std::cout << fmt::format("  {:<{}} {:>20} {:>11} {:>18} {:>18} {:>11}\n", "layer", name_width, "weight range",
                           "weight SQNR", "output range", "output clip", "output SQNR");
  for (const auto& l : r.layers)
    std::cout << fmt::format(
        "  {:<{}} {:>20} {:>11} {:>18} {:>18} {:>11}\n", l.layer, name_width,
        fmt::format("[{:.4f}, {:.4f}]", l.weight_minmax.first, l.weight_minmax.second), db(l.weight_sqnr_db),
        fmt::format("[{:.3f}, {:.3f}]", l.activation_minmax.first, l.activation_minmax.second),
        fmt::format("[{:.3f}, {:.3f}]", l.activation_clip.first, l.activation_clip.second), db(l.activation_sqnr_db));
  std::cout << fmt::format("accuracy on {} test images: float {:.2f}%, fake-quant {:.2f}%", r.images,
                           100 * r.float_accuracy, 100 * r.fake_quant_accuracy);
  if (r.int_accuracy) std::cout << fmt::format(", integer {:.2f}%", 100 * *r.int_accuracy);
  std::cout << "\n";
  if (r.agree)
    std::cout << fmt::format("agreement fake-quant vs integer: {:.4f}% of predictions, max logit difference {} LSB\n",
                             100 * r.agree->fraction, r.agree->max_logit_diff_lsb);
  else
    std::cout << "agreement: n/a (" << r.no_integer_reason << ")\n";
  std::cout << fmt::format("wrote {}\n", s.out);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "inspect: per-layer ranges, histograms, SQNR, sensitivity and bit-width sweep of a float or QAT "
      "checkpoint, as a self-contained HTML report",
      "inspect"};
  Settings s;
  app.add_option("--model", s.model, "float or QAT checkpoint (written by train)")->required();
  app.add_option("--data", s.data, "folder with the MNIST-style IDX files")->capture_default_str();
  app.add_option("--out", s.out, "HTML report to write (default: MODEL.report.html next to the model)");
  app.add_flag("--json", s.json, "print the report's numbers as one JSON object on stdout");
  app.add_option("--log", s.log, "training log written by 'train --log' (the report draws its curves)");
  app.add_option("--bits", s.bits,
                 "bit widths for a float checkpoint (wNaM, N, M in 2..8; a QAT checkpoint keeps its own)")
      ->capture_default_str();
  app.add_option("--observer", s.observer,
                 "activation observer for a float checkpoint (a QAT checkpoint keeps its own)")
      ->check(CLI::IsMember({"minmax", "ema", "percentile", "mse"}))
      ->capture_default_str();
  app.add_option("--calib", s.calib, "training images to calibrate on")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--images", s.images, "test images for every accuracy (sweep, sensitivity, agreement)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--low-bits", s.low_bits, "the weight width of the sensitivity table")
      ->check(CLI::Range(2, 8))
      ->capture_default_str();
  app.add_option("--bins", s.bins, "histogram bins")->check(CLI::Range(4, 4096))->capture_default_str();
  app.add_option("--threads", s.threads, "threads (0: all cores)")->check(CLI::Range(0, 256));
  auto* layer = app.add_option("--layer", s.layer, "only print how one layer (e.g. layers.0) is quantized");
  app.add_flag("--sweep", s.sweep, "only print PTQ accuracy and size at 8, 6, 4, 3 and 2 bits")->excludes(layer);
  return apps::run_main(app, argc, argv, [&] { run(s); });
}
