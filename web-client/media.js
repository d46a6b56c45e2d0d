// @ts-check
// Camera and microphone, the level meter, and the two peer connections with Haven's SFU:
// `publish` carries what this browser sends, `subscribe` what it receives (see
// docs/protocol.md).

/** @typedef {import('./signaling.js').TrackInfo} TrackInfo */
/** @typedef {import('./signaling.js').SubscribeOfferMessage} SubscribeOfferMessage */
/** @typedef {import('./signaling.js').IceServerInfo} IceServerInfo */

/**
 * The configuration of both peer connections. Haven is ICE-lite and writes its own
 * candidates into its SDP, so no STUN server is needed; TURN servers (for networks that let
 * nothing but a relay through) come with their credentials in `joined`. An explicit empty
 * list keeps the browser from contacting any default server.
 * @param {IceServerInfo[] | undefined} iceServers
 * @returns {RTCConfiguration}
 */
function peerConfig(iceServers) {
  return { iceServers: iceServers || [], bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' };
}

/**
 * What the camera is asked for: 720p, which the publish connection sends in three simulcast
 * layers; Haven sends each subscriber the layer that fits its bandwidth and the size at which
 * it shows the video. A camera that cannot do 720p gives what it can, and the browser then
 * sends fewer layers.
 */
const VIDEO_CONSTRAINTS = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 24 } };

/**
 * The three layers of the camera, lowest first (the order Haven reads them in), with the
 * rids Haven knows: `q` quarter, `h` half, `f` full resolution. The bitrates are caps; the
 * browser's own estimate of its uplink may send less, or stop the upper layers.
 * @type {RTCRtpEncodingParameters[]}
 */
export const SIMULCAST_ENCODINGS = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000, maxFramerate: 15 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/**
 * Why a device could not be opened, as the page explains it.
 * @typedef {'denied' | 'missing' | 'busy' | 'unsupported' | 'failed'} MediaProblem
 */

/**
 * @typedef {object} LocalMedia
 * @property {MediaStream | null} stream
 * @property {MediaProblem | null} problem what went wrong with what was asked for
 * @property {boolean} hasVideo
 * @property {boolean} hasAudio
 */

/**
 * @typedef {object} DeviceChoice
 * @property {boolean} video whether to open a camera at all
 * @property {string} [audioId] a deviceId from enumerateDevices, or '' for the default
 * @property {string} [videoId]
 */

/**
 * Open the microphone and, when asked, the camera. When both were asked for and the camera
 * alone fails (none, or busy), the microphone is still opened, so the person can join with
 * audio only; `problem` then says what happened to the camera.
 * @param {DeviceChoice} choice
 * @returns {Promise<LocalMedia>}
 */
export async function openLocalMedia(choice) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return { stream: null, problem: 'unsupported', hasVideo: false, hasAudio: false };
  }

  const audio = choice.audioId ? { deviceId: { exact: choice.audioId } } : true;
  const video = choice.video
    ? { ...VIDEO_CONSTRAINTS, ...(choice.videoId ? { deviceId: { exact: choice.videoId } } : {}) }
    : false;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio, video });
    return { stream, problem: null, hasVideo: !!video, hasAudio: true };
  } catch (error) {
    const problem = classifyMediaError(error);
    if (!video || problem === 'denied' || problem === 'unsupported') {
      return { stream: null, problem, hasVideo: false, hasAudio: false };
    }
    // The camera may be what failed: try the microphone alone.
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio, video: false });
      return { stream, problem, hasVideo: false, hasAudio: true };
    } catch {
      return { stream: null, problem, hasVideo: false, hasAudio: false };
    }
  }
}

/**
 * Open the camera alone (turning it back on during a session).
 * @param {string} [videoId]
 * @returns {Promise<MediaStreamTrack | null>}
 */
export async function openCamera(videoId) {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: false,
      video: { ...VIDEO_CONSTRAINTS, ...(videoId ? { deviceId: { exact: videoId } } : {}) },
    });
    return stream.getVideoTracks()[0] || null;
  } catch {
    return null;
  }
}

/**
 * @param {unknown} error
 * @returns {MediaProblem}
 */
function classifyMediaError(error) {
  const name = error instanceof DOMException ? error.name : '';
  switch (name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'denied';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'missing';
    case 'NotReadableError':
    case 'AbortError':
      return 'busy';
    default:
      return 'failed';
  }
}

/**
 * The cameras and microphones the browser lists. Labels are empty until access is granted.
 * @returns {Promise<{cameras: MediaDeviceInfo[], microphones: MediaDeviceInfo[]}>}
 */
export async function listDevices() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) {
    return { cameras: [], microphones: [] };
  }
  const devices = await navigator.mediaDevices.enumerateDevices();
  return {
    cameras: devices.filter((d) => d.kind === 'videoinput' && d.deviceId !== ''),
    microphones: devices.filter((d) => d.kind === 'audioinput' && d.deviceId !== ''),
  };
}

/** Stop every device light this stream holds. @param {MediaStream | null} stream */
export function stopLocalMedia(stream) {
  if (stream) for (const track of stream.getTracks()) track.stop();
}

/**
 * The microphone level of a stream, from a WebAudio AnalyserNode: the RMS of the waveform,
 * scaled so that normal speech reaches the top third of the meter.
 */
export class LevelMeter {
  /** @param {MediaStream} stream with at least one audio track */
  constructor(stream) {
    this.context = new AudioContext();
    this.analyser = this.context.createAnalyser();
    this.analyser.fftSize = 512;
    this.samples = new Float32Array(this.analyser.fftSize);
    this.source = this.context.createMediaStreamSource(stream);
    this.source.connect(this.analyser);
    // Autoplay rules may start the context suspended until the page has had a click.
    this.context.resume().catch(() => {});
  }

  /** @returns {number} 0 (silence) to 1 (loud) */
  level() {
    this.analyser.getFloatTimeDomainData(this.samples);
    let sum = 0;
    for (const s of this.samples) sum += s * s;
    const rms = Math.sqrt(sum / this.samples.length);
    return Math.min(1, rms * 4);
  }

  resume() {
    if (this.context.state === 'suspended') this.context.resume().catch(() => {});
  }

  close() {
    this.source.disconnect();
    this.context.close().catch(() => {});
  }
}

/**
 * The publish connection: one audio and one video m-line, both send-only. A missing
 * device still gets its m-line (with no track), so the offer always has the same shape
 * and a camera turned on later only needs `replaceTrack`, not a new negotiation.
 *
 * Offers are numbered (`negotiation`); an answer is applied only when it answers the latest
 * offer, so the answer to an offer that an ICE restart overtook cannot undo the restart.
 */
export class PublishConnection {
  /**
   * @param {MediaStream | null} stream
   * @param {(candidate: string) => void} onCandidate an empty string marks the end
   * @param {IceServerInfo[]} [iceServers] TURN servers from `joined`
   */
  constructor(stream, onCandidate, iceServers) {
    this.pc = new RTCPeerConnection(peerConfig(iceServers));
    /** The number of the latest offer; answers to earlier ones are stale. */
    this.negotiation = 0;

    for (const kind of ['audio', 'video']) {
      const track = stream ? stream.getTracks().find((t) => t.kind === kind) : undefined;
      /** @type {RTCRtpTransceiverInit} */
      const init = { direction: 'sendonly' };
      if (stream && track) init.streams = [stream];
      // The layers are declared even without a camera yet: one turned on later sends them.
      if (kind === 'video') init.sendEncodings = SIMULCAST_ENCODINGS;
      this.pc.addTransceiver(track || kind, init);
    }

    this.pc.addEventListener('icecandidate', (event) => {
      onCandidate(event.candidate ? event.candidate.candidate : '');
    });
  }

  /**
   * Create the next offer and apply it locally.
   * @param {{iceRestart?: boolean}} [how] new ICE credentials: an ICE restart
   * @returns {Promise<{negotiation: number, sdp: string}>} what to send as `publish_offer`
   */
  async offer(how = {}) {
    if (how.iceRestart) this.pc.restartIce();
    const negotiation = this.negotiation + 1;
    this.negotiation = negotiation;
    const offer = await this.pc.createOffer({ iceRestart: !!how.iceRestart });
    // A later offer may have started meanwhile; then this one is dropped unsent.
    if (negotiation !== this.negotiation) return { negotiation, sdp: '' };
    await this.pc.setLocalDescription(offer);
    const sdp = this.pc.localDescription ? this.pc.localDescription.sdp : offer.sdp || '';
    return { negotiation, sdp };
  }

  /**
   * Apply `publish_answer`, unless it answers an offer that a later one replaced.
   * @param {string} sdp
   * @param {number | undefined} negotiation the number the answer carries
   * @returns {Promise<boolean>} whether it was applied
   */
  async answer(sdp, negotiation) {
    if (negotiation !== undefined && negotiation !== this.negotiation) return false;
    if (this.pc.signalingState !== 'have-local-offer') return false;
    await this.pc.setRemoteDescription({ type: 'answer', sdp });
    return true;
  }

  close() {
    this.pc.close();
  }
}

/**
 * Send this track (or nothing) on the publish connection's m-line of its kind. With `null`
 * the browser stops sending that kind at once; Haven's subscribers see its frames stop.
 * @param {RTCPeerConnection} pc
 * @param {'audio' | 'video'} kind
 * @param {MediaStreamTrack | null} track
 */
export async function replacePublishedTrack(pc, kind, track) {
  const transceiver = pc.getTransceivers()
    .find((t) => (t.sender.track?.kind || t.receiver.track.kind) === kind);
  if (transceiver) await transceiver.sender.replaceTrack(track);
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
  /**
   * @param {SubscribeHooks} hooks
   * @param {IceServerInfo[]} [iceServers] from `joined`
   */
  constructor(hooks, iceServers) {
    this.hooks = hooks;
    this.pc = new RTCPeerConnection(peerConfig(iceServers));
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
