//! Redundant audio (RED, RFC 2198): reading the payload a publisher sends, and writing it for
//! each subscriber in the form that subscriber negotiated.
//!
//! A RED payload is a list of block headers followed by the blocks themselves. Every header
//! but the last is four bytes: the F bit (set: another header follows), the block's payload
//! type (7 bits), its timestamp offset before the packet's own timestamp (14 bits) and its
//! length (10 bits). The last header is one byte, the F bit clear and the payload type; its
//! block, the *primary*, is the newest audio and takes the rest of the payload. Browsers
//! wrap Opus this way, carrying the previous packet's frame as one redundant block.
//!
//! str0m in RTP mode hands RED packets over as they arrived (on the RED payload type) and
//! sends whatever payload it is given, so the unwrapping is done here.

use std::ops::Range;
use std::sync::Arc;

use str0m::media::Pt;

/// Why a payload is not valid RED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedError {
    /// No bytes at all: not even the final header.
    Empty,
    /// A four-byte header runs past the end of the payload.
    TruncatedHeader,
    /// The lengths of the redundant blocks add up to more than the payload holds.
    BlocksOverrun,
}

/// One block of a RED payload: where its bytes are and what its header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Payload type of the block (7 bits), in the sender's numbering.
    pub pt: u8,
    /// How far (in RTP timestamp units) the block's audio lies before the packet's
    /// timestamp; 0 for the primary block.
    pub timestamp_offset: u16,
    /// Where the block's bytes sit in the payload.
    pub range: Range<usize>,
    /// Offset of the block's header (its first byte holds the payload type).
    header_at: usize,
}

/// A parsed RED payload: where each block lies. Every block is inside the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Red {
    /// The redundant (older) blocks, oldest first.
    pub redundant: Vec<Block>,
    /// The last block: the newest audio, at the packet's own timestamp.
    pub primary: Block,
}

/// Length of a redundant block from its four-byte header.
fn block_len(h: &[u8; 4]) -> usize {
    (usize::from(h[2] & 0x03) << 8) | usize::from(h[3])
}

impl Red {
    /// Reads the block headers of `payload` and checks that every block lies inside it.
    pub fn parse(payload: &[u8]) -> Result<Red, RedError> {
        if payload.is_empty() {
            return Err(RedError::Empty);
        }
        let mut headers = Vec::new();
        let mut at = 0;
        let final_pt = loop {
            let Some(&first) = payload.get(at) else {
                return Err(RedError::TruncatedHeader);
            };
            if first & 0x80 == 0 {
                break first & 0x7f;
            }
            let Some(h) = payload
                .get(at..at + 4)
                .and_then(|h| <&[u8; 4]>::try_from(h).ok())
            else {
                return Err(RedError::TruncatedHeader);
            };
            headers.push((at, *h));
            at += 4;
        };
        let final_at = at;
        let mut data = final_at + 1;
        let mut redundant = Vec::with_capacity(headers.len());
        for (header_at, h) in headers {
            let end = data + block_len(&h);
            if end > payload.len() {
                return Err(RedError::BlocksOverrun);
            }
            redundant.push(Block {
                pt: h[0] & 0x7f,
                timestamp_offset: (u16::from(h[1]) << 6) | u16::from(h[2] >> 2),
                range: data..end,
                header_at,
            });
            data = end;
        }
        Ok(Red {
            redundant,
            primary: Block {
                pt: final_pt,
                timestamp_offset: 0,
                range: data..payload.len(),
                header_at: final_at,
            },
        })
    }

    /// Every block, oldest first; the primary last.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.redundant.iter().chain(std::iter::once(&self.primary))
    }
}

/// Builds a RED payload from redundant blocks (payload type, timestamp offset, bytes; oldest
/// first) and the primary block. `None` when a block is longer than 1,023 bytes or an offset
/// does not fit in 14 bits, which the format cannot express.
pub fn wrap(redundant: &[(u8, u16, &[u8])], primary_pt: u8, primary: &[u8]) -> Option<Vec<u8>> {
    let size = redundant.iter().map(|(_, _, b)| 4 + b.len()).sum::<usize>() + 1 + primary.len();
    let mut out = Vec::with_capacity(size);
    for &(pt, offset, bytes) in redundant {
        if bytes.len() > 0x3ff || offset > 0x3fff {
            return None;
        }
        let len = bytes.len() as u16;
        out.push(0x80 | (pt & 0x7f));
        out.push((offset >> 6) as u8);
        out.push((((offset & 0x3f) << 2) as u8) | (len >> 8) as u8);
        out.push(len as u8);
    }
    out.push(primary_pt & 0x7f);
    for (_, _, bytes) in redundant {
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(primary);
    Some(out)
}

/// One publisher's audio packet, to be written for each subscriber in the form it
/// negotiated. Built once per packet; the copies a subscriber needs are made once and shared.
pub struct AudioPacket {
    payload: Arc<[u8]>,
    red: Option<RedParts>,
}

struct RedParts {
    /// The publisher's Opus payload type, the one the blocks should carry.
    opus: u8,
    /// Every block is Opus: the payload can go on as RED.
    all_opus: bool,
    /// The primary block, if it is Opus with at least one byte.
    primary: Option<Range<usize>>,
    primary_copy: Option<Arc<[u8]>>,
    /// The payload with its blocks renumbered for one subscriber's Opus payload type.
    renumbered: Option<(u8, Arc<[u8]>)>,
}

impl AudioPacket {
    /// Plain Opus (or any codec not wrapped in RED): forwarded as it is.
    pub fn plain(payload: Arc<[u8]>) -> AudioPacket {
        AudioPacket { payload, red: None }
    }

    /// A RED payload wrapping the publisher's Opus payload type `opus`. `Err` when the
    /// payload is not valid RED; nobody can use it then.
    pub fn red(payload: Arc<[u8]>, opus: Pt) -> Result<AudioPacket, RedError> {
        let opus = *opus;
        let red = Red::parse(&payload)?;
        let all_opus = red.blocks().all(|b| b.pt == opus);
        let primary = Some(&red.primary)
            .filter(|b| b.pt == opus && !b.range.is_empty())
            .map(|b| b.range.clone());
        Ok(AudioPacket {
            payload,
            red: Some(RedParts {
                opus,
                all_opus,
                primary,
                primary_copy: None,
                renumbered: None,
            }),
        })
    }

    /// The payload type and payload for a subscriber whose Opus payload type is `opus` and
    /// whose RED payload type, if it negotiated RED, is `red`. `None` when there is nothing
    /// that subscriber can decode.
    ///
    /// - Plain Opus goes on as plain Opus.
    /// - RED goes on as RED to a subscriber that negotiated it, with the blocks' payload
    ///   types renumbered where the subscriber's Opus payload type differs.
    /// - Otherwise the primary block goes on alone, as plain Opus; the packet keeps its own
    ///   timestamp, which is the primary block's.
    pub fn for_subscriber(&mut self, opus: Pt, red: Option<Pt>) -> Option<(Pt, Arc<[u8]>)> {
        let Some(parts) = &mut self.red else {
            return Some((opus, self.payload.clone()));
        };
        if let (Some(red), true) = (red, parts.all_opus) {
            if *opus == parts.opus {
                return Some((red, self.payload.clone()));
            }
            let renumbered = match &parts.renumbered {
                Some((pt, copy)) if *pt == *opus => copy.clone(),
                _ => {
                    let copy: Arc<[u8]> = renumber(&self.payload, *opus)?.into();
                    parts.renumbered = Some((*opus, copy.clone()));
                    copy
                }
            };
            return Some((red, renumbered));
        }
        let range = parts.primary.clone()?;
        let copy = match &parts.primary_copy {
            Some(copy) => copy.clone(),
            None => {
                let copy: Arc<[u8]> = self.payload.get(range)?.into();
                parts.primary_copy = Some(copy.clone());
                copy
            }
        };
        Some((opus, copy))
    }
}

/// A copy of a RED payload with every block header's payload type set to `pt`.
fn renumber(payload: &[u8], pt: u8) -> Option<Vec<u8>> {
    let red = Red::parse(payload).ok()?;
    let mut copy = payload.to_vec();
    for b in red.blocks() {
        let byte = copy.get_mut(b.header_at)?;
        *byte = (*byte & 0x80) | (pt & 0x7f);
    }
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Chrome-style packet: one redundant Opus block (the previous 20 ms frame, 960 ticks
    /// back) and the primary, both on payload type 111.
    fn chrome_like() -> Vec<u8> {
        let mut p = vec![
            0x80 | 111, // F=1, PT 111
            0x0f,       // offset 960 = 0b00_1111_0000_00: high 8 bits 0x0f
            0x00,       // low 6 bits of the offset (0) and the top 2 bits of the length (0)
            3,          // length 3
            111,        // final header: F=0, PT 111
        ];
        p.extend_from_slice(&[0xa1, 0xa2, 0xa3]); // redundant
        p.extend_from_slice(&[0xb1, 0xb2, 0xb3, 0xb4]); // primary
        p
    }

    #[test]
    fn the_primary_is_the_last_block_and_takes_the_rest() {
        let p = chrome_like();
        let red = Red::parse(&p).expect("valid");
        let b = &red.primary;
        assert_eq!(b.pt, 111);
        assert_eq!(&p[b.range.clone()], &[0xb1, 0xb2, 0xb3, 0xb4]);
        assert_eq!(b.timestamp_offset, 0);
    }

    #[test]
    fn redundant_blocks_carry_their_offset_and_length() {
        let p = chrome_like();
        let red = Red::parse(&p).expect("valid");
        let all: Vec<&Block> = red.blocks().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].pt, 111);
        assert_eq!(all[0].timestamp_offset, 960);
        assert_eq!(&p[all[0].range.clone()], &[0xa1, 0xa2, 0xa3]);
        assert_eq!(all[1], &red.primary);
    }

    #[test]
    fn the_largest_offset_and_length_are_read_whole() {
        // Offset 0x3fff and length 0x3ff: every bit of both fields set.
        let block = vec![7u8; 0x3ff];
        let mut p = vec![0x80 | 96, 0xff, 0xff, 0xff, 97];
        p.extend_from_slice(&block);
        p.push(0x42);
        let red = Red::parse(&p).expect("valid");
        let all: Vec<&Block> = red.blocks().collect();
        assert_eq!(all[0].pt, 96);
        assert_eq!(all[0].timestamp_offset, 0x3fff);
        assert_eq!(all[0].range.len(), 0x3ff);
        assert_eq!(all[1].pt, 97);
        assert_eq!(&p[all[1].range.clone()], &[0x42]);
    }

    #[test]
    fn several_redundant_blocks_follow_in_order() {
        let p = wrap(
            &[(111, 1920, &[1, 1]), (111, 960, &[2, 2, 2])],
            111,
            &[3, 3, 3, 3],
        )
        .expect("fits");
        let red = Red::parse(&p).expect("valid");
        let all: Vec<&Block> = red.blocks().collect();
        let offsets: Vec<u16> = all.iter().map(|b| b.timestamp_offset).collect();
        assert_eq!(offsets, vec![1920, 960, 0]);
        let bytes: Vec<&[u8]> = all.iter().map(|b| &p[b.range.clone()]).collect();
        assert_eq!(bytes, vec![&[1, 1][..], &[2, 2, 2][..], &[3, 3, 3, 3][..]]);
    }

    #[test]
    fn a_payload_without_redundancy_is_its_final_header_and_primary() {
        let p = [111, 0xde, 0xad];
        let red = Red::parse(&p).expect("valid");
        assert_eq!(red.primary.pt, 111);
        assert_eq!(&p[red.primary.range.clone()], &[0xde, 0xad]);
        assert!(red.redundant.is_empty());
    }

    #[test]
    fn an_empty_primary_is_valid_red_but_not_forwarded_as_opus() {
        let p = [0x80 | 111, 0x0f, 0x00, 2, 111, 0xa1, 0xa2];
        let red = Red::parse(&p).expect("valid");
        assert!(red.primary.range.is_empty());
        let mut audio = AudioPacket::red(p[..].into(), Pt::from(111)).expect("valid");
        assert_eq!(audio.for_subscriber(Pt::from(111), None), None);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert_eq!(Red::parse(&[]), Err(RedError::Empty));
        // A header with F set and nothing after it.
        assert_eq!(Red::parse(&[0x80 | 111]), Err(RedError::TruncatedHeader));
        // Cut inside the four-byte header.
        assert_eq!(
            Red::parse(&[0x80 | 111, 0x0f, 0x00]),
            Err(RedError::TruncatedHeader)
        );
        // Four-byte header but no final header after it.
        assert_eq!(
            Red::parse(&[0x80 | 111, 0x0f, 0x00, 0]),
            Err(RedError::TruncatedHeader)
        );
        // Redundant block claims 3 bytes, only 2 follow the headers.
        assert_eq!(
            Red::parse(&[0x80 | 111, 0x0f, 0x00, 3, 111, 0xa1, 0xa2]),
            Err(RedError::BlocksOverrun)
        );
        // Lengths that add up past the end across two blocks.
        let mut p = vec![0x80 | 111, 0, 0, 200, 0x80 | 111, 0, 0, 200, 111];
        p.extend_from_slice(&[0; 399]);
        assert_eq!(Red::parse(&p), Err(RedError::BlocksOverrun));
        assert!(AudioPacket::red(p.into(), Pt::from(111)).is_err());
    }

    #[test]
    fn every_truncation_of_a_valid_payload_is_handled_without_panic() {
        let p = wrap(&[(111, 960, &[9; 40])], 111, &[8; 60]).expect("fits");
        for cut in 0..p.len() {
            let short = &p[..cut];
            // Either an error, or (once the headers and redundant block fit) a shorter primary.
            if let Ok(red) = Red::parse(short) {
                for b in red.blocks() {
                    assert!(b.range.start <= b.range.end && b.range.end <= short.len());
                }
            }
        }
        // Arbitrary bytes: no panic, and every block in bounds.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let len = (x % 48) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if let Ok(red) = Red::parse(&bytes) {
                for b in red.blocks() {
                    assert!(b.range.start <= b.range.end && b.range.end <= bytes.len());
                }
            }
        }
    }

    #[test]
    fn wrap_refuses_what_the_format_cannot_say() {
        assert!(wrap(&[(111, 0x4000, &[1])], 111, &[2]).is_none());
        assert!(wrap(&[(111, 0, &[0; 0x400])], 111, &[2]).is_none());
    }

    #[test]
    fn a_subscriber_without_red_gets_the_primary_on_its_opus_payload_type() {
        let p = chrome_like();
        let mut audio = AudioPacket::red(p.into(), Pt::from(111)).expect("valid");
        let (pt, payload) = audio.for_subscriber(Pt::from(109), None).expect("primary");
        assert_eq!(pt, Pt::from(109));
        assert_eq!(&payload[..], &[0xb1, 0xb2, 0xb3, 0xb4]);
    }

    #[test]
    fn a_red_subscriber_gets_red_as_sent_when_the_payload_types_agree() {
        let p = chrome_like();
        let mut audio = AudioPacket::red(p.clone().into(), Pt::from(111)).expect("valid");
        let (pt, payload) = audio
            .for_subscriber(Pt::from(111), Some(Pt::from(63)))
            .expect("red");
        assert_eq!(pt, Pt::from(63));
        assert_eq!(&payload[..], &p[..]);
    }

    #[test]
    fn a_red_subscriber_with_another_opus_payload_type_gets_the_blocks_renumbered() {
        let p = chrome_like();
        let mut audio = AudioPacket::red(p.clone().into(), Pt::from(111)).expect("valid");
        let (pt, payload) = audio
            .for_subscriber(Pt::from(109), Some(Pt::from(120)))
            .expect("red");
        assert_eq!(pt, Pt::from(120));
        let red = Red::parse(&payload).expect("still valid");
        assert!(red.blocks().all(|b| b.pt == 109));
        assert_eq!(payload[0] & 0x80, 0x80, "F bit kept");
        // Everything but the payload type bits is unchanged.
        assert_eq!(&payload[1..4], &p[1..4]);
        assert_eq!(&payload[5..], &p[5..]);
    }

    #[test]
    fn red_with_a_foreign_block_goes_to_red_subscribers_as_its_primary() {
        // A redundant block of another codec (PT 0): a subscriber could not place it.
        let p = wrap(&[(0, 160, &[5, 5])], 111, &[6, 6, 6]).expect("fits");
        let mut audio = AudioPacket::red(p.into(), Pt::from(111)).expect("valid");
        let (pt, payload) = audio
            .for_subscriber(Pt::from(111), Some(Pt::from(63)))
            .expect("primary");
        assert_eq!(pt, Pt::from(111));
        assert_eq!(&payload[..], &[6, 6, 6]);
    }

    #[test]
    fn a_primary_of_another_codec_reaches_nobody_without_red() {
        let p = wrap(&[], 0, &[6, 6, 6]).expect("fits");
        let mut audio = AudioPacket::red(p.into(), Pt::from(111)).expect("valid");
        assert_eq!(audio.for_subscriber(Pt::from(111), None), None);
    }

    #[test]
    fn plain_opus_goes_on_unchanged() {
        let mut audio = AudioPacket::plain(vec![1u8, 2, 3].into());
        let (pt, payload) = audio
            .for_subscriber(Pt::from(111), Some(Pt::from(63)))
            .expect("plain");
        assert_eq!(pt, Pt::from(111));
        assert_eq!(&payload[..], &[1, 2, 3]);
    }
}
