// @ts-check
// The page: screens, tiles, the therapist's panel, dialogs, announcements.
// Everything is built with DOM calls and classes, never HTML strings, so the strict CSP
// holds and no participant id or name can ever be read as markup.

/** @typedef {import('./signaling.js').Role} Role */
/** @typedef {import('./signaling.js').ParticipantInfo} ParticipantInfo */
/** @typedef {import('./signaling.js').SessionInfo} SessionInfo */
/** @typedef {import('./stats.js').Quality} Quality */
/** @typedef {import('./signaling.js').MediaStatsEntry} MediaStatsEntry */

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

  const heading = document.querySelector(`#screen-${screen} h1`);
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

/** @param {Role | string | null} role */
export function roleLabel(role) {
  switch (role) {
    case 'therapist': return 'Therapist';
    case 'client': return 'Client';
    case 'sponsor': return 'Sponsor';
    default: return 'Participant';
  }
}

/**
 * How a person is named on screen: their display name when the token carried one, else
 * their role and pseudonymous id.
 * @param {{participant_id: string, role: Role | string, display_name?: string | null}} person
 */
export function personLabel(person) {
  return person.display_name
    ? `${person.display_name} (${roleLabel(person.role).toLowerCase()})`
    : `${roleLabel(person.role)} ${person.participant_id}`;
}

/**
 * Up to two letters (from a name) or three characters (from a pseudonymous id), shown on
 * a tile whose camera is off.
 * @param {{participant_id: string, display_name?: string | null}} person
 */
export function initials(person) {
  const name = (person.display_name || '').trim();
  if (name) {
    const words = name.split(/\s+/).filter(Boolean);
    const first = [...words[0]][0] || '';
    const last = words.length > 1 ? [...words[words.length - 1]][0] || '' : '';
    return (first + last).toUpperCase();
  }
  return person.participant_id.replace(/[^\p{L}\p{N}]/gu, '').slice(0, 3).toUpperCase();
}

/**
 * A date as the person's own clock shows it.
 * @param {string} iso
 * @param {boolean} [withDay]
 */
export function localTime(iso, withDay = false) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '';
  return withDay
    ? date.toLocaleString(undefined, { weekday: 'long', day: 'numeric', month: 'long', hour: 'numeric', minute: '2-digit' })
    : date.toLocaleTimeString(undefined, { hour: 'numeric', minute: '2-digit' });
}

/** @param {string} kind */
export function kindLabel(kind) {
  switch (kind) {
    case 'individual': return 'One-on-one session';
    case 'group': return 'Group session';
    case 'family': return 'Family session';
    default: return 'Session';
  }
}

/**
 * Fill a definition list with facts (term, value); empty values are left out.
 * @param {HTMLElement} list
 * @param {[string, string][]} facts
 */
export function renderFacts(list, facts) {
  const nodes = [];
  for (const [term, value] of facts) {
    if (!value) continue;
    const dt = document.createElement('dt');
    dt.textContent = term;
    const dd = document.createElement('dd');
    dd.textContent = value;
    nodes.push(dt, dd);
  }
  list.replaceChildren(...nodes);
  list.hidden = nodes.length === 0;
}

/**
 * The session's facts for the pre-join and waiting screens.
 * @param {SessionInfo | null} session
 * @returns {[string, string][]}
 */
export function sessionFacts(session) {
  if (!session) return [];
  const range = session.starts_at && session.ends_at
    ? `${localTime(session.starts_at, true)} to ${localTime(session.ends_at)}`
    : '';
  return [['Session', `${kindLabel(session.kind)}, ${session.id}`], ['Scheduled', range]];
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
  const hasVideo = !!stream && stream.getVideoTracks().some((t) => t.readyState === 'live');
  video.closest('.media')?.classList.toggle('no-video', !hasVideo);
  if (stream) play(video);
}

/**
 * The size, in device pixels, at which a video element is shown: the layer a server should
 * send it. `object-fit: cover` fills the element's box, so the box is what is shown. A
 * hidden or detached element, or one whose video is not wanted (audio only), gets 0 x 0.
 *
 * A tile showing initials because no frame has arrived yet still reports its box: the
 * video is wanted there, and reporting 0 x 0 would tell the server to send nothing, so no
 * frame would ever arrive.
 * @param {HTMLVideoElement} video
 * @param {boolean} [wanted] false while the person chose audio only
 * @returns {{width: number, height: number}}
 */
export function displayedSize(video, wanted = true) {
  if (!wanted || !video.isConnected || video.closest('[hidden]')) {
    return { width: 0, height: 0 };
  }
  const box = video.getBoundingClientRect();
  const scale = window.devicePixelRatio || 1;
  return { width: Math.round(box.width * scale), height: Math.round(box.height * scale) };
}

/**
 * One participant's tile: a video element that also plays their audio, initials when no
 * video shows, a caption with their name and markers (muted, weak connection).
 */
export class Tile {
  /**
   * @param {ParticipantInfo} person
   * @param {{self: boolean, onSize: (size: {width: number, height: number}) => void}} options
   */
  constructor(person, options) {
    this.person = person;
    this.self = options.self;
    /** Ids of the tracks now shown, to skip needless reloads of the element. */
    this.trackIds = '';
    this.hasVideoTrack = false;
    this.videoFlowing = false;
    this.muted = false;
    /** @type {Quality} */
    this.quality = 'unknown';
    this.speaking = false;

    this.element = document.createElement('figure');
    this.element.className = options.self ? 'tile self' : 'tile';
    // A figure, named by its caption: ARIA allows no list role on it (axe: aria-allowed-role).
    this.element.dataset.participantId = person.participant_id;

    this.media = document.createElement('div');
    this.media.className = 'media no-video';

    this.video = document.createElement('video');
    this.video.autoplay = true;
    this.video.playsInline = true;
    // The self view must never play back one's own microphone.
    this.video.muted = options.self;
    if (options.self) this.video.classList.add('mirror');

    this.avatar = document.createElement('p');
    this.avatar.className = 'placeholder avatar';
    this.avatar.setAttribute('aria-hidden', 'true');

    this.markers = document.createElement('p');
    this.markers.className = 'markers';
    this.media.append(this.video, this.avatar, this.markers);

    this.caption = document.createElement('figcaption');
    this.element.append(this.media, this.caption);
    this.rename(person);

    // Each video reports the size it is shown at (see displayedSize): when its box changes,
    // and when its video stops or starts being wanted (audio only).
    this.onSize = options.onSize;
    this.wantsVideo = true;
    this.lastSize = '';
    this.resize = new ResizeObserver(() => this.reportSize());
    this.resize.observe(this.video);
  }

  /** Tell `onSize` the displayed size, when it changed since the last report. */
  reportSize() {
    const size = displayedSize(this.video, this.wantsVideo);
    const key = `${size.width}x${size.height}`;
    if (key === this.lastSize) return;
    this.lastSize = key;
    this.onSize(size);
  }

  /** @param {boolean} wanted false while the person chose audio only */
  setWantsVideo(wanted) {
    this.wantsVideo = wanted;
    this.reportSize();
  }

  /** @param {ParticipantInfo} person */
  rename(person) {
    this.person = person;
    this.avatar.textContent = initials(person);
    this.caption.textContent = !this.self ? personLabel(person)
      : person.display_name ? `You: ${person.display_name}`
        : `You (${roleLabel(person.role)} ${person.participant_id})`;
    this.render();
  }

  /** @param {MediaStreamTrack[]} tracks */
  showTracks(tracks) {
    this.hasVideoTrack = tracks.some((t) => t.kind === 'video' && t.readyState === 'live');
    const ids = tracks.map((t) => t.id).sort().join(' ');
    if (ids !== this.trackIds) {
      this.trackIds = ids;
      this.video.srcObject = tracks.length > 0 ? new MediaStream(tracks) : null;
      if (tracks.length > 0) play(this.video);
    }
    this.render();
  }

  /**
   * @param {{videoFlowing?: boolean, muted?: boolean, quality?: Quality, speaking?: boolean}} change
   */
  update(change) {
    Object.assign(this, Object.fromEntries(Object.entries(change).filter(([, v]) => v !== undefined)));
    this.render();
  }

  render() {
    const showVideo = this.hasVideoTrack && this.videoFlowing;
    this.media.classList.toggle('no-video', !showVideo);
    this.element.classList.toggle('speaking', this.speaking);
    this.element.classList.toggle('poor', this.quality === 'poor');

    /** @type {HTMLElement[]} */
    const badges = [];
    const words = [];
    if (this.muted) {
      badges.push(badge('Muted', 'badge muted'));
      words.push('muted');
    }
    if (this.quality === 'poor') {
      badges.push(badge('Weak connection', 'badge warn'));
      words.push('weak connection');
    }
    if (!showVideo) words.push('camera off');
    if (this.speaking) words.push('speaking');
    this.markers.replaceChildren(...badges);

    const name = this.caption.textContent || '';
    this.element.setAttribute('aria-label', words.length ? `${name}: ${words.join(', ')}` : name);
  }

  remove() {
    this.resize.disconnect();
    this.element.remove();
  }
}

/**
 * @param {string} text
 * @param {string} className
 */
function badge(text, className) {
  const span = document.createElement('span');
  span.className = className;
  span.textContent = text;
  return span;
}

/**
 * @param {string} text
 * @param {string} label the accessible name, naming whom the button acts on
 * @param {() => void} onClick
 * @param {string} [className]
 */
function button(text, label, onClick, className) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = text;
  b.setAttribute('aria-label', label);
  if (className) b.className = className;
  b.addEventListener('click', onClick);
  return b;
}

/**
 * The therapist's waiting list, each entry with Admit and Deny.
 * @param {ParticipantInfo[]} waiting
 * @param {{admit: (id: string) => void, deny: (id: string) => void}} actions
 */
export function renderWaitingList(waiting, actions) {
  byId('waiting-empty', HTMLElement).hidden = waiting.length > 0;
  byId('waiting-count', HTMLElement).textContent = String(waiting.length);

  const items = waiting.map((person) => {
    const item = document.createElement('li');
    item.className = 'person';
    item.dataset.participantId = person.participant_id;

    const name = document.createElement('span');
    name.className = 'person-name';
    name.textContent = personLabel(person);

    const who = personLabel(person);
    const buttons = document.createElement('span');
    buttons.className = 'person-actions';
    buttons.append(
      button('Admit', `Admit ${who}`, () => actions.admit(person.participant_id), 'primary'),
      button('Deny', `Deny ${who}`, () => actions.deny(person.participant_id)),
    );
    item.append(name, buttons);
    return item;
  });
  byId('waiting-list', HTMLUListElement).replaceChildren(...items);
}

/**
 * @typedef {object} PresentEntry
 * @property {ParticipantInfo} person
 * @property {Quality} quality as this therapist receives them
 * @property {MediaStatsEntry} [media] Haven's figures for them, where it sends them
 */

/** @param {Quality} quality */
export function qualityLabel(quality) {
  switch (quality) {
    case 'good': return 'Connection good';
    case 'fair': return 'Connection fair';
    case 'poor': return 'Connection poor';
    default: return 'Connection not measured (no media arriving)';
  }
}

/** @param {number} bps */
function rate(bps) {
  return bps >= 1_000_000 ? `${(bps / 1_000_000).toFixed(1)} Mbit/s` : `${Math.round(bps / 1000)} kbit/s`;
}

/**
 * Haven's figures for one participant in words a therapist can scan: what reaches Haven
 * from them and what Haven sends them, loss, round trip, and the video they receive.
 * @param {MediaStatsEntry | undefined} media
 */
export function mediaSummary(media) {
  if (!media) return '';
  const parts = [];
  if (media.modality === 'audio_only') parts.push('receives audio only');
  else if (media.layer) {
    const video = { low: 'low', medium: 'medium', high: 'full' }[media.layer] || media.layer;
    parts.push(`receives ${video} quality video`);
  }
  if (typeof media.bitrate_in_kbps === 'number') parts.push(`sends ${rate(media.bitrate_in_kbps * 1000)}`);
  if (typeof media.bitrate_out_kbps === 'number') parts.push(`gets ${rate(media.bitrate_out_kbps * 1000)}`);
  const lost = Math.max(media.loss_in ?? 0, media.loss_out ?? 0);
  if (typeof media.loss_in === 'number' || typeof media.loss_out === 'number') {
    parts.push(`${Math.round(lost * 100)} % lost`);
  }
  if (typeof media.rtt_ms === 'number') parts.push(`${Math.round(media.rtt_ms)} ms round trip`);
  return parts.join(', ');
}

/**
 * Who is in the session, as the therapist's panel shows them: quality, Mute, Remove.
 * Entries are updated in place so that a button keeps keyboard focus across updates.
 * @param {PresentEntry[]} present
 * @param {{mute: (id: string, muted: boolean) => void, remove: (id: string) => void}} actions
 */
export function renderPresentList(present, actions) {
  byId('present-empty', HTMLElement).hidden = present.length > 0;
  byId('present-count', HTMLElement).textContent = String(present.length);

  const list = byId('present-list', HTMLUListElement);
  /** @type {Map<string, HTMLLIElement>} */
  const existing = new Map();
  for (const child of list.children) {
    if (child instanceof HTMLLIElement && child.dataset.participantId) {
      existing.set(child.dataset.participantId, child);
    }
  }

  const items = present.map(({ person, quality, media }) => {
    const id = person.participant_id;
    const who = personLabel(person);
    let item = existing.get(id);
    if (!item) {
      item = document.createElement('li');
      item.className = 'person';
      item.dataset.participantId = id;

      const name = document.createElement('span');
      name.className = 'person-name';
      const status = document.createElement('span');
      status.className = 'person-status';
      const details = document.createElement('span');
      details.className = 'person-details';
      const buttons = document.createElement('span');
      buttons.className = 'person-actions';
      const mute = button('', '', () => actions.mute(id, item?.dataset.muted !== 'true'));
      mute.dataset.action = 'mute';
      buttons.append(mute, button('Remove', `Remove ${who}`, () => actions.remove(id), 'danger'));
      item.append(name, status, details, buttons);
    }

    const [name, status, details] = /** @type {HTMLElement[]} */ ([...item.children]);
    name.textContent = who;
    const muted = !!person.muted;
    item.dataset.muted = String(muted);
    item.dataset.quality = quality;
    status.textContent = `${qualityLabel(quality)}${muted ? ', muted by you' : ''}`;
    status.className = `person-status q-${quality}`;
    const summary = mediaSummary(media);
    details.textContent = summary;
    details.hidden = summary === '';
    item.dataset.modality = media?.modality || '';
    item.dataset.layer = media?.layer || '';

    const mute = item.querySelector('[data-action="mute"]');
    if (mute instanceof HTMLButtonElement) {
      mute.textContent = muted ? 'Unmute' : 'Mute';
      mute.setAttribute('aria-label', `${muted ? 'Unmute' : 'Mute'} ${who}`);
    }
    return item;
  });

  // Keep focused nodes in place: append in order, which moves without recreating.
  for (const [id, item] of existing) {
    if (!present.some((p) => p.person.participant_id === id)) item.remove();
  }
  items.forEach((item, index) => {
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] || null);
  });
}

/**
 * Ask a yes-or-no question in a modal dialog. Escape or Cancel answer no.
 * @param {{title: string, text: string, confirm: string}} question
 * @returns {Promise<boolean>}
 */
export function confirmDialog(question) {
  const dialog = byId('confirm-dialog', HTMLDialogElement);
  byId('confirm-title', HTMLElement).textContent = question.title;
  byId('confirm-text', HTMLElement).textContent = question.text;
  const ok = byId('confirm-ok', HTMLButtonElement);
  const cancel = byId('confirm-cancel', HTMLButtonElement);
  ok.textContent = question.confirm;

  return new Promise((resolve) => {
    const opener = document.activeElement;
    /** @param {boolean} answer */
    const finish = (answer) => {
      ok.removeEventListener('click', yes);
      cancel.removeEventListener('click', no);
      dialog.removeEventListener('close', no);
      if (dialog.open) dialog.close();
      if (opener instanceof HTMLElement && opener.isConnected) opener.focus();
      resolve(answer);
    };
    const yes = () => finish(true);
    const no = () => finish(false);
    ok.addEventListener('click', yes);
    cancel.addEventListener('click', no);
    dialog.addEventListener('close', no);
    dialog.showModal();
    // The safe answer has focus, so a stray Enter does not end anything.
    cancel.focus();
  });
}

/**
 * Fill a device select with the listed devices, keeping the chosen one when still there.
 * @param {HTMLSelectElement} select
 * @param {MediaDeviceInfo[]} devices
 * @param {string} chosen
 * @param {string} noneText
 */
export function fillDeviceSelect(select, devices, chosen, noneText) {
  const options = devices.map((d, index) => {
    const option = document.createElement('option');
    option.value = d.deviceId;
    option.textContent = d.label || `Device ${index + 1}`;
    return option;
  });
  if (options.length === 0) {
    const none = document.createElement('option');
    none.value = '';
    none.textContent = noneText;
    options.push(none);
  }
  select.replaceChildren(...options);
  select.disabled = devices.length === 0;
  if (chosen && devices.some((d) => d.deviceId === chosen)) select.value = chosen;
}
