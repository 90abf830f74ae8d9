//! Open things counted per key against a most: a tenant's native API connections
//! (`--native-max-connections-per-tenant`), a source address's HTTP connections
//! (`--http-max-connections-per-source`). One key cannot take every place a global cap
//! leaves, and a closed one gives its place back.

use std::hash::Hash;
use std::sync::Arc;

use dashmap::DashMap;

/// How many are open per key; a key with none open holds no entry.
#[derive(Debug)]
pub(crate) struct OpenCounts<K: Eq + Hash>(DashMap<K, usize>);

impl<K: Eq + Hash> Default for OpenCounts<K> {
    fn default() -> Self {
        Self(DashMap::new())
    }
}

/// One open thing of `key`, counted until dropped.
#[derive(Debug)]
pub(crate) struct Counted<K: Eq + Hash> {
    all: Arc<OpenCounts<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> OpenCounts<K> {
    /// Counts one more open for `key`, unless it has `most` open already.
    pub(crate) fn open(self: &Arc<Self>, key: K, most: usize) -> Option<Counted<K>> {
        let mut open = self.0.entry(key.clone()).or_insert(0);
        if *open >= most {
            return None;
        }
        *open += 1;
        drop(open);
        Some(Counted { all: self.clone(), key })
    }

    /// How many `key` has open.
    #[cfg(test)]
    pub(crate) fn of(&self, key: &K) -> usize {
        self.0.get(key).map_or(0, |n| *n)
    }
}

impl<K: Eq + Hash> Drop for Counted<K> {
    fn drop(&mut self) {
        self.all.0.remove_if_mut(&self.key, |_, open| {
            *open = open.saturating_sub(1);
            *open == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_opens_at_most_its_most_and_a_closed_one_gives_its_place_back() {
        let counts = Arc::new(OpenCounts::<&str>::default());
        let a: Vec<_> = (0..3).filter_map(|_| counts.open("a", 2)).collect();
        assert_eq!(a.len(), 2, "the third is refused");
        let b = counts.open("b", 2).expect("another key has its own places");
        assert_eq!((counts.of(&"a"), counts.of(&"b")), (2, 1));
        drop(a);
        drop(b);
        assert!(counts.0.is_empty(), "keys with none open hold no entry");
        assert!(counts.open("a", 2).is_some());
    }
}
