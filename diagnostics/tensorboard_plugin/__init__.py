"""The Depth dashboard: a TensorBoard plugin that shows how depthlab's per-stage diagnostics evolve.

`tensorboard --logdir runs/` shows a *Depth* tab (registered through the `tensorboard_plugins` entry
point, `diagnostics.tensorboard_plugin.plugin:DepthLoader`) with three views of any per-stage
quantity the trainer logged (diagnostics/tensorboard_logging.py):

- Heatmap: stage x training step, one colour scale per metric for the whole run (optionally shared
  across the selected runs), the value on hover, the detected cliff end, plateau and climb per step;
- Depth profile: the quantity against stage at a chosen step (slider, play), one curve per run,
  optionally on relative depth (0 = embed, 1 = norm), phase boundaries drawn, ISI's regimes shaded;
- Phase timeline: per run, cliff end, plateau and climb start over training, and the step at which
  each phase first appears and from which it stays.

`metadata` (the data format) needs only TensorBoard's protos; `plugin` (the backend) is imported by
TensorBoard; `static/index.js` is the frontend (a plain ES module: SVG and canvas, nothing fetched
from outside); `browser` starts TensorBoard and headless Chromium for the tests and the benchmark.
"""
