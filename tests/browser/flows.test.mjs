// Every flow of the web client in headless Chromium against one real Haven binary: the
// pre-join check with access denied, waiting and admit, deny, one-on-one, mute by the
// therapist, audio-only mode, reconnection after the WebSocket is cut, remove, a family
// session with a sponsor (and a sponsor link refused where sponsors are not allowed), a
// group of five at phone width, and ending the session for everyone. Each flow keeps a
// screenshot; axe-core checks the pre-join, waiting, in-session, ended and error screens.
//
// One server and one browser for the file; each person is a browser context with its own
// fake camera and microphone. Sessions are separate per flow so that capacity and removal
// in one flow do not touch another. Run it through run.sh (private network namespace).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  axeCheck, framesDecoded, freeTcpPort, freeUdpPort, havenCommand, launchBrowser, mintLink,
  openPerson, receiveStats, startHaven, stopProcess, waitFor, waitForHealth, waitForScreen,
  waitForState, within,
} from './helpers.mjs';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const OUTPUT_DIR = path.resolve(process.env.TEST_OUTPUT_DIR || path.join(REPO_ROOT, 'test-output'));

const DESKTOP = { width: 1280, height: 800 };
const LAPTOP = { width: 1024, height: 720 };
const PHONE = { width: 360, height: 740 };
/** How long Haven keeps a lost participant's place in this file's server. */
const GRACE_SECONDS = 8;

/** Figures written to flows.json at the end. */
const figures = {};
/** Everyone opened in this file, closed in `after`. */
const people = [];

let bin;
let tmp;
let dataDir;
let origin;
let haven;
let browser;
let tokenHelp = '';

async function link(session, role, subject, { kind = 'individual', name, sponsorFor } = {}) {
  const extra = ['--kind', kind];
  // Display names appear in tokens once the binary supports them.
  if (name && tokenHelp.includes('--display-name')) extra.push('--display-name', name);
  // A session that allows a sponsor, who accompanies this client.
  if (sponsorFor) extra.push('--sponsor-for', sponsorFor);
  return mintLink(bin, { dataDir, session, role, subject, publicUrl: origin, extra });
}

async function open(name, options) {
  const person = await openPerson(browser, origin, name, options);
  people.push(person);
  return person;
}

async function shot(person, file) {
  await person.page.screenshot({ path: path.join(OUTPUT_DIR, file), fullPage: true });
}

/** axe-core on a page; fails on serious or critical violations. */
async function accessible(person, screen) {
  const serious = await axeCheck(person.page, path.join(OUTPUT_DIR, `flows-axe-${screen}.json`));
  assert.deepEqual(serious, [], `axe found serious violations on the ${screen} screen`);
}

/** Open the link and press Join once the camera check allows it. */
async function joinFrom(person, url) {
  await person.page.goto(url);
  const join = person.page.getByRole('button', { name: 'Join', exact: true });
  await waitFor(`${person.name}'s Join button to be enabled`, () => join.isEnabled(),
    { timeoutMs: 10_000 });
  await join.click();
}

/** Remote video decoded from at least `streams` participants, and still growing. */
async function videoFlowing(person, streams, timeoutMs = 20_000) {
  const first = await waitFor(`${person.name} to decode video from ${streams} participant(s)`,
    () => receiveStats(person.page), {
      timeoutMs,
      until: (s) => s && s.video.filter((v) => v.framesDecoded > 0).length >= streams,
    });
  await waitFor(`${person.name}'s decoded frames to grow`, () => receiveStats(person.page),
    { timeoutMs: 10_000, until: (s) => framesDecoded(s) > framesDecoded(first) });
}

const state = (person) => person.page.evaluate(() => window.haven.state);

async function noSidewaysScroll(person, screen) {
  const width = await person.page.evaluate(() => document.documentElement.scrollWidth);
  const viewport = person.page.viewportSize().width;
  assert.ok(width <= viewport,
    `${person.name}'s ${screen} screen is ${width} px wide in a ${viewport} px window`);
}

describe('web client flows', { timeout: 240_000 }, () => {
  before(async () => {
    bin = process.env.HAVEN_BIN;
    assert.ok(bin, 'set HAVEN_BIN to the haven binary (e.g. $HOME/.cache/haven-target/debug/haven)');
    await fs.access(bin, fs.constants.X_OK);
    await fs.mkdir(OUTPUT_DIR, { recursive: true });
    tokenHelp = await havenCommand(bin, ['token', '--help']);

    tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'haven-flows-'));
    dataDir = path.join(tmp, 'data');
    await fs.mkdir(dataDir);
    const httpPort = await freeTcpPort();
    const mediaPort = await freeUdpPort();
    origin = `http://127.0.0.1:${httpPort}`;
    haven = startHaven(bin, [
      'serve', '--http', `127.0.0.1:${httpPort}`, '--media-port', String(mediaPort),
      '--data-dir', dataDir,
    ], path.join(OUTPUT_DIR, 'flows-haven.log'), {
      // Short, so that the flow where resuming fails gives up within seconds.
      HAVEN_RESUME_GRACE_SECONDS: String(GRACE_SECONDS),
    });
    await waitForHealth(origin, haven, 15_000);
    browser = await launchBrowser();
  });

  after(async () => {
    for (const person of people) {
      await fs.writeFile(path.join(OUTPUT_DIR, `flows-${person.name}-console.log`),
        person.seen.console.join('\n') + '\n').catch(() => {});
      // Nothing reached another origin, and no page threw (CSP violations included).
      assert.deepEqual(person.seen.foreignRequests, [], `${person.name} contacted another origin`);
      assert.deepEqual(person.seen.pageErrors, [], `${person.name} threw`);
    }
    await within(15_000, 'closing the browser', browser?.close() ?? Promise.resolve())
      .catch((error) => console.error(error.message));
    if (haven) await stopProcess(haven).catch((error) => console.error(`stopping haven: ${error.message}`));
    await fs.writeFile(path.join(OUTPUT_DIR, 'flows.json'),
      JSON.stringify({ test: 'browser_flows', at: new Date().toISOString(), ...figures }, null, 2));
    console.log(`figures: ${JSON.stringify(figures)}`);
    if (tmp) await fs.rm(tmp, { recursive: true, force: true });
  });

  test('pre-join explains blocked access and offers a way on; the ready check passes axe', async () => {
    const url = await link('sess-prejoin', 'client', 'p-90', { name: 'Pat Example' });

    const blocked = await open('prejoin-denied', { viewport: LAPTOP, deniedMedia: true });
    await blocked.page.goto(url);
    await blocked.page.getByRole('heading', { name: 'Camera and microphone are blocked' }).waitFor();
    assert.equal(await blocked.page.getByRole('button', { name: 'Join', exact: true }).isDisabled(), true);
    await blocked.page.getByRole('button', { name: 'Try again' }).waitFor();
    await blocked.page.getByRole('button', { name: 'Join without camera or microphone' }).waitFor();
    // The session and its time are named before joining.
    const facts = await blocked.page.locator('#prejoin-session').innerText();
    assert.match(facts, /sess-prejoin/);
    assert.match(facts, /Scheduled/);
    await shot(blocked, 'flows-prejoin-denied.png');
    await accessible(blocked, 'prejoin-denied');

    const ready = await open('prejoin', { viewport: LAPTOP });
    await ready.page.goto(url);
    await ready.page.locator('#prejoin-status', { hasText: 'Your camera and microphone are ready.' }).waitFor();
    const cameras = await ready.page.locator('#camera-select option').count();
    const microphones = await ready.page.locator('#mic-select option').count();
    assert.ok(cameras >= 1 && microphones >= 1, `devices listed: ${cameras} cameras, ${microphones} mics`);
    // The level meter moves with the fake microphone's tone (after a click, as in life).
    await ready.page.locator('#mic-select').click();
    await ready.page.keyboard.press('Escape');
    await waitFor('the level meter to move', () => ready.page.locator('#mic-level')
      .evaluate((m) => m.value), { timeoutMs: 8000, until: (v) => v > 0 });
    // Audio only: the camera is released.
    await ready.page.getByLabel(/Join with audio only/).check();
    await ready.page.locator('#prejoin-status', { hasText: 'Your microphone is ready.' }).waitFor();
    await waitFor('the camera to be released', () => ready.page.evaluate(() =>
      document.querySelector('#preview-video').srcObject?.getVideoTracks().length ?? 0),
    { timeoutMs: 5000, until: (n) => n === 0 });
    await ready.page.getByLabel(/Join with audio only/).uncheck();
    await ready.page.locator('#prejoin-status', { hasText: 'Your camera and microphone are ready.' }).waitFor();
    await shot(ready, 'flows-prejoin.png');
    await accessible(ready, 'prejoin');
    await blocked.context.close();
    await ready.context.close();
  });

  describe('one-on-one', () => {
    const SESSION = 'sess-one';
    let therapist;
    let client;

    test('a waiting client is admitted; both see and hear each other', async () => {
      therapist = await open('one-therapist', { viewport: DESKTOP });
      client = await open('one-client', { viewport: LAPTOP });

      await joinFrom(therapist, await link(SESSION, 'therapist', 't-01', { name: 'Tester T01' }));
      await waitForScreen(therapist.page, 'call');

      await joinFrom(client, await link(SESSION, 'client', 'p-01', { name: 'Tester P01' }));
      await waitForScreen(client.page, 'waiting');
      await client.page.getByRole('heading', { name: 'Your therapist will let you in' }).waitFor();
      await client.page.locator('#waiting-status', { hasText: 'Your therapist is here' }).waitFor();
      // The preview stays in the waiting room.
      await waitFor('the waiting preview to play', () => client.page.evaluate(() => {
        const v = document.querySelector('#screen-waiting video');
        return !!v && v.srcObject !== null && v.videoWidth > 0;
      }), { timeoutMs: 5000 });
      await shot(client, 'flows-waiting.png');
      await accessible(client, 'waiting');

      // Alone in the room, the therapist is told someone waits, not that nobody is here.
      await therapist.page.locator('#alone-note',
        { hasText: 'Nobody else is in the session yet; 1 person is waiting to be admitted.' }).waitFor();
      // What the live region says from here on.
      await therapist.page.evaluate(() => {
        const region = /** @type {HTMLElement} */ (document.querySelector('#announcer'));
        const said = /** @type {string[]} */ ([]);
        Object.assign(globalThis, { announced: said });
        new MutationObserver(() => { if (region.textContent) said.push(region.textContent); })
          .observe(region, { childList: true, characterData: true, subtree: true });
      });

      await therapist.page.getByRole('button', { name: /^Admit .*(p-01|Tester P01)/ }).click();
      await waitForScreen(client.page, 'call');
      await Promise.all([videoFlowing(therapist, 1), videoFlowing(client, 1)]);
      assert.equal(await therapist.page.locator('#alone-note').isVisible(), false);
      const announced = await therapist.page.evaluate(() => globalThis.announced);
      assert.ok(!announced.some((sentence) => /\b0 people/.test(sentence)),
        `announced after Admit: ${JSON.stringify(announced)}`);

      const timing = await client.page.evaluate(() => ({ ...window.haven.timing }));
      figures.ws_open_to_first_frame_ms = Math.round(timing.firstRemoteFrame - timing.wsOpen);

      // One-on-one layout, the remote tile reports the size it is shown at.
      assert.equal(await client.page.locator('#grid').getAttribute('data-layout'), 'one-on-one');
      const sizes = await waitFor('the remote tile to report its displayed size',
        () => client.page.evaluate(() => window.haven.state.displaySizes['t-01']),
        { timeoutMs: 5000, until: (s) => s && s.width > 0 && s.height > 0 });
      figures.one_on_one_remote_display_size = sizes;

      await shot(client, 'flows-one-on-one-client.png');
      await shot(therapist, 'flows-one-on-one-therapist.png');
      await accessible(therapist, 'in-session-therapist');
      await accessible(client, 'in-session-client');
    });

    test('keyboard: shortcuts toggle the microphone and the help dialog lists them', async () => {
      await client.page.locator('body').press('m');
      await waitForState(client.page, 'mic off', () => !window.haven.state.micOn);
      await client.page.locator('body').press('m');
      await waitForState(client.page, 'mic on', () => window.haven.state.micOn);

      await client.page.getByRole('button', { name: 'Keyboard shortcuts' }).focus();
      await client.page.keyboard.press('Enter');
      const dialog = client.page.getByRole('dialog', { name: 'Keyboard shortcuts' });
      await dialog.waitFor();
      await shot(client, 'flows-shortcuts-help.png');
      await client.page.keyboard.press('Escape');
      await dialog.waitFor({ state: 'hidden' });
    });

    test('the therapist mutes and unmutes the client', async () => {
      await therapist.page.getByRole('button', { name: /^Mute .*(p-01|Tester P01)/ }).click();
      await waitForState(client.page, 'the client to be muted by the therapist',
        () => window.haven.state.mutedByTherapist);
      await client.page.getByRole('button', { name: 'Muted by your therapist' }).waitFor();
      await waitForState(therapist.page, 'the therapist to see p-01 muted',
        () => window.haven.state.participants.some((p) => p.participant_id === 'p-01' && p.muted));
      await therapist.page.locator('.tile[data-participant-id="p-01"] .badge.muted').waitFor();
      await shot(client, 'flows-muted-client.png');
      await shot(therapist, 'flows-muted-therapist.png');

      await therapist.page.getByRole('button', { name: /^Unmute .*(p-01|Tester P01)/ }).click();
      await waitForState(client.page, 'the client to be unmuted',
        () => !window.haven.state.mutedByTherapist);
    });

    test('audio-only mode stops sending and showing video', async () => {
      await client.page.getByRole('button', { name: 'Audio only: off' }).click();
      await waitForState(client.page, 'audio only and no video track sent', () =>
        window.haven.state.audioOnly && !window.haven.pcs.publish.getSenders()
          .some((s) => s.track && s.track.kind === 'video'));
      // The client shows no incoming video; the therapist sees initials for the client.
      await waitFor('the client to hide incoming video', () => client.page.evaluate(() =>
        [...document.querySelectorAll('.tile:not(.self) video')]
          .every((v) => !v.srcObject || v.srcObject.getVideoTracks().length === 0)),
      { timeoutMs: 5000 });
      await therapist.page.waitForFunction(() => document
        .querySelector('.tile[data-participant-id="p-01"] .media')?.classList.contains('no-video'),
      null, { timeout: 8000 });
      await shot(client, 'flows-audio-only-client.png');
      await shot(therapist, 'flows-audio-only-therapist.png');

      await client.page.getByRole('button', { name: 'Audio only: on' }).click();
      await therapist.page.waitForFunction(() => !document
        .querySelector('.tile[data-participant-id="p-01"] .media')?.classList.contains('no-video'),
      null, { timeout: 8000 });
    });

    test('after the WebSocket is cut, the client resumes and media flows again', async () => {
      const before = await client.page.evaluate(() => window.haven.state.reconnect.resumes);
      await client.page.evaluate(() => window.haven.socket().close());
      await client.page.locator('#reconnect-banner').waitFor({ state: 'visible', timeout: 3000 });
      await shot(client, 'flows-reconnecting.png');

      await waitForState(client.page, 'the client to resume',
        (n) => window.haven.state.reconnect.resumes > n &&
          window.haven.state.connection.signaling === 'open' && window.haven.state.screen === 'call',
        before, 20_000);
      await client.page.locator('#reconnect-banner').waitFor({ state: 'hidden', timeout: 3000 });
      await Promise.all([videoFlowing(client, 1), videoFlowing(therapist, 1)]);
      const timing = await client.page.evaluate(() => ({ ...window.haven.timing }));
      if (timing.resumedFrame !== null) {
        figures.socket_cut_to_first_frame_ms = Math.round(timing.resumedFrame - timing.socketLost);
      }
      const present = await state(therapist);
      assert.ok(present.participants.some((p) => p.participant_id === 'p-01'),
        'the therapist no longer lists p-01 after the resume');
      await shot(client, 'flows-reconnected.png');
    });

    test('when the connection cannot be restored, the page says so and Try again works', async () => {
      // Every new socket is refused until `refuse` is cleared, as on a network that is down.
      let refuse = true;
      await client.page.routeWebSocket(/\/ws$/, (ws) => {
        if (refuse) ws.close();
        else ws.connectToServer();
      });
      await client.page.evaluate(() => window.haven.socket().close());
      await waitForState(client.page, 'reconnection to give up',
        () => window.haven.state.connection.signaling === 'lost', null, (GRACE_SECONDS + 8) * 1000);
      const retry = client.page.getByRole('button', { name: 'Try again' });
      await retry.waitFor();
      assert.match(await client.page.locator('#reconnect-banner').innerText(), /could not reconnect/);
      await shot(client, 'flows-reconnect-failed.png');

      // Once the grace period has passed on the server (the therapist sees the client
      // leave), the place is gone: Try again joins anew and the client waits to be admitted.
      await therapist.page.waitForFunction(
        () => !window.haven.state.participants.some((p) => p.participant_id === 'p-01'),
        null, { timeout: (GRACE_SECONDS + 8) * 1000 });
      refuse = false;
      await retry.click();
      await waitForScreen(client.page, 'waiting');
      await therapist.page.getByRole('button', { name: /^Admit .*(p-01|Tester P01)/ }).click();
      await waitForScreen(client.page, 'call');
    });

    test('the therapist removes the client, who sees why', async () => {
      await therapist.page.getByRole('button', { name: /^Remove .*(p-01|Tester P01)/ }).click();
      const dialog = therapist.page.getByRole('dialog');
      await dialog.waitFor();
      await shot(therapist, 'flows-remove-confirm.png');
      await dialog.getByRole('button', { name: 'Remove' }).click();

      await waitForScreen(client.page, 'ended');
      assert.equal((await state(client)).endedReason, 'removed');
      await client.page.getByRole('heading', { name: 'You were removed from the session' }).waitFor();
      assert.equal(await client.page.getByRole('button', { name: 'Join again' }).isVisible(), false);
      await shot(client, 'flows-removed.png');
      await accessible(client, 'ended');
      await therapist.page.waitForFunction(
        () => !window.haven.state.participants.some((p) => p.participant_id === 'p-01'));
      // Not "the only one here so far": someone was here and left.
      await therapist.page.locator('#alone-note',
        { hasText: 'Everyone else has left the session.' }).waitFor();
    });

    test('the therapist denies a waiting person', async () => {
      const other = await open('one-denied', { viewport: PHONE });
      await joinFrom(other, await link(SESSION, 'client', 'p-02'));
      await waitForScreen(other.page, 'waiting');
      await therapist.page.locator('#alone-note', {
        hasText: 'Everyone else has left the session; 1 person is waiting to be admitted.',
      }).waitFor();
      await therapist.page.getByRole('button', { name: /^Deny .*p-02/ }).click();
      await waitForScreen(other.page, 'ended');
      assert.equal((await state(other)).endedReason, 'denied');
      await other.page.getByRole('heading', { name: 'You were not let in' }).waitFor();
      await shot(other, 'flows-denied.png');

      await therapist.page.getByRole('button', { name: 'Leave', exact: true }).click();
      await waitForScreen(therapist.page, 'ended');
      for (const person of [therapist, client, other]) await person.context.close();
    });
  });

  describe('family session with a sponsor', () => {
    const SESSION = 'sess-family';
    const FAMILY = { kind: 'family', sponsorFor: 'p-41' };

    test('the therapist admits the client, then the client\'s sponsor, who is labelled and receives both',
      async () => {
        const therapist = await open('family-therapist', { viewport: DESKTOP });
        const client = await open('family-client', { viewport: LAPTOP });
        const sponsor = await open('family-sponsor', { viewport: LAPTOP });

        await joinFrom(therapist, await link(SESSION, 'therapist', 't-41', FAMILY));
        await waitForScreen(therapist.page, 'call');
        await joinFrom(client, await link(SESSION, 'client', 'p-41', FAMILY));
        await waitForScreen(client.page, 'waiting');
        await therapist.page.getByRole('button', { name: /^Admit .*p-41/ }).click();
        await waitForScreen(client.page, 'call');

        // A sponsor waits to be admitted like a client, and is named as a sponsor in the panel.
        await joinFrom(sponsor, await link(SESSION, 'sponsor', 's-41', FAMILY));
        await waitForScreen(sponsor.page, 'waiting');
        await therapist.page.getByRole('button', { name: 'Admit Sponsor s-41', exact: true }).click();
        await waitForScreen(sponsor.page, 'call');

        // The sponsor's top bar says whose session this is.
        await sponsor.page.locator('#sponsor-badge', { hasText: 'Sponsor session' }).waitFor();
        assert.equal(await sponsor.page.locator('#session-label').innerText(),
          `Sponsor session: ${SESSION}`);
        assert.equal((await state(sponsor)).role, 'sponsor');
        // The others see no sponsor badge of their own.
        assert.equal(await client.page.locator('#sponsor-badge').isVisible(), false);
        assert.equal(await therapist.page.locator('#sponsor-badge').isVisible(), false);

        // The sponsor receives the therapist and the client; they receive the sponsor.
        await waitForState(sponsor.page, 'the sponsor to list t-41 and p-41', () => {
          const ids = window.haven.state.participants.map((p) => p.participant_id);
          return ids.includes('t-41') && ids.includes('p-41');
        });
        await Promise.all([videoFlowing(sponsor, 2), videoFlowing(therapist, 2), videoFlowing(client, 2)]);
        // Every tile shows its video, not initials, before the pictures are taken.
        await Promise.all([sponsor, therapist].map((person) => person.page.waitForFunction(
          () => document.querySelectorAll('#grid .media.no-video').length === 0, null,
          { timeout: 10_000 })));

        await shot(sponsor, 'flows-sponsor.png');
        await shot(therapist, 'flows-sponsor-therapist.png');
        await accessible(sponsor, 'in-session-sponsor');

        // When the client leaves, the sponsor leaves with them and is told why.
        await client.page.getByRole('button', { name: 'Leave', exact: true }).click();
        await waitForScreen(client.page, 'ended');
        await waitForScreen(sponsor.page, 'ended');
        assert.equal((await state(sponsor)).endedReason, 'sponsored_client_left');
        await sponsor.page.getByRole('heading', { name: 'The session ended for you' }).waitFor();
        await therapist.page.getByRole('button', { name: 'Leave', exact: true }).click();
        await waitForScreen(therapist.page, 'ended');
        for (const person of [therapist, client, sponsor]) await person.context.close();
      });

    test('a sponsor link for a session without sponsors is refused with a clear message', async () => {
      const refused = await open('sponsor-refused', { viewport: LAPTOP });
      // An individual session whose links name no client to accompany: sponsors are not allowed.
      await joinFrom(refused, await link('sess-no-sponsor', 'sponsor', 's-42'));
      await waitForScreen(refused.page, 'error');
      assert.equal((await state(refused)).error?.code, 'sponsor_not_allowed');
      await refused.page.getByRole('heading', { name: 'You could not join the session' }).waitFor();
      assert.match(await refused.page.locator('#error-message').innerText(),
        /This session does not allow sponsors/);
      assert.equal(await refused.page.locator('#error-code').innerText(), 'sponsor_not_allowed');
      // Trying the same link again cannot help, so it is not offered.
      assert.equal(await refused.page.locator('#error-retry-button').isVisible(), false);
      await shot(refused, 'flows-sponsor-refused.png');
      await accessible(refused, 'error');
      await refused.context.close();
    });
  });

  describe('group of five at phone width', () => {
    const SESSION = 'sess-group';
    const CLIENTS = ['p-11', 'p-12', 'p-13', 'p-14'];
    let therapist;
    let clients;

    test('the therapist admits four clients; everyone receives everyone', async () => {
      therapist = await open('group-therapist', { viewport: DESKTOP });
      await joinFrom(therapist, await link(SESSION, 'therapist', 't-02', { kind: 'group' }));
      await waitForScreen(therapist.page, 'call');

      clients = [];
      for (const id of CLIENTS) clients.push(await open(`group-${id}`, { viewport: PHONE }));
      await Promise.all(clients.map(async (c, i) => {
        await joinFrom(c, await link(SESSION, 'client', CLIENTS[i], { kind: 'group' }));
        await waitForScreen(c.page, 'waiting');
      }));
      await noSidewaysScroll(clients[0], 'pre-join/waiting');
      await shot(clients[0], 'flows-phone-waiting.png');

      await shot(therapist, 'flows-group-waiting-list.png');
      for (const id of CLIENTS) {
        await therapist.page.getByRole('button', { name: new RegExp(`^Admit .*${id}`) }).click();
      }
      const admittedAt = Date.now();
      await Promise.all(clients.map((c) => waitForScreen(c.page, 'call')));
      await waitForState(therapist.page, 'four participants',
        () => window.haven.state.participants.length === 4);
      await Promise.all([videoFlowing(therapist, 4, 30_000), ...clients.map((c) => videoFlowing(c, 4, 30_000))]);
      figures.group_admit_to_all_decoding_ms = Date.now() - admittedAt;

      // The panel shows each participant's connection quality as the therapist receives it.
      await waitFor('quality for all four in the panel', () => therapist.page.evaluate(() =>
        [...document.querySelectorAll('#present-list .person')].map((li) => li.dataset.quality)),
      { timeoutMs: 10_000, until: (q) => q.length === 4 && q.every((x) => x !== 'unknown') });
      // The fake microphones play a tone: someone is highlighted as speaking.
      await therapist.page.locator('.tile.speaking').first().waitFor({ timeout: 10_000 });

      for (const c of clients) await noSidewaysScroll(c, 'call');
      await shot(therapist, 'flows-group-therapist.png');
      await shot(clients[0], 'flows-phone-group-client.png');
      await accessible(therapist, 'in-session-group');
    });

    test('ending the session for everyone asks first, then ends it for all', async () => {
      await therapist.page.getByRole('button', { name: 'End session for everyone' }).click();
      const dialog = therapist.page.getByRole('dialog', { name: 'End the session for everyone?' });
      await dialog.waitFor();
      // Cancel first: nothing happens.
      await dialog.getByRole('button', { name: 'Cancel' }).click();
      await dialog.waitFor({ state: 'hidden' });
      assert.equal((await state(clients[0])).screen, 'call');

      await therapist.page.getByRole('button', { name: 'End session for everyone' }).click();
      await shot(therapist, 'flows-end-confirm.png');
      await dialog.getByRole('button', { name: 'End session' }).click();
      await Promise.all([therapist, ...clients].map((p) => waitForScreen(p.page, 'ended')));
      for (const c of clients) assert.equal((await state(c)).endedReason, 'session_ended');
      await clients[0].page.getByRole('heading', { name: 'The session has ended' }).waitFor();
      await noSidewaysScroll(clients[0], 'ended');
      await shot(clients[0], 'flows-session-ended.png');
    });
  });
});
