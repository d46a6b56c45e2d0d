//! The parts of the VP8 RTP payload (RFC 7741) the forwarder reads and rewrites: the picture
//! id and TL0PICIDX of the payload descriptor, and the picture size of a keyframe.

/// Where the descriptor's fields sit in one payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Offset and width (7 or 15 bits) of the picture id.
    picture_id: Option<(usize, u8)>,
    tl0_at: Option<usize>,
    /// Offset of the VP8 payload header (the first byte after the descriptor).
    header_at: usize,
    start_of_partition_zero: bool,
}

impl Descriptor {
    pub fn parse(payload: &[u8]) -> Option<Descriptor> {
        let first = *payload.first()?;
        let extended = first & 0x80 != 0;
        let start = first & 0x10 != 0;
        let partition = first & 0x07;
        let mut at = 1;
        let mut picture_id = None;
        let mut tl0_at = None;
        if extended {
            let x = *payload.get(1)?;
            at = 2;
            if x & 0x80 != 0 {
                let pid = *payload.get(at)?;
                if pid & 0x80 != 0 {
                    payload.get(at + 1)?;
                    picture_id = Some((at, 15));
                    at += 2;
                } else {
                    picture_id = Some((at, 7));
                    at += 1;
                }
            }
            if x & 0x40 != 0 {
                payload.get(at)?;
                tl0_at = Some(at);
                at += 1;
            }
            if x & 0x30 != 0 {
                at += 1;
            }
        }
        if at > payload.len() {
            return None;
        }
        Some(Descriptor {
            picture_id,
            tl0_at,
            header_at: at,
            start_of_partition_zero: start && partition == 0,
        })
    }

    pub fn picture_id(&self, payload: &[u8]) -> Option<u16> {
        let (at, bits) = self.picture_id?;
        Some(match bits {
            15 => (u16::from(payload[at] & 0x7f) << 8) | u16::from(payload[at + 1]),
            _ => u16::from(payload[at] & 0x7f),
        })
    }

    pub fn tl0(&self, payload: &[u8]) -> Option<u8> {
        self.tl0_at.map(|at| payload[at])
    }

    /// True for the first packet of a keyframe.
    pub fn is_keyframe_start(&self, payload: &[u8]) -> bool {
        self.start_of_partition_zero && payload.get(self.header_at).is_some_and(|h| h & 0x01 == 0)
    }

    /// Width and height from a keyframe's header (only in its first packet).
    pub fn keyframe_size(&self, payload: &[u8]) -> Option<(u32, u32)> {
        if !self.is_keyframe_start(payload) {
            return None;
        }
        let h = payload.get(self.header_at..self.header_at + 10)?;
        if h[3..6] != [0x9d, 0x01, 0x2a] {
            return None;
        }
        let w = u32::from(u16::from_le_bytes([h[6], h[7]]) & 0x3fff);
        let ht = u32::from(u16::from_le_bytes([h[8], h[9]]) & 0x3fff);
        Some((w, ht))
    }

    /// Adds the offsets to the picture id (modulo its width) and TL0PICIDX, in place.
    pub fn rewrite(&self, payload: &mut [u8], picture_id_offset: u16, tl0_offset: u8) {
        if let Some((at, bits)) = self.picture_id {
            match bits {
                15 => {
                    let pid = (u16::from(payload[at] & 0x7f) << 8) | u16::from(payload[at + 1]);
                    let new = pid.wrapping_add(picture_id_offset) & 0x7fff;
                    payload[at] = 0x80 | (new >> 8) as u8;
                    payload[at + 1] = new as u8;
                }
                _ => {
                    let pid = payload[at] & 0x7f;
                    payload[at] = pid.wrapping_add(picture_id_offset as u8) & 0x7f;
                }
            }
        }
        if let Some(at) = self.tl0_at {
            payload[at] = payload[at].wrapping_add(tl0_offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// X=1, I=1 (15-bit picture id 0x1234), L=1 (TL0 7), T=1; then a keyframe header of a
    /// 640x360 picture.
    fn keyframe() -> Vec<u8> {
        vec![
            0x90, 0xe0, 0x92, 0x34, 0x07, 0x20, // descriptor
            0x50, 0x23, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01, 0xaa,
        ]
    }

    #[test]
    fn reads_fields_and_size() {
        let p = keyframe();
        let d = Descriptor::parse(&p).expect("parses");
        assert_eq!(d.picture_id(&p), Some(0x1234));
        assert_eq!(d.tl0(&p), Some(7));
        assert!(d.is_keyframe_start(&p));
        assert_eq!(d.keyframe_size(&p), Some((640, 360)));
    }

    #[test]
    fn rewrites_with_wraparound() {
        let mut p = keyframe();
        let d = Descriptor::parse(&p).expect("parses");
        d.rewrite(&mut p, 0x7fff - 0x1233, 250);
        assert_eq!(d.picture_id(&p), Some(0));
        assert_eq!(d.tl0(&p), Some(1));
        assert_eq!(p[2] & 0x80, 0x80, "keeps the 15-bit marker");
    }

    #[test]
    fn short_descriptor_and_truncated_payloads() {
        // No extension: S=1, partition 0, interframe.
        let p = [0x10, 0x01, 0x00];
        let d = Descriptor::parse(&p).expect("parses");
        assert_eq!(d.picture_id(&p), None);
        assert!(!d.is_keyframe_start(&p));
        assert!(Descriptor::parse(&[]).is_none());
        assert!(Descriptor::parse(&[0x90, 0x80]).is_none());
        assert!(Descriptor::parse(&[0x90, 0x80, 0x81]).is_none());
        // A keyframe start too short to carry its size has none.
        let k = [0x10, 0x00, 0x00];
        let d = Descriptor::parse(&k).expect("parses");
        assert!(d.is_keyframe_start(&k));
        assert_eq!(d.keyframe_size(&k), None);
    }
}
