// A small line-plot writer for the training experiment: panels of polylines with axes, nice
// ticks (linear or log10), titles and a shared legend, as one standalone SVG file. No
// dependencies beyond the standard library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace plot {

struct series {
  std::string label;
  std::string color;  ///< any SVG colour, e.g. "#1f77b4"
  std::vector<double> x, y;
  bool dashed = false;
};

struct panel {
  std::string title;
  std::string x_label;
  std::string y_label;
  bool log_y = false;
  std::vector<series> lines;
};

namespace detail {

inline std::string format_number(double v) {
  char buf[32];
  const double a = std::abs(v);
  if (v == 0) return "0";
  if (a >= 1e4 || a < 1e-3)
    std::snprintf(buf, sizeof buf, "%.0e", v);
  else if (a >= 100)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else
    std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

inline std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else
      out += c;
  }
  return out;
}

/// Tick positions covering [lo, hi] at a 1-2-5 step giving about `target` ticks.
inline std::vector<double> linear_ticks(double lo, double hi, int target = 5) {
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step) * step; t <= hi + 1e-9 * step; t += step) ticks.push_back(t);
  return ticks;
}

/// Log ticks: 1-2-5 multiples of powers of ten inside [lo, hi] (thinned to 1s when the range is wide).
inline std::vector<double> log_ticks(double lo, double hi) {
  std::vector<double> ticks;
  const bool wide = std::log10(hi / lo) > 2.5;
  for (int p = int(std::floor(std::log10(lo))); p <= int(std::ceil(std::log10(hi))); ++p)
    for (double m : {1.0, 2.0, 5.0}) {
      if (wide && m != 1.0) continue;
      const double t = m * std::pow(10.0, p);
      if (t >= lo * (1 - 1e-12) && t <= hi * (1 + 1e-12)) ticks.push_back(t);
    }
  return ticks;
}

}  // namespace detail

/// Renders the panels side by side (`columns` per row) under a title, with one legend for all
/// series labels (in order of first appearance).
inline std::string render(const std::vector<panel>& panels, const std::string& title, int columns = 3) {
  const int pw = 420, ph = 270;                  // panel size
  const int ml = 62, mr = 14, mt = 30, mb = 44;  // plot margins inside a panel
  const int rows = int((panels.size() + std::size_t(columns) - 1) / std::size_t(columns));
  const int width = columns * pw + 20, title_h = 34;

  // Legend entries: every series label once, in order of first appearance, wrapped to the width.
  std::vector<const series*> legend;
  for (const auto& p : panels)
    for (const auto& s : p.lines)
      if (std::none_of(legend.begin(), legend.end(), [&](const series* l) { return l->label == s.label; }))
        legend.push_back(&s);
  std::vector<std::pair<int, int>> legend_at;  // x, row
  int lx = 20, lrow = 0;
  for (const series* s : legend) {
    const int w = 44 + int(s->label.size()) * 7;
    if (lx + w > width - 10 && lx > 20) {
      lx = 20;
      ++lrow;
    }
    legend_at.emplace_back(lx, lrow);
    lx += w;
  }
  const int legend_h = 22 * (lrow + 1) + 6;
  const int height = title_h + legend_h + rows * ph + 10;
  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << width << ' ' << height << "\" font-family=\"Helvetica, Arial, sans-serif\">\n";
  svg << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg << "<text x=\"" << width / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">"
      << detail::escape(title) << "</text>\n";

  for (std::size_t n = 0; n < legend.size(); ++n) {
    const series* s = legend[n];
    const int lx = legend_at[n].first, ly = title_h + 12 + 22 * legend_at[n].second;
    svg << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 26 << "\" y2=\"" << ly << "\" stroke=\""
        << s->color << "\" stroke-width=\"2.5\"" << (s->dashed ? " stroke-dasharray=\"6 3\"" : "") << "/>\n";
    svg << "<text x=\"" << lx + 32 << "\" y=\"" << ly + 4 << "\" font-size=\"12\">" << detail::escape(s->label)
        << "</text>\n";
  }

  for (std::size_t i = 0; i < panels.size(); ++i) {
    const panel& p = panels[i];
    const int ox = 10 + int(i % std::size_t(columns)) * pw,
              oy = title_h + legend_h + int(i / std::size_t(columns)) * ph;
    const int x0 = ox + ml, x1 = ox + pw - mr, y0 = oy + ph - mb, y1 = oy + mt;
    double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
    for (const auto& s : p.lines)
      for (std::size_t k = 0; k < s.x.size(); ++k) {
        if (!std::isfinite(s.y[k]) || (p.log_y && s.y[k] <= 0)) continue;
        xmin = std::min(xmin, s.x[k]);
        xmax = std::max(xmax, s.x[k]);
        ymin = std::min(ymin, s.y[k]);
        ymax = std::max(ymax, s.y[k]);
      }
    if (!(xmin < xmax)) xmax = xmin + 1;
    if (!(ymin < ymax)) ymax = ymin + (p.log_y ? ymin : 1.0);
    if (p.log_y) {
      ymin = std::pow(10.0, std::floor(std::log10(ymin) * 10) / 10);
      ymax = std::pow(10.0, std::ceil(std::log10(ymax) * 10) / 10);
    } else {
      const double pad = 0.05 * (ymax - ymin);
      ymin = ymin >= 0 && ymin - pad < 0 ? 0 : ymin - pad;
      ymax += pad;
    }
    auto sx = [&](double v) { return x0 + (v - xmin) / (xmax - xmin) * (x1 - x0); };
    auto sy = [&](double v) {
      const double f = p.log_y ? (std::log10(v) - std::log10(ymin)) / (std::log10(ymax) - std::log10(ymin))
                               : (v - ymin) / (ymax - ymin);
      return y0 - f * (y0 - y1);
    };

    svg << "<g>\n<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << oy + 18
        << "\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">" << detail::escape(p.title) << "</text>\n";
    // Grid and ticks.
    for (double t : p.log_y ? detail::log_ticks(ymin, ymax) : detail::linear_ticks(ymin, ymax)) {
      const double y = sy(t);
      svg << "<line x1=\"" << x0 << "\" y1=\"" << y << "\" x2=\"" << x1 << "\" y2=\"" << y
          << "\" stroke=\"#e4e4e4\"/>\n";
      svg << "<text x=\"" << x0 - 5 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\" font-size=\"10\">"
          << detail::format_number(t) << "</text>\n";
    }
    for (double t : detail::linear_ticks(xmin, xmax)) {
      const double x = sx(t);
      svg << "<line x1=\"" << x << "\" y1=\"" << y0 << "\" x2=\"" << x << "\" y2=\"" << y0 + 4
          << "\" stroke=\"#444\"/>\n";
      svg << "<text x=\"" << x << "\" y=\"" << y0 + 15 << "\" text-anchor=\"middle\" font-size=\"10\">"
          << detail::format_number(t) << "</text>\n";
    }
    svg << "<rect x=\"" << x0 << "\" y=\"" << y1 << "\" width=\"" << x1 - x0 << "\" height=\"" << y0 - y1
        << "\" fill=\"none\" stroke=\"#444\"/>\n";
    svg << "<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << y0 + 32 << "\" text-anchor=\"middle\" font-size=\"11\">"
        << detail::escape(p.x_label) << "</text>\n";
    svg << "<text transform=\"translate(" << ox + 14 << ' ' << (y0 + y1) / 2
        << ") rotate(-90)\" text-anchor=\"middle\" font-size=\"11\">" << detail::escape(p.y_label) << "</text>\n";
    // Lines.
    for (const auto& s : p.lines) {
      svg << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.8\""
          << (s.dashed ? " stroke-dasharray=\"6 3\"" : "") << " points=\"";
      for (std::size_t k = 0; k < s.x.size(); ++k) {
        if (!std::isfinite(s.y[k]) || (p.log_y && s.y[k] <= 0)) continue;
        char buf[48];
        std::snprintf(buf, sizeof buf, "%.1f,%.1f ", sx(s.x[k]), sy(std::clamp(s.y[k], ymin, ymax)));
        svg << buf;
      }
      svg << "\"/>\n";
    }
    svg << "</g>\n";
  }
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace plot
