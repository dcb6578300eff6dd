"""The evaluation's plots: accuracy_vs_m.png and accuracy_vs_flops.png, one panel per
benchmark with its headline metric against m (or prefill FLOPs), its chance and
image-blind baselines as dashed lines, and plain-number ticks on log axes."""
import math
import os


def prefill_gflops(entry: dict) -> float:
  """The prefill GFLOPs per image of one m's results entry."""
  return entry["flops"]["prefill"] / 1e9


# Mantissa series for plain-number ticks on a log axis, sparsest first.
_NICE_MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7),
                   (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8))
# FLOPs units: (divisor from GFLOPs, name), the first whose range reads well is used.
_FLOPS_UNITS = ((1e-3, "MFLOPs"), (1.0, "GFLOPs"), (1e3, "TFLOPs"))
_BASELINE_STYLE = {"chance": ("chance", (2, 2)), "image_blind": ("image-blind", (6, 3))}


def plain_number(x: float) -> str:
  """A tick label without exponents: 0.5 -> "0.5", 2.0 -> "2", 1500 -> "1,500"."""
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def _spread(ticks: list[float], lo: float, hi: float, max_ticks: int) -> bool:
  """At most max_ticks, at least 1/(max_ticks + 1) of the log axis apart."""
  if len(ticks) > max_ticks:
    return False
  gap = math.log10(hi / lo) / (max_ticks + 1)
  return all(math.log10(b / a) >= gap for a, b in zip(ticks, ticks[1:]))


def log_ticks(lo: float, hi: float, max_ticks: int = 5) -> list[float]:
  """Plain-number ticks for a log axis shown from lo to hi (0 < lo < hi).

  -> the most ticks of a 1-3 / 1-2-5 / ... series that fit `_spread`; where none
  gives two, the ends rounded to a few significant digits (inside [lo, hi]).
  """
  best = []
  for mantissas in _NICE_MANTISSAS:
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
      for mant in mantissas:
        t = float(f"{mant * 10.0 ** e:.6g}")
        if lo <= t <= hi:
          ticks.append(t)
    if len(ticks) > len(best) and _spread(ticks, lo, hi, max_ticks):
      best = ticks
  if len(best) >= 2:
    return best
  ends = [_round_inside(lo, lo, hi), _round_inside(hi, lo, hi)]
  return ends if ends[0] < ends[1] else [ends[0]]


def _round_inside(x: float, lo: float, hi: float) -> float:
  """x with the fewest significant digits (2 to 4) that stays in [lo, hi]."""
  for digits in (2, 3, 4):
    t = float(f"{x:.{digits}g}")
    if lo <= t <= hi:
      return t
  return x


def thin_ticks(values, max_ticks: int = 12) -> list:
  """Sorted distinct values kept at least 1/max_ticks of the log axis apart, the
  smallest and largest always kept (the one before the largest yields to it)."""
  vals = sorted(set(values))
  if len(vals) < 3:
    return vals
  gap = math.log2(vals[-1] / vals[0]) / max_ticks
  kept = [vals[0]]
  for v in vals[1:]:
    if math.log2(v / kept[-1]) >= gap:
      kept.append(v)
  if kept[-1] != vals[-1]:
    if len(kept) > 1 and math.log2(vals[-1] / kept[-1]) < gap:
      kept.pop()
    kept.append(vals[-1])
  return kept


def _log_limits(lo: float, hi: float) -> tuple[float, float]:
  """View limits around [lo, hi] on a log axis, with a margin."""
  pad = max(1.15, (hi / lo) ** 0.06)
  return lo / pad, hi * pad


def _flops_unit(gflops) -> tuple[float, str]:
  hi = max(gflops)
  for div, name in _FLOPS_UNITS:
    if hi / div < 1e4:
      return div, name
  return _FLOPS_UNITS[-1]


def _set_log_x(ax, x, kind: str) -> None:
  """A log x axis with a few plain-number tick labels that do not overlap."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  lo, hi = _log_limits(min(x), max(x))
  ax.set_xscale("log", base=2 if kind == "m" else 10)
  ax.set_xlim(lo, hi)
  ticks = thin_ticks(x) if kind == "m" else log_ticks(lo, hi)
  ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: plain_number(v)))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.tick_params(axis="x", labelsize=8)


def _draw_baselines(ax, base: dict, color) -> None:
  """Dashed horizontal lines in the benchmark's colour, one legend entry each."""
  for key, (label, dashes) in _BASELINE_STYLE.items():
    if key in base and base[key] is not None:
      ax.axhline(base[key], linestyle="--", dashes=dashes, color=color, linewidth=1.1,
                 alpha=0.8, label=f"{label} {base[key]:.3g}")


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def make_figure(results: dict, kind: str):
  """The figure of accuracy_vs_<kind>.png (kind "m" or "flops"): one panel per
  benchmark with its headline metric, baselines as dashed lines. -> a Figure."""
  plt = _pyplot()
  ms = results["ms"]
  per = results["per_m"]
  names = results["benchmarks"]
  baselines = results.get("baselines", {})
  sources = results.get("sources", {})
  gflops = [prefill_gflops(per[m]) for m in ms]
  div, unit = _flops_unit(gflops)
  cols = min(3, len(names))
  rows = int(math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for i, (ax, name) in enumerate(zip(axes.flat, names)):
    color = f"C{i % 10}"
    metric = results["headline"][name]
    x = ms if kind == "m" else [g / div for g in gflops]
    y = [per[m]["benchmarks"][name][metric] for m in ms]
    ax.plot(x, y, "o-", color=color, label=metric)
    for xi, yi, m in zip(x, y, ms):
      ax.annotate(f"{m}", (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7)
    _draw_baselines(ax, baselines.get(name, {}), color)
    _set_log_x(ax, x, kind)
    ax.set_xlabel("visual tokens m" if kind == "m" else f"prefill {unit} per image")
    ax.set_ylabel(metric)
    if all(0.0 <= v <= 1.0 for v in y + [b for b in baselines.get(name, {}).values()
                                         if b is not None]):
      ax.set_ylim(0.0, 1.02)  # Rates on their full scale: noise does not look like a trend.
    ax.set_title(name + (" (built-in)" if sources.get(name) == "builtin" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle(f"accuracy against {'m' if kind == 'm' else 'FLOPs'} "
               f"({os.path.basename(os.path.dirname(results['checkpoint'])) or 'model'})")
  fig.tight_layout()
  return fig


def plot(results: dict, out_dir: str) -> list[str]:
  """accuracy_vs_m.png and accuracy_vs_flops.png: one panel per benchmark, with its
  chance and image-blind baselines (results["baselines"]) as dashed lines."""
  plt = _pyplot()
  paths = []
  for kind in ("m", "flops"):
    fig = make_figure(results, kind)
    path = os.path.join(out_dir, f"accuracy_vs_{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
