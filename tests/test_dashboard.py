"""The Depth dashboard (diagnostics/tensorboard_plugin/): what a person sees in a real browser, and the data
path under it (tensors written by the trainer, read through TensorBoard's data provider, purged on resume).

The browser tests serve two runs (a tiny one trained in-process, 2 blocks; one of 3 blocks written with the
trainer's logging functions) with the `tensorboard` command (the plugin found through its entry point) and
drive Debian's headless Chromium with Selenium, one TensorBoard and one browser for the module.
Screenshots of each view land in the test's temporary folder, and in $DEPTHLAB_SCREENSHOTS when set.

    python -m tests.test_dashboard --logdir runs/demo_digits/tb --out docs/images   # the README's screenshots
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from torch.utils.tensorboard import SummaryWriter

from diagnostics.records import read_diagnostics
from diagnostics.tensorboard_logging import (
    dashboard_scalars,
    depth_summary,
    grad_norm_summary,
    headline_summaries,
    summary_scalars,
    write_summary,
)
from diagnostics.tensorboard_plugin import browser
from diagnostics.tensorboard_plugin.metadata import ISI_REGIMES, parse_content
from diagnostics.tensorboard_plugin.plugin import DepthLoader, DepthPlugin, display_name, phase_emergence
from tests.conftest import DEMO_RECIPE, TINY_OVERRIDES
from trainer.loop import train
from trainer.recipe import load_recipe

STAGES = ["embed", "pe", "block_1", "block_2", "norm"]


def record_at(step: int, centered: list[float], model: str = "raw") -> dict:
    """A diagnostics.jsonl record with token similarity and phases (cliff at pe, plateau pe..block_1)."""
    return {"step": step, "epoch": step / 10, "model": model, "trigger": "every_steps", "probe_size": 8,
            "num_processes": 1, "elapsed_s": 0.1, "stages": STAGES,
            "token_similarity": {"raw": [0.1, 0.2, 0.3, 0.4, 0.5], "centered": centered},
            "pe_dominance": 0.3, "isi": {"isi": [0.0, 0.001, 0.002, None, 0.004], "r2_self": [1.0] * 5,
                                         "r2_all": [1.0] * 5},
            "phases": {"cliff_end": "pe", "cliff_size": 0.03, "tau": 0.005, "plateau_start": "pe",
                       "plateau_end": "block_2", "plateau_length": 3, "plateau_median": -0.01, "climb_start": None},
            "probe_top1": 50.0}


def python_provider(logdir: Path) -> data_provider.MultiplexerDataProvider:
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"depth": 0})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, str(logdir))


def plugin_for(provider, logdir) -> DepthPlugin:
    return DepthPlugin(type("Context", (), {"data_provider": provider, "logdir": str(logdir), "flags": None})())


# ---- the data: what the trainer writes, read back as the plugin reads it ---------------------------------

def test_per_stage_values_are_tensors_and_scalars_keep_the_headline_summaries(tmp_path):
    record = record_at(10, [0.02, -0.01, -0.012, -0.011, 0.0])
    summary = depth_summary(record)
    tags = [value.tag for value in summary.value]
    assert "depth/token_sim_centered" in tags and "depth/isi" in tags and "depth/phases" in tags
    value = next(v for v in summary.value if v.tag == "depth/isi")
    content = parse_content(value.metadata.plugin_data.content)
    assert value.metadata.plugin_data.plugin_name == "depth"
    assert content == {"version": 1, "kind": "stages", "model": "raw", "metric": "isi", "key": "isi", "quantity": "isi",
                       "family": "isi", "log": False, "stages": STAGES}
    nc1 = {**record, "neural_collapse": {"nc1": [1.0] * 5}}
    assert parse_content(next(v for v in depth_summary(nc1).value if v.tag == "depth/nc1")
                         .metadata.plugin_data.content)["log"]  # the registry's log heatmap
    # Scalars: the headline summaries (derived from the registry's heatmaps) and the phase sizes only
    assert set(headline_summaries()) == {"isi/max", "isi/argmax", "isi/mean", "attn/cls_centrality_ratio_last",
                                         "attn/consensus_last", "nc/nc1_final", "plasticity/MHA_mean"}
    assert set(dashboard_scalars(record)) == {"depth/phase/cliff_size", "depth/phase/plateau_length",
                                              "depth/token_sim/pe_dominance", "depth/probe/top1", "depth/isi/max",
                                              "depth/isi/argmax", "depth/isi/mean"}
    assert set(dashboard_scalars(record)) < set(summary_scalars(record))
    grads = grad_norm_summary({"MHA": {"block_1": 2.0, "block_2": None}}, STAGES)
    assert [v.tag for v in grads.value] == ["depth/grad_norm_MHA"]


def test_the_plugin_reads_a_resumed_run_as_the_uninterrupted_one(tmp_path):
    """purge_step on resume: the Python data provider ignores a run's first restart; the plugin drops what
    the resumed session redid (the Rust data server, the browser tests' default, purges by itself)."""
    run = tmp_path / "logs" / "r" / "tb"
    writer = SummaryWriter(str(run))  # the first session: no purge_step, as the trainer opens it
    for step in (2, 4, 6):
        write_summary(writer, depth_summary(record_at(step, [0.02, -0.01, -0.01, -0.01, float(step)])), step)
    writer.close()
    time.sleep(0.01)
    writer = SummaryWriter(str(run), purge_step=4)  # resumed from the checkpoint at step 3
    for step in (4, 6, 8):
        write_summary(writer, depth_summary(record_at(step, [0.02, -0.01, -0.01, -0.01, 10.0 * step])), step)
    writer.close()
    provider = python_provider(tmp_path / "logs")
    raw = provider.read_tensors(context.RequestContext(), experiment_id="", plugin_name="depth", downsample=100)
    assert [d.step for d in raw["r/tb"]["depth/token_sim_centered"]] == [2, 4, 6, 4, 6, 8]  # not purged
    (series,) = plugin_for(provider, tmp_path / "logs").read_series(context.RequestContext(), "",
                                                                   "token_sim_centered", "raw", None)
    assert series["name"] == "r" and series["steps"] == [2, 4, 6, 8]
    assert [values[-1] for values in series["values"]] == [2.0, 40.0, 60.0, 80.0]
    assert series["phases"]["steps"] == [2, 4, 6, 8] and series["phases"]["cliff_end"] == [1, 1, 1, 1]
    assert series["values"][0][:4] == [0.02, -0.01, -0.01, -0.01]


def test_phase_emergence_is_the_first_step_and_the_step_it_stays_from():
    rows = [{"cliff_size": 0.001, "tau": 0.005, "plateau_length": 2, "climb_start": None},
            {"cliff_size": 0.01, "tau": 0.005, "plateau_length": 4, "climb_start": 6},
            {"cliff_size": 0.002, "tau": 0.005, "plateau_length": 4, "climb_start": None},
            {"cliff_size": 0.02, "tau": 0.005, "plateau_length": 5, "climb_start": 7}]
    assert phase_emergence([10, 20, 30, 40], rows) == {
        "cliff": {"first_seen": 20, "stays_from": 40}, "plateau": {"first_seen": 20, "stays_from": 20},
        "climb": {"first_seen": 20, "stays_from": 40}}
    assert phase_emergence([10], rows[:1])["plateau"] == {"first_seen": None, "stays_from": None}


def test_loader_keeps_every_evaluation_and_names_runs():
    flags = argparse.Namespace(samples_per_plugin={})
    DepthLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"depth": 0}  # TensorBoard would keep 10 of an unknown plugin's samples
    flags = argparse.Namespace(samples_per_plugin={"depth": 50})
    DepthLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"depth": 50}  # the user's choice wins
    assert display_name(".", "runs/demo_digits/tb") == "demo_digits" and display_name("seed1/tb", None) == "seed1"


# ---- what a person sees --------------------------------------------------------------------------------

DIAGNOSTICS = ["diagnostics.enabled=true", "diagnostics.metrics=[token_similarity,attention]",
               "diagnostics.every_steps=1", "diagnostics.probe_size=24", "diagnostics.probe_batch_size=24",
               "diagnostics.tensorboard_images=never", "train.max_steps=6", "checkpoint.every_steps=6",
               "checkpoint.every_epochs=null", "eval.every_epochs=null", "checkpoint.save_best=false"]
RUNS = ("deep", "shallow")  # TensorBoard lists runs by name


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A sweep's layout, `<logdir>/<name>/tb`: `shallow` trained in-process (2 blocks, 6 evaluations), `deep`
    (3 blocks, ISI included) written at the same steps with the trainer's logging functions, as a deeper model's
    run of the same sweep would be (ISI costs seconds per evaluation even at this size)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from tools.benchmark_dashboard import write_synthetic_run

    root = tmp_path_factory.mktemp("dashboard")
    train(load_recipe(DEMO_RECIPE, [*TINY_OVERRIDES, *DIAGNOSTICS, "model.depth=2"]), root / "shallow")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    records = write_synthetic_run(root / "deep" / "tb", blocks=3, evaluations=6, every=1)
    (root / "deep" / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def records(logdir):
    return {name: read_diagnostics(logdir / name) for name in RUNS}


@pytest.fixture(scope="module")
def dashboard(logdir, tmp_path_factory):
    """One TensorBoard for the module and one Chromium on its Depth tab (switched into the plugin's iframe)."""
    shots = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("DEPTHLAB_SCREENSHOTS"):
        shots.append(Path(os.environ["DEPTHLAB_SCREENSHOTS"]))
    with browser.serve_tensorboard(logdir) as url, browser.chromium(1400, 1600) as driver:
        browser.open_depth_tab(driver, url)
        yield type("Dashboard", (), {"driver": driver, "url": url, "shots": shots})()


def screenshot(dashboard, element, name: str) -> None:
    for folder in dashboard.shots:
        folder.mkdir(parents=True, exist_ok=True)
        element.screenshot(str(folder / f"{name}.png"))


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_the_depth_tab_is_in_tensorboards_header(dashboard):
    driver = dashboard.driver
    driver.switch_to.default_content()
    try:
        tabs = [tab for tab in css(driver, ".plugin-name") if tab.is_displayed()]
        assert "DEPTH" in [tab.text for tab in tabs]  # shown upper-case, as TensorBoard shows its tabs
        depth = next(tab for tab in tabs if tab.text == "DEPTH")
        assert depth.get_attribute("data-plugin-id") == "depth"
        screenshot(dashboard, css(driver, "body")[0], "dashboard_page")
    finally:
        driver.switch_to.frame(browser.depth_frame(driver))


def test_heatmap_has_one_row_per_stage_in_model_order(dashboard, records):
    driver = dashboard.driver
    for name, run_records in records.items():
        (panel,) = css(driver, f".heatmap-panel[data-run='{name}/tb']")
        assert panel.find_elements("css selector", ".panel-title")[0].text == name
        labels = [label.text for label in panel.find_elements("css selector", ".row-label")]
        assert labels == run_records[-1]["stages"]  # embed, pe, block_1 ... norm, top to bottom
        canvas = panel.find_elements("css selector", "canvas.heatmap")[0]
        assert int(canvas.get_attribute("data-rows")) == len(labels)
        assert int(canvas.get_attribute("data-columns")) == len(run_records) == 6  # one column per evaluation
    screenshot(dashboard, css(driver, "#depth-heatmap-view")[0], "dashboard_heatmap")


def hover_cell(driver, canvas, row: int, column: int) -> str:
    from selenium.webdriver.common.action_chains import ActionChains

    width, height = (int(canvas.get_attribute(k)) for k in ("data-cell-width", "data-cell-height"))
    size = canvas.size
    x = (column + 0.5) * width - size["width"] / 2  # Selenium's offsets are from the element's centre
    y = (row + 0.5) * height - size["height"] / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(round(x)), int(round(y))).perform()
    (tooltip,) = css(driver, "#depth-tooltip")
    assert tooltip.is_displayed()
    return tooltip.text


def test_hovered_heatmap_value_is_the_value_in_diagnostics_jsonl(dashboard, records):
    driver = dashboard.driver
    run_records = records["shallow"]
    canvas = css(driver, ".heatmap-panel[data-run='shallow/tb'] canvas.heatmap")[0]
    for row, column in ((3, 4), (0, 0), (len(run_records[0]["stages"]) - 1, 5)):
        record = run_records[column]
        text = hover_cell(driver, canvas, row, column)
        stage = record["stages"][row]
        assert f"shallow · {stage} · step {record['step']}" in text
        shown = float(css(driver, "#depth-tooltip .tooltip-value")[0].text)
        assert shown == pytest.approx(record["token_similarity"]["centered"][row], rel=1e-5, abs=1e-12)
        assert f"cliff end {record['phases']['cliff_end']}" in text


def test_profile_has_one_curve_per_selected_run_named_in_the_legend(dashboard, records):
    from selenium.webdriver.common.keys import Keys

    driver = dashboard.driver
    slider = css(driver, "#depth-step-slider")[0]
    slider.send_keys(Keys.HOME)
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # the third evaluation
    step = records["shallow"][2]["step"]
    assert css(driver, "#depth-step-label")[0].text == f"step {step}"
    curves = css(driver, "path.profile-curve")
    assert sorted(curve.get_attribute("data-run") for curve in curves) == ["deep", "shallow"]
    legend = [item.text for item in css(driver, "#depth-profile-legend .legend-item .legend-name")]
    assert legend == ["deep", "shallow"]
    colours = {curve.get_attribute("stroke") for curve in curves}
    assert len(colours) == 2  # distinct colours
    for curve in curves:  # one point per stage with a value
        name = curve.get_attribute("data-run")
        assert curve.get_attribute("d").count("L") == len(records[name][2]["stages"]) - 1
    assert css(driver, "line.cliff-end-mark") and css(driver, "rect.plateau-band")
    screenshot(dashboard, css(driver, "#depth-profile-view")[0], "dashboard_profile")

    relative = css(driver, "#depth-relative-depth")[0]
    relative.click()  # align the depth-2 and depth-3 models: both curves span embed (0) to norm (1)
    ends = {tuple(round(float(p.split(",")[0][1:])) for p in (d.split(" ")[0], d.split(" ")[-1]))
            for d in (curve.get_attribute("d") for curve in css(driver, "path.profile-curve"))}
    assert len(ends) == 1
    relative.click()

    deep_box = css(driver, "#depth-runs input[data-run='deep/tb']")[0]
    deep_box.click()  # deselect a run: its curve, heatmap and legend entry go
    assert [c.get_attribute("data-run") for c in css(driver, "path.profile-curve")] == ["shallow"]
    assert [i.text for i in css(driver, "#depth-profile-legend .legend-item .legend-name")] == ["shallow"]
    assert not css(driver, ".heatmap-panel[data-run='deep/tb']")
    deep_box.click()
    assert len(css(driver, "path.profile-curve")) == 2


def test_isi_is_shown_against_its_regimes(dashboard):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = dashboard.driver
    select = Select(css(driver, "#depth-quantity")[0])
    assert [o.get_attribute("value") for o in select.options][:2] == ["token_sim_raw", "token_sim_centered"]
    select.select_by_value("isi")
    WebDriverWait(driver, 10).until(lambda d: "isi against" in css(d, "#depth-profile-view h2")[0].text)
    regimes = {rect.get_attribute("data-regime") for rect in css(driver, "rect.isi-regime")}
    assert regimes and regimes <= {regime["name"] for regime in ISI_REGIMES}
    screenshot(dashboard, css(driver, "#depth-profile-view")[0], "dashboard_profile_isi")
    select.select_by_value("token_sim_centered")
    WebDriverWait(driver, 10).until(lambda d: "token_sim_centered against" in css(d, "#depth-profile-view h2")[0].text)


def test_phase_timeline_shows_when_each_phase_appeared(dashboard, records):
    driver = dashboard.driver
    for name, run_records in records.items():
        expected = phase_emergence([r["step"] for r in run_records], [r["phases"] for r in run_records])
        (table,) = css(driver, f"table.emergence[data-run='{name}/tb']")
        for phase, when in expected.items():
            cells = [td.text for td in table.find_elements("css selector", f"tr[data-phase='{phase}'] td")]
            fmt = [("–" if when[k] is None else f"step {when[k]}") for k in ("first_seen", "stays_from")]
            assert cells == [phase, *fmt], (name, phase)
        timeline = css(driver, f"svg.timeline[data-run='{name}/tb']")[0]
        assert len(timeline.find_elements("css selector", "circle")) == len(run_records)  # a cliff end per evaluation
    screenshot(dashboard, css(driver, "#depth-timeline-view")[0], "dashboard_timeline")


# ---- the README's screenshots of a real run -------------------------------------------------------------

def take_screenshots(logdir: str, out: Path) -> list[Path]:
    """The Depth tab's three views, Scalars and Images of a run, as PNGs in `out` (what the README shows)."""
    from selenium.webdriver.common.by import By

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with browser.serve_tensorboard(logdir) as url, browser.chromium(1400, 1100) as driver:
        browser.open_depth_tab(driver, url)
        for view in ("heatmap", "profile", "timeline"):
            path = out / f"dashboard_{view}.png"
            driver.find_element(By.CSS_SELECTOR, f"#depth-{view}-view").screenshot(str(path))
            written.append(path)
        driver.find_element(By.CSS_SELECTOR, "#depth-quantity option[value='isi']")
        driver.execute_script("const s = document.querySelector('#depth-quantity'); s.value = 'isi';"
                              "s.dispatchEvent(new Event('change'));")
        browser.wait_for_views(driver)
        time.sleep(1.0)
        path = out / "dashboard_profile_isi.png"
        driver.find_element(By.CSS_SELECTOR, "#depth-profile-view").screenshot(str(path))
        written.append(path)
        driver.switch_to.default_content()
        for tab in ("scalars", "images"):
            driver.get(f"{url}/#{tab}")
            time.sleep(4.0)
            path = out / f"tensorboard_{tab}.png"
            driver.save_screenshot(str(path))
            written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="screenshots of the Depth dashboard on a real run")
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    arguments = parser.parse_args()
    for written in take_screenshots(arguments.logdir, arguments.out):
        print(f"wrote {written}")
