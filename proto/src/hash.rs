//! A fast hasher for the maps the hot path looks up per message (pending requests by message id,
//! requests and connections by peer endpoint, metrics by method name). SipHash, the standard
//! one, guards against keys chosen to collide; these maps only ever hold keys this process chose
//! (its own message ids, the endpoints its callers name, the fixed method names), so a peer's
//! bytes can only be looked up in them, never grow a chain.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-rotate mixing as in rustc's FxHash.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.add(value.into());
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply only carries low bits upwards, and a message id's counter is stored
        // big-endian, in the high bytes of its last word: without this mix (splitmix64's) every
        // id would land in the same buckets.
        let mut z = self.hash;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_message_ids_spread_over_the_buckets() {
        let build = BuildHasherDefault::<FastHasher>::default();
        let buckets: std::collections::HashSet<u64> = (0..1024u64)
            .map(|n| build.hash_one(uuid::Uuid::from_u64_pair(0x1234_5678, n)) & 1023)
            .collect();
        // Random placement of 1024 keys in 1024 buckets fills about 63% of them.
        assert!(buckets.len() > 550, "{} buckets of 1024", buckets.len());
    }
}
