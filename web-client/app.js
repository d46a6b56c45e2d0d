// @ts-check
// Haven's web client: the flow from the join link to the end of a session.
//
//   pre-join (devices, preview, level) -> join -> waiting room -> admitted: publish +
//   subscribe -> (socket lost: resume, both peer connections rebuilt) -> ended
//
// signaling.js speaks the protocol, media.js owns devices and peer connections, stats.js
// reads what arrives, ui.js draws the page.

import { CLOSING_ERROR_CODES, SignalingChannel, previewToken, signalingUrl } from './signaling.js';
import {
  LevelMeter, PublishConnection, SubscribeConnection, listDevices, openCamera, openLocalMedia,
  replacePublishedTrack, stopLocalMedia,
} from './media.js';
import { ReceiveStats, pickActiveSpeaker } from './stats.js';
import {
  Tile, announce, attachStream, byId, confirmDialog, fillDeviceSelect, localTime,
  personLabel, renderFacts, renderPresentList, renderWaitingList, roleLabel, sessionFacts,
  showNotice, showScreen,
} from './ui.js';

/** @typedef {import('./signaling.js').Role} Role */
/** @typedef {import('./signaling.js').LeaveReason} LeaveReason */
/** @typedef {import('./signaling.js').SessionInfo} SessionInfo */
/** @typedef {import('./signaling.js').ParticipantInfo} ParticipantInfo */
/** @typedef {import('./signaling.js').ServerMessage} ServerMessage */
/** @typedef {import('./signaling.js').ErrorMessage} ErrorMessage */
/** @typedef {import('./signaling.js').JoinedMessage} JoinedMessage */
/** @typedef {import('./signaling.js').IceServerInfo} IceServerInfo */
/** @typedef {import('./signaling.js').Modality} Modality */
/** @typedef {import('./signaling.js').MediaStatsEntry} MediaStatsEntry */
/** @typedef {import('./media.js').MediaProblem} MediaProblem */
/** @typedef {import('./stats.js').Quality} Quality */
/** @typedef {import('./ui.js').Screen} Screen */

/** Errors worth a "Try again": the same link may work a little later. */
const RETRYABLE_ERRORS = new Set(['too_early', 'internal', 'unreachable']);

/** How long Leave waits for Haven's `left` before the page ends the stay by itself. */
const LEAVE_TIMEOUT_MS = 5000;

/** Reconnection: the first retry, the longest pause between retries, one attempt's limit. */
const RECONNECT_FIRST_MS = 500;
const RECONNECT_MAX_MS = 8000;
const RECONNECT_ATTEMPT_MS = 10_000;
/** Used until `joined` says how long Haven keeps a place (`resume_grace_seconds`). */
const DEFAULT_GRACE_SECONDS = 60;

/** How often receive statistics are read (active speaker, camera off, quality). */
const STATS_INTERVAL_MS = 700;
/** A speaker stays highlighted this long after falling silent, so the ring does not flicker. */
const SPEAKER_HOLD_MS = 1200;
/** Without a decoded frame for this long, a tile shows initials instead of video. */
const VIDEO_STALL_MS = 2000;
/** Past the scheduled start by this much, the waiting room tells people what to do. */
const LATE_AFTER_MS = 5 * 60_000;

/**
 * Displayed sizes are sent this long after the last change, so that a window being dragged
 * wider sends one `video_size` per video, not one per frame of the drag.
 */
const VIDEO_SIZES_DEBOUNCE_MS = 250;

/**
 * ICE restart. A connection that is `disconnected` this long (the browser's consent checks
 * went unanswered, typically a changed network), or at once `failed`, is restarted: new ICE
 * credentials, new checks from whatever address the device has now. A restart that has not
 * connected after ICE_RESTART_RETRY_MS is tried again; after ICE_RESTART_GIVE_UP_MS without
 * media the page falls back to resuming the whole stay (new socket, both connections built
 * anew), which is what a lost WebSocket does anyway.
 */
const ICE_DISCONNECTED_GRACE_MS = 2000;
const ICE_RESTART_RETRY_MS = 5000;
const ICE_RESTART_GIVE_UP_MS = 15_000;

/** What the page knows. Tests read it through `window.haven.state`. */
const state = {
  screen: /** @type {Screen} */ ('prejoin'),
  participantId: /** @type {string | null} */ (null),
  role: /** @type {Role | null} */ (null),
  displayName: /** @type {string | null} */ (null),
  session: /** @type {SessionInfo | null} */ (null),
  therapistPresent: /** @type {boolean | null} */ (null),
  /** Everyone else in the room. */
  participants: /** @type {ParticipantInfo[]} */ ([]),
  /** The waiting room, as a therapist sees it. */
  waiting: /** @type {ParticipantInfo[]} */ ([]),
  micOn: true,
  cameraOn: true,
  /** Send no video and show no incoming video. */
  audioOnly: false,
  mutedByTherapist: false,
  /** What the pre-join check found; null when both devices opened. */
  mediaProblem: /** @type {MediaProblem | null} */ (null),
  connection: {
    publish: 'new', subscribe: 'new',
    /** connecting, open, reconnecting, lost (gave up; "Try again" shown), closed */
    signaling: 'closed',
  },
  reconnect: { attempts: 0, resumes: 0 },
  activeSpeaker: /** @type {string | null} */ (null),
  /** Connection quality of each participant as this browser receives them. */
  quality: /** @type {Record<string, Quality>} */ ({}),
  /** The size (device pixels) each participant's video element is shown at; see README. */
  displaySizes: /** @type {Record<string, {width: number, height: number}>} */ ({}),
  /** The last size sent to Haven per participant, "WxH". */
  sentVideoSizes: /** @type {Record<string, string>} */ ({}),
  /** Where the highlighted speaker comes from: Haven's `active_speaker`, or local stats. */
  speakerSource: /** @type {'server' | 'stats'} */ ('stats'),
  /** What Haven sends this browser (`modality`), and why when it is audio only. */
  modality: /** @type {Modality} */ ('video'),
  modalityReason: /** @type {string | null} */ (null),
  /** Haven's own figures per participant (`quality`), for the therapist's panel. */
  mediaStats: /** @type {Record<string, MediaStatsEntry>} */ ({}),
  /** ICE restarts of this stay per connection, and whether media is being restored. */
  ice: { publishRestarts: 0, subscribeRestarts: 0, restoring: false, resumesForMedia: 0 },
  error: /** @type {{code: string, message: string} | null} */ (null),
  endedReason: /** @type {string | null} */ (null),
  /** Date.now() of the first `joined` of this stay, for the ended page. */
  joinedAt: /** @type {number | null} */ (null),
};

/** Peer connections of the current stay, for tests that call getStats(). */
const pcs = {
  publish: /** @type {RTCPeerConnection | null} */ (null),
  subscribe: /** @type {RTCPeerConnection | null} */ (null),
};

/** performance.now() of milestones, in milliseconds, for tests that measure set-up time. */
const timing = {
  wsOpen: /** @type {number | null} */ (null),
  firstRemoteFrame: /** @type {number | null} */ (null),
  /** The last reconnection: socket lost, and first remote frame after it. */
  socketLost: /** @type {number | null} */ (null),
  resumedFrame: /** @type {number | null} */ (null),
};

Object.assign(window, {
  haven: { state, pcs, timing, socket: () => channel?.socket ?? null },
});

// The token is a credential: keep it in memory only and out of the address bar, history
// and any bookmark. A reload therefore needs the original link again.
const token = takeTokenFromFragment();
const preview = token ? previewToken(token) : null;

/** @type {MediaStream | null} */
let localStream = null;
/** @type {LevelMeter | null} */
let meter = null;
/** @type {ReturnType<typeof setInterval> | undefined} */
let meterTimer;
/** The devices chosen on the pre-join screen ('' for the browser's default). */
const chosen = { audioId: '', videoId: '' };

/** @type {SignalingChannel | null} */
let channel = null;
/** Whether someone else has left the room during this stay (for the note shown when alone). */
let othersLeft = false;
/** Whether the current socket has had an answer to its `join` (waiting, joined or left). */
let answered = false;
/** @type {SubscribeConnection | null} */
let subscriber = null;
/** @type {PublishConnection | null} */
let publisher = null;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let videoSizesTimer;
/**
 * Per connection: the timer of the next ICE restart, and since when (performance.now()) its
 * ICE has been neither connected nor completed; null while it is.
 */
const iceWatch = {
  publish: { timer: /** @type {ReturnType<typeof setTimeout> | undefined} */ (undefined),
    troubleSince: /** @type {number | null} */ (null) },
  subscribe: { timer: /** @type {ReturnType<typeof setTimeout> | undefined} */ (undefined),
    troubleSince: /** @type {number | null} */ (null) },
};
/** @type {Tile | null} */
let selfTile = null;
/** Remote tiles by participant id. @type {Map<string, Tile>} */
const tiles = new Map();
/** The latest remote tracks by participant, kept for tiles created after their media. */
let remoteTracks = /** @type {Map<string, MediaStreamTrack[]>} */ (new Map());
/** Publish candidates gathered before `publish_offer` was sent. @type {string[] | null} */
let earlyPublishCandidates = [];
let leaving = false;

/** From the last `joined`: what resumes this stay after a lost socket. */
let resumeToken = /** @type {string | null} */ (null);
/** TURN servers and their credentials, for both peer connections. @type {IceServerInfo[]} */
let iceServers = [];
let graceSeconds = DEFAULT_GRACE_SECONDS;
let reconnectDeadline = 0;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let reconnectTimer;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let attemptTimer;

/** @type {ReturnType<typeof setInterval> | undefined} */
let statsTimer;
let receiveStats = new ReceiveStats();
/** When each participant last had a decoded frame / was last loud. */
const lastFrameAt = new Map();
let speakerSince = 0;
/** @type {ReturnType<typeof setInterval> | undefined} */
let waitingTimer;

let shortcutsEnabled = readShortcutSetting();

function takeTokenFromFragment() {
  const value = new URLSearchParams(window.location.hash.slice(1)).get('token');
  if (window.location.hash) {
    history.replaceState(null, '', window.location.pathname + window.location.search);
  }
  return value || null;
}

/** @param {Screen} screen */
function setScreen(screen) {
  state.screen = screen;
  showScreen(screen);
}

/** @param {SessionInfo | null | undefined} session */
function showSession(session) {
  if (session) state.session = session;
  const role = state.role || preview?.role || null;
  const sponsor = role === 'sponsor';
  byId('sponsor-badge', HTMLElement).hidden = !sponsor;
  byId('session-label', HTMLElement).textContent = state.session
    ? `${sponsor ? 'Sponsor session: ' : ''}${state.session.id}` : '';

  const facts = sessionFacts(state.session);
  if (role) facts.push(['You join as', roleLabel(role)]);
  renderFacts(byId('prejoin-session', HTMLElement), facts);
  renderFacts(byId('waiting-session', HTMLElement), facts);
}

// ---- pre-join: devices, preview, level meter -------------------------------------------

/** Text and help for what the device check found. */
const MEDIA_HELP = {
  denied: {
    title: 'Camera and microphone are blocked',
    text: 'Your browser was told not to let this page use them. Select the camera or lock ' +
      'icon at the left of the address bar, allow Camera and Microphone, then choose ' +
      '"Try again". You can also join without them: you will see and hear the others, but ' +
      'they will not see or hear you.',
  },
  missing: {
    title: 'No camera or microphone found',
    text: 'Connect a headset, microphone or camera (or check that it is switched on), then ' +
      'choose "Try again". You can also join without them and listen.',
  },
  busy: {
    title: 'Your camera or microphone is busy',
    text: 'Another app (another video call, for example) is using it. Close that app, then ' +
      'choose "Try again".',
  },
  unsupported: {
    title: 'This browser cannot use a camera here',
    text: 'Open the link in a current version of Chrome, Edge, Firefox or Safari.',
  },
  failed: {
    title: 'Your camera or microphone did not start',
    text: 'Choose "Try again". If it keeps happening, restart your browser.',
  },
};

/**
 * @param {string} status
 * @param {{join: boolean, retry: boolean, withoutMedia: boolean}} offer
 * @param {MediaProblem | null} [problem]
 */
function setPrejoin(status, offer, problem = null) {
  byId('prejoin-status', HTMLElement).textContent = status;
  byId('join-button', HTMLButtonElement).disabled = !offer.join;
  byId('retry-media-button', HTMLButtonElement).hidden = !offer.retry;
  byId('join-no-media-button', HTMLButtonElement).hidden = !offer.withoutMedia;

  const help = byId('media-help', HTMLElement);
  help.hidden = !problem;
  if (problem) {
    byId('media-help-title', HTMLElement).textContent = MEDIA_HELP[problem].title;
    byId('media-help-text', HTMLElement).textContent = MEDIA_HELP[problem].text;
  }
}

async function startPreview() {
  setPrejoin('Starting your camera and microphone…', { join: false, retry: false, withoutMedia: false });
  stopMeter();
  stopLocalMedia(localStream);

  const wantVideo = !state.audioOnly;
  const media = await openLocalMedia({ video: wantVideo, ...chosen });
  localStream = media.stream;
  state.mediaProblem = media.problem;
  attachStream(byId('preview-video', HTMLVideoElement), localStream);
  startMeter();
  await refreshDeviceLists();

  if (!media.problem) {
    const ready = wantVideo ? 'Your camera and microphone are ready.' : 'Your microphone is ready.';
    setPrejoin(ready, { join: true, retry: false, withoutMedia: false });
  } else if (media.hasAudio) {
    // The microphone works; the camera did not. Joining with audio only is the way on.
    setPrejoin('Your microphone is ready; your camera is not. You can join with audio only.',
      { join: true, retry: true, withoutMedia: false }, media.problem);
  } else {
    setPrejoin('Your camera and microphone are not available.',
      { join: false, retry: true, withoutMedia: true }, media.problem);
  }
}

async function refreshDeviceLists() {
  const { cameras, microphones } = await listDevices().catch(() => ({ cameras: [], microphones: [] }));
  const activeVideo = localStream?.getVideoTracks()[0]?.getSettings().deviceId || chosen.videoId;
  const activeAudio = localStream?.getAudioTracks()[0]?.getSettings().deviceId || chosen.audioId;
  fillDeviceSelect(byId('camera-select', HTMLSelectElement), cameras, activeVideo, 'No camera available');
  fillDeviceSelect(byId('mic-select', HTMLSelectElement), microphones, activeAudio, 'No microphone available');
  if (state.audioOnly) byId('camera-select', HTMLSelectElement).disabled = true;
}

function startMeter() {
  const level = byId('mic-level', HTMLMeterElement);
  level.value = 0;
  if (!localStream || localStream.getAudioTracks().length === 0) return;

  meter = new LevelMeter(localStream);
  const active = meter;
  meterTimer = setInterval(() => { level.value = active.level(); }, 100);
}

function stopMeter() {
  clearInterval(meterTimer);
  meter?.close();
  meter = null;
}

// ---- connecting ------------------------------------------------------------------------

/** @param {{resume: boolean}} how */
function connect(how) {
  if (!token) return;

  if (!how.resume) {
    setPrejoin('Connecting to your session…', { join: false, retry: false, withoutMedia: false });
    leaving = false;
    state.error = null;
    showNotice('');
  }
  answered = false;
  state.connection.signaling = how.resume ? 'reconnecting' : 'connecting';
  // At most one socket: an attempt still opening is dropped (its close is then ignored).
  const previous = channel;
  channel = null;
  previous?.close();

  const opened = new SignalingChannel(signalingUrl(window.location), {
    onOpen: () => {
      if (!how.resume) timing.wsOpen = performance.now();
      const resume = how.resume && resumeToken ? { resume: resumeToken } : {};
      opened.send({ type: 'join', token, ...resume });
    },
    onMessage: (message) => {
      if (channel !== opened) return;
      if (!answered && message.type !== 'error' && message.type !== 'pong') {
        answered = true;
        clearTimeout(attemptTimer);
      }
      handleMessage(message);
    },
    onClose: (code) => {
      if (channel === opened) handleClose(code);
    },
  });
  channel = opened;

  // A socket can hang while opening on a bad network: give each attempt a deadline.
  clearTimeout(attemptTimer);
  attemptTimer = setTimeout(() => {
    if (channel === opened && !answered) opened.socket.close();
  }, RECONNECT_ATTEMPT_MS);
}

// ---- messages from Haven ---------------------------------------------------------------

/** @param {ServerMessage} message */
function handleMessage(message) {
  switch (message.type) {
    case 'waiting': return onWaiting(message.session, message.therapist_present);
    case 'joined': return onJoined(message);
    case 'waiting_list': return onWaitingList(message.waiting);
    case 'participant_joined': return addParticipant(message, true);
    case 'participant_left': return removeParticipant(message.participant_id, message.reason);
    case 'muted': return onMutedByTherapist(message.muted);
    case 'participant_muted': return onParticipantMuted(message.participant_id, message.muted);
    case 'publish_answer': return onPublishAnswer(message.sdp, message.negotiation);
    case 'subscribe_offer': return subscriber?.handleOffer(message);
    case 'left': return endStay(message.reason, message.credited_minutes);
    case 'active_speaker': return onActiveSpeaker(message.participant_id);
    case 'modality': return onModality(message.modality, message.reason);
    case 'quality': return onMediaStats(message.participants);
    case 'going_away': return onGoingAway(message.deadline);
    case 'pong': return;
    case 'error': return onError(message);
    default:
      console.warn('haven: ignored message type', /** @type {{type: string}} */ (message).type);
  }
}

/**
 * @param {SessionInfo} session
 * @param {boolean} therapistPresent
 */
function onWaiting(session, therapistPresent) {
  reconnected();
  showSession(session);
  const changed = state.therapistPresent !== therapistPresent;
  state.therapistPresent = therapistPresent;

  // Whoever resumed into the waiting room has no call any more.
  if (state.screen === 'call') teardownCall();

  const status = therapistPresent
    ? 'Your therapist is here and will let you in shortly.'
    : 'Your therapist has not arrived yet. Please keep this page open.';
  byId('waiting-status', HTMLElement).textContent = status;
  updateLateAdvice();

  if (state.screen !== 'waiting') {
    byId('waiting-device-slot', HTMLElement).append(byId('device-check', HTMLElement));
    setScreen('waiting');
    // Moving a video element pauses it.
    attachStream(byId('preview-video', HTMLVideoElement), localStream);
    if (!meter) startMeter();
    announce(`You are in the waiting room. ${status}`);
    clearInterval(waitingTimer);
    waitingTimer = setInterval(updateLateAdvice, 15_000);
  } else if (changed) {
    announce(status);
  }
}

/** Past the start with no therapist: say that it is fine to wait, and for how long. */
function updateLateAdvice() {
  const late = byId('waiting-late', HTMLElement);
  const starts = state.session ? Date.parse(state.session.starts_at) : NaN;
  const overdue = Number.isFinite(starts) && Date.now() > starts + LATE_AFTER_MS;
  late.hidden = !overdue;
  if (!overdue || !state.session) return;

  late.textContent = state.therapistPresent
    ? `The session was due to start at ${localTime(state.session.starts_at)}. Your therapist ` +
      'is here and may be finishing with someone else. Please keep waiting.'
    : `The session was due to start at ${localTime(state.session.starts_at)}. Your therapist ` +
      'may be running late. Keep this page open; if nobody lets you in within 15 minutes, ' +
      'contact your program.';
}

/** @param {JoinedMessage} joined */
function onJoined(joined) {
  const wasReconnecting = state.connection.signaling === 'reconnecting' || state.connection.signaling === 'lost';
  reconnected();
  clearInterval(waitingTimer);

  // Haven requires fresh negotiation after a resume: drop whatever media was set up.
  teardownCall();

  state.participantId = joined.participant_id;
  state.role = joined.role;
  state.displayName = joined.display_name ?? null;
  state.mutedByTherapist = !!joined.muted;
  resumeToken = joined.resume_token ?? null;
  iceServers = joined.ice_servers ?? [];
  graceSeconds = joined.resume_grace_seconds ?? DEFAULT_GRACE_SECONDS;
  if (state.joinedAt === null) state.joinedAt = Date.now();
  if (joined.resumed) state.reconnect.resumes += 1;
  showSession(joined.session);

  // The preview is no longer needed: the self tile shows the camera.
  stopMeter();
  byId('prejoin-device-slot', HTMLElement).append(byId('device-check', HTMLElement));
  byId('preview-video', HTMLVideoElement).srcObject = null;

  setScreen('call');
  const self = {
    participant_id: joined.participant_id, role: joined.role,
    display_name: state.displayName, muted: state.mutedByTherapist,
  };
  selfTile = new Tile(self, { self: true, onSize: () => {} });
  byId('grid', HTMLElement).replaceChildren(selfTile.element);
  for (const person of joined.participants || []) addParticipant(person, false);

  const therapist = joined.role === 'therapist';
  byId('therapist-panel', HTMLElement).hidden = !therapist;
  if (therapist) renderPanel();
  updateControls();
  updateLayout();

  const others = state.participants.length;
  const here = others === 1 ? '1 other person is' : `${others} other people are`;
  announce(joined.resumed || wasReconnecting
    ? `Reconnected. You are back in the session. ${here} here.`
    : `You joined the session. ${here} here.`);
  startMedia();
}

function startMedia() {
  const signaling = channel;
  if (!signaling) return;
  // Chosen before joining (or kept across a resume): Haven sends this browser no video.
  if (state.audioOnly) signaling.send({ type: 'audio_only', enabled: true });

  subscriber = new SubscribeConnection({
    onCandidate: (candidate) => signaling.send({ type: 'candidate', pc: 'subscribe', candidate }),
    onAnswer: (negotiation, sdp) => signaling.send({ type: 'subscribe_answer', negotiation, sdp }),
    onTracks: showRemoteTracks,
    onError: (error) => {
      console.error('haven: subscribe negotiation failed', error);
      showNotice('Incoming audio and video could not be set up. Leave and join again.');
    },
  }, iceServers);
  pcs.subscribe = subscriber.pc;
  watchConnection(subscriber.pc, 'subscribe');

  earlyPublishCandidates = [];
  const publish = new PublishConnection(localStream, (candidate) => {
    if (earlyPublishCandidates) earlyPublishCandidates.push(candidate);
    else signaling.send({ type: 'candidate', pc: 'publish', candidate });
  }, iceServers);
  publisher = publish;
  pcs.publish = publish.pc;
  watchConnection(publish.pc, 'publish');

  sendPublishOffer(publish, false).then(() => {
    for (const candidate of earlyPublishCandidates || []) {
      signaling.send({ type: 'candidate', pc: 'publish', candidate });
    }
    earlyPublishCandidates = null;
  }).catch((error) => {
    console.error('haven: publish offer failed', error);
    showNotice('Your camera and microphone could not be sent. Leave and join again.');
  });

  receiveStats = new ReceiveStats();
  clearInterval(statsTimer);
  statsTimer = setInterval(readStats, STATS_INTERVAL_MS);
}

/**
 * Offer on the publish connection and send it as `publish_offer`. Offers are numbered, so a
 * late answer to an offer that a newer one replaced is left alone.
 * @param {PublishConnection} publish
 * @param {boolean} iceRestart
 */
async function sendPublishOffer(publish, iceRestart) {
  const { negotiation, sdp } = await publish.offer({ iceRestart });
  if (!sdp || publish !== publisher) return;
  channel?.send({ type: 'publish_offer', negotiation, sdp });
}

/**
 * @param {RTCPeerConnection} pc
 * @param {'publish' | 'subscribe'} name
 */
function watchConnection(pc, name) {
  // A new connection has not connected yet: that counts as trouble from now on.
  iceWatch[name].troubleSince = performance.now();
  pc.addEventListener('connectionstatechange', () => {
    if (pcs[name] !== pc) return;
    state.connection[name] = pc.connectionState;
  });
  pc.addEventListener('iceconnectionstatechange', () => {
    if (pcs[name] !== pc) return;
    onIceState(name, pc.iceConnectionState);
  });
}

// ---- ICE restart: keeping media across a changed or unsteady network ---------------------

/**
 * @param {'publish' | 'subscribe'} name
 * @param {RTCIceConnectionState} ice
 */
function onIceState(name, ice) {
  const watch = iceWatch[name];
  if (ice === 'connected' || ice === 'completed') {
    clearTimeout(watch.timer);
    watch.timer = undefined;
    watch.troubleSince = null;
    mediaRestored();
    return;
  }
  if (watch.troubleSince === null) watch.troubleSince = performance.now();
  if (ice === 'disconnected' && watch.timer === undefined) {
    // Often a moment's loss that the browser recovers from by itself: wait a little first.
    watch.timer = setTimeout(() => restartIce(name), ICE_DISCONNECTED_GRACE_MS);
  } else if (ice === 'failed') {
    restartIce(name);
  }
}

/**
 * Restart ICE on one connection, and keep at it until it connects or the stay is resumed.
 * The publish connection is the browser's to offer on (a `publish_offer` with new ICE
 * credentials); on the subscribe connection Haven offers, so the page asks it to
 * (`ice_restart`) and answers the `subscribe_offer` that follows.
 * @param {'publish' | 'subscribe'} name
 */
function restartIce(name) {
  const watch = iceWatch[name];
  clearTimeout(watch.timer);
  watch.timer = undefined;
  const pc = pcs[name];
  if (!pc || !channel?.isOpen || state.screen !== 'call') return;
  if (pc.iceConnectionState === 'connected' || pc.iceConnectionState === 'completed') return;

  const since = watch.troubleSince ?? performance.now();
  if (performance.now() - since > ICE_RESTART_GIVE_UP_MS) return resumeForMedia();
  mediaRestoring();
  if (name === 'publish' && publisher) {
    state.ice.publishRestarts += 1;
    sendPublishOffer(publisher, true).catch((error) => {
      console.error('haven: ice restart offer failed', error);
    });
  } else if (name === 'subscribe') {
    state.ice.subscribeRestarts += 1;
    channel.send({ type: 'ice_restart' });
  }
  watch.timer = setTimeout(() => restartIce(name), ICE_RESTART_RETRY_MS);
}

/**
 * The device's network changed (back online, or another connection type): restart ICE on
 * both connections now rather than wait for the consent checks to fail, since the old path
 * may already be gone.
 */
function onNetworkChange() {
  if (state.screen !== 'call' || !channel?.isOpen) return;
  if (publisher) {
    state.ice.publishRestarts += 1;
    sendPublishOffer(publisher, true).catch(() => {});
  }
  if (subscriber) {
    state.ice.subscribeRestarts += 1;
    channel.send({ type: 'ice_restart' });
  }
}

/** ICE restarts did not bring media back: resume the stay, which builds both anew. */
function resumeForMedia() {
  if (state.screen !== 'call' || !channel) return;
  state.ice.resumesForMedia += 1;
  // Closing the socket takes the path of a lost connection: resume within the grace
  // period, a new `joined`, both peer connections negotiated afresh.
  channel.socket.close();
}

function mediaRestoring() {
  if (state.ice.restoring || state.connection.signaling !== 'open') return;
  state.ice.restoring = true;
  showBanner('Your connection is unsteady. Restoring audio and video…', false);
}

function mediaRestored() {
  if (!state.ice.restoring) return;
  const live = (/** @type {RTCPeerConnection | null} */ pc) => !pc ||
    pc.iceConnectionState === 'connected' || pc.iceConnectionState === 'completed';
  if (!live(pcs.publish) || !live(pcs.subscribe)) return;
  state.ice.restoring = false;
  if (state.connection.signaling === 'open') {
    hideBanner();
    announce('Audio and video are back.');
  }
}

/**
 * @param {string} sdp
 * @param {number} [negotiation]
 */
function onPublishAnswer(sdp, negotiation) {
  if (!publisher) return;
  publisher.answer(sdp, negotiation).catch((error) => {
    console.error('haven: publish answer rejected', error);
    showNotice('Your camera and microphone could not be sent. Leave and join again.');
  });
}

/** @param {Map<string, MediaStreamTrack[]>} byParticipant */
function showRemoteTracks(byParticipant) {
  remoteTracks = byParticipant;
  for (const [participantId, tile] of tiles) {
    const tracks = byParticipant.get(participantId) || [];
    // Audio-only: incoming video is not shown, and its size is reported as 0 x 0 so that
    // Haven, where it reads sizes, stops sending it.
    tile.showTracks(state.audioOnly ? tracks.filter((t) => t.kind === 'audio') : tracks);
    tile.setWantsVideo(!state.audioOnly);
    if (!state.audioOnly && tracks.some((t) => t.kind === 'video')) watchFirstFrame(tile.video);
  }
}

/**
 * Note when the first remote video frame is ready, for the set-up time figures.
 * @param {HTMLVideoElement} video
 */
function watchFirstFrame(video) {
  const mark = () => {
    if (timing.firstRemoteFrame === null) timing.firstRemoteFrame = performance.now();
    if (timing.socketLost !== null && timing.resumedFrame === null) {
      timing.resumedFrame = performance.now();
    }
  };
  // A frame handed to the compositor, or failing that the first frame the element has.
  if ('requestVideoFrameCallback' in video) video.requestVideoFrameCallback(mark);
  video.addEventListener('loadeddata', mark, { once: true });
}

/**
 * @param {ParticipantInfo} person
 * @param {boolean} isNews whether to announce it (not for those already in the room)
 */
function addParticipant(person, isNews) {
  const id = person.participant_id;
  if (id === state.participantId || tiles.has(id)) return;

  // `participant_joined` carries no name; a therapist knows it from the waiting list.
  const waited = state.waiting.find((p) => p.participant_id === id);
  const info = {
    participant_id: id, role: person.role,
    display_name: person.display_name ?? waited?.display_name ?? null,
    muted: !!person.muted,
  };
  state.participants.push(info);
  const tile = new Tile(info, {
    self: false,
    onSize: (size) => {
      state.displaySizes[id] = size;
      scheduleVideoSizes();
    },
  });
  tile.update({ muted: info.muted });
  tiles.set(id, tile);
  byId('grid', HTMLElement).append(tile.element);
  showRemoteTracks(remoteTracks);
  updateLayout();
  renderPanel();

  if (isNews) announce(`${personLabel(info)} joined.`);
}

/**
 * @param {string} id
 * @param {LeaveReason} reason
 */
function removeParticipant(id, reason) {
  const person = state.participants.find((p) => p.participant_id === id);
  state.participants = state.participants.filter((p) => p.participant_id !== id);
  tiles.get(id)?.remove();
  if (tiles.delete(id)) othersLeft = true;
  delete state.quality[id];
  delete state.displaySizes[id];
  delete state.mediaStats[id];
  delete state.sentVideoSizes[id];
  if (state.activeSpeaker === id) state.activeSpeaker = null;
  updateLayout();
  renderPanel();

  const why = {
    left: 'left', connection_lost: 'lost their connection', removed: 'was removed',
    session_ended: 'left because the session ended', replaced: 'moved to another device',
    token_revoked: 'left: their link was withdrawn',
    sponsored_client_left: 'left with the client they accompany',
    server_shutdown: 'left because the server restarted', denied: 'left',
  }[reason] || 'left';
  const who = person ? personLabel(person) : `Participant ${id}`;
  announce(`${who} ${why}.`);
}

/** Tile sizes follow the number of people: one-on-one is a large remote, small self view. */
function updateLayout() {
  const grid = byId('grid', HTMLElement);
  const remote = tiles.size;
  grid.dataset.layout = remote === 0 ? 'alone' : remote === 1 ? 'one-on-one' : 'group';
  const total = remote + 1;
  grid.dataset.cols = String(total <= 4 ? 2 : total <= 9 ? 3 : 4);
  updateAloneNote();

  // One-on-one: the remote tile first (the large one), the self view after it (the inset).
  if (selfTile) {
    if (remote === 1) grid.append(selfTile.element);
    else grid.prepend(selfTile.element);
  }
}

/**
 * The note above an empty grid: nobody has come yet, or everyone else has left; for a
 * therapist, also how many people wait to be admitted.
 */
function updateAloneNote() {
  const note = byId('alone-note', HTMLElement);
  note.hidden = tiles.size > 0;
  if (note.hidden) return;
  const waiting = state.role === 'therapist' ? state.waiting.length : 0;
  if (waiting === 0) {
    note.textContent = othersLeft
      ? 'Everyone else has left the session.'
      : 'You are the only one here so far.';
    return;
  }
  const here = othersLeft ? 'Everyone else has left the session' : 'Nobody else is in the session yet';
  const queue = waiting === 1 ? '1 person is' : `${waiting} people are`;
  note.textContent = `${here}; ${queue} waiting to be admitted.`;
}

// ---- what arrives: active speaker, camera off, quality -----------------------------------

async function readStats() {
  const sub = subscriber;
  if (!sub || sub.pc.connectionState === 'closed') return;

  let stats;
  try {
    stats = await receiveStats.sample(sub.pc, sub.byMid);
  } catch {
    return;
  }
  if (sub !== subscriber) return;

  const now = Date.now();
  // Haven's `active_speaker`, once it has sent one, decides; it hears everyone, this page
  // included, and judges from the levels the senders measured.
  if (state.speakerSource === 'stats') {
    const loud = pickActiveSpeaker(stats, state.activeSpeaker);
    if (loud) {
      state.activeSpeaker = loud;
      speakerSince = now;
    } else if (now - speakerSince > SPEAKER_HOLD_MS) {
      state.activeSpeaker = null;
    }
  }

  for (const [id, tile] of tiles) {
    const s = stats.get(id);
    if (s?.videoFlowing) lastFrameAt.set(id, now);
    const quality = s ? s.quality : 'unknown';
    state.quality[id] = quality;
    tile.update({
      videoFlowing: now - (lastFrameAt.get(id) || 0) < VIDEO_STALL_MS,
      quality,
      speaking: state.activeSpeaker === id,
    });
  }
  renderPanel();
}

// ---- what Haven is told and tells about media: sizes, speaker, modality, figures ---------

function scheduleVideoSizes() {
  clearTimeout(videoSizesTimer);
  videoSizesTimer = setTimeout(sendVideoSizes, VIDEO_SIZES_DEBOUNCE_MS);
}

/**
 * Tell Haven the size each remote video is shown at (`video_size`, one per participant whose
 * size changed since it was last sent), so that it sends the layer that fits.
 */
function sendVideoSizes() {
  if (!channel?.isOpen || !publisher) return;
  for (const id of tiles.keys()) {
    const size = state.displaySizes[id] || { width: 0, height: 0 };
    const key = `${size.width}x${size.height}`;
    if (state.sentVideoSizes[id] === key) continue;
    state.sentVideoSizes[id] = key;
    channel.send({ type: 'video_size', participant_id: id, width: size.width, height: size.height });
  }
}

/**
 * Haven's active speaker, judged from the audio levels every sender measures; it may be
 * this page's own participant. From the first one on, the page's own guess from receive
 * statistics is no longer used.
 * @param {string | null} id
 */
function onActiveSpeaker(id) {
  state.speakerSource = 'server';
  state.activeSpeaker = typeof id === 'string' ? id : null;
  for (const [participantId, tile] of tiles) {
    tile.update({ speaking: participantId === state.activeSpeaker });
  }
  selfTile?.update({ speaking: state.activeSpeaker !== null && state.activeSpeaker === state.participantId });
}

/**
 * What Haven now sends this browser. Audio only because of bandwidth gets a note; audio
 * only at the person's own request (`requested`) is already shown by the control.
 * @param {Modality} modality
 * @param {string} [reason]
 */
function onModality(modality, reason) {
  setModality(modality === 'audio_only' ? 'audio_only' : 'video', reason ?? null, true);
}

const AUDIO_ONLY_NOTE = 'Your connection is too weak for video right now, so you receive ' +
  'audio only. Video comes back by itself when your connection improves.';

/**
 * @param {Modality} modality
 * @param {string | null} reason
 * @param {boolean} tell whether to announce a change of the note
 */
function setModality(modality, reason, tell) {
  const weakBefore = state.modality === 'audio_only' && state.modalityReason !== 'requested';
  state.modality = modality;
  state.modalityReason = modality === 'audio_only' ? reason : null;
  const weak = modality === 'audio_only' && reason !== 'requested';

  const note = byId('modality-note', HTMLElement);
  note.textContent = weak ? AUDIO_ONLY_NOTE : '';
  note.hidden = !weak;
  if (tell && weak !== weakBefore) {
    announce(weak ? AUDIO_ONLY_NOTE : 'Your connection improved: video is back.');
  }
}

/** @param {MediaStatsEntry[]} entries Haven's figures per participant */
function onMediaStats(entries) {
  if (!Array.isArray(entries)) return;
  for (const entry of entries) {
    if (entry && typeof entry.participant_id === 'string') state.mediaStats[entry.participant_id] = entry;
  }
  renderPanel();
}

/** @param {string} deadline when the draining server ends the remaining sessions */
function onGoingAway(deadline) {
  const by = localTime(deadline);
  showNotice('Haven is about to restart for maintenance. ' +
    (by ? `This session can go on until ${by} at the latest; ` : '') +
    'after that, join again with the same link.');
}

// ---- therapist panel -------------------------------------------------------------------

const therapistActions = {
  /** @param {string} id */
  admit: (id) => channel?.send({ type: 'admit', participant_id: id }),
  /** @param {string} id */
  deny: (id) => channel?.send({ type: 'deny', participant_id: id }),
  /**
   * @param {string} id
   * @param {boolean} muted
   */
  mute: (id, muted) => channel?.send({ type: 'mute', participant_id: id, muted }),
  /** @param {string} id */
  remove: async (id) => {
    const person = state.participants.find((p) => p.participant_id === id);
    const who = person ? personLabel(person) : id;
    const sure = await confirmDialog({
      title: `Remove ${who}?`,
      text: 'They leave the session now and cannot come back with the same link.',
      confirm: 'Remove',
    });
    if (sure) channel?.send({ type: 'remove', participant_id: id });
  },
};

function renderPanel() {
  if (state.role !== 'therapist') return;
  renderPresentList(state.participants.map((person) => ({
    person, quality: state.quality[person.participant_id] || 'unknown',
    media: state.mediaStats[person.participant_id],
  })), therapistActions);
}

/** @param {ParticipantInfo[]} waiting */
function onWaitingList(waiting) {
  if (state.role !== 'therapist') return;

  const before = new Set(state.waiting.map((p) => p.participant_id));
  state.waiting = waiting;
  renderWaitingList(waiting, therapistActions);
  updateAloneNote();

  // Announce arrivals by name; otherwise only a shorter list is news.
  const arrived = waiting.filter((p) => !before.has(p.participant_id));
  if (arrived.length > 0) {
    const who = arrived.map(personLabel).join(', ');
    announce(`${who} ${arrived.length === 1 ? 'is' : 'are'} waiting to be admitted.`);
  } else if (waiting.length === 0 && before.size > 0) {
    announce('Nobody is waiting.');
  } else if (waiting.length < before.size) {
    announce(`${waiting.length} ${waiting.length === 1 ? 'person is' : 'people are'} still waiting.`);
  }
}

async function endSessionForEveryone() {
  const sure = await confirmDialog({
    title: 'End the session for everyone?',
    text: 'Everyone leaves the session now, including people in the waiting room, and ' +
      'nobody can join this session again.',
    confirm: 'End session',
  });
  if (sure) channel?.send({ type: 'end_session' });
}

/**
 * @param {string} id
 * @param {boolean} muted
 */
function onParticipantMuted(id, muted) {
  const person = state.participants.find((p) => p.participant_id === id);
  if (!person) return;
  person.muted = muted;
  tiles.get(id)?.update({ muted });
  renderPanel();
  announce(`${personLabel(person)} ${muted ? 'was muted by the therapist' : 'can be heard again'}.`);
}

/** @param {boolean} muted */
function onMutedByTherapist(muted) {
  state.mutedByTherapist = muted;
  updateControls();
  const sentence = muted
    ? 'Your therapist muted your microphone. Others cannot hear you for now.'
    : 'Your therapist unmuted you. Others can hear you again when your microphone is on.';
  announce(sentence);
  showNotice(muted ? sentence : '');
}

// ---- errors, lost connections, reconnection ---------------------------------------------

/** @param {ErrorMessage} error */
function onError(error) {
  state.error = { code: error.code, message: error.message };
  if (!CLOSING_ERROR_CODES.has(error.code)) {
    showNotice(`${error.message} (error code: ${error.code})`);
    return;
  }
  showError(error.code, error.message, error.opens_at);
}

/**
 * @param {string} code
 * @param {string} text
 * @param {string} [opensAt]
 */
function showError(code, text, opensAt) {
  const wasInSession = state.screen === 'call';
  teardown();

  let message = text;
  if (code === 'too_early' && opensAt) message += ` That is ${localTime(opensAt, true)} your time.`;
  byId('error-title', HTMLElement).textContent = wasInSession
    ? 'The session stopped because of an error'
    : 'You could not join the session';
  byId('error-message', HTMLElement).textContent = message;
  byId('error-code', HTMLElement).textContent = code;
  byId('error-retry-button', HTMLButtonElement).hidden = !RETRYABLE_ERRORS.has(code);
  setScreen('error');
  announce(message);
}

/** @param {number} code */
function handleClose(code) {
  clearTimeout(attemptTimer);
  if (state.screen === 'ended' || state.screen === 'error') return;
  if (leaving) return endStay('left');

  const signaling = state.connection.signaling;
  if (signaling === 'reconnecting') return scheduleReconnect();
  if (signaling === 'connecting' && !answered) {
    return showError('unreachable', `Haven could not be reached (close code ${code}). ` +
      'Check your internet connection and choose "Try again".');
  }
  // Lost while waiting or in the session: get the place back.
  startReconnecting();
}

function startReconnecting() {
  state.connection.signaling = 'reconnecting';
  state.reconnect.attempts = 0;
  timing.socketLost = performance.now();
  timing.resumedFrame = null;
  reconnectDeadline = Date.now() + graceSeconds * 1000;
  showBanner('Connection lost. Reconnecting… Your place in the session is kept for now.', false);
  scheduleReconnect();
}

/** Exponential backoff with jitter, bounded by the time Haven keeps the place. */
function scheduleReconnect() {
  const attempt = state.reconnect.attempts;
  const base = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** attempt);
  const delay = Math.round(base * (0.8 + Math.random() * 0.4));
  if (Date.now() + delay > reconnectDeadline) return giveUpReconnecting();

  state.reconnect.attempts = attempt + 1;
  clearTimeout(reconnectTimer);
  reconnectTimer = setTimeout(() => connect({ resume: true }), delay);
}

function giveUpReconnecting() {
  clearTimeout(reconnectTimer);
  state.connection.signaling = 'lost';
  const closing = channel;
  channel = null;
  closing?.close();
  teardownMedia();
  showBanner('We could not reconnect you. Check that you are online (Wi-Fi or mobile ' +
    'data), then choose "Try again".', true);
}

function retryNow() {
  clearTimeout(reconnectTimer);
  state.connection.signaling = 'reconnecting';
  state.reconnect.attempts = 0;
  reconnectDeadline = Date.now() + graceSeconds * 1000;
  showBanner('Reconnecting…', false);
  connect({ resume: true });
}

/** The socket answered again: clear the banner. */
function reconnected() {
  const was = state.connection.signaling;
  state.connection.signaling = 'open';
  clearTimeout(reconnectTimer);
  if (was === 'reconnecting' || was === 'lost') hideBanner();
}

/**
 * @param {string} text
 * @param {boolean} failed whether reconnecting has stopped and needs the person
 */
function showBanner(text, failed) {
  const banner = byId('reconnect-banner', HTMLElement);
  banner.hidden = false;
  banner.classList.toggle('failed', failed);
  // A failure needs the person: say it at once; progress is said politely.
  banner.setAttribute('role', failed ? 'alert' : 'status');
  byId('reconnect-text', HTMLElement).textContent = text;
  const retry = byId('reconnect-retry-button', HTMLButtonElement);
  retry.hidden = !failed;
  if (failed) retry.focus();
}

function hideBanner() {
  byId('reconnect-banner', HTMLElement).hidden = true;
}

// ---- leaving and the end ---------------------------------------------------------------

function leave() {
  if (!channel || leaving) {
    if (state.connection.signaling === 'lost') endStay('left');
    return;
  }
  leaving = true;
  byId('leave-button', HTMLButtonElement).disabled = true;
  byId('waiting-leave-button', HTMLButtonElement).disabled = true;
  channel.send({ type: 'leave' });

  // Haven answers with `left` and closes; do not leave the person stuck if it does not.
  setTimeout(() => {
    if (leaving && state.screen !== 'ended') endStay('left');
  }, LEAVE_TIMEOUT_MS);
}

/** What the ended page says for each reason, and whether the link may be used again. */
const ENDINGS = {
  left: { title: 'You left the session', text: 'Thank you for joining.', rejoin: true },
  session_ended: {
    title: 'The session has ended',
    text: 'Your therapist ended the session for everyone. Thank you for joining.', rejoin: false,
  },
  removed: {
    title: 'You were removed from the session',
    text: 'Your therapist removed you from this session. If you think this is a mistake, ' +
      'contact your program.', rejoin: false,
  },
  denied: {
    title: 'You were not let in',
    text: 'The therapist did not admit you to this session. If you think this is a mistake, ' +
      'contact your program. You can also try joining again.', rejoin: true,
  },
  replaced: {
    title: 'The session moved to another window',
    text: 'You opened this session again in another tab or on another device, so this page ' +
      'was disconnected. Use the newer window, or choose "Join again" to come back here.',
    rejoin: true,
  },
  connection_lost: {
    title: 'Your connection was lost',
    text: 'Check that you are online, then choose "Join again".', rejoin: true,
  },
  token_revoked: {
    title: 'Your link no longer works',
    text: 'This join link was withdrawn. Contact your program for a new one.', rejoin: false,
  },
  sponsored_client_left: {
    title: 'The session ended for you',
    text: 'The client you accompany has left the session, so your visit has ended too.',
    rejoin: false,
  },
  server_shutdown: {
    title: 'The session was interrupted',
    text: 'Haven is restarting. Choose "Join again" in a minute.', rejoin: true,
  },
};

/**
 * @param {LeaveReason | string} reason
 * @param {number} [creditedMinutes] for a client: the minutes the ledger credits for this session
 */
function endStay(reason, creditedMinutes) {
  const ending = ENDINGS[/** @type {keyof typeof ENDINGS} */ (reason)] ||
    { title: 'You are no longer in the session', text: 'Your stay in the session ended.', rejoin: true };
  const role = state.role;
  const joinedAt = state.joinedAt;
  teardown();

  state.endedReason = reason;
  byId('ended-title', HTMLElement).textContent = ending.title;
  byId('ended-reason', HTMLElement).textContent = ending.text;

  /** @type {[string, string][]} */
  const facts = sessionFacts(state.session);
  if (joinedAt !== null) {
    const minutes = Math.max(0, Math.round((Date.now() - joinedAt) / 60_000));
    facts.push(['You were in the session',
      `from ${localTime(new Date(joinedAt).toISOString())} to ${localTime(new Date().toISOString())} ` +
      `(${minutes === 0 ? 'less than a minute' : minutes === 1 ? 'about 1 minute' : `about ${minutes} minutes`}` +
      ', as this browser measured it)']);
  }
  if (role === 'client' && typeof creditedMinutes === 'number') {
    const whole = Math.floor(creditedMinutes);
    facts.push(['Credited for this session so far',
      `${whole} minute${whole === 1 ? '' : 's'} (time your audio or video reached the therapist)`]);
  }
  renderFacts(byId('ended-facts', HTMLElement), facts);
  // Without a figure from the server (for example after a lost connection), say where the
  // record is kept.
  byId('ended-credit-note', HTMLElement).hidden = role !== 'client' || typeof creditedMinutes === 'number';
  byId('rejoin-button', HTMLButtonElement).hidden = !token || !ending.rejoin;
  setScreen('ended');
  announce(`${ending.title}. ${ending.text}`);
}

/** Media of the current call only: both peer connections and the remote tiles. */
function teardownMedia() {
  clearInterval(statsTimer);
  clearTimeout(videoSizesTimer);
  for (const watch of Object.values(iceWatch)) {
    clearTimeout(watch.timer);
    watch.timer = undefined;
  }
  state.ice.restoring = false;
  state.sentVideoSizes = {};
  subscriber?.close();
  subscriber = null;
  publisher?.close();
  publisher = null;
  pcs.publish = null;
  pcs.subscribe = null;
  state.connection.publish = 'new';
  state.connection.subscribe = 'new';
  remoteTracks = new Map();
  for (const tile of tiles.values()) tile.showTracks([]);
  lastFrameAt.clear();
}

/** The call screen's content: media, tiles, participants. */
function teardownCall() {
  teardownMedia();
  for (const tile of tiles.values()) tile.remove();
  tiles.clear();
  selfTile?.remove();
  selfTile = null;
  state.participants = [];
  state.quality = {};
  state.displaySizes = {};
  state.activeSpeaker = null;
  state.speakerSource = 'stats';
  state.mediaStats = {};
  setModality('video', null, false);
  byId('grid', HTMLElement).replaceChildren();
}

/** Close the socket and both connections, and turn the camera and microphone off. */
function teardown() {
  clearTimeout(reconnectTimer);
  clearTimeout(attemptTimer);
  clearInterval(waitingTimer);
  hideBanner();
  const closing = channel;
  channel = null;
  closing?.close();
  state.connection.signaling = 'closed';
  resumeToken = null;

  teardownCall();
  stopMeter();
  stopLocalMedia(localStream);
  localStream = null;
  byId('prejoin-device-slot', HTMLElement).append(byId('device-check', HTMLElement));
}

function backToStart() {
  Object.assign(state, {
    participantId: null, role: null, therapistPresent: null, participants: [], waiting: [],
    error: null, endedReason: null, mutedByTherapist: false, joinedAt: null,
  });
  state.cameraOn = !state.audioOnly;
  state.micOn = true;
  timing.wsOpen = null;
  timing.firstRemoteFrame = null;
  othersLeft = false;
  leaving = false;
  byId('leave-button', HTMLButtonElement).disabled = false;
  byId('waiting-leave-button', HTMLButtonElement).disabled = false;
  renderWaitingList([], therapistActions);
  showNotice('');
  setScreen('prejoin');
  startPreview();
}

// ---- microphone, camera, audio only ------------------------------------------------------

function updateControls() {
  const audio = localStream ? localStream.getAudioTracks() : [];
  const video = localStream ? localStream.getVideoTracks() : [];
  for (const track of audio) track.enabled = state.micOn && !state.mutedByTherapist;

  const mic = byId('mic-button', HTMLButtonElement);
  mic.disabled = audio.length === 0 || state.mutedByTherapist;
  mic.textContent = audio.length === 0 ? 'No microphone'
    : state.mutedByTherapist ? 'Muted by your therapist'
      : state.micOn ? 'Mute microphone' : 'Unmute microphone';

  const camera = byId('camera-button', HTMLButtonElement);
  camera.disabled = state.audioOnly;
  camera.textContent = state.audioOnly ? 'Camera off (audio only)'
    : state.cameraOn && video.length > 0 ? 'Turn camera off' : 'Turn camera on';

  const audioOnly = byId('audio-only-button', HTMLButtonElement);
  audioOnly.setAttribute('aria-pressed', String(state.audioOnly));
  audioOnly.textContent = state.audioOnly ? 'Audio only: on' : 'Audio only: off';

  selfTile?.showTracks(video);
  selfTile?.update({
    videoFlowing: video.some((t) => t.readyState === 'live'),
    muted: !state.micOn || state.mutedByTherapist,
  });
}

function toggleMic() {
  if (state.mutedByTherapist || !localStream?.getAudioTracks().length) return;
  state.micOn = !state.micOn;
  updateControls();
  announce(state.micOn ? 'Microphone on.' : 'Microphone muted.');
}

/**
 * Camera off stops the device (its light goes out) and sends nothing in its place, so
 * others see initials rather than a black picture; camera on opens it again.
 * @param {boolean} on
 */
async function setCamera(on) {
  state.cameraOn = on;
  if (!on) {
    for (const track of localStream?.getVideoTracks() || []) {
      track.stop();
      localStream?.removeTrack(track);
    }
    if (pcs.publish) await replacePublishedTrack(pcs.publish, 'video', null);
    updateControls();
    return;
  }

  const track = await openCamera(chosen.videoId);
  if (!track) {
    state.cameraOn = false;
    showNotice('Your camera could not be started. Check that no other app is using it.');
    updateControls();
    return;
  }
  if (!state.cameraOn || state.audioOnly) return track.stop();
  if (!localStream) localStream = new MediaStream();
  localStream.addTrack(track);
  if (pcs.publish) await replacePublishedTrack(pcs.publish, 'video', track);
  updateControls();
}

async function toggleCamera() {
  if (state.audioOnly) return;
  const on = !(state.cameraOn && (localStream?.getVideoTracks().length || 0) > 0);
  await setCamera(on);
  announce(state.cameraOn ? 'Camera on.' : 'Camera off.');
}

/**
 * Audio only: stop sending video (the camera is stopped, the sender sends nothing) and stop
 * showing incoming video. Haven is told (`audio_only`) and stops sending video to this
 * browser; every remote video also reports 0 x 0 (`video_size`).
 */
async function toggleAudioOnly() {
  state.audioOnly = !state.audioOnly;
  if (state.screen === 'call') channel?.send({ type: 'audio_only', enabled: state.audioOnly });
  if (state.audioOnly) {
    await setCamera(false);
  } else {
    await setCamera(true);
  }
  showRemoteTracks(remoteTracks);
  updateControls();
  announce(state.audioOnly
    ? 'Audio only is on. Your camera is off and video of others is hidden.'
    : 'Audio only is off.');
}

// ---- keyboard shortcuts ------------------------------------------------------------------

function readShortcutSetting() {
  try {
    return window.localStorage.getItem('haven.shortcuts') !== 'off';
  } catch {
    return true;
  }
}

/** @param {KeyboardEvent} event */
function onShortcut(event) {
  if (!shortcutsEnabled || state.screen !== 'call') return;
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLSelectElement ||
    target instanceof HTMLTextAreaElement) return;
  if (document.querySelector('dialog[open]')) return;

  const key = event.key.toLowerCase();
  if (key === 'm') toggleMic();
  else if (key === 'v') toggleCamera();
  else if (key === 'a') toggleAudioOnly();
  else if (key === '?') openHelp();
  else return;
  event.preventDefault();
}

function openHelp() {
  const dialog = byId('help-dialog', HTMLDialogElement);
  byId('shortcuts-enabled', HTMLInputElement).checked = shortcutsEnabled;
  dialog.showModal();
  byId('help-close', HTMLButtonElement).focus();
}

// ---- start -----------------------------------------------------------------------------

byId('join-button', HTMLButtonElement).addEventListener('click', () => {
  state.cameraOn = !state.audioOnly && (localStream?.getVideoTracks().length || 0) > 0;
  connect({ resume: false });
});
byId('join-no-media-button', HTMLButtonElement).addEventListener('click', () => {
  announce('Joining without camera or microphone. Others will not see or hear you.');
  state.cameraOn = false;
  connect({ resume: false });
});
byId('retry-media-button', HTMLButtonElement).addEventListener('click', startPreview);
byId('audio-only-check', HTMLInputElement).addEventListener('change', (event) => {
  state.audioOnly = event.target instanceof HTMLInputElement && event.target.checked;
  state.cameraOn = !state.audioOnly;
  startPreview();
});
byId('camera-select', HTMLSelectElement).addEventListener('change', (event) => {
  if (event.target instanceof HTMLSelectElement) chosen.videoId = event.target.value;
  startPreview();
});
byId('mic-select', HTMLSelectElement).addEventListener('change', (event) => {
  if (event.target instanceof HTMLSelectElement) chosen.audioId = event.target.value;
  startPreview();
});

byId('waiting-leave-button', HTMLButtonElement).addEventListener('click', leave);
byId('leave-button', HTMLButtonElement).addEventListener('click', leave);
byId('rejoin-button', HTMLButtonElement).addEventListener('click', backToStart);
byId('error-retry-button', HTMLButtonElement).addEventListener('click', backToStart);
byId('reconnect-retry-button', HTMLButtonElement).addEventListener('click', retryNow);
byId('end-session-button', HTMLButtonElement).addEventListener('click', endSessionForEveryone);

byId('mic-button', HTMLButtonElement).addEventListener('click', toggleMic);
byId('camera-button', HTMLButtonElement).addEventListener('click', toggleCamera);
byId('audio-only-button', HTMLButtonElement).addEventListener('click', toggleAudioOnly);
byId('help-button', HTMLButtonElement).addEventListener('click', openHelp);
byId('help-close', HTMLButtonElement).addEventListener('click', () => {
  byId('help-dialog', HTMLDialogElement).close();
  byId('help-button', HTMLButtonElement).focus();
});
byId('shortcuts-enabled', HTMLInputElement).addEventListener('change', (event) => {
  shortcutsEnabled = event.target instanceof HTMLInputElement && event.target.checked;
  try {
    window.localStorage.setItem('haven.shortcuts', shortcutsEnabled ? 'on' : 'off');
  } catch {
    // Private browsing may refuse storage; the choice then lasts for this page only.
  }
});
document.addEventListener('keydown', onShortcut);

// The level meter's audio context may need a user gesture to run.
document.addEventListener('pointerdown', () => meter?.resume());
document.addEventListener('keydown', () => meter?.resume());

// Back online: do not wait for the next scheduled attempt; in a call whose socket held,
// restart ICE, since the device's address has probably changed.
window.addEventListener('online', () => {
  if (state.connection.signaling === 'reconnecting') {
    clearTimeout(reconnectTimer);
    connect({ resume: true });
  } else {
    onNetworkChange();
  }
});
// Wi-Fi to mobile data and back, where the browser says so (Network Information API).
/** @type {EventTarget | undefined} */
const networkInfo = /** @type {{connection?: EventTarget}} */ (navigator).connection;
networkInfo?.addEventListener('change', onNetworkChange);

// Closing the tab closes the socket cleanly, so Haven knows at once; it holds the stay for
// the resume grace period (a reload continues it), then ends it as `connection_lost`.
window.addEventListener('pagehide', () => {
  const closing = channel;
  channel = null;
  closing?.close();
});

if (token) {
  if (preview?.session) state.session = preview.session;
  showSession(state.session);
  startPreview();
} else {
  byId('error-message', HTMLElement).textContent =
    'This page needs the join link your program sent you. Open that link again.';
  byId('error-code', HTMLElement).textContent = 'missing_link';
  byId('error-retry-button', HTMLButtonElement).hidden = true;
  setScreen('error');
}
