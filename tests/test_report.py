import base64
import io
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from farm.cli import main
from farm.config import StudyError
from farm.grid import expand
from farm.plan import plan_study
from farm.report import (
    build,
    ci_half_width,
    compare,
    comparisons,
    fit_line,
    linear_fits,
    paired_tests,
    pivot_tables,
    reference_table,
    render_html,
    render_md,
    summarize,
    with_derived_columns,
    write_report,
)
from farm.results import table, write_table, write_trial
from farm.spec import EvalSpec, Reference, ReportSpec, TableSpec

RATE = "data.transforms.0.rate"


@pytest.fixture
def finished_study(tmp_path, tiny_doc):
    """Results of a 2 rates x 3 seeds study with known metrics; one trial failed."""
    tiny_doc["grid"] = {RATE: [0.0, 0.5], "seed": [1, 2, 3]}
    tiny_doc["reference"] = {
        "source": "Paper, Table 1",
        "rows": [{"label": "clean", "axes": {RATE: 0.0}, "metrics": {"acc": 0.7}}],
    }
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials:
        rate, seed = t.axes[RATE], t.axes["seed"]
        if (rate, seed) == (0.5, 3):
            write_trial(tmp_path, t, plans[t.id], "failed", {}, {}, "RuntimeError: boom")
        else:
            write_trial(tmp_path, t, plans[t.id], "ok", {"acc": 0.6 - rate * 0.2 + 0.01 * seed, "loss": 1.0 + seed}, {})
    df = table(tmp_path, trials)
    write_table(tmp_path, "tiny", df)
    return tmp_path, trials, df


def test_summary_has_mean_std_n_and_t_interval(finished_study):
    _, trials, df = finished_study
    s = summarize(df, [RATE, "seed"], ["acc"]).set_index(RATE)
    assert s.loc[0.0, "acc.n"] == 3 and abs(s.loc[0.0, "acc.mean"] - 0.62) < 1e-12
    assert abs(s.loc[0.0, "acc.std"] - 0.01) < 1e-12
    assert abs(s.loc[0.0, "acc.ci95"] - 4.302652729911275 * 0.01 / np.sqrt(3)) < 1e-9  # t(0.975, df=2)
    assert s.loc[0.5, "acc.n"] == 2  # the failed seed is left out
    assert np.isnan(ci_half_width(float("nan"), 1))


def test_paired_test_pairs_conditions_by_seed(finished_study):
    _, _, df = finished_study
    tests = paired_tests(comparisons(df, [RATE, "seed"], RATE), ["acc", "loss"], RATE).set_index("metric")
    acc = tests.loc["acc"]
    assert acc["seeds"] == 2 and abs(acc["mean difference"] + 0.1) < 1e-12
    assert np.isnan(acc["p (paired t)"])  # both seeds differ by exactly -0.1: no spread, no t statistic
    noisy = df.copy()
    noisy.loc[noisy["trial"] == "rate=0.5_seed=2", "acc"] += 0.03
    t = paired_tests(comparisons(noisy, [RATE, "seed"], RATE), ["acc"], RATE).iloc[0]
    a, b = np.array([0.61, 0.62]), np.array([0.51, 0.55])
    assert abs(t["p (paired t)"] - stats.ttest_rel(b, a).pvalue) < 1e-12
    assert np.isnan(tests.loc["loss", "p (paired t)"])  # identical values: no test


def test_reference_rows_sit_beside_ours(finished_study):
    _, trials, df = finished_study
    s = summarize(df, [RATE, "seed"], ["acc"])
    ref = reference_table(trials[0].study.reference, s, [RATE, "seed"])
    row = ref.iloc[0]
    assert row["published"] == 0.7 and row["metric"] == "acc" and row["ours"] == "0.620 ± 0.025 (n=3)"


def test_report_md_and_html_carry_the_same_content(finished_study):
    results, trials, df = finished_study
    md = write_report(results / "tiny", trials[0].study, df, list(trials[0].axes), {"x": 1}).read_text()
    html = (results / "tiny" / "report.html").read_text()
    for text in ("5 of 6 trials finished", "RuntimeError: boom", "Paper, Table 1", "p (paired t)", "acc by data.transforms.0.rate"):
        assert text in md and text in html
    assert "![acc by data.transforms.0.rate](plot.png)" in md
    assert 'src="data:image/png;base64,' in html and "plot.png" not in html  # self-contained
    assert "transformers" in md and "transformers" in html  # the environment


def test_farm_report_from_a_results_folder_and_compare(finished_study, capsys):
    results, trials, df = finished_study
    assert main(["report", str(results / "tiny")]) == 0
    assert (results / "tiny" / "report.html").exists()
    other = results / "copy"
    shutil.copytree(results / "tiny", other / "tiny")
    t = pd.read_csv(other / "tiny" / "table.csv")
    t.loc[t["trial"] == "rate=0.0_seed=1", "acc"] += 0.05
    t.to_csv(other / "tiny" / "table.csv", index=False)
    out = compare(results / "tiny", other / "tiny")
    row = next(line for line in out.splitlines() if line.startswith("| rate=0.0_seed=1 "))
    assert "| 0.05 |" in row
    assert main(["compare", str(results / "tiny"), str(results / "nope")]) == 2


def test_html_report_renders_in_headless_chromium(finished_study, tmp_path, chromium):
    results, trials, df = finished_study
    write_report(results / "tiny", trials[0].study, df, list(trials[0].axes), {"x": 1})
    url = (results / "tiny" / "report.html").as_uri()
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    images = re.findall(r'<img[^>]*src="([^"]+)"', dom)
    assert images and "<table" in dom
    for src in images:  # every image is inline and decodes as a PNG
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1000,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # not blank: text, tables and the plot drew


def test_every_plot_kind_renders_and_a_missing_column_is_noted(tmp_path, tiny_doc):
    tiny_doc["grid"] = {RATE: [0.0, 0.25, 0.5], "seed": [1, 2]}
    tiny_doc["report"] = {
        "plots": [
            {"kind": "line", "x": RATE, "y": "acc"},
            {"kind": "fit", "x": "diversity", "y": "acc", "title": "acc vs diversity"},
            {"kind": "heatmap", "x": RATE, "y": "safety/"},
            {"kind": "bars", "x": RATE, "y": "safety/"},
            {"kind": "line", "x": RATE, "y": "no_such_metric"},
            {"kind": "heatmap", "x": RATE, "y": "bench/"},  # a prefix no column has (no group reported, say)
        ]
    }
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials:
        r, s = t.axes[RATE], t.axes["seed"]
        write_trial(
            tmp_path,
            t,
            plans[t.id],
            "ok",
            {"acc": 0.6 - r / 5 + s / 100, "diversity": 10 + 20 * r + s, "safety/asian": 0.3 + r / 10, "safety/women": 0.25 - r / 10},
            {},
        )
    df = table(tmp_path, trials)
    md = write_report(tmp_path / "tiny", trials[0].study, df, list(trials[0].axes), {}).read_text()
    pngs = sorted(p.name for p in (tmp_path / "tiny").glob("plot*.png"))
    assert pngs == ["plot-2.png", "plot-3.png", "plot-4.png", "plot.png"]
    for name in pngs:
        Image.open(tmp_path / "tiny" / name).verify()
    assert "## acc vs diversity" in md and "## safety/ by data.transforms.0.rate" in md
    assert "plot 'no_such_metric by data.transforms.0.rate' skipped: the table has no column 'no_such_metric'" in md
    assert "plot 'bench/ by data.transforms.0.rate' skipped: the table has no column 'bench/'" in md


def test_wide_table_beside_published_and_a_heatmap_row_per_grid_point(tmp_path, tiny_doc):
    tiny_doc["grid"] = {"stages.dpo": {"none": None, "b1": {"beta": 0.1}}, RATE: [0.0, 0.5], "seed": [1, 2]}
    tiny_doc["report"] = {
        "tables": [{"title": "Benchmarks", "metrics": ["bench/"]}],
        "plots": [{"kind": "heatmap", "y": "safety/", "title": "safety by chain"}],
    }
    tiny_doc["reference"] = {
        "source": "Paper, Table 2",
        "rows": [
            {"label": "SFT+DPO", "axes": {"stages.dpo": "b1", RATE: 0.0}, "metrics": {"bench/arc": 0.46, "bench/piqa": 0.79}},
            {"label": "other metric only", "metrics": {"acc": 0.5}},
        ],
    }
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials:
        dpo, r, s = t.axes["stages.dpo"] == "b1", t.axes[RATE], t.axes["seed"]
        write_trial(
            tmp_path,
            t,
            plans[t.id],
            "ok",
            {"bench/arc": 0.25 + 0.1 * dpo + s / 100, "bench/piqa": 0.5 - r / 10, "safety/asian": 0.3 + r, "safety/women": 0.2 + 0.1 * dpo},
            {},
        )
    df = table(tmp_path, trials)
    md = write_report(tmp_path / "tiny", trials[0].study, df, list(trials[0].axes), {}).read_text()
    ours = md.split("## Benchmarks: ours")[1].split("##")[0]
    assert "| grid point | arc (↑) | piqa (↑) |" in ours  # bench/: higher is better
    assert "| dpo=b1, rate=0.0 | 0.365 ± 0.064 (n=2) | 0.5 ± 0 (n=2) |" in ours  # t(0.975,1) * 0.005 = 0.06353
    published = md.split("## Benchmarks: published")[1].split("##")[0]
    assert "| SFT+DPO | stages.dpo=b1, data.transforms.0.rate=0.0 | 0.46 | 0.79 |" in published
    assert "other metric only" not in published and "Paper, Table 2" in published
    assert "## safety by chain" in md
    image = Image.open(tmp_path / "tiny" / "plot.png")
    assert image.size[1] > 300  # one heatmap row per grid point (4)


# ---------------------------------------------------------------- Study D: derived columns, pivots, fits

N, K = "data.transforms.0.num_prompts", "data.transforms.0.ranking_length"
D_AXES = ["stages", N, K, "seed"]
D_COLUMNS = {"budget": "num_prompts * ranking_length / 2", "kind": "stages"}  # axes by their short names


def study_d_table() -> pd.DataFrame:
    """2 kinds x 3 ranking lengths x 3 prompt counts x 2 seeds; reward known at every trial."""
    rows = []
    for kind, base in (("PRO", 0.5), ("SFT", 0.4)):
        for k in (2, 3, 4):
            for n in (1500, 2000, 3000):
                for seed, noise in ((1, -0.001), (2, 0.001)):
                    rows.append(
                        {
                            "trial": f"{kind}_{n}_{k}_{seed}",
                            "status": "ok",
                            "stages": kind,
                            N: n,
                            K: k,
                            "seed": seed,
                            "reward": base + 0.01 * k + n / 1e6 + noise,
                            "acc": 0.6 + 0.01 * k,
                        }
                    )
    return pd.DataFrame(rows)


def study_d(tables=(), plots=(), columns=D_COLUMNS, main_metric=None, reference_rows=(), departures=()):
    report = ReportSpec(columns=columns, tables=list(tables), plots=list(plots), main_metric=main_metric)
    reference = Reference(source="Paper, Table 3", note="Llama 7B.", rows=list(reference_rows)) if reference_rows else None
    return SimpleNamespace(name="study-d", description="", report=report, reference=reference, departures=list(departures), eval=EvalSpec())


def test_departures_from_the_reference_are_shown_as_the_study_states_them():
    said = ["A 1M-parameter GPT-2 stands in for OPT-1.3B.", "BLEU <on characters> & words"]
    report = build(study_d(departures=said), study_d_table(), D_AXES, {})
    md, page = render_md(report), render_html(report)
    assert "## Departures from the reference protocol\n\n- A 1M-parameter GPT-2 stands in for OPT-1.3B.\n- BLEU <on characters> & words" in md
    assert "<li>BLEU &lt;on characters&gt; &amp; words</li>" in page
    assert "Departures" not in render_md(build(study_d(), study_d_table(), D_AXES, {}))


def test_derived_columns_are_added_and_a_bad_one_is_a_note():
    df, notes = with_derived_columns(study_d_table(), D_AXES, {**D_COLUMNS, "broken": "kind + 1", "seed": "seed * 2", "half": "budget / 2"})
    assert notes == ["column 'broken' skipped: " + notes[0].split(": ", 1)[1], "column 'seed' skipped: the table already has a column 'seed'"]
    row = df[(df[N] == 3000) & (df[K] == 3)].iloc[0]
    assert row["budget"] == 4500 and row["kind"] == row["stages"] and row["half"] == 2250  # later columns see earlier ones
    assert df["budget"].dtype.kind == "i"  # N * k / 2 in whole numbers reads 4500, not 4.5e+03
    assert "num_prompts" not in df.columns  # short names exist for expressions only


def test_pivot_of_one_metric_rows_by_derived_columns_columns_by_ranking_length():
    df, _ = with_derived_columns(study_d_table(), D_AXES, D_COLUMNS)
    spec = TableSpec(title="Reward", metrics=["reward"], rows=["budget", "kind"], columns=K)
    (ours,) = pivot_tables(spec, df, D_AXES, None)
    heading, table, note = ours
    assert heading == "Reward: ours" and "reward" in note
    assert list(table.columns) == ["budget", "kind", "ranking_length=2", "ranking_length=3", "ranking_length=4"]
    assert list(zip(table["budget"], table["kind"]))[:4] == [(1500, "PRO"), (1500, "SFT"), (2000, "PRO"), (2000, "SFT")]
    cell = table.set_index(["budget", "kind"])
    # budget 3000 = 3000 prompts of 2, 2000 of 3, 1500 of 4; mean of the two seeds, t(0.975, 1) * 0.001 = 0.01271
    assert cell.loc[(3000, "PRO"), "ranking_length=2"] == "0.523 ± 0.013 (n=2)"
    assert cell.loc[(3000, "SFT"), "ranking_length=4"] == "0.442 ± 0.013 (n=2)"
    assert pd.isna(cell.loc[(1500, "PRO"), "ranking_length=3"])  # 1500 prompts of 3 make budget 2250: an empty cell
    (selected,) = pivot_tables(spec.model_copy(update={"where": "budget == 3000 and num_prompts > 1500"}), df, D_AXES, None)
    assert list(selected[1]["kind"]) == ["PRO", "SFT"] and list(selected[1].columns[2:]) == ["ranking_length=2", "ranking_length=3"]
    assert "trials where budget == 3000" in selected[2]
    (default_rows,) = pivot_tables(spec.model_copy(update={"rows": None}), df, D_AXES, None)
    assert list(default_rows[1].columns[:2]) == ["stages", "num_prompts"]  # every other axis but the seed


PUBLISHED = [
    {"label": "PRO, N=3000, k=2", "axes": {"budget": 3000, "kind": "PRO", K: 2}, "metrics": {"reward": 0.61}},
    {"label": "PRO, N=3000, k=3", "axes": {"budget": 3000, "kind": "PRO", K: 3}, "metrics": {"reward": 0.63}},
    {"label": "SFT, N=24000, k=4", "axes": {"budget": 24000, "kind": "SFT", K: 4}, "metrics": {"reward": 0.55}},
    {"label": "PRO, no length", "axes": {"budget": 3000, "kind": "PRO"}, "metrics": {"reward": 0.6}},
    {"label": "PRO, 3000 prompts of 2", "axes": {"budget": 3000, "kind": "PRO", N: 3000}, "metrics": {"acc": 0.7}},
]


def test_study_d_report_pivot_beside_published_fit_table_and_notes():
    study = study_d(
        tables=[
            TableSpec(title="Reward", metrics=["reward"], rows=["budget", "kind"], columns=K),
            TableSpec(title="Bad query", metrics=["reward"], columns=K, where="budget >"),
            TableSpec(title="No such row", metrics=["reward"], columns=K, rows=["nope"]),
        ],
        plots=[{"kind": "fit", "x": "budget", "y": "reward", "by": ["kind", K]}, {"kind": "line", "x": "budget", "y": "reward", "by": ["kind"]}],
        columns={**D_COLUMNS, "broken": "nope * 2"},
        main_metric="acc",
        reference_rows=PUBLISHED,
    )
    report = build(study, study_d_table(), D_AXES, {})
    tables = {heading: (table, note) for heading, table, note in report.tables}
    published, note = tables["Reward: published"]
    assert note == "Published: Paper, Table 3. Llama 7B."
    assert list(published.columns) == ["budget", "kind", "ranking_length=2", "ranking_length=3", "ranking_length=4"]
    cell = published.set_index(["budget", "kind"])
    assert cell.loc[(3000, "PRO"), "ranking_length=2"] == 0.61 and cell.loc[(3000, "PRO"), "ranking_length=3"] == 0.63
    assert cell.loc[(24000, "SFT"), "ranking_length=4"] == 0.55 and pd.isna(cell.loc[(24000, "SFT"), "ranking_length=2"])
    long = tables["Published numbers beside ours"][0].set_index("published condition")
    assert list(long.index) == ["PRO, no length", "PRO, 3000 prompts of 2"]  # the pivot's cells are not repeated
    assert long.loc["PRO, 3000 prompts of 2", "ours"].startswith("0.62 ")  # matched through the derived budget and kind
    across = tables["Across seeds"][0]
    assert "acc" in across and "reward (↑)" not in across and "budget" not in across  # the pivot shows reward; budget is no metric
    fits = tables["Linear fit: reward against budget"]
    assert list(fits[0].columns) == ["kind", "ranking_length", "slope", "intercept", "MSE", "R²", "n points"] and len(fits[0]) == 6
    assert "each seed a point" in fits[1]
    assert "column 'broken' skipped: name 'nope' is not defined" in report.notes
    assert any(n.startswith("table 'Bad query' skipped: ") for n in report.notes)
    assert "table 'No such row' skipped: the table has no column 'nope'" in report.notes
    # the paired difference from the main axis' first value (seed level: no per-item values), then the study's plots
    assert [name for _, name, _ in report.plots] == ["difference.png", "plot.png", "plot-2.png"]
    assert report.plots[0][0] == "acc: paired difference from stages=PRO (95% interval over seeds, Student t)"
    md, page = render_md(report), render_html(report)
    for text in ("## Reward: ours", "## Reward: published", "## Linear fit: reward against budget", "ranking_length=3"):
        assert text in md
    assert "| 3000 | PRO | 0.523 ± 0.013 (n=2) | 0.532 ± 0.013 (n=2) | 0.541 ± 0.013 (n=2) |" in md
    assert "| 1500 | PRO | 0.521 ± 0.013 (n=2) | — | — |" in md
    assert "| 3000 | PRO | 0.61 | 0.63 | — |" in md
    assert "<h2>Reward: published</h2>" in page and "<h2>Linear fit: reward against budget</h2>" in page
    assert "<td>0.523 ± 0.013 (n=2)</td>" in page and "<td>—</td>" in page


def test_a_pivot_with_where_leaves_its_metric_in_the_across_seeds_table():
    spec = TableSpec(title="Reward", metrics=["reward"], rows=["budget", "kind"], columns=K, where="budget == 3000")
    across = next(t for h, t, _ in build(study_d(tables=[spec], main_metric="acc"), study_d_table(), D_AXES, {}).tables if h == "Across seeds")
    assert "reward (↑)" in across  # reward_score's reward: higher is better


def test_metric_columns_say_which_way_is_better(tmp_path, tiny_doc):
    """A column of a registered metric's value is marked ↑ or ↓ as the metric declares
    (farm.eval.metrics), in the across-seeds table, a wide table and a pivot's note; a value
    without a direction (a count) or of no registered metric stays as it is."""
    tiny_doc["grid"] = {RATE: [0.0, 0.5], "seed": [1, 2]}
    tiny_doc["report"] = {
        "tables": [{"title": "Misalignment", "metrics": ["misalign_joint/"]}, {"title": "Toxic", "metrics": ["toxicity_mean"], "columns": RATE}]
    }
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials:
        r, s = t.axes[RATE], t.axes["seed"]
        values = {"reward_accuracy": 0.6 - r / 5 + s / 100, "perplexity": 30 + r + s, "misalign_prompts": 3, "acc": 0.5 + s / 100}
        values |= {"misalign_joint/none": 0.4 + r / 10 + s / 100, "misalign_joint/pos": 0.3 + s / 100, "toxicity_mean": 0.1 + s / 100}
        write_trial(tmp_path, t, plans[t.id], "ok", values, {})
    df = table(tmp_path, trials)
    report = build(trials[0].study, df, list(trials[0].axes), {})
    tables = {heading: (table, note) for heading, table, note in report.tables}
    across = tables["Across seeds"][0]
    assert {"reward_accuracy (↑)", "perplexity (↓)", "misalign_prompts", "acc"} <= set(across.columns)
    assert "reward_accuracy" not in across.columns and "perplexity" not in across.columns
    assert list(tables["Misalignment: ours"][0].columns) == ["grid point", "none (↓)", "pos (↓)"]
    assert tables["Toxic: ours"][1].startswith("toxicity_mean (↓): mean ± 95% CI")
    md = render_md(report)
    assert "reward_accuracy (↑)" in md and "| grid point | none (↓) | pos (↓) |" in md


def test_fit_recovers_an_exact_line_and_the_mean_squared_residual():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    exact = fit_line(x, 0.12 * x + 0.3)
    assert abs(exact["slope"] - 0.12) < 1e-12 and abs(exact["intercept"] - 0.3) < 1e-12
    assert exact["MSE"] < 1e-25 and abs(exact["R²"] - 1) < 1e-12 and exact["n points"] == 5
    noisy = fit_line(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 5.0]))
    # By hand: slope 5.5 / 5 = 1.1, intercept 2.75 - 1.1 * 1.5 = 1.1; residuals -0.1, 0.8, -1.3, 0.6.
    assert abs(noisy["slope"] - 1.1) < 1e-12 and abs(noisy["intercept"] - 1.1) < 1e-12
    assert abs(noisy["MSE"] - (0.01 + 0.64 + 1.69 + 0.36) / 4) < 1e-12
    assert abs(noisy["R²"] - (1 - 2.7 / 8.75)) < 1e-12  # total sum of squares around 2.75: 8.75


def test_one_fit_per_series_and_none_for_a_single_x():
    trials = pd.DataFrame({"kind": ["PRO"] * 3 + ["SFT"] * 3 + ["base"] * 2, "x": [1, 2, 3, 1, 2, 3, 5, 5], "y": [2, 4, 6, 1, 0, -1, 0.3, 0.5]})
    fits = linear_fits(trials, "x", "y", ["kind"]).set_index("kind")
    assert fits.loc["PRO", "slope"] == pytest.approx(2) and fits.loc["SFT", "slope"] == pytest.approx(-1)
    assert fits.loc["SFT", "intercept"] == pytest.approx(2) and fits.loc["PRO", "MSE"] == pytest.approx(0, abs=1e-20)
    assert np.isnan(fits.loc["base", "slope"]) and np.isnan(fits.loc["base", "MSE"]) and fits.loc["base", "n points"] == 2
    everything = linear_fits(trials, "x", "y", [])
    assert len(everything) == 1 and everything.iloc[0]["n points"] == 8


@pytest.fixture
def itemized_study(tmp_path, tiny_doc, write_study):
    """2 rates x 3 seeds, each trial scored on the same 200 items (0/1 accuracy, and a continuous
    margin): at rate 0.5 a known set of items flips from right to wrong, and a few the other way."""
    tiny_doc["grid"] = {RATE: [0.0, 0.5], "seed": [1, 2, 3]}
    tiny_doc["report"] = {"main_metric": "acc"}
    path = write_study(tiny_doc)
    trials = expand(tiny_doc, str(path))
    plans = plan_study(trials)
    rng = np.random.default_rng(0)
    ids = [f"row{i}" for i in range(200)]
    truth = {}
    for seed in (1, 2, 3):
        clean = (rng.random(200) < 0.7).astype(float)
        noisy = clean.copy()
        noisy[np.flatnonzero(clean == 1)[: 20 + 5 * seed]] = 0.0  # right at 0.0, wrong at 0.5
        noisy[np.flatnonzero(clean == 0)[:4]] = 1.0  # and the reverse
        margin = rng.normal(0, 1, 200)
        truth[seed] = {0.0: {"acc": clean, "margin": margin}, 0.5: {"acc": noisy, "margin": margin - 0.3 + rng.normal(0, 0.1, 200)}}
    for t in trials:
        v = truth[t.axes["seed"]][t.axes[RATE]]
        items = {m: {"ids": ids, "values": x.tolist()} for m, x in v.items()}
        write_trial(tmp_path, t, plans[t.id], "ok", {m: float(x.mean()) for m, x in v.items()}, {}, items=items)
    df = table(tmp_path, trials)
    write_table(tmp_path, "tiny", df)
    return tmp_path, path, trials, df, truth


def test_item_level_comparison_bootstrap_mcnemar_and_bh(itemized_study):
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.multitest import multipletests

    from farm.report import item_tests
    from farm.results import read_items

    results, _, trials, df, truth = itemized_study
    items = read_items(results / "tiny", df["trial"])
    assert set(items) == set(df["trial"]) and len(items["rate=0.0_seed=1"]["acc"]) == 200
    tests = item_tests(comparisons(df, [RATE, "seed"], RATE), ["acc", "margin", "nope"], RATE, items).set_index("metric")
    assert set(tests.index) == {"acc", "margin"}  # a metric without per-item values is not compared item by item
    acc = tests.loc["acc"]
    want = np.mean([truth[s][0.5]["acc"].mean() - truth[s][0.0]["acc"].mean() for s in (1, 2, 3)])
    assert acc["mean difference"] == pytest.approx(want) and acc["low (95%)"] < want < acc["high (95%)"] < 0
    assert acc["seeds"] == 3 and acc["items per seed"] == "200"
    # McNemar: 25+30+35 items right only at rate 0, 4 per seed right only at 0.5; exact, as statsmodels computes it
    assert acc["McNemar a only / b only"] == "90 / 12"
    assert acc["p (McNemar, pooled)"] == pytest.approx(mcnemar([[0, 90], [12, 0]], exact=True).pvalue)
    assert acc["p (McNemar) per seed"].count(",") == 2
    assert "p (McNemar, pooled)" not in tests.columns or np.isnan(tests.loc["margin", "p (McNemar, pooled)"])  # not 0/1
    assert tests["q (bootstrap, BH)"].tolist() == pytest.approx(multipletests(tests["p (bootstrap)"], method="fdr_bh")[1].tolist())


def test_report_shows_the_paired_difference_and_seeds_needed_and_plan_power_prints_them(itemized_study, capsys):
    results, path, trials, df, _ = itemized_study
    md = write_report(results / "tiny", trials[0].study, df, list(trials[0].axes), {}).read_text()
    for text in (
        "## Paired differences over items and seeds",
        "q (bootstrap, BH)",
        "McNemar",
        "## Seeds needed: acc",
        "hierarchical bootstrap",
        "q (BH)",
    ):
        assert text in md
    assert md.index("](difference.png)") < md.index("](plot.png)")  # the paired difference is the first plot
    Image.open(results / "tiny" / "difference.png").verify()
    capsys.readouterr()
    assert main(["plan", str(path), "--results", str(results), "--power"]) == 0
    out = capsys.readouterr().out
    assert "acc, paired differences of data.transforms.0.rate against 0.0 (1 comparisons, 3 seeds, 200 items per seed)" in out
    rows = {float(line.split()[0]): line.split() for line in out.splitlines() if re.match(r"\s+0\.0[25]\s", line)}
    assert set(rows) == {0.02, 0.05} and int(rows[0.02][1]) >= int(rows[0.05][1]) >= 2  # a smaller difference needs more seeds
    assert main(["plan", str(path), "--results", str(results), "--power", "0.1", "--metric", "nope"]) == 2
    assert "its metrics: acc, margin" in capsys.readouterr().err
    assert main(["plan", str(path), "--results", str(results / "empty"), "--power"]) == 2
    assert "no finished trial" in capsys.readouterr().err


def test_pairs_compare_cells_the_main_axis_does_not_pair_item_by_item():
    """Study D's equal-budget question: (k=4, N=1500) against (k=2, N=3000) within each kind and
    seed, from a `report.pairs` entry; item-level figures equal farm.stats on the same differences,
    and a query that leaves two trials per seed is a note, not a crash."""
    from farm import stats as fs
    from farm.report import chosen_pairs, item_tests
    from farm.spec import PairSpec

    df = study_d_table()
    rng = np.random.default_rng(0)
    ids = pd.Index([f"q{i}" for i in range(50)])
    items = {t: {"reward": pd.Series(rng.normal(r, 0.05, 50), index=ids)} for t, r in zip(df["trial"], df["reward"])}
    spec = PairSpec(
        title="k=4 on 1500 vs k=2 on 3000",
        a="ranking_length == 2 and num_prompts == 3000",
        b="ranking_length == 4 and num_prompts == 1500",
        by=["kind"],
    )
    columns = {**D_COLUMNS, "ranking_length": "ranking_length", "num_prompts": "num_prompts"}  # as jobs/diversity.yaml names them
    study = study_d(main_metric="reward", columns=columns)
    study.report = study.report.model_copy(update={"pairs": [spec, PairSpec(title="too coarse", a="ranking_length == 2", b="ranking_length == 4")]})
    report = build(study, df, D_AXES, {}, items)
    tables = {heading: table for heading, table, _ in report.tables}
    seeds = tables["Paired across seeds: k=4 on 1500 vs k=2 on 3000"].set_index("kind")
    assert seeds.loc["PRO", "mean difference"] == pytest.approx(0.02 - 0.0015) and seeds.loc["PRO", "seeds"] == 2
    within = tables["Paired over items and seeds: k=4 on 1500 vs k=2 on 3000"].set_index("kind")
    diffs = [(items[f"PRO_1500_4_{s}"]["reward"] - items[f"PRO_3000_2_{s}"]["reward"]).to_numpy() for s in (1, 2)]
    assert within.loc["PRO", "mean difference"] == pytest.approx(fs.mean_difference(diffs))
    assert (within.loc["PRO", "low (95%)"], within.loc["PRO", "high (95%)"]) == pytest.approx(fs.hierarchical_bootstrap(diffs)[:2])
    assert within.loc["PRO", "pair"] == "k=4 on 1500 vs k=2 on 3000" and "McNemar a only / b only" not in within  # rewards are not 0/1
    assert any(n.startswith("pairs 'too coarse' skipped: a selects several trials of one seed") for n in report.notes)
    with pytest.raises(ValueError, match="add the columns that tell them apart to `by`"):
        list(chosen_pairs(with_derived_columns(df, D_AXES, columns)[0], study.report.pairs[1]))
    assert len(item_tests([], ["reward"], "pair", items)) == 0


def test_a_mean_is_shown_to_the_precision_its_interval_supports():
    from farm.report import _mean_ci

    assert _mean_ci(0.62593, 0.02163, 2, 0.0216) == "0.626 ± 0.022 (std 0.022, n=2)"
    assert _mean_ci(0.7594, 0.1673, 3) == "0.76 ± 0.17 (n=3)"
    assert _mean_ci(79.41, 12.7, 3) == "79 ± 13 (n=3)"
    assert _mean_ci(0.5, 0.0, 2) == "0.5 ± 0 (n=2)"  # seeds that agree exactly
    assert _mean_ci(0.61234, float("nan"), 1) == "0.6123 (n=1)"  # one seed: no interval, 4 digits


def test_axes_are_named_as_the_study_names_them(finished_study, tiny_doc):
    results, trials, df = finished_study
    study = trials[0].study.model_copy(update={"report": ReportSpec(labels={RATE: "label flip rate"})})
    report = build(study, df, [RATE, "seed"], {})
    titles = [t for t, _, _ in report.tables]
    assert "Paired tests across seeds: label flip rate" in titles
    across = dict((t, table) for t, table, _ in report.tables)["Across seeds"]
    assert "label flip rate" in across.columns and RATE not in across.columns
    assert report.plots[0][0].startswith("acc: paired difference from label flip rate=0.0")
    tiny_doc["grid"] = {RATE: [0.0, 0.5], "seed": [1, 2]}
    tiny_doc["report"] = {"labels": {"data.transforms.0.ratio": "label flip rate"}}
    with pytest.raises(StudyError, match=r"report.labels: 'data.transforms.0.ratio' is neither a grid axis"):
        expand(tiny_doc, "s.yaml")


def test_training_curves_mean_and_band_per_main_axis_value_and_one_line_for_a_shared_stage(finished_study):
    from farm.report import curves_plot

    results, trials, df = finished_study
    ok = df[df["status"] == "ok"]
    # pretrain: one run every trial shares; sft: a loss that falls faster at rate 0 (seeds apart by 0.1)
    histories = {
        t: {
            "pretrain": pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5]}),
            "sft": pd.DataFrame(
                {"step": [5, 10, 10], "loss": [2.0 + r + 0.1 * s, 1.0 + r + 0.1 * s, np.nan], "train_runtime": [np.nan, np.nan, 9.0]}
            ),
        }
        for t, r, s in zip(ok["trial"], ok[RATE], ok["seed"])
    }
    png = curves_plot(df, histories, ["pretrain", "sft", "dpo"], RATE, {RATE: "label flip rate"})
    image = Image.open(io.BytesIO(png))
    assert image.size[0] > image.size[1]  # two panels side by side (dpo kept no history)
    assert curves_plot(df, {}, ["pretrain"], RATE, {}) is None
    report = build(trials[0].study, df, [RATE, "seed"], {}, histories=histories)
    assert ("Training curves: loss by step (mean over seeds, 95% band)", "curves.png") in [(c, n) for c, n, _ in report.plots]
