import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from farm.cache import plan_study
from farm.cli import main
from farm.report import ci_half_width, paired_tests, reference_table, summarize, write_report
from farm.results import compare, table, write_table, write_trial
from farm.spec import expand

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
    tests = paired_tests(df, [RATE, "seed"], ["acc", "loss"], RATE).set_index("metric")
    acc = tests.loc["acc"]
    assert acc["seeds"] == 2 and abs(acc["mean difference"] + 0.1) < 1e-12
    assert np.isnan(acc["p (paired t)"])  # both seeds differ by exactly -0.1: no spread, no t statistic
    noisy = df.copy()
    noisy.loc[noisy["trial"] == "rate=0.5_seed=2", "acc"] += 0.03
    t = paired_tests(noisy, [RATE, "seed"], ["acc"], RATE).iloc[0]
    a, b = np.array([0.61, 0.62]), np.array([0.51, 0.55])
    assert abs(t["p (paired t)"] - stats.ttest_rel(b, a).pvalue) < 1e-12
    assert np.isnan(tests.loc["loss", "p (paired t)"])  # identical values: no test


def test_reference_rows_sit_beside_ours(finished_study):
    _, trials, df = finished_study
    s = summarize(df, [RATE, "seed"], ["acc"])
    ref = reference_table(trials[0].study.reference, s, [RATE, "seed"])
    row = ref.iloc[0]
    assert row["published"] == 0.7 and row["metric"] == "acc" and row["ours"].startswith("0.62 ± ")


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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_headless_chromium(finished_study, tmp_path):
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it)")
    results, trials, df = finished_study
    write_report(results / "tiny", trials[0].study, df, list(trials[0].axes), {"x": 1})
    url = (results / "tiny" / "report.html").as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
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
    tiny_doc["report"] = {"plots": [
        {"kind": "line", "x": RATE, "y": "acc"},
        {"kind": "fit", "x": "diversity", "y": "acc", "title": "acc vs diversity"},
        {"kind": "heatmap", "x": RATE, "y": "safety/"},
        {"kind": "bars", "x": RATE, "y": "safety/"},
        {"kind": "line", "x": RATE, "y": "no_such_metric"},
    ]}
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials:
        r, s = t.axes[RATE], t.axes["seed"]
        write_trial(tmp_path, t, plans[t.id], "ok", {"acc": 0.6 - r / 5 + s / 100, "diversity": 10 + 20 * r + s,
                                                     "safety/asian": 0.3 + r / 10, "safety/women": 0.25 - r / 10}, {})
    df = table(tmp_path, trials)
    md = write_report(tmp_path / "tiny", trials[0].study, df, list(trials[0].axes), {}).read_text()
    pngs = sorted(p.name for p in (tmp_path / "tiny").glob("plot*.png"))
    assert pngs == ["plot-2.png", "plot-3.png", "plot-4.png", "plot.png"]
    for name in pngs:
        Image.open(tmp_path / "tiny" / name).verify()
    assert "## acc vs diversity" in md and "## safety/ by data.transforms.0.rate" in md
    assert "plot 'no_such_metric by data.transforms.0.rate' skipped: the table has no column 'no_such_metric'" in md


def test_wide_table_beside_published_and_a_heatmap_row_per_grid_point(tmp_path, tiny_doc):
    tiny_doc["grid"] = {"stages.dpo": {"none": None, "b1": {"beta": 0.1}}, RATE: [0.0, 0.5], "seed": [1, 2]}
    tiny_doc["report"] = {"tables": [{"title": "Benchmarks", "metrics": ["bench/"]}],
                          "plots": [{"kind": "heatmap", "y": "safety/", "title": "safety by chain"}]}
    tiny_doc["reference"] = {"source": "Paper, Table 2", "rows": [
        {"label": "SFT+DPO", "axes": {"stages.dpo": "b1", RATE: 0.0}, "metrics": {"bench/arc": 0.46, "bench/piqa": 0.79}},
        {"label": "other metric only", "metrics": {"acc": 0.5}},
    ]}
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials:
        dpo, r, s = t.axes["stages.dpo"] == "b1", t.axes[RATE], t.axes["seed"]
        write_trial(tmp_path, t, plans[t.id], "ok", {"bench/arc": 0.25 + 0.1 * dpo + s / 100, "bench/piqa": 0.5 - r / 10,
                                                     "safety/asian": 0.3 + r, "safety/women": 0.2 + 0.1 * dpo}, {})
    df = table(tmp_path, trials)
    md = write_report(tmp_path / "tiny", trials[0].study, df, list(trials[0].axes), {}).read_text()
    ours = md.split("## Benchmarks: ours")[1].split("##")[0]
    assert "| grid point | arc | piqa |" in ours
    assert "| dpo=b1, rate=0.0 | 0.365 ± 0.06353 (n=2) | 0.5 ± 0 (n=2) |" in ours  # t(0.975,1) * 0.005 = 0.06353
    published = md.split("## Benchmarks: published")[1].split("##")[0]
    assert "| SFT+DPO | stages.dpo=b1, data.transforms.0.rate=0.0 | 0.46 | 0.79 |" in published
    assert "other metric only" not in published and "Paper, Table 2" in published
    assert "## safety by chain" in md
    image = Image.open(tmp_path / "tiny" / "plot.png")
    assert image.size[1] > 300  # one heatmap row per grid point (4)
