// @ts-check
// What this browser receives from each participant, read from the subscribe connection's
// getStats(): audio level (for the active speaker), whether video frames arrive (initials
// when they do not), and connection quality (packet loss, jitter, frame rate). The same
// figures feed the tiles and the therapist's panel: a therapist judges each participant's
// connection by what reaches the therapist.

/** @typedef {import('./signaling.js').TrackInfo} TrackInfo */

/** @typedef {'good' | 'fair' | 'poor' | 'unknown'} Quality */

/**
 * @typedef {object} ParticipantStats
 * @property {number} audioLevel 0..1, the latest inbound audio level
 * @property {boolean} audioFlowing audio packets arrived since the previous sample
 * @property {boolean} videoFlowing video frames were decoded since the previous sample
 * @property {number} lossRate lost / expected packets since the previous sample, 0..1
 * @property {number} jitterMs the larger of audio and video jitter
 * @property {number | null} fps decoded video frames per second, when video flows
 * @property {Quality} quality
 */

/** Above this inbound `audioLevel` (0..1, linear) a participant counts as speaking. */
export const SPEAKING_LEVEL = 0.04;

/**
 * @typedef {object} Totals
 * @property {number} packetsReceived
 * @property {number} packetsLost
 * @property {number} framesDecoded
 */

/** Keeps the previous totals per m-line, so each sample measures the time since the last. */
export class ReceiveStats {
  constructor() {
    /** @type {Map<string, Totals>} */
    this.previous = new Map();
    /**
     * Quality is judged over the last few samples, so one lost burst does not flash a marker.
     * @type {Map<string, {lost: number, expected: number}[]>}
     */
    this.history = new Map();
  }

  /**
   * @param {RTCPeerConnection} pc the subscribe connection
   * @param {Map<string, TrackInfo>} byMid which participant each m-line carries
   * @returns {Promise<Map<string, ParticipantStats>>} keyed by participant id
   */
  async sample(pc, byMid) {
    const report = await pc.getStats();
    /** @type {Map<string, ParticipantStats & {lost: number, expected: number, jitters: number[]}>} */
    const byParticipant = new Map();

    report.forEach((s) => {
      if (s.type !== 'inbound-rtp' || typeof s.mid !== 'string') return;
      const info = byMid.get(s.mid);
      if (!info) return;

      let entry = byParticipant.get(info.participant_id);
      if (!entry) {
        entry = {
          audioLevel: 0, audioFlowing: false, videoFlowing: false, lossRate: 0, jitterMs: 0,
          fps: null, quality: 'unknown', lost: 0, expected: 0, jitters: [],
        };
        byParticipant.set(info.participant_id, entry);
      }

      const now = {
        packetsReceived: s.packetsReceived || 0,
        packetsLost: Math.max(0, s.packetsLost || 0),
        framesDecoded: s.framesDecoded || 0,
      };
      const key = `${info.participant_id}/${s.mid}`;
      const before = this.previous.get(key) || { packetsReceived: 0, packetsLost: 0, framesDecoded: 0 };
      this.previous.set(key, now);

      const received = Math.max(0, now.packetsReceived - before.packetsReceived);
      const lost = Math.max(0, now.packetsLost - before.packetsLost);
      // A stream that stopped (camera off, muted by the therapist) says nothing about the
      // connection: its jitter is stale and its last gap is not loss.
      if (received > 0) {
        entry.lost += lost;
        entry.expected += received + lost;
        if (typeof s.jitter === 'number') entry.jitters.push(s.jitter * 1000);
      }

      if (s.kind === 'audio') {
        entry.audioLevel = typeof s.audioLevel === 'number' ? s.audioLevel : 0;
        entry.audioFlowing = received > 0;
      } else {
        entry.videoFlowing = now.framesDecoded > before.framesDecoded;
        entry.fps = entry.videoFlowing && typeof s.framesPerSecond === 'number'
          ? s.framesPerSecond : null;
      }
    });

    /** @type {Map<string, ParticipantStats>} */
    const result = new Map();
    for (const [id, entry] of byParticipant) {
      const history = (this.history.get(id) || []).slice(-3);
      history.push({ lost: entry.lost, expected: entry.expected });
      this.history.set(id, history);

      const lost = history.reduce((sum, h) => sum + h.lost, 0);
      const expected = history.reduce((sum, h) => sum + h.expected, 0);
      const lossRate = expected > 0 ? lost / expected : 0;
      const jitterMs = Math.max(0, ...entry.jitters);
      result.set(id, {
        audioLevel: entry.audioLevel,
        audioFlowing: entry.audioFlowing,
        videoFlowing: entry.videoFlowing,
        lossRate,
        jitterMs,
        fps: entry.fps,
        quality: judgeQuality({ expected, lossRate, jitterMs, fps: entry.fps }),
      });
    }
    return result;
  }
}

/**
 * Thresholds follow common conferencing practice: a few per cent of loss or tens of
 * milliseconds of jitter are noticed; above ten per cent speech breaks up.
 * @param {{expected: number, lossRate: number, jitterMs: number, fps: number | null}} m
 * @returns {Quality}
 */
export function judgeQuality(m) {
  if (m.expected === 0) return 'unknown';
  if (m.lossRate >= 0.1 || m.jitterMs >= 100) return 'poor';
  if (m.lossRate >= 0.03 || m.jitterMs >= 40 || (m.fps !== null && m.fps < 8)) return 'fair';
  return 'good';
}

/**
 * The participant to highlight as speaking: the loudest above the threshold. The current
 * speaker keeps the highlight while still above it, so two voices do not make it flicker.
 * @param {Map<string, ParticipantStats>} stats
 * @param {string | null} current
 * @returns {string | null}
 */
export function pickActiveSpeaker(stats, current) {
  const currentLevel = current ? stats.get(current)?.audioLevel ?? 0 : 0;
  if (current && currentLevel >= SPEAKING_LEVEL) return current;

  let best = null;
  let bestLevel = SPEAKING_LEVEL;
  for (const [id, s] of stats) {
    if (s.audioLevel >= bestLevel) {
      best = id;
      bestLevel = s.audioLevel;
    }
  }
  return best;
}
