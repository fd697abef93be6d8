// End-to-end test of the `flipsketch serve` page in Debian's headless Chromium.
//
//   FLIPSKETCH_URL=http://127.0.0.1:PORT node tests/e2e/e2e.mjs
//
// Env: FLIPSKETCH_URL (required), E2E_ARTIFACTS (screenshots, downloads, logs; default
// tests/e2e/artifacts), CHROMIUM (default /usr/bin/chromium), E2E_READY_TIMEOUT_S (model load,
// default 600), E2E_JOB_TIMEOUT_S (one small job, default 120), E2E_CANCEL_TIMEOUT_S (a running
// job stopping after cancel, default 180). Prints "N passed, N failed"; exits 1 on any failure.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BASE = (process.env.FLIPSKETCH_URL || '').replace(/\/+$/, '');

// Waits until the page's paper has ink (an example is drawn from its PNG asynchronously).
async function waitInked(p) {
  await p.waitForFunction(() => {
    const c = document.querySelector('#canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) if (d[i] < 128) return true;
    return false;
  });
}
const ARTIFACTS = path.resolve(process.env.E2E_ARTIFACTS || path.join(HERE, 'artifacts'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const secs = (name, def) => Number(process.env[name] || def) * 1000;
const READY_MS = secs('E2E_READY_TIMEOUT_S', 600);
const JOB_MS = secs('E2E_JOB_TIMEOUT_S', 120);
const CANCEL_MS = secs('E2E_CANCEL_TIMEOUT_S', 180);
const DESKTOP = { width: 1280, height: 900 };
const PHONE = { width: 375, height: 812 };

if (!BASE) {
  console.error('set FLIPSKETCH_URL to the base URL of a running `flipsketch serve`, e.g. http://127.0.0.1:8080');
  process.exit(2);
}
fs.mkdirSync(ARTIFACTS, { recursive: true });

// ------------------------------------------------------------------ tiny runner
const results = [];
const log = [];
const note = (m) => { console.log(`    ${m}`); log.push(m); };
async function test(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.push({ name, ok: false, error: e });
    console.log(`FAIL ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n     ${String(e && e.stack || e).split('\n').join('\n     ')}`);
    await shot(`FAIL-${name.replace(/[^a-z0-9]+/gi, '-').toLowerCase()}`).catch(() => {});
  }
}

// ------------------------------------------------------------------ helpers
let context, page;
const pageErrors = [];
async function shot(name, p = page, opts = {}) {
  const file = path.join(ARTIFACTS, `${name}.png`);
  await p.screenshot({ path: file, fullPage: true, ...opts });
  note(`screenshot ${path.relative(process.cwd(), file)}`);
}
function watchPage(p, label) {
  p.on('pageerror', (e) => pageErrors.push(`${label}: ${e.message}`));
  p.on('console', (m) => { if (m.type() === 'error') log.push(`${label} console error: ${m.text()}`); });
}

// Counts dark pixels of #canvas and returns a cheap digest of all its pixels.
const canvasStats = (p = page) => p.evaluate(() => {
  const c = document.querySelector('#canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let dark = 0, h = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] < 128) dark++;
    h = (h * 31 + d[i] + d[i + 1] * 7 + d[i + 2] * 13) >>> 0;
  }
  return { dark, hash: h, w: c.width, h: c.height };
});
const pixel = (x, y, p = page) => p.evaluate(([x, y]) => Array.from(document.querySelector('#canvas').getContext('2d').getImageData(x, y, 1, 1).data), [x, y]);

async function stroke(points, p = page) {
  const box = await p.locator('#canvas').boundingBox();
  const at = ([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height];
  const [x0, y0] = at(points[0]);
  await p.mouse.move(x0, y0);
  await p.mouse.down();
  for (const pt of points.slice(1)) {
    const [x, y] = at(pt);
    await p.mouse.move(x, y, { steps: 8 });
  }
  await p.mouse.up();
}

async function waitReady(p = page) {
  await p.waitForSelector('#health[data-state="ready"]', { timeout: READY_MS });
  await p.waitForFunction(() => !document.querySelector('#submit').disabled, null, { timeout: 10000 });
}

async function openAdvanced(p = page) {
  if (!(await p.locator('#advanced').evaluate((d) => d.open))) await p.click('#advanced > summary');
}

// A PNG with a transparent background and an opaque black rectangle, for the upload test.
function makePng(w, h, rect) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => { let c = 0xffffffff; for (const b of buf) c = crcTable[(c ^ b) & 255] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const chunk = (type, data) => {
    const t = Buffer.from(type, 'ascii');
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(Buffer.concat([t, data])));
    return Buffer.concat([len, t, data, c]);
  };
  const raw = Buffer.alloc(h * (w * 4 + 1));
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const inside = x >= rect[0] && x < rect[2] && y >= rect[1] && y < rect[3];
    raw[y * (w * 4 + 1) + 1 + x * 4 + 3] = inside ? 255 : 0; // RGB 0 = black, alpha 0 outside
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 6;
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr), chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

// Records every text #status shows (progress can be quicker than the test's polling).
const recordStatuses = (p = page) => p.evaluate(() => {
  window.__statuses = [];
  const s = document.querySelector('#status');
  new MutationObserver(() => window.__statuses.push(s.textContent)).observe(s, { childList: true, characterData: true, subtree: true });
});

// Waits until the job in the page ends; returns its final data-status.
async function waitJobEnd(p, timeout) {
  await p.waitForSelector('#progress:is([data-status="done"], [data-status="failed"], [data-status="cancelled"])', { timeout });
  return p.locator('#progress').getAttribute('data-status');
}

// ------------------------------------------------------------------ the tests
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'flipsketch-e2e-'));
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: DESKTOP,
    acceptDownloads: true,
  });
  page = context.pages()[0] || (await context.newPage());
  watchPage(page, 'main');
  note(`base URL ${BASE}, artifacts in ${ARTIFACTS}`);

  await test('the page loads and waits for the model', async () => {
    const res = await page.goto(`${BASE}/`, { waitUntil: 'domcontentloaded' });
    assert.equal(res.status(), 200);
    for (const id of ['canvas', 'pen', 'eraser', 'undo', 'clear', 'upload', 'prompt', 'variants', 'motion', 'submit', 'cancel', 'progress', 'queue', 'results', 'error']) {
      assert.equal(await page.locator(`#${id}`).count(), 1, `#${id} is on the page`);
    }
    assert.notEqual((await page.textContent('#health')).trim(), '', 'the health badge says something');
    await shot('01-loading');
    await waitReady();
    if (process.env.E2E_QUEUE === 'postgres') {
      // one front end and one worker on a PostgreSQL queue (run.sh)
      assert.match(await page.textContent('#health'), /ready \(1 worker: 1 CPU, (bf16|f32)\)/i, 'the badge counts the workers and says their precision');
    } else {
      assert.match(await page.textContent('#health'), /ready \(model on CPU, (bf16|f32)\)/i, 'the badge says where the model runs, in which precision');
    }
    const canvas = await canvasStats();
    assert.deepEqual([canvas.w, canvas.h], [512, 512], 'the canvas is 512x512 inside');
    assert.equal(canvas.dark, 0, 'the paper starts blank');
    await shot('02-ready');
  });
  if (!results[0].ok) throw new Error('the page did not load or the model never became ready: skipping the other tests');

  await test('drawing strokes, undo and redo', async () => {
    await stroke([[0.3, 0.3], [0.5, 0.25], [0.7, 0.3]]);
    const one = await canvasStats();
    assert.ok(one.dark > 100, `the first stroke left ink (${one.dark} dark pixels)`);
    await stroke([[0.3, 0.7], [0.5, 0.8], [0.7, 0.7]]);
    const two = await canvasStats();
    assert.ok(two.dark > one.dark, 'the second stroke added ink');
    await stroke([[0.5, 0.35], [0.48, 0.5], [0.53, 0.62]]);
    const three = await canvasStats();
    assert.ok(three.dark > two.dark, 'the third stroke added ink');
    await shot('03-drawn');
    await page.click('#undo');
    const undone = await canvasStats();
    assert.equal(undone.hash, two.hash, 'undo brings back exactly the two-stroke drawing');
    await page.click('#redo');
    assert.equal((await canvasStats()).hash, three.hash, 'redo puts the third stroke back');
    // The eraser paints paper.
    await page.click('#eraser');
    await stroke([[0.25, 0.3], [0.75, 0.3]]);
    assert.ok((await canvasStats()).dark < three.dark, 'the eraser removed ink');
    await page.click('#undo');
    await page.click('#pen');
    assert.equal((await canvasStats()).hash, three.hash);
  });

  await test('an empty prompt, a server error and a network error show in #error', async () => {
    await page.fill('#prompt', '');
    await page.click('#submit');
    await page.waitForSelector('#error:not([hidden])');
    const msg = await page.textContent('#error');
    assert.match(msg, /prompt|describe|move/i, `error names the prompt: ${msg}`);
    assert.equal(await page.getAttribute('#error', 'role'), 'alert');
    assert.equal(await page.isVisible('#progress'), false, 'no job was started');
    await shot('04-empty-prompt-error');

    await page.fill('#prompt', 'the face smiles');
    await page.route('**/api/jobs', (r) => r.fulfill({ status: 429, contentType: 'application/json', body: '{"error":"the queue is full (8 jobs waiting); try again later"}' }));
    await page.click('#submit');
    await page.waitForFunction(() => /queue is full/.test(document.querySelector('#error').textContent));
    assert.equal(await page.isDisabled('#submit'), false, 'submit is usable again after an error');
    await page.unroute('**/api/jobs');

    await page.route('**/api/jobs', (r) => r.abort('connectionrefused'));
    await page.click('#submit');
    await page.waitForFunction(() => /reach the server/i.test(document.querySelector('#error').textContent));
    await page.unroute('**/api/jobs');
    assert.equal(await page.isDisabled('#submit'), false);
  });

  await test('a job runs with live progress and shows 2 looping GIFs to download', async () => {
    await page.fill('#prompt', 'the face smiles and nods');
    await page.fill('#variants', '2');
    await openAdvanced();
    await page.fill('#frames', '2');
    await page.fill('#steps', '2');
    await recordStatuses();
    await page.click('#submit');
    await page.waitForSelector('#progress:not([hidden])');
    assert.equal(await page.isDisabled('#submit'), true, 'submit is disabled while the job runs');
    assert.equal(await page.isVisible('#cancel'), true, 'cancel is offered while the job runs');
    await page.waitForFunction(() => document.querySelector('#status').textContent.trim() !== '');
    await page.waitForSelector('#progress:is([data-status="queued"], [data-status="running"], [data-status="done"])', { timeout: JOB_MS });
    await shot('05-progress');
    const end = await waitJobEnd(page, JOB_MS);
    const statuses = await page.evaluate(() => window.__statuses);
    note(`status texts seen: ${JSON.stringify([...new Set(statuses)])}`);
    assert.equal(end, 'done', `job ended ${end}: ${await page.textContent('#error')}`);
    assert.ok(statuses.filter((s) => s.trim()).length >= 2, 'the status text updated during the job');
    assert.equal(await page.isDisabled('#submit'), false, 'submit is enabled again');
    await page.waitForSelector('#results .result img');
    assert.equal(await page.locator('#results .result').count(), 2, 'two results');
    await page.waitForFunction(() => Array.from(document.querySelectorAll('#results .result img')).every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 30000 });
    const sizes = await page.$$eval('#results .result img', (imgs) => imgs.map((i) => [i.naturalWidth, i.naturalHeight]));
    note(`result GIF sizes ${JSON.stringify(sizes)}`);
    assert.equal(await page.locator('#results .result a.download').count(), 2);
    assert.match((await page.textContent('#result-seed')).trim(), /^\d+$/, 'the seed is shown');
    await page.locator('#results-section').scrollIntoViewIfNeeded();
    await shot('06-results');
    await shot('06-results-viewport', page, { fullPage: false });

    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#results .result >> nth=0 >> a.download')]);
    const name = download.suggestedFilename();
    assert.match(name, /\.gif$/i, `download name ${name}`);
    const saved = path.join(ARTIFACTS, `download-${name}`);
    await download.saveAs(saved);
    const head = fs.readFileSync(saved).subarray(0, 4).toString('latin1');
    assert.equal(head, 'GIF8', 'the download is a GIF');
    note(`downloaded ${name} (${fs.statSync(saved).size} bytes)`);
    const raw = await page.getAttribute('#results .result >> nth=0 >> a.raw', 'href');
    const rawRes = await page.request.get(`${BASE}${raw}`);
    assert.equal(rawRes.status(), 200);
    assert.equal((await rawRes.body()).subarray(0, 4).toString('latin1'), 'GIF8', 'the colour GIF is a GIF');
    // The other formats offered for download are real files of their kind.
    const magic = { mp4: [4, 'ftyp'], apng: [1, 'PNG'], svg: [0, '<svg'], sheet: [1, 'PNG'], sheet_json: [0, '{'] };
    for (const [key, [at, text]] of Object.entries(magic)) {
      const href = await page.getAttribute(`#results .result >> nth=0 >> a.format-${key}`, 'href');
      const res = await page.request.get(`${BASE}${href}`);
      assert.equal(res.status(), 200, `${key} download`);
      const body = await res.body();
      assert.equal(body.subarray(at, at + text.length).toString('latin1'), text, `${key} is what it says`);
    }
    const frameLinks = await page.locator('#results .result >> nth=0 >> .frame-links a').count();
    assert.ok(frameLinks >= 1, 'PNG frames are offered');
  });

  await test('phone-size layout (375x812) stacks and fits the width', async () => {
    await page.setViewportSize(PHONE);
    await page.waitForTimeout(300);
    const m = await page.evaluate(() => ({
      scroll: document.documentElement.scrollWidth,
      canvas: document.querySelector('#canvas').getBoundingClientRect().width,
      results: document.querySelectorAll('#results .result').length,
    }));
    assert.ok(m.scroll <= 375, `no horizontal scrolling (scrollWidth ${m.scroll})`);
    assert.ok(m.canvas > 300 && m.canvas <= 375, `the canvas scales to the width (${m.canvas} px)`);
    await page.evaluate(() => window.scrollTo(0, 0));
    await shot('07-phone-top', page, { fullPage: false });
    await shot('07-phone-full');
    await page.locator('#results-section').scrollIntoViewIfNeeded();
    await shot('07-phone-results', page, { fullPage: false });
    // A finger draws too (pointer events with touch).
    const before = await canvasStats();
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.evaluate(() => {
      const c = document.querySelector('#canvas');
      const r = c.getBoundingClientRect();
      const ev = (type, x, y) => c.dispatchEvent(new PointerEvent(type, { pointerId: 7, pointerType: 'touch', isPrimary: true, bubbles: true, cancelable: true, clientX: r.left + x * r.width, clientY: r.top + y * r.height, button: 0, buttons: type === 'pointerup' ? 0 : 1 }));
      ev('pointerdown', 0.1, 0.9);
      for (let i = 1; i <= 10; i++) ev('pointermove', 0.1 + i * 0.03, 0.9);
      ev('pointerup', 0.4, 0.9);
    });
    assert.ok((await canvasStats()).dark > before.dark, 'a touch stroke drew');
    assert.equal(await page.locator('#canvas').evaluate((c) => getComputedStyle(c).touchAction), 'none');
    await page.click('#undo');
    await page.setViewportSize(DESKTOP);
  });

  await test('an uploaded image is fitted on white paper and can be undone', async () => {
    const before = await canvasStats();
    // 80x40, transparent, black block in the middle: fitted to 512x256, centred vertically.
    await page.setInputFiles('#upload', { name: 'doodle.png', mimeType: 'image/png', buffer: makePng(80, 40, [30, 10, 50, 30]) });
    await page.waitForFunction((h) => {
      const c = document.querySelector('#canvas');
      const d = c.getContext('2d').getImageData(256, 256, 1, 1).data;
      return d[0] < 60;
    }, before.hash, { timeout: 10000 });
    const corner = await pixel(20, 140); // inside the image, transparent there
    assert.ok(corner[0] > 245 && corner[1] > 245 && corner[2] > 245, `transparent became white: ${corner}`);
    assert.deepEqual((await pixel(5, 5)).slice(0, 3), [255, 255, 255], 'the margin is white paper');
    const after = await canvasStats();
    assert.ok(after.dark > 12000, `the block is drawn big (${after.dark} dark pixels)`);
    await shot('08-upload');
    await page.click('#undo');
    assert.equal((await canvasStats()).hash, before.hash, 'undo brings the drawing back');
  });

  await test('example sketches have thumbnails and draw onto the canvas', async () => {
    await page.waitForFunction(() => document.querySelectorAll('.example').length > 0);
    const n = await page.locator('.example').count();
    assert.ok(n >= 4, `${n} examples`);
    // the thumbnails are the repository's examples/*.png, served by the binary
    await page.waitForFunction(() => Array.from(document.querySelectorAll('.example img')).every((i) => i.complete && i.naturalWidth > 0));
    const thumbsInked = await page.$$eval('.example img', (imgs) => imgs.map((img) => {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const cc = c.getContext('2d');
      cc.drawImage(img, 0, 0);
      const d = cc.getImageData(0, 0, c.width, c.height).data;
      let dark = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++;
      return dark;
    }));
    assert.ok(thumbsInked.every((d) => d > 50), `every thumbnail shows a drawing: ${thumbsInked}`);
    const manifest = await (await fetch(`${BASE}/examples/examples.json`)).json();
    assert.equal(manifest.length, n, 'one button per example of examples/examples.json');
    await page.fill('#prompt', '');
    await page.locator('.example').first().click();
    await page.waitForFunction(() => document.querySelector('#prompt').value.trim() !== '');
    assert.equal((await page.inputValue('#prompt')).trim(), manifest[0].prompt, 'an empty prompt gets the example\'s suggestion');
    await waitInked(page);
    const ex = await canvasStats();
    assert.ok(ex.dark > 500, 'the example is drawn');
    await shot('09-example');
    await page.click('#clear');
    assert.equal((await canvasStats()).dark, 0, 'clear empties the paper');
    await page.click('#undo');
    assert.equal((await canvasStats()).hash, ex.hash, 'undo brings the example back after clear');
  });

  await test('a second job waits in the queue; both cancel (with event stream and with polling)', async () => {
    // The biggest job the server allows, so that it is still running when we look (a tiny test
    // model is fast); it is cancelled long before it would end.
    const max = async (sel, def) => String(Number(await page.getAttribute(sel, 'max')) || def);
    const [variantsMax, framesMax, stepsMax] = [await max('#variants', 8), await max('#frames', 24), await max('#steps', 100)];
    const pageB = await context.newPage();
    watchPage(pageB, 'second');
    // The second page has no event stream: it must fall back to polling.
    await pageB.route('**/api/jobs/*/events', (r) => r.abort('failed'));
    await pageB.goto(`${BASE}/`);
    await waitReady(pageB);
    await pageB.locator('.example').nth(2).click();
    await waitInked(pageB);
    await pageB.fill('#variants', '1');
    await openAdvanced(pageB);
    await pageB.fill('#frames', '2');
    await pageB.fill('#steps', '2');

    await page.bringToFront();
    await page.fill('#prompt', 'the cat waves its paw');
    await page.fill('#variants', variantsMax);
    await openAdvanced();
    await page.fill('#frames', framesMax);
    await page.fill('#steps', stepsMax);
    await page.click('#submit');
    await page.waitForSelector('#progress:is([data-status="queued"], [data-status="running"])', { timeout: JOB_MS });

    await pageB.bringToFront();
    await pageB.click('#submit');
    await pageB.waitForSelector('#progress[data-status="queued"]', { timeout: JOB_MS });
    await pageB.waitForFunction(() => {
      const q = document.querySelector('#queue');
      return !q.hidden && /next|ahead/i.test(q.textContent);
    }, null, { timeout: 15000 });
    note(`second page queue text: ${await pageB.textContent('#queue')}`);
    await shot('10-queued', pageB);
    await pageB.click('#cancel');
    assert.equal(await waitJobEnd(pageB, JOB_MS), 'cancelled');
    assert.match(await pageB.textContent('#status'), /cancelled/i);
    assert.equal(await pageB.isDisabled('#submit'), false);
    await pageB.close();

    await page.bringToFront();
    await page.waitForSelector('#progress[data-status="running"]', { timeout: JOB_MS });
    await shot('11-running');
    await page.click('#cancel');
    await page.waitForFunction(() => /cancel/i.test(document.querySelector('#status').textContent));
    assert.equal(await waitJobEnd(page, CANCEL_MS), 'cancelled');
    assert.match(await page.textContent('#status'), /cancelled/i, 'the page says cancelled');
    assert.equal(await page.isDisabled('#submit'), false, 'submit is usable again');
    assert.equal(await page.isHidden('#error'), true, `no error: ${await page.textContent('#error')}`);
    await shot('12-cancelled');
  });

  await test('no uncaught script errors', async () => {
    assert.deepEqual(pageErrors, []);
  });
} catch (e) {
  if (results.length && !results[0].ok) console.log(e.message);
  else {
    results.push({ name: 'setup', ok: false, error: e });
    console.log(`FAIL setup\n     ${e && e.stack || e}`);
  }
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  fs.writeFileSync(path.join(ARTIFACTS, 'log.txt'), `${log.join('\n')}\n`);
}

const passed = results.filter((r) => r.ok).length;
const failed = results.length - passed;
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
