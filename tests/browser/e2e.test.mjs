// A therapist and a client in two real Chromium browsers, through a real Haven binary:
// the client waits, the therapist admits, both see and hear each other, the client leaves,
// and the attendance report credits both. Run it through run.sh, which puts it in a private
// network namespace where only loopback exists.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  attendanceRows, audioPackets, framesDecoded, freeTcpPort, freeUdpPort, havenCommand,
  launchParticipant, mintLink, receiveStats, rowParticipant, sleep, startHaven, stopProcess,
  waitFor, waitForHealth, waitForScreen, watchPage, within,
} from './helpers.mjs';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const OUTPUT_DIR = path.resolve(process.env.TEST_OUTPUT_DIR || path.join(REPO_ROOT, 'test-output'));
const SESSION = 'sess-e2e-1';

/** Long enough that whole-second counting credits both people with something. */
const MIN_MEDIA_MS = 3000;

test('therapist admits a waiting client and both receive audio and video', { timeout: 180_000 }, async () => {
  const bin = process.env.HAVEN_BIN;
  assert.ok(bin, 'set HAVEN_BIN to the haven binary (e.g. $HOME/.cache/haven-target/debug/haven)');
  await fs.access(bin, fs.constants.X_OK);
  await fs.mkdir(OUTPUT_DIR, { recursive: true });

  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'haven-browser-'));
  const dataDir = path.join(tmp, 'data');
  await fs.mkdir(dataDir);

  const httpPort = await freeTcpPort();
  const mediaPort = await freeUdpPort();
  const origin = `http://127.0.0.1:${httpPort}`;
  const haven = startHaven(bin, [
    'serve', '--http', `127.0.0.1:${httpPort}`, '--media-port', String(mediaPort),
    '--data-dir', dataDir,
  ], path.join(OUTPUT_DIR, 'browser-e2e-haven.log'));

  /** @type {{name: string, context: any, page: any, seen: any}[]} */
  const people = [];
  let passed = false;
  try {
    await waitForHealth(origin, haven, 15_000);

    const link = (role, subject) => mintLink(bin, {
      dataDir, session: SESSION, role, subject, publicUrl: origin,
    });
    const therapistLink = await link('therapist', 't-01');
    const clientLink = await link('client', 'p-01');

    // Two browsers with fresh profiles; the client on a 360 px phone-sized window.
    const open = async (name, viewport) => {
      const { context, page } = await launchParticipant(path.join(tmp, `profile-${name}`), viewport);
      const person = { name, context, page, seen: watchPage(page, origin) };
      people.push(person);
      return person;
    };
    const therapist = await open('therapist', { width: 1280, height: 800 });
    const client = await open('client', { width: 360, height: 780 });

    // The therapist joins first and is in the room at once.
    const response = await therapist.page.goto(therapistLink);
    // The console check below only proves CSP compliance if the policy is in force.
    assert.match(response.headers()['content-security-policy'] || '', /script-src 'self'/);
    assert.equal(new URL(therapist.page.url()).hash, '', 'the token must leave the address bar');
    await therapist.page.getByRole('button', { name: 'Join', exact: true }).click();
    await waitForScreen(therapist.page, 'call');

    // The client waits, told that the therapist will let them in.
    await client.page.goto(clientLink);
    await client.page.getByRole('button', { name: 'Join', exact: true }).click();
    await waitForScreen(client.page, 'waiting');
    await client.page.getByRole('heading', { name: 'Your therapist will let you in' }).waitFor();

    // The therapist sees p-01 waiting and admits them.
    const admit = therapist.page.getByRole('button', { name: /^Admit .*p-01$/ });
    await admit.click();
    await waitForScreen(client.page, 'call');

    // Both subscribe connections decode video (and keep decoding) and receive audio.
    const mediaFlowing = async (person) => {
      const first = await waitFor(`${person.name} to decode remote video and receive audio`,
        () => receiveStats(person.page),
        { timeoutMs: 20_000, until: (s) => framesDecoded(s) > 0 && audioPackets(s) > 0 });

      const later = await waitFor(`${person.name}'s decoded frame count to grow`,
        () => receiveStats(person.page),
        { timeoutMs: 10_000, until: (s) => framesDecoded(s) > framesDecoded(first) });
      return { first, later };
    };
    const [therapistMedia, clientMedia] = await Promise.all([
      mediaFlowing(therapist), mediaFlowing(client),
    ]);
    const mediaSince = Date.now();

    // The figure: WebSocket open to the first remote video frame, on the client's page.
    const timing = await client.page.evaluate(() => ({ ...window.haven.timing }));
    assert.ok(timing.wsOpen !== null && timing.firstRemoteFrame !== null,
      `the client page recorded no first frame: ${JSON.stringify(timing)}`);
    const wsOpenToFirstFrameMs = Math.round(timing.firstRemoteFrame - timing.wsOpen);
    console.log(`figure: ws_open_to_first_frame_ms=${wsOpenToFirstFrameMs}`);

    // 360 px must not scroll sideways.
    const clientWidth = await client.page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(clientWidth <= 360, `the client page is ${clientWidth} px wide at a 360 px window`);

    for (const person of people) {
      await person.page.screenshot({
        path: path.join(OUTPUT_DIR, `browser-e2e-${person.name}.png`), fullPage: true,
      });
    }

    await fs.writeFile(path.join(OUTPUT_DIR, 'browser-e2e.json'), JSON.stringify({
      test: 'browser_e2e',
      at: new Date().toISOString(),
      chromium: therapist.context.browser()?.version() ?? null,
      ws_open_to_first_frame_ms: wsOpenToFirstFrameMs,
      therapist_receive: therapistMedia.later,
      client_receive: clientMedia.later,
    }, null, 2));

    // Give the ledger whole seconds of media for both before the client leaves.
    await sleep(Math.max(0, MIN_MEDIA_MS - (Date.now() - mediaSince)));

    await client.page.getByRole('button', { name: 'Leave', exact: true }).click();
    await waitForScreen(client.page, 'ended');
    await therapist.page.waitForFunction(
      () => !window.haven.state.participants.some((p) => p.participant_id === 'p-01'),
      null, { timeout: 10_000 });

    await therapist.page.getByRole('button', { name: 'Leave', exact: true }).click();
    await waitForScreen(therapist.page, 'ended');

    // Nothing reached any other origin, and the pages raised no errors (CSP included).
    for (const person of people) {
      assert.deepEqual(person.seen.foreignRequests, [], `${person.name} contacted another origin`);
      assert.deepEqual(person.seen.pageErrors, [], `${person.name} threw`);
      assert.deepEqual(person.seen.consoleErrors, [], `${person.name} logged errors`);
    }

    // The ledger, read after Haven stopped, credits both people.
    const exit = await stopProcess(haven);
    assert.ok(!exit.error, `haven could not be stopped: ${exit.error}`);

    const reportText = await havenCommand(bin, [
      'attendance', 'report', '--auditor', 'a-test-01', '--data-dir', dataDir, '--session', SESSION, '--format', 'json',
    ]);
    await fs.writeFile(path.join(OUTPUT_DIR, 'browser-e2e-attendance.json'), reportText);
    const rows = attendanceRows(JSON.parse(reportText));
    for (const id of ['t-01', 'p-01']) {
      const row = rows.find((r) => rowParticipant(r) === id);
      assert.ok(row, `attendance report has no row for ${id}: ${reportText}`);
      assert.ok(row.connected_seconds > 0, `${id} has connected_seconds ${row.connected_seconds}`);
    }

    passed = true;
  } finally {
    for (const person of people) {
      await fs.writeFile(path.join(OUTPUT_DIR, `browser-e2e-${person.name}-console.log`),
        person.seen.console.join('\n') + '\n').catch(() => {});
      await within(10_000, `closing ${person.name}'s browser`, person.context.close())
        .catch((error) => console.error(error.message));
    }
    await stopProcess(haven).catch((error) => console.error(`stopping haven: ${error.message}`));

    if (passed) await fs.rm(tmp, { recursive: true, force: true });
    else console.error(`kept ${tmp} for inspection; Haven's log is in ${OUTPUT_DIR}`);
  }
});
