//! The few MessagePack primitives the envelope's hand-written fast path needs. They write exactly
//! what rmp-serde writes (the smallest form of each length and integer), so the bytes on the wire
//! do not depend on which path encoded them; the reader takes only those forms and says `None`
//! for anything else, which sends the frame to the general (serde) decoder.

pub(crate) fn put_map_len(buf: &mut Vec<u8>, len: usize) {
    if len < 16 {
        buf.push(0x80 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        buf.push(0xde);
        buf.extend_from_slice(&len.to_be_bytes());
    } else {
        buf.push(0xdf);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

pub(crate) fn put_array_len(buf: &mut Vec<u8>, len: usize) {
    if len < 16 {
        buf.push(0x90 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        buf.push(0xdc);
        buf.extend_from_slice(&len.to_be_bytes());
    } else {
        buf.push(0xdd);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

pub(crate) fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = s.len();
    if len < 32 {
        buf.push(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        buf.extend_from_slice(&[0xd9, len]);
    } else if let Ok(len) = u16::try_from(len) {
        buf.push(0xda);
        buf.extend_from_slice(&len.to_be_bytes());
    } else {
        buf.push(0xdb);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
    }
    buf.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_bin(buf: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if let Ok(len) = u8::try_from(len) {
        buf.extend_from_slice(&[0xc4, len]);
    } else if let Ok(len) = u16::try_from(len) {
        buf.push(0xc5);
        buf.extend_from_slice(&len.to_be_bytes());
    } else {
        buf.push(0xc6);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
    }
    buf.extend_from_slice(bytes);
}

pub(crate) fn put_uint(buf: &mut Vec<u8>, value: u64) {
    if value < 128 {
        buf.push(value as u8);
    } else if let Ok(v) = u8::try_from(value) {
        buf.extend_from_slice(&[0xcc, v]);
    } else if let Ok(v) = u16::try_from(value) {
        buf.push(0xcd);
        buf.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(value) {
        buf.push(0xce);
        buf.extend_from_slice(&v.to_be_bytes());
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&value.to_be_bytes());
    }
}

pub(crate) fn put_nil(buf: &mut Vec<u8>) {
    buf.push(0xc0);
}

/// A cursor over a frame. Every method returns None on anything unexpected (another form,
/// a truncated frame), never panics.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    /// Whether every byte has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.first().copied()
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        )
    }

    pub(crate) fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ 0x80..=0x8f => Some(usize::from(m & 0x0f)),
            0xde => self.be(2).map(|n| n as usize),
            0xdf => self.be(4).map(|n| n as usize),
            _ => None,
        }
    }

    pub(crate) fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ 0x90..=0x9f => Some(usize::from(m & 0x0f)),
            0xdc => self.be(2).map(|n| n as usize),
            0xdd => self.be(4).map(|n| n as usize),
            _ => None,
        }
    }

    pub(crate) fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.raw_str()?).ok()
    }

    /// A string's bytes, not checked as UTF-8: for comparing with names known in advance
    /// (keys, kinds), which match only valid UTF-8.
    pub(crate) fn raw_str(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return None,
        };
        self.take(len)
    }

    pub(crate) fn bin(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            0xc4 => self.be(1)? as usize,
            0xc5 => self.be(2)? as usize,
            0xc6 => self.be(4)? as usize,
            _ => return None,
        };
        self.take(len)
    }

    pub(crate) fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            m @ 0x00..=0x7f => Some(u64::from(m)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    /// `nil` as None, an unsigned integer as Some.
    pub(crate) fn opt_uint(&mut self) -> Option<Option<u64>> {
        if self.peek()? == 0xc0 {
            self.byte()?;
            return Some(None);
        }
        self.uint().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_match_rmp_serde_at_every_size_boundary() {
        for len in [0usize, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536] {
            let s = "x".repeat(len);
            let mut buf = Vec::new();
            put_str(&mut buf, &s);
            assert_eq!(buf, rmp_serde::to_vec(&s).unwrap(), "str of {len}");
            assert_eq!(Reader::new(&buf).str(), Some(s.as_str()));

            let bytes = vec![7u8; len];
            let mut buf = Vec::new();
            put_bin(&mut buf, &bytes);
            let serde = rmp_serde::to_vec(&serde_bytes::Bytes::new(&bytes)).unwrap();
            assert_eq!(buf, serde, "bin of {len}");
            assert_eq!(Reader::new(&buf).bin(), Some(bytes.as_slice()));

            let list = vec![1u8; len];
            let mut buf = Vec::new();
            put_array_len(&mut buf, len);
            list.iter().for_each(|v| put_uint(&mut buf, u64::from(*v)));
            assert_eq!(buf, rmp_serde::to_vec(&list).unwrap(), "array of {len}");
            assert_eq!(Reader::new(&buf).array_len(), Some(len));
        }
        for value in [
            0u64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX.into(),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_uint(&mut buf, value);
            assert_eq!(buf, rmp_serde::to_vec(&value).unwrap(), "{value}");
            assert_eq!(Reader::new(&buf).uint(), Some(value));
        }
        for len in [0usize, 15, 16, 65_535, 65_536] {
            let mut buf = Vec::new();
            put_map_len(&mut buf, len);
            assert_eq!(Reader::new(&buf).map_len(), Some(len));
        }
    }

    #[test]
    fn truncated_or_other_forms_are_none() {
        assert_eq!(Reader::new(&[0xd9, 5, b'a']).str(), None);
        assert_eq!(Reader::new(&[0xa2, 0xff, 0xfe]).str(), None, "not UTF-8");
        assert_eq!(Reader::new(&[0xc5, 0]).bin(), None);
        assert_eq!(Reader::new(&[0xcf, 0, 0]).uint(), None);
        assert_eq!(Reader::new(&[0xff]).uint(), None, "a negative fixint");
        assert_eq!(Reader::new(&[]).map_len(), None);
        assert_eq!(Reader::new(&[0xc0]).opt_uint(), Some(None));
    }
}
