// The Depth dashboard (TensorBoard dynamic plugin): heatmap, depth profile and phase timeline of
// depthlab's per-stage diagnostics. A plain ES module: DOM, SVG and canvas, no library, nothing fetched
// but this plugin's own routes (./runs, ./series), which the backend (plugin.py) serves.

const SVG_NS = 'http://www.w3.org/2000/svg';
// matplotlib's tab10 then tab20's light half: distinct run colours; more runs cycle through hues.
const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
  '#bcbd22', '#17becf', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5', '#c49c94', '#f7b6d2',
  '#c7c7c7', '#dbdb8d', '#9edae5'];
// viridis(t) = sum_k VIRIDIS[k] t^k per channel (the polynomial diagnostics/raster.py uses)
const VIRIDIS = [
  [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
  [0.1050930431085774, 1.404613529898575, 1.384590162594685],
  [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
  [-4.634230498983486, -5.799100973351585, -19.33244095627987],
  [6.228269936347081, 14.17993336680509, 56.69055260068105],
  [4.776384997670288, -13.74514537774601, -65.35303263337234],
  [-5.435455855934631, 4.645852612178535, 26.3124352495832],
];
const MISSING = '#d7d7d7';
const PLAY_INTERVAL_MS = 350;
const REFRESH_MS = 15000;

const STYLE = `
  body { font: 13px/1.4 Roboto, "Liberation Sans", "DejaVu Sans", Arial, sans-serif; color: #212121;
         margin: 0; background: #f5f5f5; }
  .depth-app { padding: 12px 16px 40px; }
  .controls { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: center; background: #fff;
              padding: 10px 12px; border-radius: 4px; box-shadow: 0 1px 2px rgba(0,0,0,.15); }
  .controls label { display: inline-flex; align-items: center; gap: 6px; }
  .controls select { font: inherit; padding: 2px 4px; }
  .run-list { display: flex; flex-wrap: wrap; gap: 4px 12px; width: 100%; }
  .run-list label { white-space: nowrap; }
  .swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; }
  section.view { background: #fff; margin-top: 12px; padding: 10px 12px 14px; border-radius: 4px;
                 box-shadow: 0 1px 2px rgba(0,0,0,.15); }
  section.view h2 { font-size: 15px; font-weight: 500; margin: 0 0 6px; }
  .hint { color: #616161; font-size: 12px; margin: 0 0 8px; }
  .panel { margin: 8px 0 14px; }
  .panel-title { font-weight: 500; margin-bottom: 4px; display: flex; align-items: center; gap: 6px; }
  .heatmap-grid { display: grid; grid-template-columns: auto auto auto; align-items: start;
                  justify-content: start; column-gap: 6px; }
  .row-labels { display: flex; flex-direction: column; text-align: right; font-size: 11px; color: #424242; }
  .row-label { white-space: nowrap; }
  .column-labels { position: relative; height: 16px; font-size: 11px; color: #424242; }
  .column-labels span { position: absolute; transform: translateX(-50%); white-space: nowrap; }
  .axis-title { font-size: 11px; color: #616161; }
  .colorbar { display: flex; align-items: stretch; gap: 4px; font-size: 11px; color: #424242; }
  .colorbar-ticks { position: relative; width: 84px; }
  .colorbar-ticks span { position: absolute; transform: translateY(-50%); white-space: nowrap; }
  canvas.heatmap { cursor: crosshair; display: block; }
  .tooltip { position: fixed; pointer-events: none; background: rgba(33,33,33,.92); color: #fff;
             padding: 5px 8px; border-radius: 3px; font-size: 12px; display: none; z-index: 10;
             white-space: nowrap; }
  .profile-controls { display: flex; align-items: center; gap: 10px; margin-bottom: 6px; }
  .profile-controls input[type=range] { width: 420px; }
  .profile-controls button { font: inherit; min-width: 64px; }
  .legend { display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 12px; margin-top: 4px; }
  .legend-item, .legend-mark { display: inline-flex; align-items: center; gap: 5px; }
  svg text { font-family: Roboto, "Liberation Sans", "DejaVu Sans", Arial, sans-serif; }
  table.emergence { border-collapse: collapse; font-size: 12px; margin-top: 4px; }
  table.emergence td, table.emergence th { padding: 2px 10px 2px 0; text-align: left; font-weight: normal; }
  table.emergence th { color: #616161; }
  .empty { padding: 24px; color: #616161; }
`;

// ---- small helpers -----------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key === 'style') node.style.cssText = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function viridis(t) {
  const x = Math.min(1, Math.max(0, t));
  const rgb = [0, 1, 2].map((c) => {
    let v = 0;
    for (let k = VIRIDIS.length - 1; k >= 0; k--) v = v * x + VIRIDIS[k][c];
    return Math.round(Math.min(1, Math.max(0, v)) * 255);
  });
  return rgb;
}

function runColor(index) {
  if (index < PALETTE.length) return PALETTE[index];
  return `hsl(${(index * 137.508) % 360}, 60%, 45%)`;
}

function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return 'n/a';
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-4) return v.toExponential(5);
  return Number(v.toPrecision(6)).toString();
}

function formatTick(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

function niceTicks(low, high, count = 4) {
  if (!(Number.isFinite(low) && Number.isFinite(high)) || high <= low) return Number.isFinite(low) ? [low] : [];
  const raw = (high - low) / Math.max(count - 1, 1);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  let step = magnitude;
  for (const m of [1, 2, 5]) if (m * magnitude <= raw * (1 + 1e-12)) step = m * magnitude;
  const first = Math.ceil(low / step - 1e-9) * step;
  const ticks = [];
  for (let t = first; t <= high + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  return ticks;
}

function quantile(sorted, q) {
  const position = (sorted.length - 1) * q;
  const lower = Math.floor(position);
  const upper = Math.ceil(position);
  return sorted[lower] + (sorted[upper] - sorted[lower]) * (position - lower);
}

// The colour range of a heatmap: min..max, narrowed to Tukey's far fences (quartiles -/+ 3 IQR) so that
// one outlier cell cannot take the whole range (the same rule as diagnostics/raster.py robust_range).
export function robustRange(values) {
  const finite = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (!finite.length) return {low: 0, high: 1, clippedLow: false, clippedHigh: false};
  const min = finite[0];
  const max = finite[finite.length - 1];
  const q1 = quantile(finite, 0.25);
  const q3 = quantile(finite, 0.75);
  const iqr = q3 - q1;
  let low = iqr > 0 ? Math.max(min, q1 - 3 * iqr) : min;
  let high = iqr > 0 ? Math.min(max, q3 + 3 * iqr) : max;
  if (high <= low) {
    const pad = Math.abs(low) * 0.05 || 0.5;
    return {low: low - pad, high: high + pad, clippedLow: false, clippedHigh: false};
  }
  return {low, high, clippedLow: min < low, clippedHigh: max > high};
}

function transform(log) {
  return log ? (v) => (v !== null && v > 0 ? Math.log10(v) : NaN) : (v) => (v === null ? NaN : v);
}

function stageIndexName(stages, index) {
  return index === null || index === undefined || !Number.isFinite(index) ? null : stages[index] ?? null;
}

function phaseAt(entry, step) {
  // the phases detected at this evaluation step (null when the run has none there)
  const phases = entry.phases;
  if (!phases) return null;
  const i = phases.steps.indexOf(step);
  if (i < 0) return null;
  const row = {};
  for (const [key, values] of Object.entries(phases)) if (key !== 'steps') row[key] = values[i];
  return row;
}

function latestAtOrBefore(steps, step) {
  let best = -1;
  for (let i = 0; i < steps.length; i++) if (steps[i] <= step) best = i;
  return best;
}

// ---- the app -----------------------------------------------------------------------------------

class DepthDashboard {
  constructor(root) {
    this.root = root;
    this.state = {model: 'raw', quantity: null, selected: null, shared: false, relative: false,
      stepIndex: null, fitStep: false};
    this.timings = {start: performance.now()};
    this.tooltip = el('div', {class: 'tooltip', id: 'depth-tooltip'});
    this.playing = null;
    this.signature = '';
  }

  async start() {
    this.meta = await this.fetchJson('./runs');
    this.root.append(this.tooltip);
    if (!this.meta.runs.length) {
      this.root.append(el('div', {class: 'empty'},
          'No depth diagnostics here yet: train with diagnostics.enabled: true (recipe diagnostics: section).'));
      this.markDrawn('heatmap'); this.markDrawn('profile'); this.markDrawn('timeline');
      return;
    }
    this.runColors = new Map(this.meta.runs.map((r, i) => [r.run, runColor(i)]));
    this.state.selected = new Set(this.meta.runs.map((r) => r.run));
    const models = this.models();
    this.state.model = models.includes('raw') ? 'raw' : models[0];
    const quantities = this.quantities();
    this.state.quantity = quantities.some((q) => q.quantity === this.meta.default_quantity) ?
      this.meta.default_quantity : quantities[0].quantity;
    this.buildLayout();
    await this.load();
    if (!this.refreshTimer) this.refreshTimer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  async fetchJson(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  }

  models() {
    const models = new Set();
    for (const run of this.meta.runs) for (const q of run.quantities) models.add(q.model);
    return [...models];
  }

  quantities() {
    // quantities of the chosen weights, in registry order, each once
    const seen = new Map();
    for (const run of this.meta.runs) {
      for (const q of run.quantities) if (q.model === this.state.model && !seen.has(q.quantity)) seen.set(q.quantity, q);
    }
    return [...seen.values()];
  }

  buildLayout() {
    const app = el('div', {class: 'depth-app'});
    const modelSelect = el('select', {id: 'depth-model', onchange: (e) => { this.state.model = e.target.value; this.fillQuantities(); this.load(); }});
    for (const m of this.models()) modelSelect.append(el('option', {value: m}, `${m} weights`));
    modelSelect.value = this.state.model;
    this.quantitySelect = el('select', {id: 'depth-quantity', onchange: (e) => { this.state.quantity = e.target.value; this.load(); }});
    this.fillQuantities();
    const shared = el('input', {type: 'checkbox', id: 'depth-shared-scale', onchange: (e) => { this.state.shared = e.target.checked; this.drawHeatmaps(); }});
    const relative = el('input', {type: 'checkbox', id: 'depth-relative-depth', onchange: (e) => { this.state.relative = e.target.checked; this.drawProfile(); }});
    const runList = el('div', {class: 'run-list', id: 'depth-runs'});
    for (const run of this.meta.runs) {
      const box = el('input', {type: 'checkbox', 'data-run': run.run, checked: true, onchange: (e) => {
        if (e.target.checked) this.state.selected.add(run.run); else this.state.selected.delete(run.run);
        this.drawAll();
      }});
      runList.append(el('label', {}, box, el('span', {class: 'swatch', style: `background:${this.runColors.get(run.run)}`}), run.name));
    }
    app.append(el('div', {class: 'controls'},
        el('label', {}, 'Weights', modelSelect),
        el('label', {}, 'Quantity', this.quantitySelect),
        el('label', {}, shared, 'one colour scale for all selected runs'),
        el('label', {}, relative, 'relative depth (0 = embed, 1 = norm)'),
        runList));

    this.heatmapView = el('section', {class: 'view', id: 'depth-heatmap-view'});
    this.profileView = el('section', {class: 'view', id: 'depth-profile-view'});
    this.timelineView = el('section', {class: 'view', id: 'depth-timeline-view'});
    app.append(this.heatmapView, this.profileView, this.timelineView);
    this.root.append(app);
  }

  fillQuantities() {
    const quantities = this.quantities();
    this.quantitySelect.replaceChildren(...quantities.map((q) => el('option', {value: q.quantity}, q.quantity)));
    if (!quantities.some((q) => q.quantity === this.state.quantity)) this.state.quantity = quantities[0]?.quantity;
    this.quantitySelect.value = this.state.quantity;
  }

  async load() {
    const params = new URLSearchParams({quantity: this.state.quantity, model: this.state.model});
    this.data = await this.fetchJson(`./series?${params}`);
    this.signature = this.dataSignature();
    this.state.stepIndex = null;  // the latest step
    this.drawAll();
  }

  async refresh() {
    if (document.hidden || this.playing) return;
    try {
      const meta = await this.fetchJson('./runs');
      const params = new URLSearchParams({quantity: this.state.quantity, model: this.state.model});
      const data = await this.fetchJson(`./series?${params}`);
      const before = this.signature;
      const followLatest = this.state.stepIndex === null;
      this.data = data;
      this.signature = this.dataSignature();
      if (this.signature !== before || meta.runs.length !== this.meta.runs.length) {
        if (meta.runs.length !== this.meta.runs.length) { this.meta = meta; this.root.replaceChildren(this.tooltip); this.start(); return; }
        if (followLatest) this.state.stepIndex = null;
        this.drawAll();
      }
    } catch (error) {
      // TensorBoard restarting or the logdir being rewritten: keep what is shown
    }
  }

  dataSignature() {
    return JSON.stringify(this.data.runs.map((r) => [r.run, r.steps.length, r.steps[r.steps.length - 1]]));
  }

  selectedEntries() {
    return this.data.runs.filter((r) => this.state.selected.has(r.run));
  }

  drawAll() {
    this.drawHeatmaps();
    this.drawProfile();
    this.drawTimelines();
  }

  markDrawn(view) {
    this.timings[view] = performance.now();
    document.body.dataset[`${view}Drawn`] = String(this.timings[view]);
    window.depthDashboard = {timings: this.timings, timeOrigin: performance.timeOrigin};
  }

  showTooltip(event, html) {
    this.tooltip.innerHTML = html;
    this.tooltip.style.display = 'block';
    const x = Math.min(event.clientX + 14, window.innerWidth - this.tooltip.offsetWidth - 4);
    const y = Math.min(event.clientY + 14, window.innerHeight - this.tooltip.offsetHeight - 4);
    this.tooltip.style.left = `${x}px`;
    this.tooltip.style.top = `${y}px`;
  }

  hideTooltip() {
    this.tooltip.style.display = 'none';
  }

  // ---- heatmap: stage x training step ---------------------------------------------------------
  drawHeatmaps() {
    const entries = this.selectedEntries();
    const view = this.heatmapView;
    const log = entries.some((e) => e.log);
    view.replaceChildren(
        el('h2', {}, `Heatmap: ${this.state.quantity} by stage and training step`),
        el('p', {class: 'hint'},
            (this.state.shared ? 'One colour scale for all selected runs' : 'One colour scale per run') +
            (log ? ' (log10 colours)' : '') +
            ', over every evaluation; the colour range ends at the far quartile fences, so one outlier cell ' +
            'cannot take it (hover for the value). Marks, per evaluation: ',
            this.markLegend()));
    const f = transform(log);
    const scales = new Map();
    if (this.state.shared) {
      const range = robustRange(entries.flatMap((e) => e.values.flat().map(f)));
      for (const e of entries) scales.set(e.run, range);
    } else {
      for (const e of entries) scales.set(e.run, robustRange(e.values.flat().map(f)));
    }
    const width = Math.max(360, (view.clientWidth || 900) - 220);
    for (const entry of entries) view.append(this.heatmapPanel(entry, scales.get(entry.run), f, log, width));
    if (!entries.length) view.append(el('p', {class: 'hint'}, 'No run selected.'));
    this.markDrawn('heatmap');
  }

  markLegend() {
    const icon = (shape) => {
      const s = svg('svg', {width: 16, height: 12, viewBox: '0 0 16 12'});
      if (shape === 'cliff') s.append(svg('circle', {cx: 8, cy: 6, r: 3.5, fill: '#fff', stroke: '#212121', 'stroke-width': 1.2}));
      if (shape === 'plateau') {
        s.append(svg('rect', {x: 1, y: 2, width: 14, height: 8, fill: '#9e9e9e'}));
        s.append(svg('line', {x1: 1, y1: 2, x2: 15, y2: 2, stroke: '#fff', 'stroke-width': 2}));
        s.append(svg('line', {x1: 1, y1: 10, x2: 15, y2: 10, stroke: '#fff', 'stroke-width': 2}));
      }
      if (shape === 'climb') s.append(svg('path', {d: 'M8 1.5 L12.5 10 L3.5 10 Z', fill: '#fff', stroke: '#212121', 'stroke-width': 1.2}));
      return s;
    };
    return el('span', {class: 'legend'},
        el('span', {class: 'legend-mark'}, icon('cliff'), 'cliff end'),
        el('span', {class: 'legend-mark'}, icon('plateau'), 'plateau (between the white lines)'),
        el('span', {class: 'legend-mark'}, icon('climb'), 'climb start'));
  }

  heatmapPanel(entry, range, f, log, maxWidth) {
    const rows = entry.stages.length;
    const columns = entry.steps.length;
    const cellW = Math.max(2, Math.min(96, Math.floor(maxWidth / Math.max(columns, 1))));  // few evaluations: wide cells
    const cellH = rows > 20 ? 12 : rows > 12 ? 16 : 20;
    const width = cellW * columns;
    const height = cellH * rows;
    const ratio = window.devicePixelRatio || 1;
    const canvas = el('canvas', {class: 'heatmap', 'data-run': entry.run, 'data-rows': rows, 'data-columns': columns,
      'data-cell-width': cellW, 'data-cell-height': cellH,
      style: `width:${width}px;height:${height}px`});
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext('2d');
    ctx.scale(ratio, ratio);
    const span = range.high - range.low;
    for (let j = 0; j < columns; j++) {
      const column = entry.values[j];
      for (let i = 0; i < rows; i++) {
        const v = f(column[i] ?? null);
        if (Number.isFinite(v)) {
          const [r, g, b] = viridis((v - range.low) / span);
          ctx.fillStyle = `rgb(${r},${g},${b})`;
        } else {
          ctx.fillStyle = MISSING;
        }
        ctx.fillRect(j * cellW, i * cellH, cellW, cellH);
      }
    }
    this.drawPhaseMarks(ctx, entry, cellW, cellH);

    const rowLabels = el('div', {class: 'row-labels', style: `height:${height}px`});
    for (const stage of entry.stages) {
      rowLabels.append(el('div', {class: 'row-label', 'data-stage': stage, style: `height:${cellH}px;line-height:${cellH}px`}, stage));
    }
    const columnLabels = el('div', {class: 'column-labels', style: `width:${width}px`});
    const every = Math.max(1, Math.ceil(columns / Math.max(1, Math.floor(width / 56))));
    for (let j = 0; j < columns; j += every) {
      columnLabels.append(el('span', {style: `left:${(j + 0.5) * cellW}px`}, String(entry.steps[j])));
    }
    canvas.addEventListener('mousemove', (event) => {
      const box = canvas.getBoundingClientRect();
      const j = Math.floor((event.clientX - box.left) / cellW);
      const i = Math.floor((event.clientY - box.top) / cellH);
      if (i < 0 || j < 0 || i >= rows || j >= columns) { this.hideTooltip(); return; }
      const phases = phaseAt(entry, entry.steps[j]);
      let phaseText = '';
      if (phases) {
        const name = (k) => stageIndexName(entry.stages, phases[k]) ?? '–';
        phaseText = `<br>cliff end ${name('cliff_end')}, plateau ${name('plateau_start')}..${name('plateau_end')}, climb ${name('climb_start')}`;
      }
      this.showTooltip(event, `${entry.name} · <b>${entry.stages[i]}</b> · step ${entry.steps[j]}<br>` +
          `${this.state.quantity} = <span class="tooltip-value">${formatValue(entry.values[j][i])}</span>${phaseText}`);
    });
    canvas.addEventListener('mouseleave', () => this.hideTooltip());

    const plot = el('div', {}, canvas, columnLabels, el('div', {class: 'axis-title', style: `width:${width}px;text-align:center`}, 'training step'));
    return el('div', {class: 'panel heatmap-panel', 'data-run': entry.run},
        el('div', {class: 'panel-title'}, el('span', {class: 'swatch', style: `background:${this.runColors.get(entry.run)}`}), entry.name),
        el('div', {class: 'heatmap-grid'}, rowLabels, plot, this.colorbar(range, height, log)));
  }

  drawPhaseMarks(ctx, entry, cellW, cellH) {
    if (!entry.phases) return;
    const radius = Math.max(1.5, Math.min(cellW, cellH) * 0.28);
    for (let j = 0; j < entry.steps.length; j++) {
      const p = phaseAt(entry, entry.steps[j]);
      if (!p) continue;
      const x0 = j * cellW;
      const cx = x0 + cellW / 2;
      if (p.plateau_start !== null && p.plateau_end !== null) {
        for (const [y, width, color] of [[0, 3, 'rgba(0,0,0,.55)'], [0, 1.6, '#fff']]) {
          ctx.strokeStyle = color;
          ctx.lineWidth = width;
          ctx.beginPath();
          const top = p.plateau_start * cellH + y + 1;
          const bottom = (p.plateau_end + 1) * cellH - 1;
          ctx.moveTo(x0, top); ctx.lineTo(x0 + cellW, top);
          ctx.moveTo(x0, bottom); ctx.lineTo(x0 + cellW, bottom);
          ctx.stroke();
        }
      }
      ctx.lineWidth = 1.2;
      ctx.strokeStyle = '#212121';
      ctx.fillStyle = '#fff';
      if (p.cliff_end !== null) {
        ctx.beginPath();
        ctx.arc(cx, (p.cliff_end + 0.5) * cellH, radius, 0, 2 * Math.PI);
        ctx.fill(); ctx.stroke();
      }
      if (p.climb_start !== null) {
        const cy = (p.climb_start + 0.5) * cellH;
        ctx.beginPath();
        ctx.moveTo(cx, cy - radius * 1.2); ctx.lineTo(cx + radius * 1.1, cy + radius); ctx.lineTo(cx - radius * 1.1, cy + radius);
        ctx.closePath(); ctx.fill(); ctx.stroke();
      }
    }
  }

  colorbar(range, height, log) {
    const bar = el('canvas', {style: `width:14px;height:${height}px;border:1px solid #424242`});
    bar.width = 14;
    bar.height = Math.max(1, height);
    const ctx = bar.getContext('2d');
    for (let y = 0; y < height; y++) {
      const [r, g, b] = viridis(1 - y / Math.max(height - 1, 1));
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(0, y, 14, 1);
    }
    const ticks = el('div', {class: 'colorbar-ticks', style: `height:${height}px`});
    const span = range.high - range.low;
    const values = niceTicks(range.low, range.high, height > 120 ? 5 : 3);
    for (const t of values) {
      const label = log ? formatTick(10 ** t) : formatTick(t);
      ticks.append(el('span', {'data-tick': t, style: `top:${(1 - (t - range.low) / span) * height}px`}, `– ${label}`));
    }
    // values beyond the colour range: a note beside the bar's end (they take its end colour)
    if (range.clippedHigh) ticks.append(el('span', {style: 'top:-12px;color:#616161;font-size:10px'}, `▲ above ${formatTick(log ? 10 ** range.high : range.high)}`));
    if (range.clippedLow) ticks.append(el('span', {style: `top:${height + 9}px;color:#616161;font-size:10px`}, `▼ below ${formatTick(log ? 10 ** range.low : range.low)}`));
    const keep = values.filter((t) => (!range.clippedHigh || (1 - (t - range.low) / span) * height > 14) &&
        (!range.clippedLow || (1 - (t - range.low) / span) * height < height - 14));
    for (const node of [...ticks.children]) if (node.dataset.tick && !keep.includes(Number(node.dataset.tick))) node.remove();
    return el('div', {class: 'colorbar'}, bar, ticks);
  }

  // ---- depth profile: the quantity against stage at one step ------------------------------------
  allSteps(entries) {
    const steps = new Set();
    for (const e of entries) for (const s of e.steps) steps.add(s);
    return [...steps].sort((a, b) => a - b);
  }

  drawProfile() {
    const entries = this.selectedEntries();
    const view = this.profileView;
    const steps = this.allSteps(entries);
    if (this.state.stepIndex !== null && this.state.stepIndex >= steps.length) this.state.stepIndex = null;
    const index = this.state.stepIndex ?? steps.length - 1;
    const step = steps[index];
    const slider = el('input', {type: 'range', id: 'depth-step-slider', min: 0, max: Math.max(steps.length - 1, 0), value: index,
      oninput: (e) => { this.state.stepIndex = Number(e.target.value); this.drawProfileChart(); }});
    const play = el('button', {id: 'depth-play', onclick: () => this.togglePlay()}, this.playing ? 'Pause' : 'Play');
    const fit = el('input', {type: 'checkbox', id: 'depth-fit-step', checked: this.state.fitStep,
      onchange: (e) => { this.state.fitStep = e.target.checked; this.drawProfileChart(); }});
    this.stepLabel = el('span', {id: 'depth-step-label'}, step === undefined ? '' : `step ${step}`);
    this.profileSlider = slider;
    this.profileChart = el('div', {id: 'depth-profile-chart'});
    view.replaceChildren(
        el('h2', {}, `Depth profile: ${this.state.quantity} against ${this.state.relative ? 'relative depth' : 'stage'}`),
        el('p', {class: 'hint'}, 'One curve per selected run at the chosen step (each run: its latest evaluation at or before it), with its detected phases.'),
        el('div', {class: 'profile-controls'}, play, slider, this.stepLabel,
            el('label', {}, fit, 'fit the y axis to this step')),
        this.profileChart);
    this.drawProfileChart();
    this.markDrawn('profile');
  }

  togglePlay() {
    const button = this.profileView.querySelector('#depth-play');
    if (this.playing) {
      clearInterval(this.playing);
      this.playing = null;
      button.textContent = 'Play';
      return;
    }
    const steps = this.allSteps(this.selectedEntries());
    if (!steps.length) return;
    if (this.state.stepIndex === null || this.state.stepIndex >= steps.length - 1) this.state.stepIndex = 0;
    button.textContent = 'Pause';
    this.drawProfileChart();
    this.playing = setInterval(() => {
      if (this.state.stepIndex >= steps.length - 1) { this.togglePlay(); return; }
      this.state.stepIndex += 1;
      this.drawProfileChart();
    }, PLAY_INTERVAL_MS);
  }

  drawProfileChart() {
    const entries = this.selectedEntries();
    const steps = this.allSteps(entries);
    const index = this.state.stepIndex ?? steps.length - 1;
    const step = steps[index];
    if (this.profileSlider) this.profileSlider.value = index;
    if (this.stepLabel) this.stepLabel.textContent = step === undefined ? '' : `step ${step}`;
    const log = entries.some((e) => e.log);
    const f = transform(log);
    const relative = this.state.relative;
    const maxStages = Math.max(1, ...entries.map((e) => e.stages.length));
    const longest = entries.find((e) => e.stages.length === maxStages);
    const xOf = (e, i) => (relative ? i / Math.max(e.stages.length - 1, 1) : i);
    const xMax = relative ? 1 : maxStages - 1;

    const shown = [];
    for (const e of entries) {
      const k = latestAtOrBefore(e.steps, step);
      if (k >= 0) shown.push({entry: e, k, step: e.steps[k], values: e.values[k]});
    }
    const pool = this.state.fitStep ? shown.flatMap((s) => s.values.map(f)) : entries.flatMap((e) => e.values.flat().map(f));
    const finite = pool.filter(Number.isFinite);
    let yLow = finite.length ? Math.min(...finite) : 0;
    let yHigh = finite.length ? Math.max(...finite) : 1;
    if (yHigh <= yLow) { const pad = Math.abs(yLow) * 0.1 || 0.5; yLow -= pad; yHigh += pad; }
    const pad = (yHigh - yLow) * 0.06;
    yLow -= pad; yHigh += pad;

    const width = Math.max(480, (this.profileView.clientWidth || 900) - 30);
    const height = 340;
    const m = {left: 64, right: 16, top: 12, bottom: 44};
    const px = (x) => m.left + (x / Math.max(xMax, 1e-9)) * (width - m.left - m.right);
    const py = (y) => m.top + (1 - (y - yLow) / (yHigh - yLow)) * (height - m.top - m.bottom);
    const chart = svg('svg', {id: 'depth-profile', width, height, viewBox: `0 0 ${width} ${height}`});
    const legend = el('div', {class: 'legend', id: 'depth-profile-legend'});

    // ISI's regimes (P1): shaded bands where the ISI is shown
    if (this.state.quantity === this.meta.isi_quantity && !log) {
      const shades = ['rgba(66,133,244,.10)', 'rgba(52,168,83,.14)', 'rgba(234,67,53,.10)'];
      this.meta.isi_regimes.forEach((regime, i) => {
        const lo = Math.max(regime.low ?? -Infinity, yLow);
        const hi = Math.min(regime.high ?? Infinity, yHigh);
        if (hi <= lo) return;
        chart.append(svg('rect', {class: 'isi-regime', 'data-regime': regime.name, x: m.left, width: width - m.left - m.right,
          y: py(hi), height: py(lo) - py(hi), fill: shades[i]}));
        chart.append(svg('text', {x: width - m.right - 6, y: py(hi) + 13, 'text-anchor': 'end', 'font-size': 11, fill: '#616161'},
            regime.name));
        legend.append(el('span', {class: 'legend-mark'}, el('span', {class: 'swatch', style: `background:${shades[i]};border:1px solid #bbb`}),
            `${regime.name} (${regime.low === null ? '' : regime.low}${regime.low !== null && regime.high !== null ? '–' : ''}${regime.high === null ? '' : (regime.low === null ? '< ' : '') + regime.high}${regime.high === null ? ' <' : ''})`));
      });
    }
    // axes and grid
    for (const t of niceTicks(yLow, yHigh, 5)) {
      chart.append(svg('line', {x1: m.left, x2: width - m.right, y1: py(t), y2: py(t), stroke: '#e0e0e0'}));
      chart.append(svg('text', {x: m.left - 6, y: py(t) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#424242'},
          log ? formatTick(10 ** t) : formatTick(t)));
    }
    if (!log && yLow < 0 && yHigh > 0) chart.append(svg('line', {x1: m.left, x2: width - m.right, y1: py(0), y2: py(0), stroke: '#9e9e9e'}));
    if (relative) {
      for (const t of [0, 0.25, 0.5, 0.75, 1]) {
        chart.append(svg('text', {x: px(t), y: height - m.bottom + 16, 'text-anchor': 'middle', 'font-size': 11, fill: '#424242'},
            t === 0 ? '0 (embed)' : t === 1 ? '1 (norm)' : String(t)));
      }
    } else if (longest) {
      const every = Math.max(1, Math.ceil(maxStages / Math.floor((width - m.left) / 46)));
      longest.stages.forEach((s, i) => {
        if (i % every === 0 || i === maxStages - 1) {
          chart.append(svg('text', {x: px(i), y: height - m.bottom + 16, 'text-anchor': 'middle', 'font-size': 11, fill: '#424242'},
              s.replace('block_', 'b')));
        }
      });
    }
    chart.append(svg('text', {x: (m.left + width - m.right) / 2, y: height - 8, 'text-anchor': 'middle', 'font-size': 12, fill: '#616161'},
        relative ? 'relative depth' : 'stage'));
    chart.append(svg('text', {x: 14, y: (m.top + height - m.bottom) / 2, 'text-anchor': 'middle', 'font-size': 12, fill: '#616161',
      transform: `rotate(-90 14 ${(m.top + height - m.bottom) / 2})`}, log ? `${this.state.quantity} (log scale)` : this.state.quantity));
    chart.append(svg('rect', {x: m.left, y: m.top, width: width - m.left - m.right, height: height - m.top - m.bottom, fill: 'none', stroke: '#9e9e9e'}));

    // phase boundaries at this step, then the curves on top
    const halfStage = (e) => (relative ? 0.5 / Math.max(e.stages.length - 1, 1) : 0.5);
    for (const s of shown) {
      const p = phaseAt(s.entry, s.step);
      const color = this.runColors.get(s.entry.run);
      if (!p) continue;
      if (p.plateau_start !== null && p.plateau_end !== null) {
        // one run: the plateau shaded over the whole height; several: one bar per run along the top
        const x0 = px(Math.max(0, xOf(s.entry, p.plateau_start) - halfStage(s.entry)));
        const x1 = px(Math.min(xMax, xOf(s.entry, p.plateau_end) + halfStage(s.entry)));
        const row = shown.indexOf(s);
        const band = shown.length === 1 ?
          {y: m.top, height: height - m.top - m.bottom, 'fill-opacity': 0.12} :
          {y: m.top + 1 + row * 5, height: 4, 'fill-opacity': 0.8};
        chart.append(svg('rect', {class: 'plateau-band', 'data-run': s.entry.name, x: x0, width: x1 - x0, fill: color, ...band}));
      }
      for (const [key, dash] of [['cliff_end', '6 3'], ['climb_start', '2 3']]) {
        if (p[key] === null) continue;
        const x = px(xOf(s.entry, p[key]));
        chart.append(svg('line', {class: `${key.replace('_', '-')}-mark`, 'data-run': s.entry.name, x1: x, x2: x, y1: m.top,
          y2: height - m.bottom, stroke: color, 'stroke-width': 1.5, 'stroke-dasharray': dash}));
      }
    }
    for (const s of shown) {
      const color = this.runColors.get(s.entry.run);
      const points = s.values.map((v, i) => [xOf(s.entry, i), f(v), v, i]).filter(([, y]) => Number.isFinite(y));
      const d = points.map(([x, y], i) => `${i ? 'L' : 'M'}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ');
      chart.append(svg('path', {class: 'profile-curve', 'data-run': s.entry.name, d, fill: 'none', stroke: color, 'stroke-width': 2}));
      for (const [x, y, raw, i] of points) {
        const dot = svg('circle', {class: 'profile-point', cx: px(x), cy: py(y), r: 3.2, fill: color});
        dot.addEventListener('mousemove', (event) => this.showTooltip(event,
            `${s.entry.name} · <b>${s.entry.stages[i]}</b> · step ${s.step}<br>${this.state.quantity} = <span class="tooltip-value">${formatValue(raw)}</span>`));
        dot.addEventListener('mouseleave', () => this.hideTooltip());
        chart.append(dot);
      }
      legend.append(el('span', {class: 'legend-item', 'data-run': s.entry.run},
          el('span', {class: 'swatch', style: `background:${color}`}),
          el('span', {class: 'legend-name'}, s.entry.name), s.step !== step ? ` (step ${s.step})` : ''));
    }
    const markIcon = (dash) => {
      const s = svg('svg', {width: 22, height: 10});
      s.append(svg('line', {x1: 1, x2: 21, y1: 5, y2: 5, stroke: '#424242', 'stroke-width': 1.5, 'stroke-dasharray': dash}));
      return s;
    };
    legend.append(el('span', {class: 'legend-mark'}, markIcon('6 3'), 'cliff end'),
        el('span', {class: 'legend-mark'}, el('span', {class: 'swatch', style: 'background:rgba(66,66,66,.25)'}),
            shown.length > 1 ? 'plateau (bars along the top, one per run)' : 'plateau'),
        el('span', {class: 'legend-mark'}, markIcon('2 3'), 'climb start'));
    this.profileChart.replaceChildren(chart, legend);
  }

  // ---- phase timeline: the phase boundaries over training, per run ------------------------------
  drawTimelines() {
    const entries = this.selectedEntries().filter((e) => e.phases);
    const view = this.timelineView;
    view.replaceChildren(el('h2', {}, 'Phase timeline: where the phases sit (stage) over training'),
        el('p', {class: 'hint'}, `Detected on the centered token similarity S_c at every evaluation. A phase is there when the cliff drops by more than the tolerance τ, the plateau spans at least ${this.meta.plateau_min_stages} stages, a climb is detected; "stays from" is the step from which it is there at every later evaluation.`));
    const allSteps = this.allSteps(entries.map((e) => ({steps: e.phases.steps})));
    const stepLow = allSteps[0] ?? 0;
    const stepHigh = allSteps[allSteps.length - 1] ?? 1;
    const width = Math.max(480, (view.clientWidth || 900) - 30);
    for (const entry of entries) view.append(this.timelinePanel(entry, stepLow, stepHigh, width));
    if (!entries.length) view.append(el('p', {class: 'hint'}, 'No phases recorded (token_similarity is not among the metrics).'));
    this.markDrawn('timeline');
  }

  timelinePanel(entry, stepLow, stepHigh, width) {
    const phases = entry.phases;
    const stages = entry.stages;
    const rowH = stages.length > 20 ? 10 : 14;
    const m = {left: 64, right: 16, top: 6, bottom: 30};
    const height = m.top + m.bottom + rowH * stages.length;
    const span = Math.max(stepHigh - stepLow, 1);
    const px = (s) => m.left + ((s - stepLow) / span) * (width - m.left - m.right);
    const py = (i) => m.top + (i + 0.5) * rowH;
    const color = this.runColors.get(entry.run);
    const chart = svg('svg', {class: 'timeline', 'data-run': entry.run, width, height});
    chart.append(svg('rect', {x: m.left, y: m.top, width: width - m.left - m.right, height: rowH * stages.length, fill: '#fafafa', stroke: '#9e9e9e'}));
    const every = Math.max(1, Math.ceil(stages.length / 12));
    stages.forEach((s, i) => {
      if (i % every === 0 || i === stages.length - 1) {
        chart.append(svg('text', {x: m.left - 6, y: py(i) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#424242'}, s));
      }
    });
    for (const t of niceTicks(stepLow, stepHigh, 6)) {
      chart.append(svg('text', {x: px(t), y: height - m.bottom + 14, 'text-anchor': 'middle', 'font-size': 11, fill: '#424242'}, String(Math.round(t))));
    }
    chart.append(svg('text', {x: (m.left + width - m.right) / 2, y: height - 3, 'text-anchor': 'middle', 'font-size': 11, fill: '#616161'}, 'training step'));
    const steps = phases.steps;
    const edges = steps.map((s, k) => [k ? (steps[k - 1] + s) / 2 : s - (steps[1] - s || span / 20) / 2,
      k < steps.length - 1 ? (s + steps[k + 1]) / 2 : s + (s - steps[k - 1] || span / 20) / 2]);
    steps.forEach((s, k) => {
      const a = phases.plateau_start[k];
      const b = phases.plateau_end[k];
      if (a === null || b === null) return;
      const x0 = px(Math.max(edges[k][0], stepLow));
      const x1 = px(Math.min(edges[k][1], stepHigh));
      chart.append(svg('rect', {class: 'timeline-plateau', x: x0, width: Math.max(x1 - x0, 1), y: m.top + a * rowH, height: (b - a + 1) * rowH,
        fill: color, 'fill-opacity': phases.plateau_length[k] >= this.meta.plateau_min_stages ? 0.28 : 0.10}));
    });
    const line = (key, marker) => {
      let d = '';
      let open = false;
      steps.forEach((s, k) => {
        const v = phases[key][k];
        if (v === null) { open = false; return; }
        d += `${open ? 'L' : 'M'}${px(s).toFixed(1)},${py(v).toFixed(1)} `;
        open = true;
      });
      chart.append(svg('path', {class: `timeline-${key.replace('_', '-')}`, d, fill: 'none', stroke: '#212121', 'stroke-width': 1.4}));
      steps.forEach((s, k) => {
        const v = phases[key][k];
        if (v === null) return;
        const node = marker === 'circle' ?
          svg('circle', {cx: px(s), cy: py(v), r: 3.2, fill: '#fff', stroke: '#212121', 'stroke-width': 1.2}) :
          svg('path', {d: `M${px(s)},${py(v) - 4} L${px(s) + 4},${py(v) + 3} L${px(s) - 4},${py(v) + 3} Z`, fill: '#fff', stroke: '#212121', 'stroke-width': 1.2});
        node.addEventListener('mousemove', (event) => this.showTooltip(event,
            `${entry.name} · step ${s}<br>${key.replace('_', ' ')} <b>${stages[v]}</b>` +
            (key === 'cliff_end' ? ` (cliff size ${formatValue(phases.cliff_size[k])}, τ ${formatValue(phases.tau[k])})` : '')));
        node.addEventListener('mouseleave', () => this.hideTooltip());
        chart.append(node);
      });
    };
    line('cliff_end', 'circle');
    line('climb_start', 'triangle');

    const emergence = entry.emergence || {};
    const cell = (v) => el('td', {}, v === null || v === undefined ? '–' : `step ${v}`);
    const table = el('table', {class: 'emergence', 'data-run': entry.run},
        el('tr', {}, el('th', {}, 'phase'), el('th', {}, 'first there'), el('th', {}, 'there from then on')));
    for (const name of ['cliff', 'plateau', 'climb']) {
      const e = emergence[name] || {};
      table.append(el('tr', {'data-phase': name}, el('td', {}, name), cell(e.first_seen), cell(e.stays_from)));
    }
    return el('div', {class: 'panel timeline-panel', 'data-run': entry.run},
        el('div', {class: 'panel-title'}, el('span', {class: 'swatch', style: `background:${color}`}), entry.name),
        chart, el('div', {class: 'legend'},
            el('span', {class: 'legend-mark'}, el('span', {class: 'swatch', style: `background:${color};opacity:.45`}), 'plateau (pale: shorter than the minimum)'),
            el('span', {class: 'legend-mark'}, '○ cliff end'), el('span', {class: 'legend-mark'}, '△ climb start')),
        table);
  }
}

export async function render() {
  const style = document.createElement('style');
  style.textContent = STYLE;
  document.head.append(style);
  const dashboard = new DepthDashboard(document.body);
  window.depthDashboardApp = dashboard;
  try {
    await dashboard.start();
  } catch (error) {
    document.body.append(el('div', {class: 'empty', id: 'depth-error'}, `The Depth dashboard could not load: ${error.message}`));
    throw error;
  }
}
