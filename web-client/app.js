// @ts-check
// Haven's web client: the flow from the join link to the end of a session.
//
//   pre-join (camera check) -> join -> waiting room -> admitted: publish + subscribe -> ended
//
// signaling.js speaks the protocol, media.js owns the peer connections, ui.js the page.

import { CLOSING_ERROR_CODES, SignalingChannel, signalingUrl } from './signaling.js';
import {
  SubscribeConnection, applyPublishAnswer, createPublishConnection, createPublishOffer,
  openLocalMedia, stopLocalMedia,
} from './media.js';
import {
  Tile, announce, attachStream, byId, renderWaitingList, roleLabel, showNotice, showScreen,
} from './ui.js';

/** @typedef {import('./signaling.js').Role} Role */
/** @typedef {import('./signaling.js').LeaveReason} LeaveReason */
/** @typedef {import('./signaling.js').SessionInfo} SessionInfo */
/** @typedef {import('./signaling.js').ParticipantInfo} ParticipantInfo */
/** @typedef {import('./signaling.js').ServerMessage} ServerMessage */
/** @typedef {import('./signaling.js').ErrorMessage} ErrorMessage */
/** @typedef {import('./ui.js').Screen} Screen */

/** Errors worth a "Try again": the same link may work a little later. */
const RETRYABLE_ERRORS = new Set(['too_early', 'internal', 'room_full']);

/** How long Leave waits for Haven's `left` before the page ends the stay by itself. */
const LEAVE_TIMEOUT_MS = 5000;

/** What the page knows. Tests read it through `window.haven.state`. */
const state = {
  screen: /** @type {Screen} */ ('prejoin'),
  participantId: /** @type {string | null} */ (null),
  role: /** @type {Role | null} */ (null),
  session: /** @type {SessionInfo | null} */ (null),
  therapistPresent: /** @type {boolean | null} */ (null),
  /** Everyone else in the room. */
  participants: /** @type {ParticipantInfo[]} */ ([]),
  /** The waiting room, as a therapist sees it. */
  waiting: /** @type {ParticipantInfo[]} */ ([]),
  micOn: true,
  cameraOn: true,
  connection: { publish: 'new', subscribe: 'new' },
  error: /** @type {{code: string, message: string} | null} */ (null),
  endedReason: /** @type {string | null} */ (null),
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
};

Object.assign(window, { haven: { state, pcs, timing } });

// The token is a credential: keep it in memory only and out of the address bar, history
// and any bookmark. A reload therefore needs the original link again.
const token = takeTokenFromFragment();

/** @type {MediaStream | null} */
let localStream = null;
/** @type {SignalingChannel | null} */
let channel = null;
/** @type {SubscribeConnection | null} */
let subscriber = null;
/** @type {Tile | null} */
let selfTile = null;
/** Remote tiles by participant id. @type {Map<string, Tile>} */
const tiles = new Map();
/** The latest remote tracks by participant, kept for tiles created after their media. */
let remoteTracks = /** @type {Map<string, MediaStreamTrack[]>} */ (new Map());
/** Publish candidates gathered before `publish_offer` was sent. @type {string[] | null} */
let earlyPublishCandidates = [];
let leaving = false;

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

// ---- pre-join --------------------------------------------------------------------------

/**
 * @param {string} text
 * @param {{join: boolean, fallback: boolean}} buttons which choices to offer
 */
function setPrejoin(text, buttons) {
  byId('prejoin-status', HTMLElement).textContent = text;
  byId('join-button', HTMLButtonElement).disabled = !buttons.join;
  byId('join-no-camera-button', HTMLButtonElement).hidden = !buttons.fallback;
  byId('retry-media-button', HTMLButtonElement).hidden = !buttons.fallback;
}

async function startPreview() {
  setPrejoin('Starting your camera and microphone…', { join: false, fallback: false });
  stopLocalMedia(localStream);

  const media = await openLocalMedia({ video: true });
  localStream = media.stream;
  attachStream(byId('preview-video', HTMLVideoElement), localStream);

  if (media.problem) setPrejoin(media.problem, { join: false, fallback: true });
  else setPrejoin('Your camera and microphone are ready.', { join: true, fallback: false });
}

async function joinWithoutCamera() {
  setPrejoin('Starting your microphone…', { join: false, fallback: false });
  stopLocalMedia(localStream);

  const media = await openLocalMedia({ video: false });
  localStream = media.stream;
  attachStream(byId('preview-video', HTMLVideoElement), localStream);
  if (!localStream) {
    announce('Joining without camera or microphone. Others will not see or hear you.');
  }
  connect();
}

function connect() {
  if (!token) return;

  setPrejoin('Connecting to your session…', { join: false, fallback: false });
  leaving = false;
  state.error = null;
  showNotice('');

  const opened = new SignalingChannel(signalingUrl(window.location), {
    onOpen: () => {
      timing.wsOpen = performance.now();
      opened.send({ type: 'join', token });
    },
    onMessage: (message) => {
      if (channel === opened) handleMessage(message);
    },
    onClose: (code) => {
      if (channel === opened) handleClose(code);
    },
  });
  channel = opened;
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
    case 'publish_answer': return onPublishAnswer(message.sdp);
    case 'subscribe_offer': return subscriber?.handleOffer(message);
    case 'left': return endStay(leaveSentence(message.reason));
    case 'pong': return;
    case 'error': return onError(message);
    default:
      console.warn('haven: ignored message type', /** @type {{type: string}} */ (message).type);
  }
}

/** @param {SessionInfo | undefined} session */
function showSession(session) {
  if (session) state.session = session;
  const label = state.session ? `Session ${state.session.id} (${state.session.kind})` : '';
  byId('session-label', HTMLElement).textContent = label;
}

/**
 * @param {SessionInfo} session
 * @param {boolean} therapistPresent
 */
function onWaiting(session, therapistPresent) {
  showSession(session);
  const changed = state.therapistPresent !== therapistPresent;
  state.therapistPresent = therapistPresent;

  const status = therapistPresent
    ? 'Your therapist is here and will let you in shortly.'
    : 'Your therapist has not arrived yet. Please keep this page open.';
  byId('waiting-status', HTMLElement).textContent = status;

  if (state.screen !== 'waiting') {
    setScreen('waiting');
    attachStream(byId('waiting-video', HTMLVideoElement), localStream);
    announce(`You are in the waiting room. ${status}`);
  } else if (changed) {
    announce(status);
  }
}

/** @param {import('./signaling.js').JoinedMessage} joined */
function onJoined(joined) {
  state.participantId = joined.participant_id;
  state.role = joined.role;
  state.participants = [];
  showSession(joined.session);
  setScreen('call');

  // The self view shows video only: the microphone must never play back here.
  selfTile = new Tile(joined.participant_id, joined.role, { self: true });
  selfTile.showTracks(localStream ? localStream.getVideoTracks() : []);
  byId('grid', HTMLElement).replaceChildren(selfTile.element);

  for (const person of joined.participants || []) addParticipant(person, false);
  byId('waiting-panel', HTMLElement).hidden = joined.role !== 'therapist';
  updateControls();

  const others = state.participants.length;
  announce(`You joined the session. ${others === 1 ? '1 other person is' : `${others} other people are`} here.`);
  startMedia();
}

function startMedia() {
  const signaling = channel;
  if (!signaling) return;

  subscriber = new SubscribeConnection({
    onCandidate: (candidate) => signaling.send({ type: 'candidate', pc: 'subscribe', candidate }),
    onAnswer: (negotiation, sdp) => signaling.send({ type: 'subscribe_answer', negotiation, sdp }),
    onTracks: showRemoteTracks,
    onError: (error) => {
      console.error('haven: subscribe negotiation failed', error);
      showNotice('Incoming audio and video could not be set up. Leave and join again.');
    },
  });
  pcs.subscribe = subscriber.pc;
  watchConnection(subscriber.pc, 'subscribe');

  earlyPublishCandidates = [];
  const publish = createPublishConnection(localStream, (candidate) => {
    if (earlyPublishCandidates) earlyPublishCandidates.push(candidate);
    else signaling.send({ type: 'candidate', pc: 'publish', candidate });
  });
  pcs.publish = publish;
  watchConnection(publish, 'publish');

  createPublishOffer(publish).then((sdp) => {
    signaling.send({ type: 'publish_offer', sdp });
    for (const candidate of earlyPublishCandidates || []) {
      signaling.send({ type: 'candidate', pc: 'publish', candidate });
    }
    earlyPublishCandidates = null;
  }).catch((error) => {
    console.error('haven: publish offer failed', error);
    showNotice('Your camera and microphone could not be sent. Leave and join again.');
  });
}

/**
 * @param {RTCPeerConnection} pc
 * @param {'publish' | 'subscribe'} name
 */
function watchConnection(pc, name) {
  pc.addEventListener('connectionstatechange', () => {
    state.connection[name] = pc.connectionState;
    if (pc.connectionState === 'failed') {
      showNotice('The media connection failed. Check your network, then leave and join again.');
    }
  });
}

/** @param {string} sdp */
function onPublishAnswer(sdp) {
  if (!pcs.publish) return;
  applyPublishAnswer(pcs.publish, sdp).catch((error) => {
    console.error('haven: publish answer rejected', error);
    showNotice('Your camera and microphone could not be sent. Leave and join again.');
  });
}

/** @param {Map<string, MediaStreamTrack[]>} byParticipant */
function showRemoteTracks(byParticipant) {
  remoteTracks = byParticipant;
  for (const [participantId, tile] of tiles) {
    tile.showTracks(byParticipant.get(participantId) || []);
    if (byParticipant.get(participantId)?.some((t) => t.kind === 'video')) {
      watchFirstFrame(tile.video);
    }
  }
}

/**
 * Note when the first remote video frame is ready, for the set-up time figure.
 * @param {HTMLVideoElement} video
 */
function watchFirstFrame(video) {
  if (timing.firstRemoteFrame !== null) return;
  const mark = () => {
    if (timing.firstRemoteFrame === null) timing.firstRemoteFrame = performance.now();
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

  state.participants.push({ participant_id: id, role: person.role });
  const tile = new Tile(id, person.role, { self: false });
  tiles.set(id, tile);
  byId('grid', HTMLElement).append(tile.element);
  showRemoteTracks(remoteTracks);

  if (isNews) announce(`${roleLabel(person.role)} ${id} joined.`);
}

/**
 * @param {string} id
 * @param {LeaveReason} reason
 */
function removeParticipant(id, reason) {
  const person = state.participants.find((p) => p.participant_id === id);
  state.participants = state.participants.filter((p) => p.participant_id !== id);
  tiles.get(id)?.element.remove();
  tiles.delete(id);

  const why = {
    left: 'left', connection_lost: 'lost their connection', removed: 'was removed',
    session_ended: 'left because the session ended',
    server_shutdown: 'left because the server restarted',
  }[reason] || 'left';
  announce(`${roleLabel(person ? person.role : '')} ${id} ${why}.`);
}

/** @param {ParticipantInfo[]} waiting */
function onWaitingList(waiting) {
  if (state.role !== 'therapist') return;

  const before = new Set(state.waiting.map((p) => p.participant_id));
  state.waiting = waiting;
  renderWaitingList(waiting, admit);

  // Announce arrivals by name; otherwise only a shorter list is news.
  const arrived = waiting.filter((p) => !before.has(p.participant_id));
  if (arrived.length > 0) {
    const who = arrived.map((p) => `${roleLabel(p.role)} ${p.participant_id}`).join(', ');
    announce(`${who} ${arrived.length === 1 ? 'is' : 'are'} waiting to be admitted.`);
  } else if (waiting.length < before.size) {
    announce(`${waiting.length} ${waiting.length === 1 ? 'person is' : 'people are'} waiting.`);
  }
}

/**
 * @param {string} participantId
 * @param {HTMLButtonElement} button
 */
function admit(participantId, button) {
  button.disabled = true;
  button.textContent = 'Admitting…';
  channel?.send({ type: 'admit', participant_id: participantId });
}

/** @param {ErrorMessage} error */
function onError(error) {
  state.error = { code: error.code, message: error.message };
  if (!CLOSING_ERROR_CODES.has(error.code)) {
    showNotice(`${error.message} (error code: ${error.code})`);
    if (error.code === 'unknown_participant') renderWaitingList(state.waiting, admit);
    return;
  }

  const wasInSession = state.screen === 'call';
  teardown();

  let message = error.message;
  if (error.code === 'too_early' && error.opens_at) {
    message += ` That is ${new Date(error.opens_at).toLocaleString()} your time.`;
  }
  byId('error-title', HTMLElement).textContent = wasInSession
    ? 'The session stopped because of an error'
    : 'You could not join the session';
  byId('error-message', HTMLElement).textContent = message;
  byId('error-code', HTMLElement).textContent = error.code;
  byId('error-retry-button', HTMLButtonElement).hidden = !RETRYABLE_ERRORS.has(error.code);
  setScreen('error');
  announce(message);
}

/** @param {number} code */
function handleClose(code) {
  if (state.screen === 'ended' || state.screen === 'error') return;

  if (leaving) endStay('You left the session.');
  else endStay(`The connection to the session was lost (close code ${code}). ` +
    'Choose "Join again" to go back in.');
}

/** @param {LeaveReason | string} reason */
function leaveSentence(reason) {
  switch (reason) {
    case 'left': return 'You left the session.';
    case 'connection_lost': return 'Your connection was lost. Choose "Join again" to go back in.';
    case 'removed': return 'Your therapist removed you from the session.';
    case 'session_ended': return 'The session has ended. Thank you for joining.';
    case 'server_shutdown':
      return 'The server is restarting. Choose "Join again" in a moment to go back in.';
    default: return 'Your stay in the session ended.';
  }
}

// ---- leaving and the end ---------------------------------------------------------------

function leave() {
  if (!channel || leaving) return;
  leaving = true;
  byId('leave-button', HTMLButtonElement).disabled = true;
  byId('waiting-leave-button', HTMLButtonElement).disabled = true;
  channel.send({ type: 'leave' });

  // Haven answers with `left` and closes; do not leave the person stuck if it does not.
  setTimeout(() => {
    if (leaving && state.screen !== 'ended') endStay('You left the session.');
  }, LEAVE_TIMEOUT_MS);
}

/** @param {string} sentence */
function endStay(sentence) {
  teardown();
  state.endedReason = sentence;
  byId('ended-reason', HTMLElement).textContent = sentence;
  byId('rejoin-button', HTMLButtonElement).hidden = !token;
  setScreen('ended');
  announce(sentence);
}

/** Close the socket and both connections, and turn the camera and microphone off. */
function teardown() {
  const closing = channel;
  channel = null;
  closing?.close();

  subscriber?.close();
  subscriber = null;
  pcs.publish?.close();
  pcs.publish = null;
  pcs.subscribe = null;

  stopLocalMedia(localStream);
  localStream = null;
  tiles.clear();
  remoteTracks = new Map();
  selfTile = null;
  byId('grid', HTMLElement).replaceChildren();
}

function backToStart() {
  Object.assign(state, {
    participantId: null, role: null, therapistPresent: null, participants: [], waiting: [],
    error: null, endedReason: null, micOn: true, cameraOn: true,
  });
  state.connection = { publish: 'new', subscribe: 'new' };
  timing.wsOpen = null;
  timing.firstRemoteFrame = null;
  byId('leave-button', HTMLButtonElement).disabled = false;
  byId('waiting-leave-button', HTMLButtonElement).disabled = false;
  renderWaitingList([], admit);
  setScreen('prejoin');
  startPreview();
}

// ---- microphone and camera -------------------------------------------------------------

function updateControls() {
  const audio = localStream ? localStream.getAudioTracks() : [];
  const video = localStream ? localStream.getVideoTracks() : [];
  for (const track of audio) track.enabled = state.micOn;
  for (const track of video) track.enabled = state.cameraOn;

  const mic = byId('mic-button', HTMLButtonElement);
  mic.disabled = audio.length === 0;
  mic.textContent = audio.length === 0 ? 'No microphone'
    : state.micOn ? 'Mute microphone' : 'Unmute microphone';

  const camera = byId('camera-button', HTMLButtonElement);
  camera.disabled = video.length === 0;
  camera.textContent = video.length === 0 ? 'No camera'
    : state.cameraOn ? 'Turn camera off' : 'Turn camera on';

  selfTile?.video.closest('.media')?.classList.toggle('no-video', !state.cameraOn || !video.length);
}

// ---- start -----------------------------------------------------------------------------

byId('join-button', HTMLButtonElement).addEventListener('click', connect);
byId('join-no-camera-button', HTMLButtonElement).addEventListener('click', joinWithoutCamera);
byId('retry-media-button', HTMLButtonElement).addEventListener('click', startPreview);
byId('waiting-leave-button', HTMLButtonElement).addEventListener('click', leave);
byId('leave-button', HTMLButtonElement).addEventListener('click', leave);
byId('rejoin-button', HTMLButtonElement).addEventListener('click', backToStart);
byId('error-retry-button', HTMLButtonElement).addEventListener('click', backToStart);

byId('mic-button', HTMLButtonElement).addEventListener('click', () => {
  state.micOn = !state.micOn;
  updateControls();
  announce(state.micOn ? 'Microphone on.' : 'Microphone muted.');
});
byId('camera-button', HTMLButtonElement).addEventListener('click', () => {
  state.cameraOn = !state.cameraOn;
  updateControls();
  announce(state.cameraOn ? 'Camera on.' : 'Camera off.');
});

// Closing the tab ends the stay on Haven's side too; close cleanly so it knows at once.
window.addEventListener('pagehide', () => channel?.close());

if (token) {
  startPreview();
} else {
  byId('error-message', HTMLElement).textContent =
    'This page needs the join link your program sent you. Open that link again.';
  byId('error-code', HTMLElement).textContent = 'missing_link';
  byId('error-retry-button', HTMLButtonElement).hidden = true;
  setScreen('error');
}
