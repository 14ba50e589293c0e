"""Figures and the report rules on the synthetic results in tests/fixtures/results."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.colors import to_rgba
import pandas as pd
import pytest

from specdec.report.aggregate import aggregate_experiment
from specdec.report.figures import (
    FIGURES,
    LEFT_OUT,
    _add_footer,
    _rc,
    TABLES,
    PlotData,
    acceptance_per_position,
    accepted_per_step,
    accepted_steps,
    by_category,
    energy_per_token,
    energy_vs_speedup,
    latency_cdf,
    latency_vs_rate,
    make_figures,
    plot_options,
    power_timeline,
    speedup_vs_gamma,
    speedup_vs_load,
    speedup_vs_tree_size,
    speedup_waterfall,
    swept,
    throughput_vs_batch,
    write_left_out,
)
from specdec.report.summary import SettingsError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "results"
RESULTS = sorted((FIXTURES / "runs" / "demo").glob("*/result.json"))


def table_paths(out_dir: Path) -> dict[str, Path]:
    return {name: out_dir / f"{name}.csv" for name in TABLES}


def tables(results, out_dir: Path) -> PlotData:
    aggregate_experiment(results, out_dir, "demo", n_resamples=200)
    return PlotData.read(table_paths(out_dir))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tables(RESULTS, tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def closed_no_energy(tmp_path_factory):
    """Closed-loop runs without energy: open-loop, energy and power figures have no data."""
    results = [
        p for p in RESULTS if "rate" not in p.parent.name and not (p.parent / "power.csv").exists()
    ]
    return results, tables(results, tmp_path_factory.mktemp("subset"))


def lines_of(fig) -> set[tuple]:
    return {
        (tuple(line.get_xdata()), tuple(round(y, 6) for y in line.get_ydata()))
        for ax in fig.axes
        for line in ax.get_lines()
    }


def test_speedup_figure_has_measured_points_and_leviathan_line(data):
    fig = speedup_vs_gamma(data)
    drawn = lines_of(fig)
    # speculative int8, batch 1: gamma 2 -> 13/10, gamma 4 -> 1.5; predicted from alpha 0.65,
    # c = 0.3, v = 1.3: (1 - 0.65^3) / (0.35 (0.6 + 1.3)) and (1 - 0.65^5) / (0.35 (1.2 + 1.3)),
    # with the prefills per output token of 64 (target 0.4 s, drafter 0.12 s; AR decode 2.8533 s)
    assert ((2.0, 4.0), (1.3, 1.5)) in drawn
    p, p_d, d = 0.4 / 64, 0.12 / 64, (3.2533333333333334 - 0.4) / 64
    steady = [(1 - 0.65**3) / (0.35 * 1.9), (1 - 0.65**5) / (0.35 * 2.5)]
    assert ((2.0, 4.0), tuple(round((p + d) / (p + p_d + d / s), 6) for s in steady)) in drawn
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "predicted (Leviathan et al., prefills added)" in labels
    assert not any("mtbench" in label for label in labels)  # no AR baseline, no speedup


@pytest.fixture(scope="module")
def one_point(tmp_path_factory):
    """Closed-loop cells at one gamma (4) and one batch size (1): no axis to draw a line over."""
    results = [p for p in RESULTS if not any(part in p.parent.name for part in ("g2", "b4", "rate"))]
    return tables(results, tmp_path_factory.mktemp("one_point"))


def test_an_axis_with_one_value_draws_a_bar_per_cell_not_a_line(data, one_point):
    def drafting(summary):
        return summary[summary["gamma"] > 0]

    assert swept(drafting(data.summary), "gamma") and not swept(drafting(one_point.summary), "gamma")
    fig = speedup_vs_gamma(one_point)
    ax = fig.axes[0]
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels == ["ngram (ngram)", "speculative (int8)", "vllm: ngram (ngram)"]
    # speedups 1.1, 1.5 (15/10, 18/12) and 1.14 as bar lengths, the predictions as markers on them
    assert [round(bar.get_width(), 6) for bar in ax.patches] == [1.1, 1.5, round(16 / 14, 6)]
    assert ax.get_ylabel() == "at draft length γ = 4"
    # the metric on the long axis, from 0 past the largest prediction: not γ 3.8 to 4.2
    assert ax.get_xlabel() == "speedup over AR (tokens/s ratio)"
    assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= 1.74
    predicted = next(line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata()))
    assert predicted.get_xdata()[:2].round(2).tolist() == [1.74, 0.97]  # test_aggregate: with the prefills
    assert "predicted (Leviathan et al., prefills added)" in ax.get_legend_handles_labels()[1]
    # the same rule for batch size: a bar of tokens/s per cell (AR of both engines, three methods
    # on humaneval, int8 on mtbench), no log2 axis around one point
    throughput = throughput_vs_batch(one_point).axes[0]
    assert len(throughput.patches) == 6 and throughput.get_xscale() == "linear"
    assert throughput.get_ylabel() == "at batch size = 1"
    # two or more values: lines over the axis, no bars
    assert not speedup_vs_gamma(data).axes[0].patches and not throughput_vs_batch(data).axes[0].patches
    assert throughput_vs_batch(data).axes[0].get_xscale() == "log"


def test_speedup_against_tree_size_draws_each_drafters_cells_beside_the_predicted_curve(data):
    """A panel per drafter and setup: its measured cells with their intervals at their nodes
    per draft, and the tree theory's curve over the best tree of each size (the demo has no
    trees: nothing to draw)."""
    assert "no drafter with token trees" in speedup_vs_tree_size(data)
    measured = [("chain", 3.0, 0.9), ("tree", 10.0, 1.1), ("chain", 4.0, 1.2), ("dynamic", 12.0, 1.0)]
    frame = pd.DataFrame(
        [{"family": i // 2, "label": f"drafter {i // 2}", "kind": kind, "nodes": n, "speedup": s,
          "speedup_ci_low": s - 0.1, "speedup_ci_high": s + 0.1} for i, (kind, n, s) in enumerate(measured)]
        + [{"family": f, "label": f"drafter {f}", "kind": "predicted", "nodes": n, "speedup": 1 + f / 10 - n / 100}
           for f in (0, 1) for n in range(1, 13)])
    fig = speedup_vs_tree_size(dataclasses.replace(data, tree_sizes=frame))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["drafter 0", "drafter 1"]
    drawn = lines_of(fig)
    for _, rows in frame[frame["kind"] == "predicted"].groupby("family"):
        assert (tuple(rows["nodes"]), tuple(round(y, 6) for y in rows["speedup"])) in drawn
    assert [len(ax.containers) for ax in shown] == [2, 2]  # each measured cell with its interval


def test_speedup_along_batch_size_and_rate_with_break_even(data):
    fig = speedup_vs_load(data)
    drawn = lines_of(fig)
    # int8 gamma 4: batch 1 -> 1.5 (15/10, 18/12), batch 4 -> 36/30; both pay, no break-even tick
    assert ((1, 4), (1.5, 1.2)) in drawn
    # open loop at 1 and 2 req/s: E2E means 16/10 against 16/15 -> 1.5 at both
    assert ((1.0, 2.0), (1.5, 1.5)) in drawn
    assert [ax.get_xlabel() for ax in fig.axes] == ["batch size", "offered request rate (req/s)"]


def test_by_category_draws_the_categories_table_with_request_counts(data):
    fig = by_category(data)
    speedup, acceptance, length = fig.axes[:3]
    # Fixture requests: code accepts 8 of 10 drafts, writing 4 of 10, one token per forward.
    assert {round(bar.get_height(), 6) for bar in acceptance.patches} == {0.8, 0.4}
    assert {round(bar.get_height(), 6) for bar in length.patches} == {1.0}
    assert [t.get_text() for t in acceptance.get_xticklabels()] == ["code", "writing"]
    # int8 gamma 4 batch 1 (2 repeats x 2 requests per category) against AR: 2.95 / 2.0333
    assert round(2.95 / (1.2 + 15 / 18), 4) in {round(bar.get_height(), 4) for bar in speedup.patches}
    counts = {text.get_text() for text in speedup.texts if text.get_text()}
    assert counts == {"2", "4"}  # requests behind each bar; none over mtbench's absent bar


def test_accepted_per_step_pools_repeats_as_shares(data):
    steps = accepted_steps(data)
    spec = steps[steps["cell_name"] == "humaneval--specdec-speculative-int8-g4--b1-n16-t0-cpu"]
    # Rates 0.6 and 0.7 over 10 drafts of 4: kept at positions 1-4 are 10, 6, 4, 2 and
    # 10, 7, 5, 3, so exactly 0..4 tokens were kept by 0, 4, 2, 2, 2 and 0, 3, 2, 2, 3 drafts.
    assert spec["steps"].tolist() == [0, 7, 4, 4, 5]
    assert spec["share"].tolist() == pytest.approx([0, 0.35, 0.2, 0.2, 0.25])
    fig = accepted_per_step(data)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert len(heights) == len(steps) == 7 * 5 + 3  # a bar per count: seven cells of gamma 4, one of 2
    assert pytest.approx(0.35) in heights


def test_acceptance_per_position_pools_repeats(data):
    drawn = lines_of(acceptance_per_position(data))
    # gamma 2 (one repeat, rate 0.65): positions 1 and 2 accept 10 and 6 of 10 drafts.
    assert ((1, 2), (1.0, 0.6)) in drawn


def test_latency_cdf_pools_requests_and_gaps(data):
    fig = latency_cdf(data)
    ttft, itl, _ = fig.axes[:3]

    def line(ax):
        return next(ln for ln in ax.get_lines() if ln.get_label() == "ar · humaneval · b1 · closed")

    # AR batch 1: two repeats of four requests, TTFT 0.1 s each, 15 emission gaps each.
    assert line(ttft).get_xdata().tolist() == pytest.approx([100.0] * 8)
    assert len(line(itl).get_xdata()) == 8 * 15


def test_latency_axes_label_plain_numbers_and_widen_a_single_value(data):
    fig = latency_cdf(data)
    fig.canvas.draw()
    ttft, _, e2e = fig.axes[:3]

    def shown(ax, minor=False):
        low, high = ax.get_xlim()
        ticks = zip(ax.get_xticks(minor=minor), ax.get_xticklabels(minor=minor))
        return [label.get_text() for x, label in ticks if low <= x <= high and label.get_text()]

    # Every fixture TTFT is 100 ms (to floating-point noise): a factor 2 either side.
    assert ttft.get_xlim() == pytest.approx((50, 200))
    assert shown(ttft) == ["50", "100", "200"]
    # E2E 0.53 to 1.6 s: 1, 2, 5 per decade, plain numbers, minor ticks unlabelled
    assert shown(e2e) == ["500", "1000"]
    assert not shown(e2e, minor=True)


@pytest.mark.parametrize("build", [latency_cdf, by_category, accepted_per_step])
def test_footer_goes_under_everything_drawn(data, build):
    with plt.rc_context(_rc(data.options)):
        fig = build(data)
        legend = fig.legend(["a legend under the panels"], loc="outside lower center")
        _add_footer(fig, data.footer)
        # as make_figures saves it: a layout redone at saving would move artists over the footer
        fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")
    renderer = fig.canvas.get_renderer()
    footer = fig.texts[-1].get_window_extent(renderer)
    others = [*fig.axes, *fig.legends, *fig.texts[:-1]]
    assert legend in others
    assert all(footer.y1 <= artist.get_tightbbox(renderer).y0 for artist in others)
    plt.close(fig)


def test_energy_against_speedup_draws_only_measured_cells(data):
    fig = energy_vs_speedup(data)
    points = {
        (round(float(x), 6), round(float(y), 6))
        for line in fig.axes[0].get_lines()
        for x, y in zip(line.get_xdata(), line.get_ydata())
        if len(line.get_xdata()) == 1
    }
    # AR b1 (speedup 1, 128 J / 64 tokens) and int8 gamma 4 b1 (1.5, median of 1.5 and 1.25 J)
    assert {(1.0, 2.0), (1.5, 1.375)} <= points
    assert not any(y == 0 for _, y in points)
    assert fig.axes[0].get_title() == "11 of 13 cells measured no energy: not drawn"


def test_figures_without_data_say_why(data, closed_no_energy):
    _, subset = closed_no_energy
    assert "open-loop" in latency_vs_rate(subset)
    assert "NVML: library not found" in energy_per_token(subset)
    assert "NVML: library not found" in energy_vs_speedup(subset)
    assert "power.csv" in power_timeline(subset)
    for build in (latency_vs_rate, energy_per_token, energy_vs_speedup, power_timeline):
        assert not isinstance(build(data), str)


def test_make_figures_draws_figures_with_data_and_names_those_left_out(closed_no_energy, tmp_path):
    """Without open-loop runs, energy, a sweep of load and token trees, six figures have nothing to show:
    their folders stay empty (no picture of "not applicable") and left_out.html names each
    with its reason."""
    results, _ = closed_no_energy
    aggregate_experiment(results, tmp_path / "tables", "demo", n_resamples=200)
    written = make_figures(table_paths(tmp_path / "tables"), tmp_path / "figures", {"dpi": 60})
    empty = {"speedup_vs_load", "latency_vs_rate", "energy_per_token", "energy_vs_speedup", "power_timeline",
             "speedup_vs_tree_size"}
    drawn = [name for name in FIGURES if name not in empty]
    assert sorted(str(p.relative_to(tmp_path / "figures")) for p in written) == sorted(
        [f"{name}/{name}.{ext}" for name in drawn for ext in ("png", "svg")] + [LEFT_OUT]
    )
    for path in written[:-1]:
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in head
    assert all((tmp_path / "figures" / name).is_dir() and not any((tmp_path / "figures" / name).iterdir()) for name in empty)
    note = (tmp_path / "figures" / LEFT_OUT).read_text()
    assert note.count("<li>") == 6 and "<li>latency vs rate: no open-loop (request-rate) runs" in note
    assert "<li>energy per token: energy not measured: NVML: library not found" in note
    assert "transformers 5.24.0" in (tmp_path / "figures/speedup_vs_gamma/speedup_vs_gamma.svg").read_text()
    # every figure drawn: nothing to name
    assert "<li>" not in write_left_out({}, tmp_path / "none.html").read_text()


def test_the_waterfall_names_methods_and_marks_series_as_the_other_figures(data):
    fig = speedup_waterfall(data)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    # a bar per drafting cell with timed forwards, named by method and the settings that vary
    # (series_labels), never by cell id; coloured by method, hatched per series of one method
    assert "speculative (int8) · b1 · closed · γ4" in legend and "ngram (ngram) · b1 · closed · γ4" in legend
    assert not any("--" in label for label in legend)
    bars = fig.axes[0].patches
    assert {bar.get_facecolor() for bar in bars} == {to_rgba(data.colors[m]) for m in ("ngram (ngram)", "speculative (int8)")}
    assert len({bar.get_hatch() for bar in bars}) == 4  # five int8 series: the four hatches, then again


def test_plot_options_are_checked():
    assert plot_options({"width_in": 5})["width_in"] == 5
    with pytest.raises(SettingsError, match=r"plots: unknown key\(s\) \['colour'\]"):
        plot_options({"colour": "red"})
    with pytest.raises(SettingsError, match="plots.dpi: expected int"):
        plot_options({"dpi": "high"})


STUB_COMMON = """\
from pathlib import Path

from specdec.records import read_result

RESULTS = "results"
CELLS = {
    cell.id: cell
    for cell in (read_result(p).config for p in Path("results/runs").glob("*/*/result.json"))
}


def experiments():
    return ["demo"]


def run_results():
    return [f"{RESULTS}/runs/{cell_id}/result.json" for cell_id in CELLS]


def experiment_slo(wildcards):
    return None


def experiment_runs(wildcards, name="result.json"):
    return [f"{RESULTS}/runs/{cell.id}/{name}" for cell in CELLS.values() if cell.experiment == wildcards.experiment]


def experiment_trainings(wildcards):
    return []


def experiment_borrowed_heads(wildcards):
    return {}


def heads_reports():
    return []
"""


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


def job_counts(output: str) -> dict[str, int]:
    """The `Job stats` table (job -> count, without the total) of a Snakemake run."""
    counts = {}
    for line in output.split("Job stats:")[1].splitlines()[3:]:
        name, count = line.split()
        if name == "total":
            return counts
        counts[name] = int(count)
    raise AssertionError("no total in the Job stats table")


def test_report_rules_build_tables_figures_and_report(tmp_path):
    (tmp_path / "workflow/rules").mkdir(parents=True)
    for part in ("scripts", "report"):
        shutil.copytree(REPO / "workflow" / part, tmp_path / "workflow" / part)
    shutil.copy(REPO / "workflow/rules/report.smk", tmp_path / "workflow/rules")
    (tmp_path / "workflow/rules/common.smk").write_text(STUB_COMMON)
    (tmp_path / "envs").mkdir()
    env_file = REPO / "envs/specdec.yaml"
    (tmp_path / "envs/specdec.yaml").write_text(
        env_file.read_text() if env_file.exists() else "dependencies: [python>=3.11]\n"
    )
    (tmp_path / "Snakefile").write_text(
        'report: "workflow/report/workflow.rst"\n\n'
        'include: "workflow/rules/common.smk"\ninclude: "workflow/rules/report.smk"\n'
    )
    shutil.copytree(FIXTURES / "runs", tmp_path / "results/runs")
    # without power samples: the power timeline has nothing to show
    for samples in (tmp_path / "results/runs").glob("*/*/power.csv"):
        samples.unlink()

    (tmp_path / "fast.yaml").write_text("aggregate: {n_resamples: 200}\n")
    (tmp_path / "replot.yaml").write_text("aggregate: {n_resamples: 200}\nplots: {dpi: 72}\n")

    lint = snakemake(tmp_path, "--lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    run = snakemake(tmp_path, "figures", "--configfile", "fast.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    assert job_counts(run.stderr) == {"aggregate": 1, "plot": 1, "figures": 1}
    for name in FIGURES:
        drawn = tmp_path / f"results/figures/demo/{name}/{name}.png"
        # the demo has no power samples and no token trees
        assert drawn.stat().st_size > 1000 if name not in ("power_timeline", "speedup_vs_tree_size") else not drawn.exists()
    assert "no AR baseline" in (tmp_path / "results/tables/demo/summary.html").read_text()

    report = snakemake(tmp_path, "figures", "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    for name in ({*FIGURES} - {"power_timeline", "speedup_vs_tree_size"}
                 | {"headline", "summary", "categories", "trees", "tree_size", "failed", "not_supported", "run_info"}):
        assert f"{name}.png" in html or f"{name}.html" in html, name
    for name in ("power_timeline", "speedup_vs_tree_size"):
        assert f"{name}.png" not in html  # left out, not shipped as a picture
    assert "Leviathan et al. (2023)" in html  # a caption
    # The first page (the workflow description) holds the headline table and the speedup
    # figure themselves, not links to them.
    landing = json.loads(html.split("var workflow_desc = ", 1)[1].split(";\n", 1)[0])
    assert "demo: speedup over AR" in landing and "1.5 [1.5, 1.5]" in landing
    assert "Where speculation stops paying" in landing and "<svg" in landing
    assert "<li>power timeline: no power samples in power.csv" in landing
    assert "<li>speedup vs tree size: no drafter with token trees" in landing
    assert landing.index("speedup over AR") < landing.index("<svg") < landing.index("Figures left out")

    # A plotting option changes the `plot` params: only plotting reruns.
    dry = snakemake(tmp_path, "figures", "-n", "--configfile", "replot.yaml")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_counts(dry.stdout + dry.stderr) == {"plot": 1, "figures": 1}


def test_report_rules_are_formatted():
    check = subprocess.run(
        [
            shutil.which("snakefmt") or "snakefmt",
            "--check",
            str(REPO / "workflow/rules/report.smk"),
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
