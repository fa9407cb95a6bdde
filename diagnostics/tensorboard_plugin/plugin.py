"""The Depth dashboard's backend: routes that read depthlab's tensors through TensorBoard's data provider.

Routes (under /data/plugin/depth/):

    /index.js                      the frontend (static/index.js)
    /runs                          runs with depth data, their quantities (with stages and models), the
                                   default quantity, ISI's regimes
    /series?quantity=Q&model=M[&run=R ...]
                                   per run: stages, steps and values[step][stage] of quantity Q for the
                                   model's weights (raw | ema), the detected phases at every evaluation
                                   and when each phase first appeared and from which step it stayed

Reading goes through `context.data_provider` (TensorBoard's multiplexer or its Rust data server),
so the dashboard works wherever TensorBoard reads event files. `DepthLoader.fix_flags` keeps every
evaluation (`--samples_per_plugin depth=all` unless given): TensorBoard otherwise keeps 10 samples of
a plugin it does not know.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from diagnostics.registry import METRICS
from diagnostics.tensorboard_plugin.metadata import (
    ISI_QUANTITY,
    ISI_REGIMES,
    PHASE_BOUNDARY_FIELDS,
    PHASE_FIELDS,
    PHASES_QUANTITY,
    PLATEAU_MIN_STAGES,
    PLUGIN_NAME,
    parse_content,
    tag_prefix,
)

STATIC = Path(__file__).resolve().parent / "static"
MAX_SAMPLES = 1_000_000  # read every stored evaluation (the loader keeps all of them)
PHASE_NAMES = ("cliff", "plateau", "climb")


def registry_order() -> dict[tuple[str, str], int]:
    """(metric, key) -> position in diagnostics/registry.py, for listing quantities as declared."""
    return {(name, key): i for i, (name, key) in enumerate((n, k) for n, spec in METRICS.items() for k in spec.keys)}


def default_quantity() -> str:
    """The first declared heatmap quantity (token_sim_centered): the curve the phases are detected on."""
    return next(spec.quantity(heatmap.key) for spec in METRICS.values() for heatmap in spec.heatmaps)


def display_name(run: str, logdir: str | None) -> str:
    """A run's name for legends: `<run dir>/tb` -> `<run dir>`; the logdir itself ('.') by its run dir."""
    if run == ".":
        if not logdir:
            return run
        path = Path(logdir).expanduser().resolve()
        return (path.parent if path.name == "tb" else path).name or run
    return run[: -len("/tb")] if run.endswith("/tb") else run


def finite_or_none(values: Iterable[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in (float(x) for x in values)]


def drop_orphans(series: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """Data of a resumed run as the uninterrupted run wrote it: per tag, step-ordered, one datum per step.

    A resumed trainer redoes the steps after its checkpoint (its writer's `purge_step`). TensorBoard's
    Rust data server and the legacy accumulator drop the old session's data from that step on; the
    Python data provider ignores the first restart of a run (it takes the first SessionLog.START it
    sees for the run's start). So, over the run's tags in write order: a datum whose step is below
    the largest step written before it starts a new session, and every earlier datum at or after
    that step is dropped; of two data at one step, the later one is kept.
    """
    events = sorted(((datum.wall_time, order, tag, datum) for tag, data in series.items()
                     for order, datum in enumerate(data)), key=lambda event: (event[0], event[1]))
    kept: list[tuple[str, Any]] = []
    newest = -math.inf
    for _, _, tag, datum in events:
        if datum.step < newest:
            kept = [(t, d) for t, d in kept if d.step < datum.step]
            newest = max((d.step for _, d in kept), default=-math.inf)
        kept.append((tag, datum))
        newest = max(newest, datum.step)
    out: dict[str, dict[int, Any]] = {tag: {} for tag in series}
    for tag, datum in kept:
        out[tag][datum.step] = datum  # write order: a later datum at the same step replaces an earlier one
    return {tag: [by_step[step] for step in sorted(by_step)] for tag, by_step in out.items()}


def phase_present(row: Mapping[str, float | None]) -> dict[str, bool]:
    """Whether each phase is there at one evaluation (metadata.py: cliff > tau, plateau >=
    PLATEAU_MIN_STAGES stages, a climb detected)."""
    size, tau, length = row.get("cliff_size"), row.get("tau"), row.get("plateau_length")
    return {"cliff": size is not None and tau is not None and size > tau,
            "plateau": length is not None and length >= PLATEAU_MIN_STAGES,
            "climb": row.get("climb_start") is not None}


def phase_emergence(steps: Sequence[int], rows: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, Any]]:
    """Per phase: the first evaluation step at which it is there (`first_seen`) and the step from which
    it is there at every later evaluation (`stays_from`; None when it is absent at the last one)."""
    out = {}
    for name in PHASE_NAMES:
        present = [phase_present(row)[name] for row in rows]
        first = next((step for step, there in zip(steps, present) if there), None)
        stays = None
        for step, there in zip(reversed(steps), reversed(present)):
            if not there:
                break
            stays = step
        out[name] = {"first_seen": first, "stays_from": stays}
    return out


def read_depth_series(logdir: str | Path) -> dict[str, dict[str, list[tuple[int, list[float | None]]]]]:
    """Every depth tensor under `logdir` as the dashboard reads it (orphans of resumed runs dropped):
    {run: {tag: [(step, values per stage), ...]}}, values None where undefined. For tests and scripts;
    the legacy EventAccumulator never purges tensors on a resume."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={PLUGIN_NAME: 0})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    reader = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    data = reader.read_tensors(context.RequestContext(), experiment_id="", plugin_name=PLUGIN_NAME,
                               downsample=MAX_SAMPLES)
    return {run: {tag: [(d.step, finite_or_none(d.numpy.ravel())) for d in series]
                  for tag, series in drop_orphans(tags).items()} for run, tags in data.items()}


class DepthPlugin(base_plugin.TBPlugin):
    """The Depth tab (an iframed ES-module plugin)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._data_provider = context.data_provider
        self._logdir = context.logdir or getattr(context.flags, "logdir", None)

    def get_plugin_apps(self) -> dict[str, Any]:
        return {"/index.js": self._serve_js, "/runs": self._serve_runs, "/series": self._serve_series}

    def is_active(self) -> bool:
        return False  # active exactly when some run has `depth` data (TensorBoard checks data_plugin_names)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Depth")

    # ---- reading --------------------------------------------------------------------------------
    def list_quantities(self, ctx: Any, experiment_id: str) -> list[dict[str, Any]]:
        """Runs (name order) with their depth quantities (registry order) and models."""
        listing = self._data_provider.list_tensors(ctx, experiment_id=experiment_id, plugin_name=PLUGIN_NAME)
        order = registry_order()
        runs = []
        for run in sorted(listing):
            quantities = []
            for tag, series in listing[run].items():
                content = parse_content(series.plugin_content)
                if content is None or content.get("kind") != "stages":
                    continue
                quantities.append({"tag": tag, "model": content["model"], "metric": content["metric"],
                                   "key": content["key"], "quantity": content["quantity"],
                                   "family": content["family"], "log": bool(content.get("log")),
                                   "stages": content["stages"], "max_step": series.max_step})
            if quantities:
                quantities.sort(key=lambda q: (q["model"] != "raw", q["model"],
                                               order.get((q["metric"], q["key"]), len(order))))
                runs.append({"run": run, "name": display_name(run, self._logdir), "quantities": quantities})
        return runs

    def read_series(self, ctx: Any, experiment_id: str, quantity: str, model: str,
                    runs: Sequence[str] | None) -> list[dict[str, Any]]:
        tag, phases_tag = f"{tag_prefix(model)}/{quantity}", f"{tag_prefix(model)}/{PHASES_QUANTITY}"
        listing = self._data_provider.list_tensors(
            ctx, experiment_id=experiment_id, plugin_name=PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(runs=runs or None, tags=[tag, phases_tag]))
        data = self._data_provider.read_tensors(
            ctx, experiment_id=experiment_id, plugin_name=PLUGIN_NAME, downsample=MAX_SAMPLES,
            run_tag_filter=provider.RunTagFilter(runs=runs or None, tags=[tag, phases_tag]))
        out = []
        for run in sorted(data):
            if tag not in data[run]:
                continue
            content = parse_content(listing[run][tag].plugin_content) or {}
            series = drop_orphans(data[run])
            entry = {"run": run, "name": display_name(run, self._logdir), "stages": content.get("stages", []),
                     "log": bool(content.get("log")), "steps": [d.step for d in series[tag]],
                     "values": [finite_or_none(d.numpy.ravel()) for d in series[tag]]}
            phase_data = series.get(phases_tag, [])
            if phase_data:
                fields = (parse_content(listing[run][phases_tag].plugin_content) or {}).get("fields", PHASE_FIELDS)
                rows = [dict(zip(fields, finite_or_none(d.numpy.ravel()))) for d in phase_data]
                steps = [d.step for d in phase_data]
                entry["phases"] = {"steps": steps, **{name: [row.get(name) for row in rows] for name in PHASE_FIELDS}}
                entry["emergence"] = phase_emergence(steps, rows)
            out.append(entry)
        return out

    # ---- routes ---------------------------------------------------------------------------------
    @wrappers.Request.application
    def _serve_js(self, request: wrappers.Request) -> wrappers.Response:
        return http_util.Respond(request, (STATIC / "index.js").read_text(), "text/javascript")

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        body = {"runs": self.list_quantities(ctx, eid), "default_quantity": default_quantity(),
                "isi_quantity": ISI_QUANTITY, "isi_regimes": list(ISI_REGIMES),
                "phase_boundaries": list(PHASE_BOUNDARY_FIELDS), "plateau_min_stages": PLATEAU_MIN_STAGES}
        return http_util.Respond(request, body, "application/json")

    @wrappers.Request.application
    def _serve_series(self, request: wrappers.Request) -> wrappers.Response:
        quantity, model = request.args.get("quantity"), request.args.get("model", "raw")
        if not quantity:
            raise errors.InvalidArgumentError("missing query parameter: quantity")
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        runs = self.read_series(ctx, eid, quantity, model, request.args.getlist("run") or None)
        return http_util.Respond(request, {"quantity": quantity, "model": model, "runs": runs}, "application/json")


class DepthLoader(base_plugin.TBLoader):
    """Loads the Depth plugin (entry point `tensorboard_plugins: depth`) and keeps all of its samples."""

    def fix_flags(self, flags: Any) -> None:
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(PLUGIN_NAME, 0)  # 0 = keep every evaluation

    def load(self, context: base_plugin.TBContext) -> DepthPlugin:
        return DepthPlugin(context)
