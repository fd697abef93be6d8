// FlipSketch page: a drawing canvas, the job form, live progress and the results.
// Plain ES2020, no dependencies; talks to the same-origin API of `flipsketch serve`.
'use strict';
(() => {
  const $ = (sel) => document.querySelector(sel);
  const el = {
    form: $('#form'), health: $('#health'), canvas: $('#canvas'), paper: $('#paper'), hint: $('#paper-hint'),
    pen: $('#pen'), eraser: $('#eraser'), undo: $('#undo'), redo: $('#redo'), clear: $('#clear'),
    widths: document.querySelectorAll('.width'), upload: $('#upload'), examples: $('#examples'),
    prompt: $('#prompt'), variants: $('#variants'), motion: $('#motion'), motionValue: $('#motion-value'),
    advanced: $('#advanced'), frames: $('#frames'), steps: $('#steps'), guidance: $('#guidance'), seed: $('#seed'),
    resetAdvanced: $('#reset-advanced'), error: $('#error'), submit: $('#submit'), submitLabel: $('#submit-label'),
    progress: $('#progress'), status: $('#status'), cancel: $('#cancel'), bar: $('#bar'), barFill: $('#bar-fill'),
    step: $('#step'), eta: $('#eta'), queue: $('#queue'),
    resultsSection: $('#results-section'), results: $('#results'), resultSeed: $('#result-seed'),
    reuseSeed: $('#reuse-seed'), resultPrompt: $('#result-prompt'),
  };
  const TITLE = document.title;
  const JOB_KEY = 'flipsketch.job';

  // ------------------------------------------------------------------ errors
  function showError(msg) {
    el.error.textContent = msg;
    el.error.hidden = false;
    el.error.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  }
  function clearError() {
    el.error.hidden = true;
    el.error.textContent = '';
  }
  async function errorText(res) {
    try {
      const body = await res.json();
      if (body && typeof body.error === 'string' && body.error) return body.error;
    } catch (_) { /* not JSON */ }
    return `${res.status} ${res.statusText || 'error'}`.trim();
  }

  // ------------------------------------------------------------------ drawing
  const SIZE = el.canvas.width; // 512
  const ctx = el.canvas.getContext('2d');
  const base = document.createElement('canvas'); // every committed step, drawn
  base.width = base.height = SIZE;
  const bctx = base.getContext('2d', { willReadFrequently: true });
  const INK = '#111111';
  const PAPER = '#ffffff';
  let tool = 'pen';
  let penWidth = 5;
  let history = []; // {type:'stroke', stroke} | {type:'image', image} | {type:'clear'}
  let redoStack = [];
  let current = null; // the stroke being drawn
  let activePointer = null;

  function paint(c, color) {
    c.save();
    c.globalCompositeOperation = 'source-over';
    c.fillStyle = color;
    c.fillRect(0, 0, c.canvas.width, c.canvas.height);
    c.restore();
  }

  function drawStroke(c, s, scale = 1, minWidth = 0) {
    const pts = s.pts;
    if (!pts.length) return;
    c.save();
    c.strokeStyle = c.fillStyle = s.color;
    c.lineWidth = Math.max(minWidth, s.width * scale);
    c.lineCap = 'round';
    c.lineJoin = 'round';
    if (pts.length === 1) {
      c.beginPath();
      c.arc(pts[0][0] * scale, pts[0][1] * scale, c.lineWidth / 2, 0, Math.PI * 2);
      c.fill();
    } else {
      c.beginPath();
      c.moveTo(pts[0][0] * scale, pts[0][1] * scale);
      for (let i = 1; i < pts.length - 1; i++) {
        const mx = (pts[i][0] + pts[i + 1][0]) / 2;
        const my = (pts[i][1] + pts[i + 1][1]) / 2;
        c.quadraticCurveTo(pts[i][0] * scale, pts[i][1] * scale, mx * scale, my * scale);
      }
      const last = pts[pts.length - 1];
      c.lineTo(last[0] * scale, last[1] * scale);
      c.stroke();
    }
    c.restore();
  }

  function applyStep(c, step) {
    switch (step.type) {
      case 'stroke': drawStroke(c, step.stroke); break;
      case 'clear': paint(c, PAPER); break;
      case 'image': paint(c, PAPER); c.drawImage(step.image, 0, 0); break;
      default: break;
    }
  }

  // Draws a list of steps on white paper, starting from the last one that repaints everything.
  function replay(c, steps) {
    paint(c, PAPER);
    let from = 0;
    for (let i = steps.length - 1; i >= 0; i--) {
      if (steps[i].type !== 'stroke') { from = i; break; }
    }
    for (let i = from; i < steps.length; i++) applyStep(c, steps[i]);
  }

  function rebuild() {
    replay(bctx, history);
    show();
    afterChange();
  }

  function show() {
    ctx.drawImage(base, 0, 0);
    if (current) drawStroke(ctx, current);
  }

  function isBlank() {
    const d = bctx.getImageData(0, 0, SIZE, SIZE).data;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] < 235 || d[i + 1] < 235 || d[i + 2] < 235) return false;
    }
    return true;
  }

  function afterChange() {
    const blank = isBlank();
    el.hint.hidden = !blank;
    el.undo.disabled = history.length === 0;
    el.redo.disabled = redoStack.length === 0;
    el.clear.disabled = blank;
  }

  function commit(step) {
    history.push(step);
    redoStack = [];
    if (history.length > 300) {
      // Bounded memory: the oldest 100 steps become one picture (they can no longer be undone).
      const c = document.createElement('canvas');
      c.width = c.height = SIZE;
      replay(c.getContext('2d'), history.slice(0, 101));
      history = [{ type: 'image', image: c }, ...history.slice(101)];
    }
    if (step.type === 'stroke') {
      applyStep(bctx, step);
      show();
      afterChange();
    } else {
      rebuild();
    }
  }

  function undo() {
    if (!history.length) return;
    redoStack.push(history.pop());
    rebuild();
  }
  function redo() {
    if (!redoStack.length) return;
    history.push(redoStack.pop());
    rebuild();
  }

  function setTool(t) {
    tool = t;
    el.pen.setAttribute('aria-pressed', String(t === 'pen'));
    el.eraser.setAttribute('aria-pressed', String(t === 'eraser'));
    el.paper.dataset.tool = t;
  }

  function canvasPoint(e, rect) {
    const x = ((e.clientX - rect.left) / rect.width) * SIZE;
    const y = ((e.clientY - rect.top) / rect.height) * SIZE;
    return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
  }

  el.canvas.addEventListener('pointerdown', (e) => {
    if (activePointer !== null || (e.pointerType === 'mouse' && e.button !== 0)) return;
    e.preventDefault();
    activePointer = e.pointerId;
    try { el.canvas.setPointerCapture(e.pointerId); } catch (_) { /* synthetic events */ }
    const rect = el.canvas.getBoundingClientRect();
    const w = tool === 'eraser' ? penWidth * 4 : penWidth;
    current = { color: tool === 'eraser' ? PAPER : INK, width: w, pts: [canvasPoint(e, rect)] };
    el.hint.hidden = true;
    show();
  });
  el.canvas.addEventListener('pointermove', (e) => {
    if (e.pointerId !== activePointer || !current) return;
    e.preventDefault();
    const rect = el.canvas.getBoundingClientRect();
    const events = typeof e.getCoalescedEvents === 'function' ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const p = canvasPoint(ev, rect);
      const last = current.pts[current.pts.length - 1];
      if (Math.hypot(p[0] - last[0], p[1] - last[1]) >= 1) current.pts.push(p);
    }
    show();
  });
  function endStroke(e) {
    if (e.pointerId !== activePointer) return;
    activePointer = null;
    if (!current) return;
    const s = current;
    current = null;
    commit({ type: 'stroke', stroke: s });
  }
  el.canvas.addEventListener('pointerup', endStroke);
  el.canvas.addEventListener('pointercancel', endStroke);
  el.canvas.addEventListener('contextmenu', (e) => e.preventDefault());

  el.pen.addEventListener('click', () => setTool('pen'));
  el.eraser.addEventListener('click', () => setTool('eraser'));
  el.widths.forEach((b) => b.addEventListener('click', () => {
    penWidth = Number(b.dataset.width);
    el.widths.forEach((o) => o.setAttribute('aria-pressed', String(o === b)));
  }));
  el.undo.addEventListener('click', undo);
  el.redo.addEventListener('click', redo);
  el.clear.addEventListener('click', () => commit({ type: 'clear' }));

  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
    if (!(e.ctrlKey || e.metaKey)) return;
    const k = e.key.toLowerCase();
    if (k === 'z' && !e.shiftKey) { e.preventDefault(); undo(); }
    else if ((k === 'z' && e.shiftKey) || k === 'y') { e.preventDefault(); redo(); }
  });

  // ------------------------------------------------------------------ upload / drop / paste
  async function loadImage(file) {
    if (typeof createImageBitmap === 'function') {
      try { return await createImageBitmap(file); } catch (_) { /* fall back to <img> */ }
    }
    const url = URL.createObjectURL(file);
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      return img;
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  async function useFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith('image/')) {
      showError(`“${file.name}” is not an image. Pick a PNG, JPEG or WebP file.`);
      return;
    }
    let img;
    try {
      img = await loadImage(file);
    } catch (_) {
      showError(`Could not read “${file.name}” as an image.`);
      return;
    }
    const w = img.width, h = img.height;
    if (!w || !h) { showError(`“${file.name}” has no pixels.`); return; }
    const c = document.createElement('canvas');
    c.width = c.height = SIZE;
    const cc = c.getContext('2d');
    paint(cc, PAPER); // transparent parts become white paper
    const k = Math.min(SIZE / w, SIZE / h);
    const dw = w * k, dh = h * k;
    cc.imageSmoothingQuality = 'high';
    cc.drawImage(img, (SIZE - dw) / 2, (SIZE - dh) / 2, dw, dh);
    clearError();
    commit({ type: 'image', image: c });
  }

  el.upload.addEventListener('change', () => {
    const f = el.upload.files && el.upload.files[0];
    useFile(f).finally(() => { el.upload.value = ''; });
  });

  const dropZone = document.querySelector('.sketch');
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files');
  let dragDepth = 0;
  dropZone.addEventListener('dragenter', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth++;
    el.paper.classList.add('dragover');
  });
  dropZone.addEventListener('dragleave', () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.paper.classList.remove('dragover');
  });
  dropZone.addEventListener('dragover', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
  });
  dropZone.addEventListener('drop', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    el.paper.classList.remove('dragover');
    useFile(e.dataTransfer.files[0]);
  });
  // A file dropped next to the drop zone should not navigate away from the drawing.
  window.addEventListener('dragover', (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener('drop', (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener('paste', (e) => {
    const t = e.target;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA')) return;
    const item = Array.from((e.clipboardData && e.clipboardData.items) || []).find((i) => i.type.startsWith('image/'));
    if (item) { e.preventDefault(); useFile(item.getAsFile()); }
  });

  // ------------------------------------------------------------------ examples
  // The sketches of the repository's examples/ folder (examples.json: name, file, prompt),
  // served by the binary; picking one puts it on the paper like an uploaded image.
  let autoPrompt = '';
  async function loadExamples() {
    let list = [];
    try {
      const res = await fetch('/examples/examples.json');
      if (res.ok) list = await res.json();
    } catch (_) { /* no examples: the row stays empty */ }
    list.forEach((ex) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'example';
      b.dataset.name = ex.name;
      b.title = `Draw the ${ex.name.toLowerCase()} example`;
      b.setAttribute('aria-label', `${ex.name} example`);
      const img = document.createElement('img');
      img.src = `/examples/${encodeURIComponent(ex.file)}`;
      img.alt = '';
      img.setAttribute('aria-hidden', 'true');
      const label = document.createElement('span');
      label.textContent = ex.name;
      b.append(img, label);
      b.addEventListener('click', async () => {
        if (!img.complete || !img.naturalWidth) {
          try { await img.decode(); } catch (_) { showError(`The ${ex.name.toLowerCase()} example could not be loaded.`); return; }
        }
        const c = document.createElement('canvas');
        c.width = c.height = SIZE;
        const cc = c.getContext('2d');
        paint(cc, PAPER);
        cc.imageSmoothingQuality = 'high';
        cc.drawImage(img, 0, 0, SIZE, SIZE);
        commit({ type: 'image', image: c });
        const p = el.prompt.value.trim();
        if (!p || p === autoPrompt) {
          el.prompt.value = ex.prompt;
          autoPrompt = ex.prompt;
          el.prompt.removeAttribute('aria-invalid');
        }
        clearError();
      });
      el.examples.append(b);
    });
  }
  loadExamples();

  // ------------------------------------------------------------------ server info and health
  let info = null;
  let ready = false;
  let busy = false;

  function setHealth(state, text) {
    el.health.dataset.state = state;
    el.health.textContent = text;
  }

  function applyInfo(i) {
    info = i;
    const d = i.defaults || {}, l = i.limits || {};
    const set = (input, max, value) => {
      if (Number.isFinite(max)) input.max = String(max);
      if (value !== undefined && value !== null) { input.value = String(value); input.defaultValue = String(value); }
    };
    set(el.variants, l.variants_max, d.variants);
    set(el.frames, l.frames_max, d.frames);
    set(el.steps, l.steps_max, d.steps);
    set(el.guidance, undefined, d.guidance);
    if (Number.isFinite(d.lambda)) {
      el.motion.value = String(d.lambda);
      el.motion.defaultValue = String(d.lambda);
      updateMotion();
    }
  }

  async function loadInfo() {
    for (let delay = 1000; ; delay = Math.min(delay * 2, 10000)) {
      try {
        const res = await fetch('/api/info', { cache: 'no-store' });
        if (res.ok) { applyInfo(await res.json()); return; }
      } catch (_) { /* retry */ }
      await sleep(delay);
    }
  }

  // "Ready (model on CPU)" for one process; with a shared queue, its workers:
  // "Ready (3 workers: 2 CUDA, 1 CPU; 1 busy)".
  function readyLabel(body) {
    const w = body.workers;
    if (w && w.alive > 0) {
      const devices = Object.entries(w.devices || {})
        .map(([d, n]) => `${n} ${d.toUpperCase()}`)
        .join(', ');
      // the precision: one name when all agree, else a count per precision
      const dtypes = Object.entries(w.dtypes || {});
      const precision = dtypes
        .map(([d, n]) => (dtypes.length > 1 ? `${n} ${d}` : d))
        .join(', ');
      const busy = w.busy ? `; ${w.busy} busy` : '';
      return `Ready (${w.alive} worker${w.alive === 1 ? '' : 's'}: ${devices}${precision ? `, ${precision}` : ''}${busy})`;
    }
    if (!body.device) return 'Ready';
    return `Ready (model on ${body.device.toUpperCase()}${body.dtype ? `, ${body.dtype}` : ''})`;
  }

  async function checkHealth() {
    let next = 2000;
    try {
      const res = await fetch('/healthz', { cache: 'no-store' });
      let body = {};
      try { body = await res.json(); } catch (_) { /* ignore */ }
      if (res.ok) {
        ready = true;
        setHealth('ready', readyLabel(body));
        updateSubmit();
        // workers of a shared queue come and go: keep the badge current
        setTimeout(checkHealth, 10000);
        return;
      }
      ready = false;
      if (body.status === 'failed') {
        setHealth('failed', 'Model failed to load');
        showError(`The model failed to load on the server: ${body.error || 'unknown error'}`);
        next = 15000;
      } else {
        setHealth('loading', 'Model loading…');
      }
    } catch (_) {
      ready = false;
      setHealth('offline', 'Can’t reach the server, retrying…');
      next = 3000;
    }
    updateSubmit();
    setTimeout(checkHealth, next);
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ------------------------------------------------------------------ form
  function updateMotion() {
    el.motionValue.textContent = Number(el.motion.value).toFixed(2);
  }
  el.motion.addEventListener('input', updateMotion);
  el.prompt.addEventListener('input', () => el.prompt.removeAttribute('aria-invalid'));
  el.resetAdvanced.addEventListener('click', () => {
    [el.frames, el.steps, el.guidance].forEach((i) => { i.value = i.defaultValue; });
    el.seed.value = '';
  });

  function updateSubmit() {
    el.submit.disabled = busy || !ready;
    el.submitLabel.textContent = busy ? 'Animating…' : ready ? 'Animate' : 'Waiting for the model…';
  }

  function intField(input, label, lo, hi) {
    const t = input.value.trim();
    const v = Number(t);
    if (t === '' || !Number.isInteger(v) || v < lo || v > hi) {
      throw Object.assign(new Error(`${label} must be a whole number from ${lo} to ${hi}.`), { input });
    }
    return v;
  }

  function readForm() {
    const l = (info && info.limits) || {};
    const prompt = el.prompt.value.trim();
    if (!prompt) {
      el.prompt.setAttribute('aria-invalid', 'true');
      throw Object.assign(new Error('Please describe how the sketch should move, for example “the cat stretches and yawns”.'), { input: el.prompt });
    }
    if (isBlank()) {
      throw new Error('The paper is empty: draw something, upload an image or pick an example first.');
    }
    const out = {
      prompt,
      variants: intField(el.variants, 'Variations', 1, l.variants_max || 8),
      lambda: Number(el.motion.value),
    };
    try {
      out.frames = intField(el.frames, 'Frames', 1, l.frames_max || 24);
      out.steps = intField(el.steps, 'Steps', 1, l.steps_max || 100);
      const g = Number(el.guidance.value.trim());
      if (el.guidance.value.trim() === '' || !Number.isFinite(g) || g < 0 || g > 50) {
        throw Object.assign(new Error('Guidance must be a number from 0 to 50.'), { input: el.guidance });
      }
      out.guidance = g;
      const st = el.seed.value.trim();
      if (st) {
        const s = Number(st);
        if (!/^\d+$/.test(st) || !Number.isSafeInteger(s)) {
          throw Object.assign(new Error('Seed must be a whole number (or leave it blank for a random one).'), { input: el.seed });
        }
        out.seed = st;
      }
    } catch (e) {
      el.advanced.open = true;
      throw e;
    }
    return out;
  }

  const canvasBlob = () => new Promise((resolve, reject) => {
    el.canvas.toBlob((b) => (b ? resolve(b) : reject(new Error('could not export the drawing'))), 'image/png');
  });

  // ------------------------------------------------------------------ jobs
  let job = null; // {id, final, cancelling, es, pollTimer, abort, prompt}

  function setBusy(b) {
    busy = b;
    updateSubmit();
    el.cancel.hidden = !b;
    el.cancel.disabled = false;
  }

  el.form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (busy) return;
    clearError();
    let fields;
    try {
      fields = readForm();
    } catch (err) {
      showError(err.message);
      if (err.input) err.input.focus();
      return;
    }
    const fd = new FormData();
    try {
      const blob = await canvasBlob();
      const max = info && info.limits && info.limits.upload_max_bytes;
      if (max && blob.size > max) {
        showError(`The drawing is too large to send (${Math.ceil(blob.size / 1024)} KB; the server takes up to ${Math.floor(max / 1024)} KB).`);
        return;
      }
      fd.append('sketch', blob, 'sketch.png');
    } catch (err) {
      showError(`Could not read the drawing: ${err.message}`);
      return;
    }
    for (const [k, v] of Object.entries(fields)) fd.append(k, String(v));

    const abort = new AbortController();
    job = { id: null, final: false, cancelling: false, es: null, pollTimer: null, abort, prompt: fields.prompt };
    const mine = job;
    setBusy(true);
    startProgress();
    el.resultsSection.classList.add('stale');
    setStatus('uploading', 'Sending your sketch…');
    let res;
    try {
      res = await fetch('/api/jobs', { method: 'POST', body: fd, signal: abort.signal });
    } catch (err) {
      if (mine.cancelling) { endJob(mine, 'cancelled'); return; }
      endJob(mine, 'failed');
      el.progress.hidden = true;
      showError('Could not reach the server. Check that flipsketch serve is still running, then try again.');
      return;
    }
    if (!res.ok) {
      const msg = await errorText(res);
      endJob(mine, 'failed');
      el.progress.hidden = true;
      if (res.status === 429) showError(`The server is busy: ${msg}`);
      else if (res.status === 413) showError(`The sketch is too large for the server: ${msg}`);
      else if (res.status === 503) { showError(`The server is not ready yet: ${msg}`); ready = false; checkHealth(); }
      else showError(msg);
      return;
    }
    const { id } = await res.json();
    mine.id = id;
    if (mine.cancelling) { requestCancel(mine); }
    try { sessionStorage.setItem(JOB_KEY, id); } catch (_) { /* private mode */ }
    follow(mine);
  });

  function follow(j) {
    if (typeof EventSource !== 'function') { poll(j); return; }
    const es = new EventSource(`/api/jobs/${encodeURIComponent(j.id)}/events`);
    j.es = es;
    es.addEventListener('status', (ev) => {
      let v;
      try { v = JSON.parse(ev.data); } catch (_) { return; }
      update(j, v);
    });
    es.onerror = () => {
      es.close();
      j.es = null;
      if (!j.final && job === j) poll(j); // the stream broke before the end: poll instead
    };
  }

  function poll(j) {
    let failures = 0;
    const tick = async () => {
      if (j.final || job !== j) return;
      try {
        const res = await fetch(`/api/jobs/${encodeURIComponent(j.id)}`, { cache: 'no-store' });
        if (res.status === 404) {
          endJob(j, 'failed');
          showError('This job is no longer on the server (it may have restarted).');
          return;
        }
        if (!res.ok) throw new Error(await errorText(res));
        failures = 0;
        update(j, await res.json());
      } catch (_) {
        failures++;
        if (failures >= 3) setStatus('running', 'Connection lost, retrying…');
      }
      if (!j.final && job === j) j.pollTimer = setTimeout(tick, 1000);
    };
    tick();
  }

  const PHASES = {
    queued: 'Waiting in line',
    encoding: 'Reading your sketch',
    inversion: 'Tracing the first frame',
    denoising: 'Animating',
    decoding: 'Drawing the frames',
    writing: 'Saving the GIFs',
  };

  function formatEta(s) {
    if (s === null || s === undefined || !Number.isFinite(s) || s < 0) return '';
    if (s < 10) return 'a few seconds left';
    if (s < 55) return `about ${Math.max(10, Math.round(s / 5) * 5)} s left`;
    if (s < 90) return 'about 1 min left';
    if (s < 3600) return `about ${Math.round(s / 60)} min left`;
    return `about ${Math.round(s / 360) / 10} h left`;
  }

  function startProgress() {
    el.progress.hidden = false;
    el.queue.hidden = true;
    el.step.textContent = '';
    el.eta.textContent = '';
    setBar(0, true);
  }

  function setStatus(state, text) {
    el.progress.dataset.status = state;
    el.status.textContent = text;
  }

  function setBar(p, indeterminate) {
    const pct = Math.round(Math.max(0, Math.min(1, p)) * 100);
    el.bar.classList.toggle('indeterminate', Boolean(indeterminate));
    el.barFill.style.width = indeterminate ? '' : `${pct}%`;
    if (indeterminate) el.bar.removeAttribute('aria-valuenow');
    else el.bar.setAttribute('aria-valuenow', String(pct));
  }

  function update(j, v) {
    if (job !== j || j.final || !v || v.id !== j.id) return;
    const st = v.status;
    const pct = Math.round((v.progress || 0) * 100);
    if (st === 'queued') {
      setStatus('queued', j.cancelling ? 'Cancelling…' : PHASES.queued);
      setBar(0, true);
      const q = v.queue_position;
      el.queue.hidden = q === null || q === undefined;
      el.queue.textContent = q === 0 ? 'You’re next' : q === 1 ? '1 job ahead of you' : `${q} jobs ahead of you`;
      el.step.textContent = '';
      el.eta.textContent = '';
      document.title = `Waiting… · ${TITLE}`;
    } else if (st === 'running') {
      el.queue.hidden = true;
      const phase = PHASES[v.phase] || (v.phase ? v.phase : 'Working');
      setStatus('running', j.cancelling ? 'Cancelling…' : phase);
      setBar(v.progress || 0, !(v.progress > 0));
      el.step.textContent = v.phase === 'denoising' && v.step != null && v.steps ? `Step ${v.step} of ${v.steps}` : pct > 0 ? `${pct}%` : '';
      el.eta.textContent = formatEta(v.eta_s);
      document.title = `${pct}% · ${TITLE}`;
    } else if (st === 'done') {
      setBar(1, false);
      showResults(v, j.prompt);
      endJob(j, 'done', `Done! ${v.results.length} animation${v.results.length === 1 ? '' : 's'} below.`);
    } else if (st === 'failed') {
      endJob(j, 'failed', 'Failed');
      showError(`The animation failed: ${v.error || 'unknown error'}`);
    } else if (st === 'cancelled') {
      const asked = j.cancelling;
      endJob(j, 'cancelled');
      if (!asked && v.error) showError(`The job was stopped: ${v.error}`);
    }
  }

  function endJob(j, state, text) {
    j.final = true;
    if (j.es) { j.es.close(); j.es = null; }
    if (j.pollTimer) { clearTimeout(j.pollTimer); j.pollTimer = null; }
    if (job !== j) return;
    el.queue.hidden = true;
    el.eta.textContent = '';
    el.step.textContent = '';
    const texts = { done: 'Done!', failed: 'Failed', cancelled: 'Cancelled' };
    setStatus(state, text || texts[state] || state);
    if (el.bar.classList.contains('indeterminate')) setBar(0, false); // a failed or cancelled job keeps its bar where it stopped
    el.resultsSection.classList.remove('stale');
    document.title = state === 'done' ? `Done · ${TITLE}` : TITLE;
    try {
      if (state === 'done' && j.id) sessionStorage.setItem(JOB_KEY, j.id);
      else sessionStorage.removeItem(JOB_KEY);
    } catch (_) { /* private mode */ }
    setBusy(false);
    el.cancel.hidden = true;
  }

  async function requestCancel(j) {
    if (!j.id) { j.abort.abort(); return; } // still uploading
    try {
      const res = await fetch(`/api/jobs/${encodeURIComponent(j.id)}`, { method: 'DELETE' });
      if (res.status === 404) { endJob(j, 'cancelled'); return; }
      if (!res.ok) throw new Error(await errorText(res));
      // The final "cancelled" status arrives on the event stream (or the next poll);
      // a running job stops at its next step.
      if (!j.es && !j.pollTimer && !j.final) poll(j);
    } catch (err) {
      j.cancelling = false;
      el.cancel.disabled = false;
      showError(`Could not cancel: ${err.message}`);
    }
  }

  el.cancel.addEventListener('click', () => {
    const j = job;
    if (!j || j.final || j.cancelling) return;
    j.cancelling = true;
    el.cancel.disabled = true;
    setStatus(el.progress.dataset.status, 'Cancelling…');
    requestCancel(j);
  });

  // ------------------------------------------------------------------ results
  let lastSeed = null;
  function showResults(v, prompt) {
    el.results.textContent = '';
    const n = v.results.length;
    v.results.forEach((r, i) => {
      const fig = document.createElement('figure');
      fig.className = 'result';
      const img = document.createElement('img');
      img.src = r.gif;
      img.width = 256;
      img.height = 256;
      img.alt = `Animation ${i + 1} of ${n}${prompt ? `: ${prompt}` : ''}`;
      const cap = document.createElement('figcaption');
      const name = document.createElement('span');
      name.className = 'variant-name';
      name.textContent = `Variation ${i + 1}`;
      const dl = document.createElement('a');
      dl.className = 'download button primary';
      dl.insertAdjacentHTML('afterbegin', '<svg aria-hidden="true" viewBox="0 0 24 24"><path d="M12 4v11 M7 10l5 5 5-5 M5 20h14"/></svg>');
      dl.href = r.gif;
      dl.download = `flipsketch-${v.seed}-${i + 1}.gif`;
      dl.append('Download GIF');
      dl.setAttribute('aria-label', `Download animation ${i + 1} as a GIF`);
      const raw = document.createElement('a');
      raw.className = 'raw';
      raw.href = r.gif_raw;
      raw.download = `flipsketch-${v.seed}-${i + 1}-colour.gif`;
      raw.textContent = 'colour version';
      raw.setAttribute('aria-label', `Download the colour version of animation ${i + 1}`);
      const row = document.createElement('span');
      row.className = 'caption-row';
      row.append(name, raw);
      const more = document.createElement('span');
      more.className = 'more-formats';
      more.append('Also: ');
      [['mp4', 'MP4 video', 'mp4'], ['apng', 'transparent PNG', 'png'], ['svg', 'SVG', 'svg'], ['sheet', 'sprite sheet', 'png'], ['sheet_json', 'sheet JSON', 'json']]
        .filter(([key]) => r[key])
        .forEach(([key, label, ext], j) => {
          if (j > 0) more.append(' · ');
          const a = document.createElement('a');
          a.href = r[key];
          a.download = `flipsketch-${v.seed}-${i + 1}${key === 'sheet' ? '-sheet' : key === 'sheet_json' ? '-sheet' : ''}.${ext}`;
          a.textContent = label;
          a.className = `format-${key}`;
          more.append(a);
        });
      if (Array.isArray(r.frames) && r.frames.length) {
        const frames = document.createElement('span');
        frames.className = 'more-formats frame-links';
        frames.append('PNG frames: ');
        r.frames.forEach((u, j) => {
          if (j > 0) frames.append(' ');
          const a = document.createElement('a');
          a.href = u;
          a.download = `flipsketch-${v.seed}-${i + 1}-frame-${String(j + 1).padStart(3, '0')}.png`;
          a.textContent = String(j + 1);
          a.setAttribute('aria-label', `Download frame ${j + 1} of animation ${i + 1} as PNG`);
          frames.append(a);
        });
        cap.append(row, dl, more, frames);
      } else {
        cap.append(row, dl, more);
      }
      fig.append(img, cap);
      el.results.append(fig);
    });
    lastSeed = v.seed;
    el.resultSeed.textContent = String(v.seed);
    el.resultPrompt.textContent = prompt ? `“${prompt}”` : '';
    el.resultsSection.hidden = false;
    el.resultsSection.scrollIntoView({ block: 'start', behavior: 'smooth' });
  }
  el.reuseSeed.addEventListener('click', () => {
    if (lastSeed === null) return;
    el.seed.value = String(lastSeed);
    el.advanced.open = true;
    el.seed.focus();
  });

  // ------------------------------------------------------------------ resume after a reload
  async function resume() {
    let id = null;
    try { id = sessionStorage.getItem(JOB_KEY); } catch (_) { return; }
    if (!id) return;
    try {
      const res = await fetch(`/api/jobs/${encodeURIComponent(id)}`, { cache: 'no-store' });
      if (!res.ok) { sessionStorage.removeItem(JOB_KEY); return; }
      const v = await res.json();
      if (v.status === 'done') {
        showResults(v, '');
      } else if (v.status === 'queued' || v.status === 'running') {
        if (busy) return;
        job = { id, final: false, cancelling: false, es: null, pollTimer: null, abort: new AbortController(), prompt: '' };
        setBusy(true);
        startProgress();
        update(job, v);
        follow(job);
      } else {
        sessionStorage.removeItem(JOB_KEY);
      }
    } catch (_) { /* server away: nothing to resume */ }
  }

  // ------------------------------------------------------------------ start
  setTool('pen');
  paint(bctx, PAPER);
  show();
  afterChange();
  updateMotion();
  el.cancel.hidden = true;
  updateSubmit();
  loadInfo();
  checkHealth();
  resume();
})();
