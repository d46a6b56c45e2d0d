// @ts-check
// Camera and microphone, and the two peer connections with Haven's SFU: `publish` carries
// what this browser sends, `subscribe` what it receives (see docs/protocol.md).

/** @typedef {import('./signaling.js').TrackInfo} TrackInfo */
/** @typedef {import('./signaling.js').SubscribeOfferMessage} SubscribeOfferMessage */

/**
 * Haven is ICE-lite and writes its own candidates into its SDP, so no STUN or TURN server
 * is needed, and an explicit empty list keeps the browser from contacting any default one.
 * @type {RTCConfiguration}
 */
const PEER_CONFIG = { iceServers: [], bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' };

/**
 * @typedef {object} LocalMedia
 * @property {MediaStream | null} stream
 * @property {string | null} problem a sentence for the person when a device was not opened
 */

/**
 * Open the microphone, and the camera when asked for.
 * @param {{video: boolean}} wanted
 * @returns {Promise<LocalMedia>}
 */
export async function openLocalMedia(wanted) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return {
      stream: null,
      problem: 'This browser cannot use a camera or microphone on this page. ' +
        'Try a current version of Chrome, Edge, Firefox or Safari.',
    };
  }

  const video = wanted.video
    ? { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 24 } }
    : false;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video });
    return { stream, problem: null };
  } catch (error) {
    return { stream: null, problem: describeMediaError(error) };
  }
}

/** @param {unknown} error */
function describeMediaError(error) {
  const name = error instanceof DOMException ? error.name : '';
  switch (name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'Camera and microphone access is blocked. Allow it in your browser\'s site ' +
        'settings and choose "Try again", or join without your camera.';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'No camera or microphone was found. Connect one and choose "Try again", ' +
        'or join without your camera.';
    case 'NotReadableError':
    case 'AbortError':
      return 'Your camera or microphone is being used by another app. Close that app and ' +
        'choose "Try again", or join without your camera.';
    default:
      return 'Your camera or microphone could not be started. Choose "Try again", ' +
        'or join without your camera.';
  }
}

/** Stop every device light this stream holds. @param {MediaStream | null} stream */
export function stopLocalMedia(stream) {
  if (stream) for (const track of stream.getTracks()) track.stop();
}

/**
 * The publish connection: one audio and one video m-line, both send-only. A missing
 * device still gets its m-line (with no track), so the offer always has the same shape.
 * @param {MediaStream | null} stream
 * @param {(candidate: string) => void} onCandidate an empty string marks the end
 */
export function createPublishConnection(stream, onCandidate) {
  const pc = new RTCPeerConnection(PEER_CONFIG);

  for (const kind of ['audio', 'video']) {
    const track = stream ? stream.getTracks().find((t) => t.kind === kind) : undefined;
    if (stream && track) pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
    else pc.addTransceiver(kind, { direction: 'sendonly' });
  }

  pc.addEventListener('icecandidate', (event) => {
    onCandidate(event.candidate ? event.candidate.candidate : '');
  });
  return pc;
}

/**
 * Create the offer and apply it locally; returns the SDP to send as `publish_offer`.
 * @param {RTCPeerConnection} pc
 */
export async function createPublishOffer(pc) {
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  return pc.localDescription ? pc.localDescription.sdp : offer.sdp || '';
}

/**
 * @param {RTCPeerConnection} pc
 * @param {string} sdp from `publish_answer`
 */
export async function applyPublishAnswer(pc, sdp) {
  await pc.setRemoteDescription({ type: 'answer', sdp });
}

/**
 * @typedef {object} SubscribeHooks
 * @property {(candidate: string) => void} onCandidate an empty string marks the end
 * @property {(negotiation: number, sdp: string) => void} onAnswer
 * @property {(tracks: Map<string, MediaStreamTrack[]>) => void} onTracks the live remote
 *   tracks of every participant, keyed by participant id, after each change
 * @property {(error: unknown) => void} onError
 */

/**
 * The subscribe connection. Haven offers, this side answers. Offers are handled one at a
 * time in arrival order, because a second offer must wait until the first is answered.
 */
export class SubscribeConnection {
  /** @param {SubscribeHooks} hooks */
  constructor(hooks) {
    this.hooks = hooks;
    this.pc = new RTCPeerConnection(PEER_CONFIG);
    /** Which participant each m-line carries, from the latest offer. @type {Map<string, TrackInfo>} */
    this.byMid = new Map();
    /** @type {Promise<void>} */
    this.queue = Promise.resolve();

    /** Candidates gathered before the first answer went out; Haven needs the answer first. */
    /** @type {string[] | null} */
    this.early = [];
    this.pc.addEventListener('icecandidate', (event) => {
      const candidate = event.candidate ? event.candidate.candidate : '';
      if (this.early) this.early.push(candidate);
      else hooks.onCandidate(candidate);
    });

    // `track` fires while the offer is applied, before the transceiver's direction is
    // final, so the event's transceiver is counted as receiving explicitly.
    this.pc.addEventListener('track', (event) => this.reportTracks(event.transceiver));
  }

  /** @param {SubscribeOfferMessage} offer */
  handleOffer(offer) {
    this.queue = this.queue
      .then(() => this.negotiate(offer))
      .catch((error) => this.hooks.onError(error));
  }

  /** @param {SubscribeOfferMessage} offer */
  async negotiate(offer) {
    // The map must be current before `track` events fire during setRemoteDescription.
    const live = (offer.tracks || []).filter((t) => t.active !== false);
    this.byMid = new Map(live.map((t) => [t.mid, t]));

    await this.pc.setRemoteDescription({ type: 'offer', sdp: offer.sdp });
    const answer = await this.pc.createAnswer();
    await this.pc.setLocalDescription(answer);

    const sdp = this.pc.localDescription ? this.pc.localDescription.sdp : answer.sdp || '';
    this.hooks.onAnswer(offer.negotiation, sdp);
    for (const candidate of this.early || []) this.hooks.onCandidate(candidate);
    this.early = null;

    // m-lines of people who left turn inactive and may now carry someone else.
    this.reportTracks(null);
  }

  /**
   * Group the receiving transceivers' tracks by participant and hand them to the page.
   * @param {RTCRtpTransceiver | null} arriving a transceiver whose `track` event is firing
   */
  reportTracks(arriving) {
    /** @type {Map<string, MediaStreamTrack[]>} */
    const byParticipant = new Map();

    for (const transceiver of this.pc.getTransceivers()) {
      const info = transceiver.mid === null ? undefined : this.byMid.get(transceiver.mid);
      const track = transceiver.receiver.track;
      if (!info || track.kind !== info.kind || track.readyState === 'ended') continue;

      const direction = transceiver.currentDirection;
      const receiving = direction === 'recvonly' || direction === 'sendrecv';
      if (!receiving && transceiver !== arriving) continue;

      const tracks = byParticipant.get(info.participant_id) || [];
      tracks.push(track);
      byParticipant.set(info.participant_id, tracks);
    }
    this.hooks.onTracks(byParticipant);
  }

  close() {
    this.pc.close();
  }
}
