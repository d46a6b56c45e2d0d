// A loopback UDP relay that stands between one browser and Haven's media port, so a test can
// give that browser a worse network than the others: a bandwidth cap toward the browser, a
// cut (nothing passes), and a new address (the relay talks to Haven from new ports, as a
// phone does when it moves from Wi-Fi to mobile data). Plus the WebSocket tap that points
// that one browser at the relay: it rewrites the candidates in Haven's SDP on the way in.
//
// Everything binds to 127.0.0.1 and forwards to one target on 127.0.0.1; every timer stops
// on close().

import dgram from 'node:dgram';

/** How often the shaper sends what its rate allows. */
const SHAPER_TICK_MS = 5;
/** Queue at most this much time of the capped rate; later packets are dropped (drop-tail). */
const SHAPER_QUEUE_MS = 250;

/**
 * @param {{target: {host: string, port: number}, downKbps?: number}} options `downKbps` caps
 *   what flows from Haven to the browser (unset: no cap)
 */
export async function startUdpRelay({ target, downKbps }) {
  const front = dgram.createSocket('udp4');
  await new Promise((resolve, reject) => {
    front.once('error', reject);
    front.bind(0, '127.0.0.1', resolve);
  });

  const relay = {
    port: front.address().port,
    cut: false,
    downKbps: downKbps ?? null,
    /** Bytes and packets each way, and what the cap or a cut dropped. */
    counts: { up: 0, down: 0, downBytes: 0, dropped: 0, rebinds: 0 },
  };
  /** Browser address ("ip:port") -> the socket that speaks to Haven for it. */
  const upstream = new Map();
  /** Packets toward the browser waiting for the shaper: [buffer, address, port]. */
  let queue = [];
  let queuedBytes = 0;
  let allowance = 0;
  let lastTick = Date.now();

  function upstreamFor(address, port) {
    const key = `${address}:${port}`;
    let socket = upstream.get(key);
    if (socket) return socket;
    socket = dgram.createSocket('udp4');
    socket.bind(0, '127.0.0.1');
    socket.on('message', (data) => toBrowser(data, address, port));
    socket.on('error', () => {});
    upstream.set(key, socket);
    return socket;
  }

  function toBrowser(data, address, port) {
    if (relay.cut) { relay.counts.dropped += 1; return; }
    if (relay.downKbps === null) { send(data, address, port); return; }
    const limit = (relay.downKbps * 1000 / 8) * (SHAPER_QUEUE_MS / 1000);
    if (queuedBytes + data.length > limit) { relay.counts.dropped += 1; return; }
    queue.push([data, address, port]);
    queuedBytes += data.length;
  }

  function send(data, address, port) {
    relay.counts.down += 1;
    relay.counts.downBytes += data.length;
    front.send(data, port, address);
  }

  const shaper = setInterval(() => {
    const now = Date.now();
    const elapsed = now - lastTick;
    lastTick = now;
    if (relay.downKbps === null) return;
    const perMs = relay.downKbps * 1000 / 8 / 1000;
    // At most one tick's worth of unused allowance carries over: no bursts after a pause.
    allowance = Math.min(allowance + perMs * elapsed, perMs * SHAPER_TICK_MS * 2 + 1500);
    while (queue.length > 0 && queue[0][0].length <= allowance) {
      const [data, address, port] = queue.shift();
      queuedBytes -= data.length;
      allowance -= data.length;
      send(data, address, port);
    }
  }, SHAPER_TICK_MS);

  front.on('message', (data, from) => {
    if (relay.cut) { relay.counts.dropped += 1; return; }
    relay.counts.up += 1;
    upstreamFor(from.address, from.port).send(data, target.port, target.host);
  });
  front.on('error', () => {});

  return Object.assign(relay, {
    /** Stop (true) or let through (false) everything, both ways. */
    setCut(cut) {
      relay.cut = cut;
      if (cut) { queue = []; queuedBytes = 0; }
    },
    /** Cap toward the browser in kbit/s, or null for none. */
    setDownKbps(kbps) {
      relay.downKbps = kbps;
    },
    /** Speak to Haven from new ports from now on: the browser appears at a new address. */
    rebind() {
      for (const socket of upstream.values()) socket.close();
      upstream.clear();
      relay.counts.rebinds += 1;
    },
    close() {
      clearInterval(shaper);
      for (const socket of upstream.values()) socket.close();
      upstream.clear();
      front.close();
    },
  });
}

/**
 * Point Haven's candidates at the relay: every UDP candidate's port becomes the relay's, and
 * TCP candidates are dropped, so the browser has no way to Haven but through the relay.
 * @param {string} sdp
 * @param {number} relayPort
 */
export function throughRelay(sdp, relayPort) {
  return sdp.split('\r\n')
    .filter((line) => !(line.startsWith('a=candidate:') && / tcp /i.test(line)))
    .map((line) => {
      if (!line.startsWith('a=candidate:')) return line;
      const parts = line.split(' ');
      // a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
      parts[5] = String(relayPort);
      return parts.join(' ');
    })
    .join('\r\n');
}

/**
 * Stand between one page and Haven's WebSocket. `fromServer(message)` may return a changed
 * message (object), or null to drop it; `fromPage(message)` likewise for what the page
 * sends. Every message each way is kept in `log` for the test to read.
 * @param {import('playwright-core').Page} page
 * @param {{fromServer?: (m: any) => any, fromPage?: (m: any) => any}} hooks
 */
export async function tapSignaling(page, hooks = {}) {
  const log = { toPage: [], toServer: [], sockets: 0 };
  /** The page side of the current socket, to inject messages. */
  let current = null;
  await page.routeWebSocket(/\/ws$/, (ws) => {
    log.sockets += 1;
    current = ws;
    const server = ws.connectToServer();
    server.onMessage((text) => {
      let message;
      try { message = JSON.parse(String(text)); } catch { ws.send(text); return; }
      log.toPage.push(message);
      const out = hooks.fromServer ? hooks.fromServer(message) : message;
      if (out) ws.send(JSON.stringify(out));
    });
    ws.onMessage((text) => {
      let message;
      try { message = JSON.parse(String(text)); } catch { server.send(text); return; }
      log.toServer.push(message);
      const out = hooks.fromPage ? hooks.fromPage(message) : message;
      if (out) server.send(JSON.stringify(out));
    });
  });
  return {
    log,
    /** Send a message to the page as if Haven had sent it. */
    inject(message) {
      if (!current) throw new Error('no WebSocket to inject into yet');
      current.send(JSON.stringify(message));
    },
  };
}
