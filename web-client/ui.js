// @ts-check
// The page: screens, the participant grid, the therapist's waiting list, announcements.
// Everything is built with DOM calls and classes, never HTML strings, so the strict CSP
// holds and no participant id can ever be read as markup.

/** @typedef {import('./signaling.js').Role} Role */
/** @typedef {import('./signaling.js').ParticipantInfo} ParticipantInfo */

/** @typedef {'prejoin' | 'waiting' | 'call' | 'ended' | 'error'} Screen */

/**
 * The element with this id, of the expected type; a missing one is a bug in index.html.
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new () => T} type
 * @returns {T}
 */
export function byId(id, type) {
  const element = document.getElementById(id);
  if (!(element instanceof type)) throw new Error(`index.html has no #${id} of that type`);
  return element;
}

const SCREENS = /** @type {const} */ (['prejoin', 'waiting', 'call', 'ended', 'error']);

/**
 * Show one screen and move focus to its heading, so keyboard and screen-reader users
 * start from the top of what changed.
 * @param {Screen} screen
 */
export function showScreen(screen) {
  for (const name of SCREENS) byId(`screen-${name}`, HTMLElement).hidden = name !== screen;

  const heading = document.querySelector(`#screen-${screen} h2`);
  if (heading instanceof HTMLElement) heading.focus();
}

/**
 * Say something through the polite live region. Clearing first makes a repeated sentence
 * be announced again.
 * @param {string} sentence
 */
export function announce(sentence) {
  const region = byId('announcer', HTMLElement);
  region.textContent = '';
  setTimeout(() => { region.textContent = sentence; }, 50);
}

/**
 * A message that does not change the screen (an error Haven sent while the socket stays
 * open, or a media problem). An empty string hides it.
 * @param {string} text
 */
export function showNotice(text) {
  const notice = byId('notice', HTMLElement);
  notice.textContent = text;
  notice.hidden = text === '';
}

/** @param {Role | string} role */
export function roleLabel(role) {
  switch (role) {
    case 'therapist': return 'Therapist';
    case 'client': return 'Client';
    case 'sponsor': return 'Sponsor';
    default: return 'Participant';
  }
}

/** @param {HTMLVideoElement} video */
function play(video) {
  // Autoplay may be refused before the page had a click; the Join click normally counts.
  video.play().catch(() => {});
}

/**
 * Show a stream (or nothing) in a video element, and mark whether it has any video.
 * @param {HTMLVideoElement} video
 * @param {MediaStream | null} stream
 */
export function attachStream(video, stream) {
  video.srcObject = stream;
  const hasVideo = !!stream && stream.getVideoTracks().length > 0;
  video.closest('.media')?.classList.toggle('no-video', !hasVideo);
  if (stream) play(video);
}

/**
 * One participant's tile: a video element that also plays their audio, and a caption.
 */
export class Tile {
  /**
   * @param {string} participantId
   * @param {Role} role
   * @param {{self: boolean}} options
   */
  constructor(participantId, role, options) {
    this.participantId = participantId;
    /** Ids of the tracks now shown, to skip needless reloads of the element. */
    this.trackIds = '';

    this.element = document.createElement('figure');
    this.element.className = options.self ? 'tile self' : 'tile';
    this.element.setAttribute('role', 'listitem');
    this.element.dataset.participantId = participantId;

    const media = document.createElement('div');
    media.className = 'media no-video';

    this.video = document.createElement('video');
    this.video.autoplay = true;
    this.video.playsInline = true;
    // The self view must never play back one's own microphone.
    this.video.muted = options.self;
    if (options.self) this.video.classList.add('mirror');

    const placeholder = document.createElement('p');
    placeholder.className = 'placeholder';
    placeholder.textContent = options.self ? 'Your camera is off' : 'No video yet';
    media.append(this.video, placeholder);

    const caption = document.createElement('figcaption');
    const who = `${roleLabel(role)} ${participantId}`;
    caption.textContent = options.self ? `You (${who})` : who;
    this.element.setAttribute('aria-label', caption.textContent);

    this.element.append(media, caption);
  }

  /** @param {MediaStreamTrack[]} tracks */
  showTracks(tracks) {
    const ids = tracks.map((t) => t.id).sort().join(' ');
    if (ids === this.trackIds) return;

    this.trackIds = ids;
    attachStream(this.video, tracks.length > 0 ? new MediaStream(tracks) : null);
  }
}

/**
 * The therapist's waiting list, each entry with its own Admit button.
 * @param {ParticipantInfo[]} waiting
 * @param {(participantId: string, button: HTMLButtonElement) => void} onAdmit
 */
export function renderWaitingList(waiting, onAdmit) {
  const list = byId('waiting-list', HTMLUListElement);
  byId('waiting-empty', HTMLElement).hidden = waiting.length > 0;
  byId('waiting-count', HTMLElement).textContent = String(waiting.length);

  const items = waiting.map((person) => {
    const item = document.createElement('li');
    item.className = 'waiting-entry';
    item.dataset.participantId = person.participant_id;

    const label = document.createElement('span');
    label.textContent = `${roleLabel(person.role)} ${person.participant_id}`;

    const admit = document.createElement('button');
    admit.type = 'button';
    admit.textContent = 'Admit';
    admit.setAttribute('aria-label', `Admit ${roleLabel(person.role)} ${person.participant_id}`);
    admit.addEventListener('click', () => onAdmit(person.participant_id, admit));

    item.append(label, admit);
    return item;
  });
  list.replaceChildren(...items);
}
