// The web client's side of Haven's media plane, in headless Chromium against a real Haven:
//
// - the camera goes out in three simulcast layers; every remote video sends `video_size`
//   (0 x 0 in audio only, which also sends `audio_only`); what the page shows for Haven's
//   `active_speaker`, `modality` and `quality` messages (injected into the WebSocket, so the
//   page's side is checked whatever the network does);
// - ICE restart: a client whose network is cut and comes back at a new address (through a
//   loopback UDP relay that this file starts) restarts ICE on both connections and media
//   flows both ways again, without resuming its stay;
// - three pages in one room, one behind a bandwidth cap: the other two still receive each
//   other's top layer, the throttled one a lower layer or audio only, its audio unbroken.
//
// Every message each page sends and receives is logged by a WebSocket tap. Run it through
// run.sh (private network namespace).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  axeCheck, framesDecoded, freeTcpPort, freeUdpPort, havenCommand, launchBrowser, mintLink,
  receiveStats, sleep, startHaven, stopProcess, waitFor, waitForHealth, waitForScreen,
  waitForState, watchPage, within,
} from './helpers.mjs';
import { startUdpRelay, tapSignaling, throughRelay } from './impair.mjs';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const OUTPUT_DIR = path.resolve(process.env.TEST_OUTPUT_DIR || path.join(REPO_ROOT, 'test-output'));

const DESKTOP = { width: 1280, height: 800 };

const figures = {};
const people = [];

let bin;
let tmp;
let dataDir;
let origin;
let mediaPort;
let haven;
let browser;

async function link(session, role, subject, kind = 'individual') {
  return mintLink(bin, {
    dataDir, session, role, subject, publicUrl: origin, extra: ['--kind', kind],
  });
}

/**
 * A person in their own browser context; `scale` is the device pixel ratio. With `relay`,
 * this page's media goes through that UDP relay (Haven's candidates are rewritten to it).
 */
async function open(name, { viewport = DESKTOP, scale = 1, relay = null } = {}) {
  const context = await browser.newContext({
    viewport, deviceScaleFactor: scale, permissions: ['camera', 'microphone'],
  });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  const seen = watchPage(page, origin);
  const tap = await tapSignaling(page, {
    fromServer: (m) => {
      if (relay && (m.type === 'publish_answer' || m.type === 'subscribe_offer')) {
        m.sdp = throughRelay(m.sdp, relay.port);
      }
      return m;
    },
  });
  const person = { name, context, page, seen, tap };
  people.push(person);
  return person;
}

async function joinFrom(person, url) {
  await person.page.goto(url);
  const join = person.page.getByRole('button', { name: 'Join', exact: true });
  await waitFor(`${person.name}'s Join button to be enabled`, () => join.isEnabled(), { timeoutMs: 10_000 });
  await join.click();
}

async function shot(person, file) {
  await person.page.screenshot({ path: path.join(OUTPUT_DIR, file), fullPage: true });
}

const state = (person) => person.page.evaluate(() => window.haven.state);
const sent = (person, type) => person.tap.log.toServer.filter((m) => m.type === type);

/** Everything this page's publish connection sends per encoding (rid, size, frames). */
function outbound(page) {
  return page.evaluate(async () => {
    const pc = window.haven.pcs.publish;
    if (!pc) return [];
    return [...(await pc.getStats()).values()]
      .filter((s) => s.type === 'outbound-rtp' && s.kind === 'video')
      .map((s) => ({ rid: s.rid ?? null, width: s.frameWidth ?? 0, frames: s.framesEncoded ?? 0 }));
  });
}

/** Frames decoded from one participant's video m-line on a page. */
async function framesFrom(page, participantId) {
  return page.evaluate(async (id) => {
    const sub = window.haven.pcs.subscribe;
    if (!sub) return { frames: 0, width: 0 };
    const mids = new Set(sub.getTransceivers()
      .filter((t) => t.receiver.track.kind === 'video' && t.mid !== null)
      .map((t) => t.mid));
    const tile = document.querySelector(`.tile[data-participant-id="${id}"] video`);
    const trackId = tile && tile.srcObject ? tile.srcObject.getVideoTracks()[0]?.id : null;
    let best = { frames: 0, width: 0 };
    for (const s of (await sub.getStats()).values()) {
      if (s.type !== 'inbound-rtp' || s.kind !== 'video' || !mids.has(s.mid)) continue;
      const t = sub.getTransceivers().find((x) => x.mid === s.mid);
      if (trackId && t?.receiver.track.id !== trackId) continue;
      if ((s.framesDecoded || 0) >= best.frames) best = { frames: s.framesDecoded || 0, width: s.frameWidth || 0 };
    }
    return best;
  }, participantId);
}

/** Audio packets received on a page, all participants together. */
async function audioPacketsOf(page) {
  const stats = await receiveStats(page);
  return (stats?.audio || []).reduce((sum, a) => sum + a.packetsReceived, 0);
}

/**
 * Within 15 s, either frames from `participantId` keep arriving on `person`'s page ('video'),
 * or Haven has told the page it sends audio only for bandwidth ('audio_only').
 */
async function videoOrAudioOnly(person, participantId) {
  let previous = await framesFrom(person.page, participantId);
  return waitFor(`${person.name} to decode ${participantId} again, or to be told audio only`, async () => {
    await sleep(700);
    const now = await framesFrom(person.page, participantId);
    const grew = now.frames > previous.frames + 3;
    previous = now;
    if (grew) return 'video';
    return (await state(person)).modality === 'audio_only' ? 'audio_only' : null;
  }, { timeoutMs: 15_000, intervalMs: 0 });
}

/** Frames from `participantId` keep arriving on `person`'s page. */
async function receivingFrom(person, participantId, timeoutMs = 20_000) {
  const first = await waitFor(`${person.name} to decode video from ${participantId}`,
    () => framesFrom(person.page, participantId), { timeoutMs, until: (f) => f.frames > 0 });
  return waitFor(`${person.name}'s frames from ${participantId} to grow`,
    () => framesFrom(person.page, participantId),
    { timeoutMs: 10_000, until: (f) => f.frames > first.frames });
}

describe('web client media behaviour', { timeout: 300_000 }, () => {
  before(async () => {
    bin = process.env.HAVEN_BIN;
    assert.ok(bin, 'set HAVEN_BIN to the haven binary');
    await fs.access(bin, fs.constants.X_OK);
    await fs.mkdir(OUTPUT_DIR, { recursive: true });
    await havenCommand(bin, ['token', '--help']);

    tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'haven-media-'));
    dataDir = path.join(tmp, 'data');
    await fs.mkdir(dataDir);
    const httpPort = await freeTcpPort();
    mediaPort = await freeUdpPort();
    origin = `http://127.0.0.1:${httpPort}`;
    haven = startHaven(bin, [
      'serve', '--http', `127.0.0.1:${httpPort}`, '--media-port', String(mediaPort),
      '--data-dir', dataDir,
    ], path.join(OUTPUT_DIR, 'media-haven.log'));
    await waitForHealth(origin, haven, 15_000);
    browser = await launchBrowser();
  });

  after(async () => {
    for (const person of people) {
      await fs.writeFile(path.join(OUTPUT_DIR, `media-${person.name}-console.log`),
        person.seen.console.join('\n') + '\n').catch(() => {});
      assert.deepEqual(person.seen.foreignRequests, [], `${person.name} contacted another origin`);
      assert.deepEqual(person.seen.pageErrors, [], `${person.name} threw`);
    }
    await within(15_000, 'closing the browser', browser?.close() ?? Promise.resolve())
      .catch((error) => console.error(error.message));
    if (haven) await stopProcess(haven).catch((error) => console.error(`stopping haven: ${error.message}`));
    await fs.writeFile(path.join(OUTPUT_DIR, 'media.json'),
      JSON.stringify({ test: 'browser_media', at: new Date().toISOString(), ...figures }, null, 2));
    console.log(`figures: ${JSON.stringify(figures)}`);
    if (tmp) await fs.rm(tmp, { recursive: true, force: true });
  });

  describe('layers, sizes, speaker, modality, figures', () => {
    const SESSION = 'sess-media-features';
    let therapist;
    let client;

    test('the camera goes out in three layers', async () => {
      therapist = await open('features-therapist');
      client = await open('features-client', { scale: 2 });
      await joinFrom(therapist, await link(SESSION, 'therapist', 't-31'));
      await waitForScreen(therapist.page, 'call');
      await joinFrom(client, await link(SESSION, 'client', 'p-31'));
      await therapist.page.getByRole('button', { name: /^Admit .*p-31/ }).click();
      await waitForScreen(client.page, 'call');

      // The offer declares three layers, lowest first, with the rids Haven knows.
      const offer = await waitFor('the client\'s publish offer', () => sent(client, 'publish_offer')[0],
        { timeoutMs: 10_000 });
      assert.equal(offer.negotiation, 1);
      assert.match(offer.sdp, /a=simulcast:send q;h;f/);
      for (const rid of ['q', 'h', 'f']) assert.match(offer.sdp, new RegExp(`a=rid:${rid} send`));

      // Haven's answer accepts them: three encodings, each smaller than the next.
      const layers = await waitFor('three encoded layers', () => outbound(client.page), {
        timeoutMs: 20_000,
        until: (l) => l.filter((x) => x.frames > 0 && x.width > 0).length === 3,
      });
      const width = Object.fromEntries(layers.map((l) => [l.rid, l.width]));
      figures.simulcast_layer_widths = width;
      assert.ok(width.q < width.h && width.h < width.f, JSON.stringify(width));
      assert.ok(width.f >= 1000, `the top layer is ${width.f} px wide; the camera should be at 720p`);
    });

    test('every remote video asks for the size it is shown at, and for nothing in audio only', async () => {
      const sizeMessages = () => sent(client, 'video_size').filter((m) => m.participant_id === 't-31');
      const first = await waitFor('a video_size for the therapist\'s tile', () => sizeMessages().at(-1),
        { timeoutMs: 10_000, until: (m) => m && m.width > 0 });
      // In device pixels: the tile's box times the device pixel ratio (2 here).
      const box = await client.page.locator('.tile[data-participant-id="t-31"] video').boundingBox();
      assert.ok(Math.abs(first.width - Math.round(box.width * 2)) <= 2, `${first.width} vs ${box.width} css px`);
      assert.ok(Math.abs(first.height - Math.round(box.height * 2)) <= 2);

      // A smaller window: a smaller size, sent once the layout settled.
      const before = sizeMessages().length;
      await client.page.setViewportSize({ width: 640, height: 600 });
      const smaller = await waitFor('a smaller video_size', () => sizeMessages().at(-1),
        { timeoutMs: 5000, until: (m) => sizeMessages().length > before && m.width < first.width });
      figures.video_size_desktop = { width: first.width, height: first.height };
      figures.video_size_small_window = { width: smaller.width, height: smaller.height };
      // A resize sends one message per video, not one per frame of the change.
      assert.ok(sizeMessages().length - before <= 2, `${sizeMessages().length - before} messages for one resize`);

      // Audio only: Haven is told, and the video is not wanted at any size.
      await client.page.getByRole('button', { name: /^Audio only/ }).click();
      await waitFor('audio_only enabled', () => sent(client, 'audio_only').at(-1),
        { timeoutMs: 5000, until: (m) => m && m.enabled === true });
      await waitFor('a 0 x 0 video_size', () => sizeMessages().at(-1),
        { timeoutMs: 5000, until: (m) => m.width === 0 && m.height === 0 });
      // Haven stops sending video to this browser: bandwidth saved, not only screen. Payload
      // bytes are counted, so that padding Haven may send to probe the link does not count.
      const videoIn = () => client.page.evaluate(async () => {
        let bytes = 0;
        let packets = 0;
        for (const s of (await window.haven.pcs.subscribe.getStats()).values()) {
          if (s.type === 'inbound-rtp' && s.kind === 'video') {
            bytes += s.bytesReceived || 0;
            packets += s.packetsReceived || 0;
          }
        }
        return { bytes, packets };
      });
      await sleep(1500);
      const paused = await videoIn();
      await sleep(2000);
      const pausedLater = await videoIn();
      figures.audio_only_video_in_2s = {
        payload_bytes: pausedLater.bytes - paused.bytes, packets: pausedLater.packets - paused.packets,
      };
      assert.ok(pausedLater.bytes - paused.bytes < 10_000,
        `video kept arriving in audio only: ${JSON.stringify(figures.audio_only_video_in_2s)}`);
      await client.page.getByRole('button', { name: /^Audio only/ }).click();
      await waitFor('audio_only disabled', () => sent(client, 'audio_only').at(-1),
        { timeoutMs: 5000, until: (m) => m && m.enabled === false });
      await waitFor('the size again', () => sizeMessages().at(-1),
        { timeoutMs: 5000, until: (m) => m.width > 0 });
      await client.page.setViewportSize(DESKTOP);
    });

    test('Haven\'s active speaker, audio-only modality and figures show on the page', async () => {
      client.tap.inject({ type: 'active_speaker', participant_id: 't-31' });
      await client.page.locator('.tile.speaking[data-participant-id="t-31"]').waitFor();
      assert.equal((await state(client)).speakerSource, 'server');
      // The speaker may be this page's own participant.
      client.tap.inject({ type: 'active_speaker', participant_id: 'p-31' });
      await client.page.locator('.tile.self.speaking').waitFor();
      await client.page.locator('.tile.speaking[data-participant-id="t-31"]').waitFor({ state: 'detached' });
      client.tap.inject({ type: 'active_speaker', participant_id: null });
      await client.page.locator('.tile.speaking').waitFor({ state: 'detached' });

      // Video paused for bandwidth: the page says why and that it comes back by itself.
      client.tap.inject({ type: 'modality', modality: 'audio_only', reason: 'bandwidth' });
      const note = client.page.locator('#modality-note');
      await note.waitFor();
      assert.match(await note.innerText(), /too weak for video/);
      await waitFor('the change announced', () => client.page.locator('#announcer').innerText(),
        { timeoutMs: 3000, until: (t) => /too weak for video/.test(t) });
      await shot(client, 'media-audio-only-bandwidth.png');
      const serious = await axeCheck(client.page, path.join(OUTPUT_DIR, 'media-axe-audio-only.json'));
      assert.deepEqual(serious, [], 'axe found serious violations with the audio-only note');
      client.tap.inject({ type: 'modality', modality: 'video' });
      await note.waitFor({ state: 'hidden' });
      // Audio only at the person's own request needs no note.
      client.tap.inject({ type: 'modality', modality: 'audio_only', reason: 'requested' });
      await sleep(300);
      assert.equal(await note.isHidden(), true);

      // The therapist's panel shows Haven's figures for each participant.
      therapist.tap.inject({
        type: 'quality',
        participants: [{
          participant_id: 'p-31', bitrate_in_kbps: 1250, bitrate_out_kbps: 820,
          loss_in: 0.02, loss_out: 0.01, rtt_ms: 45, layer: 'medium', modality: 'video',
        }],
      });
      const details = therapist.page.locator('#present-list .person[data-participant-id="p-31"] .person-details');
      await details.waitFor();
      const text = await details.innerText();
      assert.match(text, /medium quality video/);
      assert.match(text, /1\.3 Mbit\/s/);
      assert.match(text, /45 ms round trip/);
      therapist.tap.inject({
        type: 'quality',
        participants: [{ participant_id: 'p-31', layer: null, modality: 'audio_only', rtt_ms: 380 }],
      });
      await waitFor('audio only in the panel', () => details.innerText(),
        { timeoutMs: 3000, until: (t) => /receives audio only/.test(t) });
      await shot(therapist, 'media-therapist-figures.png');
      await Promise.all([client.context.close(), therapist.context.close()]);
    });
  });

  test('a client cut off and back at a new address restarts ICE; its media reaches the therapist again', async () => {
    const SESSION = 'sess-media-restart';
    const relay = await startUdpRelay({ target: { host: '127.0.0.1', port: mediaPort } });
    try {
      const therapist = await open('restart-therapist');
      const client = await open('restart-client', { relay });
      await joinFrom(therapist, await link(SESSION, 'therapist', 't-32'));
      await waitForScreen(therapist.page, 'call');
      await joinFrom(client, await link(SESSION, 'client', 'p-32'));
      await therapist.page.getByRole('button', { name: /^Admit .*p-32/ }).click();
      await waitForScreen(client.page, 'call');
      await Promise.all([receivingFrom(therapist, 'p-32'), receivingFrom(client, 't-32')]);
      // The client's media really goes through the relay.
      assert.ok(relay.counts.up > 0 && relay.counts.down > 0, JSON.stringify(relay.counts));
      const firstUfrag = /a=ice-ufrag:(\S+)/.exec(sent(client, 'publish_offer')[0].sdp)?.[1];

      // The network goes away; the browser's consent checks go unanswered.
      relay.setCut(true);
      await waitForState(client.page, 'ICE restarts on the publish connection',
        () => window.haven.state.ice.publishRestarts > 0, undefined, 20_000);
      // The page says that it is restoring media (a status, so screen readers hear it).
      const banner = client.page.locator('#reconnect-banner[role="status"]');
      await banner.waitFor();
      assert.match(await banner.innerText(), /Restoring audio and video/);
      await shot(client, 'media-restoring.png');
      const cutFor = 3000;
      await sleep(cutFor);
      // It comes back at a new address.
      relay.rebind();
      relay.setCut(false);
      const back = Date.now();
      // Audio both ways shows that the path is back; it needs no estimate to ramp up.
      const audioAtTherapist = await audioPacketsOf(therapist.page);
      const audioAtClient = await audioPacketsOf(client.page);
      await waitFor('audio from the client at the therapist again', () => audioPacketsOf(therapist.page),
        { timeoutMs: 20_000, until: (n) => n > audioAtTherapist + 25 });
      figures.ice_restart_audio_back_at_therapist_ms = Date.now() - back;
      await waitFor('audio from the therapist at the client again', () => audioPacketsOf(client.page),
        { timeoutMs: 20_000, until: (n) => n > audioAtClient + 25 });
      figures.ice_restart_audio_back_at_client_ms = Date.now() - back;
      // Video too, unless Haven judged a link too weak for it and told the page so.
      figures.ice_restart_video_at_therapist = await videoOrAudioOnly(therapist, 'p-32');
      figures.ice_restart_video_at_client = await videoOrAudioOnly(client, 't-32');
      figures.ice_restart_back_to_video_ms = Date.now() - back;

      const offers = sent(client, 'publish_offer');
      const ufrags = offers.map((o) => /a=ice-ufrag:(\S+)/.exec(o.sdp)?.[1]);
      assert.ok(ufrags.some((u) => u && u !== firstUfrag), `new ICE credentials offered: ${ufrags}`);
      // Offers are numbered and the answers carry the numbers back.
      assert.deepEqual(offers.map((o) => o.negotiation), offers.map((_, i) => i + 1));
      const s = await state(client);
      figures.ice_restart_counts = { ...s.ice, relay: { ...relay.counts } };
      // The same stay: no resume was needed for the publish side.
      assert.equal(s.reconnect.resumes, 0, JSON.stringify(s.reconnect));
      assert.equal(s.screen, 'call');

      // Haven restarted the subscribe connection too, on the page's `ice_restart`.
      assert.ok(sent(client, 'ice_restart').length > 0, 'ice_restart sent');
      const subscribeUfrags = new Set(client.tap.log.toPage.filter((m) => m.type === 'subscribe_offer')
        .map((m) => /a=ice-ufrag:(\S+)/.exec(m.sdp)?.[1]));
      assert.ok(subscribeUfrags.size >= 2, `Haven's subscribe offers had ufrags ${[...subscribeUfrags]}`);
      assert.equal((await state(client)).ice.resumesForMedia, 0);
      // The page shows the therapist's video again (or says why not), and no banner.
      if (figures.ice_restart_video_at_client === 'video') {
        await client.page.locator('.tile[data-participant-id="t-32"] .media:not(.no-video)').waitFor();
      }
      await client.page.locator('#reconnect-banner').waitFor({ state: 'hidden' });
      await shot(client, 'media-after-ice-restart.png');
      // Leave, so that these two do not keep working beside the next test.
      await Promise.all([client.context.close(), therapist.context.close()]);
    } finally {
      relay.close();
    }
  });

  test('three pages, one on a throttled link: the other two still receive the top layer', async () => {
    const SESSION = 'sess-media-throttled';
    // Below the top layer (up to 1.5 Mbit/s) and above the lowest with audio.
    const CAP_KBPS = 500;
    const relay = await startUdpRelay({ target: { host: '127.0.0.1', port: mediaPort }, downKbps: CAP_KBPS });
    try {
      // Large tiles (a wide window, device pixel ratio 2): every tile is shown wider than the
      // middle layer, so the size allows the top layer.
      const WIDE = { width: 1600, height: 1000 };
      const therapist = await open('three-therapist', { viewport: WIDE, scale: 2 });
      const client = await open('three-client', { viewport: WIDE, scale: 2 });
      const weak = await open('three-weak', { viewport: WIDE, scale: 2, relay });
      await joinFrom(therapist, await link(SESSION, 'therapist', 't-33', 'group'));
      await waitForScreen(therapist.page, 'call');
      for (const [person, id] of [[client, 'p-33'], [weak, 'p-34']]) {
        await joinFrom(person, await link(SESSION, 'client', id, 'group'));
        await therapist.page.getByRole('button', { name: new RegExp(`^Admit .*${id}`) }).click();
        await waitForScreen(person.page, 'call');
      }
      await Promise.all([
        receivingFrom(therapist, 'p-33', 30_000), receivingFrom(client, 't-33', 30_000),
      ]);

      // Give the estimates time to settle, then read what each receives.
      await sleep(8000);
      // What each sends, and what Haven reports, for the figures (and for a failure's reader).
      figures.throttled_sent = {
        therapist: await outbound(therapist.page), client: await outbound(client.page),
      };
      figures.throttled_quality = therapist.tap.log.toPage.filter((m) => m.type === 'quality').at(-1);
      const top = await waitFor('the top layer both ways between the unthrottled two', async () => ({
        atTherapist: await framesFrom(therapist.page, 'p-33'),
        atClient: await framesFrom(client.page, 't-33'),
      }), { timeoutMs: 20_000, until: (r) => r.atTherapist.width >= 1000 && r.atClient.width >= 1000 });
      // What the throttled page receives now: frames that keep coming are of a lower layer;
      // no new frames means Haven paused its video (audio only) and said so.
      const weakBefore = await framesFrom(weak.page, 't-33');
      const audioBefore = await audioPacketsOf(weak.page);
      await sleep(2000);
      const atWeak = await framesFrom(weak.page, 't-33');
      const audioAfter = await audioPacketsOf(weak.page);
      const weakState = await state(weak);
      const weakVideoFlowing = atWeak.frames > weakBefore.frames;
      figures.throttled = {
        cap_kbps: CAP_KBPS, therapist_receives_width: top.atTherapist.width,
        client_receives_width: top.atClient.width,
        throttled_receives: weakVideoFlowing ? `${atWeak.width} px wide video` : 'audio only',
        throttled_modality: weakState.modality, throttled_modality_reason: weakState.modalityReason,
        throttled_audio_packets_in_2s: audioAfter - audioBefore, relay: { ...relay.counts },
      };
      if (weakVideoFlowing) {
        assert.ok(atWeak.width < 1000, `the throttled page receives ${atWeak.width} px wide video`);
      } else if (weakState.modality === 'audio_only') {
        await weak.page.locator('#modality-note').waitFor();
      } else {
        assert.fail(`the throttled page's video stood still for 2 s without an audio-only message: ${JSON.stringify(weakState)}`);
      }
      // Its audio never stops.
      assert.ok(audioAfter > audioBefore + 20, `audio to the throttled page: ${audioBefore} then ${audioAfter}`);
      // The estimate comes from the browser's transport-wide congestion control feedback:
      // Haven offers it on the subscribe connection, the page keeps it in its answer, and the
      // estimate Haven reports for the throttled page has learnt the cap (it starts at
      // 1,000 kbit/s, and only feedback brings it down).
      const offers = weak.tap.log.toPage.filter((m) => m.type === 'subscribe_offer');
      assert.match(offers.at(-1).sdp, /a=extmap:\d+ http:\/\/www\.ietf\.org\/id\/draft-holmer-rmcat-transport-wide-cc-extensions-01/);
      assert.match(offers.at(-1).sdp, /a=rtcp-fb:\d+ transport-cc/);
      assert.match(sent(weak, 'subscribe_answer').at(-1).sdp, /a=rtcp-fb:\d+ transport-cc/);
      // RED: the pages offer it for Opus, Haven accepts it on the publish connection and
      // offers it on the subscribe one, and the audio the throttled page receives is RED
      // (each packet also carries the frame before it, which covers a lost packet).
      const publishAnswer = weak.tap.log.toPage.filter((m) => m.type === 'publish_answer').at(-1);
      assert.match(publishAnswer.sdp, /a=rtpmap:\d+ red\/48000\/2/);
      assert.match(sent(weak, 'subscribe_answer').at(-1).sdp, /a=rtpmap:\d+ red\/48000\/2/);
      // Chrome reports the codec inside RED in its statistics; what it sends with, and what
      // it expects to receive, are the codec lists of its sender and receivers, RED first.
      const redUse = async (person) => person.page.evaluate(() => ({
        sends: window.haven.pcs.publish.getSenders().find((x) => x.track?.kind === 'audio')
          ?.getParameters().codecs[0]?.mimeType,
        receives: window.haven.pcs.subscribe.getReceivers().filter((x) => x.track?.kind === 'audio')
          .map((r) => r.getParameters().codecs[0]?.mimeType),
      }));
      const [therapistRed, weakRed] = [await redUse(therapist), await redUse(weak)];
      figures.throttled.red = { therapist: therapistRed, throttled: weakRed };
      assert.equal(therapistRed.sends, 'audio/red', JSON.stringify(therapistRed));
      assert.deepEqual(weakRed.receives, ['audio/red', 'audio/red'], JSON.stringify(weakRed));
      const weakQuality = therapist.tap.log.toPage.filter((m) => m.type === 'quality').at(-1)
        ?.participants.find((q) => q.participant_id === 'p-34');
      figures.throttled.estimate_kbps = weakQuality?.estimate_kbps;
      assert.ok(weakQuality && weakQuality.estimate_kbps < CAP_KBPS * 1.5,
        `the throttled page's estimate: ${JSON.stringify(weakQuality)}`);
      // And the two others keep the top layer while it is throttled.
      const still = await framesFrom(therapist.page, 'p-33');
      const stillAtClient = await framesFrom(client.page, 't-33');
      assert.ok(still.width >= 1000 && still.frames > top.atTherapist.frames, JSON.stringify(still));
      assert.ok(stillAtClient.width >= 1000 && stillAtClient.frames > top.atClient.frames,
        JSON.stringify(stillAtClient));
      await shot(therapist, 'media-three-therapist.png');
      await shot(weak, 'media-three-throttled.png');
    } finally {
      relay.close();
    }
  });
});
