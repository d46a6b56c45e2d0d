// Helpers for the browser end-to-end test: the Haven process, its command line, Chromium,
// and bounded waiting. Every wait here has a deadline; nothing polls forever.

import { spawn, execFile } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import dgram from 'node:dgram';
import net from 'node:net';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const execFileAsync = promisify(execFile);

/** Flags that work for Chromium on a loopback-only network (see RECIPES.md). */
export const CHROMIUM_FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  // Without it Chromium gathers no candidate at all when loopback is the only interface.
  '--allow-loopback-in-peer-connection',
];

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Call `probe` until `until(value)` holds (by default: until it returns something truthy),
 * or fail after `timeoutMs` saying what was awaited and what the last probe saw.
 */
export async function waitFor(what, probe, { timeoutMs, intervalMs = 200, until = Boolean }) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (until(last)) return last;
    } catch (error) {
      last = `probe threw: ${error.message}`;
    }
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last saw: ` +
        JSON.stringify(last));
    }
    await sleep(intervalMs);
  }
}

/** Reject when `promise` takes longer than `ms`. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freeTcpPort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A UDP port on 127.0.0.1 that was free a moment ago. */
export function freeUdpPort() {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4');
    socket.once('error', reject);
    socket.bind(0, '127.0.0.1', () => {
      const { port } = socket.address();
      socket.close(() => resolve(port));
    });
  });
}

/**
 * Start `haven serve` with its output in `logPath` (and `env` added to this process's). Returns the child and a promise of its
 * exit, so the caller can stop it by PID and wait.
 */
export function startHaven(bin, args, logPath, env = {}) {
  const log = createWriteStream(logPath);
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  child.stdout.pipe(log);
  child.stderr.pipe(log);

  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (error) => resolve({ code: null, signal: null, error }));
  });

  // Should the test process end without its cleanup running, take the server with it.
  process.once('exit', () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return { child, exited };
}

/**
 * Stop a process we started, by its PID: SIGTERM first so it can flush its ledger, then
 * SIGKILL if it has not exited in `graceMs`.
 */
export async function stopProcess({ child, exited }, graceMs = 10_000) {
  if (child.exitCode !== null || child.signalCode !== null) return exited;

  process.kill(child.pid, 'SIGTERM');
  const result = await Promise.race([exited, sleep(graceMs).then(() => null)]);
  if (result) return result;

  process.kill(child.pid, 'SIGKILL');
  return within(5000, 'haven exit after SIGKILL', exited);
}

/** Wait until `GET /healthz` answers 200, or the server exits. */
export async function waitForHealth(baseUrl, haven, timeoutMs) {
  let exit = null;
  haven.exited.then((result) => { exit = result; });

  await waitFor('GET /healthz to answer 200', async () => {
    if (exit) throw new Error(`haven exited early: ${JSON.stringify(exit)}`);
    const response = await fetch(`${baseUrl}/healthz`, { signal: AbortSignal.timeout(1000) });
    return response.status === 200;
  }, { timeoutMs, intervalMs: 100 });
}

/** Run a haven subcommand with a deadline; returns stdout. */
export async function havenCommand(bin, args, timeoutMs = 20_000) {
  try {
    const { stdout } = await execFileAsync(bin, args, { timeout: timeoutMs, killSignal: 'SIGKILL' });
    return stdout;
  } catch (error) {
    throw new Error(`${bin} ${args[0]} failed: ${error.message}\n${error.stderr || ''}`);
  }
}

/**
 * Mint a join link with `haven token --link` and return the URL it printed. `extra` holds
 * further flags (`--kind group`, `--display-name ...`).
 */
export async function mintLink(bin, { dataDir, session, role, subject, publicUrl, extra = [] }) {
  const stdout = await havenCommand(bin, [
    'token', '--data-dir', dataDir, '--session', session, '--role', role,
    '--subject', subject, '--link', '--public-url', publicUrl, ...extra,
  ]);
  const link = stdout.split(/\s+/).find((word) => word.startsWith(`${publicUrl}/join#token=`));
  if (!link) throw new Error(`haven token printed no ${publicUrl}/join#token= link: ${stdout}`);
  return link;
}

/**
 * One participant's browser: its own Chromium with a fresh profile, so the two people in
 * the test share nothing but Haven.
 */
export async function launchParticipant(userDataDir, viewport) {
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport,
    timeout: 30_000,
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(15_000);
  return { context, page };
}

/**
 * One Chromium for a whole test file; each person gets their own context (profile) in it.
 * Without `--use-fake-ui-for-media-stream`, camera and microphone follow each context's
 * permissions, so a context without them sees access denied, as after a refused prompt.
 */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS.filter((flag) => flag !== '--use-fake-ui-for-media-stream'),
    timeout: 30_000,
  });
}

/**
 * A person in their own context of `browser`, with camera and microphone allowed unless
 * `deniedMedia`.
 */
export async function openPerson(browser, origin, name, { viewport, deniedMedia = false }) {
  const context = await browser.newContext({
    viewport,
    permissions: deniedMedia ? [] : ['camera', 'microphone'],
  });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  return { name, context, page, seen: watchPage(page, origin) };
}

/**
 * Run axe-core (from node_modules) on the page as it is now. Returns the serious and
 * critical violations, and writes the full result to `outPath`.
 *
 * The page's policy (`script-src 'self'`) refuses a script tag with inline content, which
 * is what `page.addScriptTag({path})` adds, so axe is evaluated through the DevTools
 * protocol instead, which page policies do not govern.
 */
export async function axeCheck(page, outPath) {
  const axePath = createRequire(import.meta.url).resolve('axe-core/axe.min.js');
  const source = await readFile(axePath, 'utf8');
  await page.evaluate(`${source}\n;void 0`);
  const result = await page.evaluate(() => window.axe.run(document, {
    runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] },
  }));
  const summary = result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 5).map((n) => n.target.join(' ')),
  }));
  await writeFile(outPath, JSON.stringify({ url: result.url, violations: summary }, null, 2));
  return summary.filter((v) => v.impact === 'serious' || v.impact === 'critical');
}

/** Wait until a page's screen and a condition on its `window.haven.state` hold. */
export async function waitForState(page, what, predicate, arg, timeoutMs = 15_000) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: timeoutMs, polling: 100 });
  } catch {
    const state = await page.evaluate(() => JSON.stringify(window.haven?.state)).catch(() => '?');
    throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; state: ${state}`);
  }
}

/**
 * Record what a page does that it must not: requests to other origins, uncaught
 * exceptions, console errors (CSP violations among them).
 */
export function watchPage(page, origin) {
  const seen = { foreignRequests: [], pageErrors: [], consoleErrors: [], console: [] };

  page.on('request', (request) => {
    const url = request.url();
    if (!url.startsWith(`${origin}/`) && !/^(data|blob):/.test(url)) seen.foreignRequests.push(url);
  });
  page.on('websocket', (socket) => {
    if (!socket.url().startsWith(origin.replace(/^http/, 'ws'))) seen.foreignRequests.push(socket.url());
  });
  page.on('pageerror', (error) => seen.pageErrors.push(String(error)));
  page.on('console', (message) => {
    seen.console.push(`${message.type()}: ${message.text()}`);
    if (message.type() === 'error') seen.consoleErrors.push(message.text());
  });
  return seen;
}

/** Wait for the web client to show a screen (`window.haven.state.screen`). */
export async function waitForScreen(page, screen, timeoutMs = 15_000) {
  try {
    await page.waitForFunction((s) => window.haven?.state.screen === s, screen, { timeout: timeoutMs });
  } catch (error) {
    const state = await page.evaluate(() => JSON.stringify(window.haven?.state)).catch(() => '?');
    throw new Error(`page did not reach screen "${screen}" in ${timeoutMs} ms; state: ${state}`);
  }
}

/**
 * What the subscribe connection receives: inbound video and audio, and the addresses of
 * the selected candidate pair.
 */
export function receiveStats(page) {
  return page.evaluate(async () => {
    const pc = window.haven?.pcs.subscribe;
    if (!pc) return null;

    const report = await pc.getStats();
    const stats = [...report.values()];
    const byId = new Map(stats.map((s) => [s.id, s]));
    const result = { video: [], audio: [], pair: null, connectionState: pc.connectionState };

    for (const s of stats) {
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        result.video.push({
          mid: s.mid, framesDecoded: s.framesDecoded || 0, framesReceived: s.framesReceived || 0,
          width: s.frameWidth, height: s.frameHeight, codec: byId.get(s.codecId)?.mimeType,
          keyFramesDecoded: s.keyFramesDecoded, packetsReceived: s.packetsReceived,
          packetsLost: s.packetsLost, pliCount: s.pliCount, nackCount: s.nackCount,
        });
      }
      if (s.type === 'inbound-rtp' && s.kind === 'audio') {
        result.audio.push({
          mid: s.mid, packetsReceived: s.packetsReceived || 0, codec: byId.get(s.codecId)?.mimeType,
        });
      }
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        const pair = byId.get(s.selectedCandidatePairId);
        const local = pair && byId.get(pair.localCandidateId);
        const remote = pair && byId.get(pair.remoteCandidateId);
        result.pair = {
          local: local && `${local.address}:${local.port}/${local.protocol}`,
          remote: remote && `${remote.address}:${remote.port}/${remote.protocol}`,
        };
      }
    }

    // What this page sends, to tell a sender problem from a forwarding one.
    const publish = window.haven.pcs.publish;
    result.sent = publish ? [...(await publish.getStats()).values()]
      .filter((s) => s.type === 'outbound-rtp')
      .map((s) => ({ kind: s.kind, packetsSent: s.packetsSent, framesEncoded: s.framesEncoded,
        keyFramesEncoded: s.keyFramesEncoded, pliCount: s.pliCount, nackCount: s.nackCount }))
      : null;
    result.publishState = publish ? publish.connectionState : null;
    return result;
  });
}

/** Most frames decoded on any inbound video stream. */
export const framesDecoded = (stats) => Math.max(0, ...(stats?.video || []).map((v) => v.framesDecoded));

/** Most packets received on any inbound audio stream. */
export const audioPackets = (stats) => Math.max(0, ...(stats?.audio || []).map((a) => a.packetsReceived));

/**
 * Rows of an attendance report that carry `connected_seconds`, wherever the report nests
 * them (the report's JSON layout is Haven's, not this test's).
 */
export function attendanceRows(report) {
  const rows = [];
  const walk = (value) => {
    if (Array.isArray(value)) value.forEach(walk);
    else if (value && typeof value === 'object') {
      if ('connected_seconds' in value) rows.push(value);
      Object.values(value).forEach(walk);
    }
  };
  walk(report);
  return rows;
}

/** The participant a report row is about. */
export const rowParticipant = (row) => row.participant_id ?? row.subject ?? row.participant;
