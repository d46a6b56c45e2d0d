// @ts-check
// The WebSocket to Haven and the message types of docs/protocol.md (version 1).
// Nothing here touches the page: app.js decides what each message means for the person.

/** @typedef {'client' | 'therapist' | 'sponsor' | 'auditor'} Role */

/**
 * Why a stay ended (`left`) or why someone else left (`participant_left`).
 * @typedef {'left' | 'replaced' | 'denied' | 'connection_lost' | 'removed' | 'session_ended'
 *   | 'token_revoked' | 'sponsored_client_left' | 'server_shutdown'} LeaveReason
 */

/**
 * @typedef {object} SessionInfo
 * @property {string} id
 * @property {string} kind
 * @property {string} starts_at
 * @property {string} ends_at
 */

/**
 * @typedef {object} ParticipantInfo
 * @property {string} participant_id
 * @property {Role} role
 * @property {string | null} [display_name] for screens only
 * @property {boolean} [muted] muted by the therapist
 */

/**
 * One m-line of the subscribe connection and whose media it carries.
 * @typedef {object} TrackInfo
 * @property {string} mid
 * @property {string} participant_id
 * @property {'audio' | 'video'} kind
 * @property {boolean} [active] false for an m-line left inactive by someone who left
 */

/**
 * A TURN server with the short-lived credentials Haven issued for it; an `RTCIceServer`.
 * @typedef {{urls: string[], username: string, credential: string}} IceServerInfo
 */

/**
 * @typedef {{type: 'joined', protocol: number, participant_id: string, role: Role,
 *   session: SessionInfo, participants: ParticipantInfo[], display_name?: string | null,
 *   resume_token?: string, resume_grace_seconds?: number, resumed?: boolean,
 *   muted?: boolean, ice_servers?: IceServerInfo[]}} JoinedMessage
 * @typedef {{type: 'waiting', session: SessionInfo, therapist_present: boolean}} WaitingMessage
 * @typedef {{type: 'waiting_list', waiting: ParticipantInfo[]}} WaitingListMessage
 * @typedef {{type: 'participant_joined', participant_id: string, role: Role,
 *   display_name?: string | null, muted?: boolean}} ParticipantJoinedMessage
 * @typedef {{type: 'participant_left', participant_id: string, reason: LeaveReason}} ParticipantLeftMessage
 * @typedef {{type: 'muted', muted: boolean}} MutedMessage
 * @typedef {{type: 'participant_muted', participant_id: string, muted: boolean}} ParticipantMutedMessage
 * @typedef {{type: 'publish_answer', sdp: string, negotiation?: number}} PublishAnswerMessage
 * @typedef {{type: 'subscribe_offer', negotiation: number, sdp: string, tracks: TrackInfo[]}} SubscribeOfferMessage
 * @typedef {{type: 'left', reason: LeaveReason, credited_minutes?: number}} LeftMessage
 * @typedef {{type: 'pong'}} PongMessage
 * @typedef {{type: 'error', code: string, message: string, opens_at?: string}} ErrorMessage
 * @typedef {{type: 'active_speaker', participant_id: string | null}} ActiveSpeakerMessage
 * @typedef {{type: 'modality', modality: Modality, reason?: 'bandwidth' | 'requested'}} ModalityMessage
 * @typedef {{type: 'quality', participants: MediaStatsEntry[]}} QualityMessage
 * @typedef {{type: 'going_away', deadline: string}} GoingAwayMessage
 */

/**
 * What Haven sends a participant: video and audio, or audio alone (their connection cannot
 * carry even the lowest video layer, or they asked for it); the attendance ledger's two
 * modalities.
 * @typedef {'video' | 'audio_only'} Modality
 */

/**
 * One participant's media as Haven measures it, for the therapist's panel. A figure Haven
 * has not measured yet is null.
 * @typedef {object} MediaStatsEntry
 * @property {string} participant_id
 * @property {number | null} [bitrate_in_kbps] what Haven receives from them
 * @property {number | null} [bitrate_out_kbps] what Haven sends them
 * @property {number | null} [loss_in] share of their packets lost on the way to Haven, 0..1
 * @property {number | null} [loss_out] share of Haven's packets lost on the way to them, 0..1
 * @property {number | null} [rtt_ms] round-trip time to them
 * @property {'low' | 'medium' | 'high' | null} [layer] the best video layer they receive
 *   now; null when they receive no video
 * @property {Modality} [modality] what Haven sends them
 */

/**
 * @typedef {JoinedMessage | WaitingMessage | WaitingListMessage | ParticipantJoinedMessage
 *   | ParticipantLeftMessage | MutedMessage | ParticipantMutedMessage | PublishAnswerMessage
 *   | SubscribeOfferMessage | LeftMessage | PongMessage | ErrorMessage | ActiveSpeakerMessage
 *   | ModalityMessage | QualityMessage | GoingAwayMessage} ServerMessage
 */

/**
 * @typedef {{type: 'join', token: string, resume?: string}
 *   | {type: 'publish_offer', sdp: string, negotiation: number}
 *   | {type: 'subscribe_answer', negotiation: number, sdp: string}
 *   | {type: 'candidate', pc: 'publish' | 'subscribe', candidate: string}
 *   | {type: 'admit', participant_id: string}
 *   | {type: 'deny', participant_id: string}
 *   | {type: 'mute', participant_id: string, muted: boolean}
 *   | {type: 'remove', participant_id: string}
 *   | {type: 'end_session'}
 *   | {type: 'leave'}
 *   | {type: 'ping'}
 *   | {type: 'video_size', participant_id: string, width: number, height: number}
 *   | {type: 'audio_only', enabled: boolean}
 *   | {type: 'ice_restart'}} ClientMessage
 */

/** Browsers ping this often so that proxies between them and Haven keep the socket open. */
export const PING_INTERVAL_MS = 10_000;

/**
 * Error codes after which Haven closes the socket (the protocol's error table). Any other
 * error leaves the participant where they are.
 */
export const CLOSING_ERROR_CODES = new Set([
  'join_required', 'token_invalid', 'token_expired', 'too_early', 'session_over',
  'wrong_audience', 'role_not_allowed', 'sponsor_not_allowed', 'token_revoked', 'internal',
]);

/**
 * The signaling URL on the page's own origin, with the scheme matching the page's.
 * @param {Location} location
 */
export function signalingUrl(location) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

/**
 * What the join token says about the session, read before connecting so the pre-join
 * screen can name the session and its time. The signature is not checked here (Haven
 * checks it); nothing read here decides anything but what the page shows.
 * @typedef {object} TokenPreview
 * @property {Role | null} role
 * @property {string | null} subject
 * @property {string | null} name
 * @property {SessionInfo | null} session
 */

/**
 * @param {string} token
 * @returns {TokenPreview}
 */
export function previewToken(token) {
  const empty = { role: null, subject: null, name: null, session: null };
  const payload = token.split('.')[1];
  if (!payload) return empty;

  try {
    const base64 = payload.replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    const s = claims && typeof claims.session === 'object' ? claims.session : null;
    const text = (/** @type {unknown} */ v) => (typeof v === 'string' ? v : null);
    const role = text(claims.role);
    return {
      role: role === 'client' || role === 'therapist' || role === 'sponsor' || role === 'auditor'
        ? role : null,
      subject: text(claims.sub),
      name: text(claims.name),
      session: s && text(s.id) ? {
        id: String(s.id), kind: text(s.kind) || '', starts_at: text(s.starts_at) || '',
        ends_at: text(s.ends_at) || '',
      } : null,
    };
  } catch {
    return empty;
  }
}

/**
 * @typedef {object} ChannelHandlers
 * @property {() => void} onOpen
 * @property {(message: ServerMessage) => void} onMessage
 * @property {(code: number, reason: string) => void} onClose
 */

/** One WebSocket to Haven: JSON in and out, and the keep-alive ping. */
export class SignalingChannel {
  /**
   * @param {string} url
   * @param {ChannelHandlers} handlers
   */
  constructor(url, handlers) {
    this.socket = new WebSocket(url);
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this.pingTimer = undefined;

    this.socket.addEventListener('open', () => {
      this.pingTimer = setInterval(() => this.send({ type: 'ping' }), PING_INTERVAL_MS);
      handlers.onOpen();
    });

    this.socket.addEventListener('message', (event) => {
      const message = parseServerMessage(event.data);
      if (message) handlers.onMessage(message);
    });

    // A socket that fails to open fires `error` and then `close`; `close` alone is enough.
    this.socket.addEventListener('close', (event) => {
      clearInterval(this.pingTimer);
      handlers.onClose(event.code, event.reason);
    });
  }

  /** @returns {boolean} whether the socket is open, so a message can still be sent */
  get isOpen() {
    return this.socket.readyState === WebSocket.OPEN;
  }

  /** @param {ClientMessage} message */
  send(message) {
    if (this.isOpen) this.socket.send(JSON.stringify(message));
  }

  close() {
    clearInterval(this.pingTimer);
    if (this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000, 'client closed');
  }
}

/**
 * Accept an object with a string `type`; the handlers check the fields of each type.
 * @param {unknown} data
 * @returns {ServerMessage | null}
 */
function parseServerMessage(data) {
  if (typeof data !== 'string') return null;

  try {
    const value = JSON.parse(data);
    if (value && typeof value === 'object' && typeof value.type === 'string') return value;
  } catch {
    // Fall through: Haven only sends JSON text, so this is a fault worth a console line.
  }
  console.warn('haven: ignored a signaling frame that is not a protocol message');
  return null;
}
